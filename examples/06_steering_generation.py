"""Tutorial 6: generation with interventions (activation steering), on IOI-style text.

The steering direction is the difference of mean MLP outputs (one layer, averaged over positions) between IOI
prompts that only use 12 women's names and prompts that only use 12 men's names. The bundled model has no notion
of gender (its training names are random), so the direction is simply "these 12 names rather than those": it is
made of the names' own representations. Adding it at every position of every generation step pushes the answer
towards the first set, although the prompt names two men. Generation runs through `IntervenableModel.generate`,
with the unsteered continuation from the same sampling seed next to it.

The default strength matters: on the bundled model alpha 4 at layer 1 leaves the continuation unchanged (P of the
women's names 0.003), while alpha 16 at layer 0 (the default) makes a woman's name the greedy answer.

    python examples/06_steering_generation.py [--model ioi-gpt2] [--layer 0] [--alpha 16] [--out out/]
"""

import argparse
import os

import torch

import hookvene as pv
from hookvene.experiments.ioi import make_ioi_dataset, name_token, tokenize_ioi

WOMEN = ("Alice", "Amy", "Anna", "Emily", "Jane", "Jennifer", "Kate", "Laura", "Lisa", "Mary", "Rachel", "Sarah")
MEN = ("Aaron", "Adam", "Andrew", "Arthur", "Brian", "Charles", "Daniel", "David", "Edward", "Eric", "Frank", "George")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ioi-gpt2", help="bundled model name, local checkpoint dir, or 'gpt2'")
    p.add_argument("--layer", type=int, default=0, help="mlp_output layer to steer")
    p.add_argument("--alpha", type=float, default=16.0, help="steering strength (multiple of the direction)")
    p.add_argument("--prompt", default="Then, John and Michael went to the store. John gave a drink to")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="folder for the figure")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    _, tokenizer, model = pv.create_gpt2_lm(args.model)

    # 1. Get the steering direction (women's names vs men's names) from collected activations
    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=args.layer, component="mlp_output", intervention_type=pv.CollectIntervention)
    ])
    collector = pv.IntervenableModel(config, model)

    def mean_mlp_output(names: tuple[str, ...]) -> torch.Tensor:
        batch = tokenize_ioi(make_ioi_dataset(32, seed=0, names=list(names)), tokenizer)
        mask = batch["attention_mask"]
        (_, acts), _ = collector(base={"input_ids": batch["input_ids"], "attention_mask": mask})
        acts = torch.stack(acts)  # (batch, pos, d_model): pyvene's list holds one tensor per example
        return (acts * mask[..., None]).sum((0, 1)) / mask.sum()  # mean over real tokens

    steering_direction = mean_mlp_output(WOMEN) - mean_mlp_output(MEN)
    print(f"steering direction at layer {args.layer} mlp_output: norm {steering_direction.norm():.3f}")

    # 2. Config for steering during generation: add a constant vector (no source run)
    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=args.layer, component="mlp_output", intervention_type=pv.AdditionIntervention)
    ])
    intervenable = pv.IntervenableModel(config, model)
    steer = args.alpha * steering_direction

    # 3. Generate with steering (every position of the prompt and of each new token), and without
    inputs = tokenizer(args.prompt, return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    new_tokens = min(args.new_tokens, model.cfg.n_ctx - n_prompt)
    unsteered, steered = intervenable.generate(
        inputs,
        source_representations=steer,
        output_original_output=True,  # also the unsteered continuation, with the same sampling seed
        max_new_tokens=new_tokens,
        do_sample=True,
        temperature=0.7,
        seed=args.seed,
    )
    print(f"prompt:    {args.prompt!r}")
    print(f"unsteered: {tokenizer.decode(unsteered[0, n_prompt:])!r}")
    print(f"steered:   {tokenizer.decode(steered[0, n_prompt:])!r}")

    # Greedy decoding gives the same tokens as adding the vector with a plain hook on every forward pass
    _, greedy = intervenable.generate(inputs, source_representations=steer, max_new_tokens=new_tokens)
    hook = (f"blocks.{args.layer}.hook_mlp_out", lambda x, hook: x + steer)
    with model.hooks(fwd_hooks=[hook]):
        by_hand = model.generate(inputs["input_ids"], max_new_tokens=new_tokens)
    assert torch.equal(greedy, by_hand)
    plain = model.generate(inputs["input_ids"], max_new_tokens=new_tokens)
    print(f"greedy unsteered: {tokenizer.decode(plain[0, n_prompt:])!r}")
    print(f"greedy steered: {tokenizer.decode(greedy[0, n_prompt:])!r} (same as a hand-written hook)")

    # 4. How much next-token probability goes to each set of names, as the strength grows
    women = [name_token(tokenizer, n) for n in WOMEN]
    men = [name_token(tokenizer, n) for n in MEN]
    alphas = [0.0, args.alpha / 4, args.alpha / 2, args.alpha, 2 * args.alpha]
    mass, gaps = [], []
    for alpha in alphas:
        _, out = intervenable(base=inputs, source_representations=alpha * steering_direction)
        logits = out.logits[0, -1]
        probs = logits.softmax(-1)
        mass.append((probs[women].sum().item(), probs[men].sum().item()))
        gaps.append((logits[women].mean() - logits[men].mean()).item())  # the target logit: women's over men's names
        print(f"alpha {alpha:5.1f}: P(women's names) = {mass[-1][0]:.4f}  P(men's names) = {mass[-1][1]:.4f}  "
              f"mean logit women - men = {gaps[-1]:+.2f}")
    at = alphas.index(args.alpha)
    first_word = tokenizer.decode(greedy[0, n_prompt]).strip()
    if first_word in WOMEN and not torch.equal(greedy, plain) and mass[at][0] > 10 * mass[0][0]:
        print(f"Finding: at alpha {args.alpha:g} the greedy answer becomes {first_word!r} (unsteered "
              f"{tokenizer.decode(plain[0, n_prompt]).strip()!r}), P(women's names) rises from {mass[0][0]:.3f} to "
              f"{mass[at][0]:.3f} and their mean logit over the men's names from {gaps[0]:+.2f} to {gaps[at]:+.2f}")
    else:
        print(f"No finding: at alpha {args.alpha:g} the greedy answer is {first_word!r} and P(women's names) "
              f"{mass[at][0]:.3f} (unsteered {mass[0][0]:.3f}); try a larger --alpha or another --layer")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(alphas, [w for w, _ in mass], "o-", label="women's names")
    ax.plot(alphas, [m for _, m in mass], "o-", label="men's names")
    ax.set_xlabel("steering strength alpha")
    ax.set_ylabel("next-token probability")
    ax.set_title(f"Steering at layer {args.layer} mlp_output\n{args.prompt!r}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "steering.png")
    fig.savefig(path, dpi=100)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
