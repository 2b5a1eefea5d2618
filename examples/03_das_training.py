"""Tutorial 3: a trainable intervention (distributed alignment search, DAS), on IOI.

Base and source prompts use the same two names but repeat a different one, so their answers (the IO name) swap:

    base:   "Then, Mary and John went to the store. John gave a drink to"   -> " Mary"
    source: "Then, Mary and John went to the store. Mary gave a drink to"   -> " John"

The variable is "which name to answer". We learn a low-dimensional subspace of the residual stream (block_output)
at the final position such that swapping just that subspace from the source into the base makes the model answer
the source's IO name. Interchange-intervention accuracy (IIA) on held-out pairs (name pairs never seen in training)
says how well the subspace carries the variable, between two references: swapping the whole vector (the upper
bound: everything the final position holds) and the same rotation untrained (the floor).

The bundled model holds the answer at the final position as a name vector, one of 40 names, not as one number:
with these settings one direction reaches about 2% IIA, 4 dimensions about 40%, and 16 of its 128 dimensions
100%, the full-vector bound. So the default is 16 (`--dim`).

    python examples/03_das_training.py [--model ioi-gpt2] [--layer 2] [--dim 16] [--steps 60] [--out out/]
"""

import argparse
import os

import torch

import hookvene as pv
from hookvene.experiments.ioi import corrupt, make_ioi_dataset, tokenize_ioi


def pairs(n: int, seed: int, tokenizer, names: str) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """(base inputs, source inputs, base answer ids, counterfactual answer ids) for n pairs of one template, with
    name pairs from the training or the held-out split (`names`)."""
    clean = make_ioi_dataset(n, seed=seed, templates=[0], names=names)  # one template: prompts have the same length
    base = tokenize_ioi(clean, tokenizer)
    source = tokenize_ioi(corrupt(clean, "swap_io_s"), tokenizer)  # repeats IO instead of S: answer = base's S
    keep = ("input_ids", "attention_mask")
    return {k: base[k] for k in keep}, {k: source[k] for k in keep}, base["io_ids"], base["s_ids"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ioi-gpt2", help="bundled model name, local checkpoint dir, or 'gpt2'")
    p.add_argument("--layer", type=int, default=None, help="block_output layer (default: the middle one)")
    p.add_argument("--dim", type=int, default=16, help="dimensions of the learned subspace")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--batch", type=int, default=32, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; for the small bundled model one is fastest (and far faster on busy cores)")
    p.add_argument("--out", default="out", help="folder for the figure and the saved intervention")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, tokenizer, model = pv.create_gpt2_lm(args.model)
    layer = model.cfg.n_layers // 2 if args.layer is None else args.layer

    # 1. Define the trainable intervention: a low-rank rotated subspace at one layer's block_output
    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(
            layer=layer,
            component="block_output",
            intervention_type=pv.LowRankRotatedSpaceIntervention,
            low_rank_dimension=args.dim,  # learn a subspace of this many dimensions
        )
    ])
    intervenable = pv.IntervenableModel(config, model)
    intervenable.disable_model_gradients()  # train the rotation only (pyvene freezes the model at construction)

    # 2. Optimizer over the intervention's parameters
    optimizer = torch.optim.Adam(intervenable.get_trainable_parameters(), lr=args.lr)

    # 3. Training and evaluation pairs (held-out seed)
    train_base, train_source, _, train_target = pairs(args.steps * args.batch, 1, tokenizer, names="train")
    test_base, test_source, test_answer, test_target = pairs(256, 2, tokenizer, names="heldout")
    last = train_base["input_ids"].shape[1] - 1
    at_last = {"sources->base": last}  # the final position, in source and base

    def iia(wrapper: pv.IntervenableModel = intervenable) -> float:
        """Interchange-intervention accuracy: the intervened model prefers the source's answer to the base's."""
        with torch.no_grad():
            _, out = wrapper(base=test_base, sources=[test_source], unit_locations=at_last)
        logits = out.logits[:, -1]
        rows = torch.arange(len(logits))
        return (logits[rows, test_target] > logits[rows, test_answer]).float().mean().item()

    print(f"DAS at layer {layer} block_output, final position (pos {last}), {args.dim} of {model.cfg.d_model} "
          f"dimensions; IIA on {len(test_target)} held-out pairs")
    upper = iia(pv.IntervenableModel([pv.RepresentationConfig(layer, "block_output")], model))  # whole vector
    floor = iia()
    print(f"IIA, full-vector interchange (upper bound): {upper:.1%}")
    print(f"IIA before training (untrained rotation, the floor): {floor:.1%}")

    # 4. Training loop: maximise P(counterfactual answer) under the intervention
    losses = []
    for step in range(args.steps):
        rows = slice(step * args.batch, (step + 1) * args.batch)
        base = {k: v[rows] for k, v in train_base.items()}
        source = {k: v[rows] for k, v in train_source.items()}
        optimizer.zero_grad()
        _, outputs = intervenable(base=base, sources=[source], unit_locations=at_last)
        logits = outputs.logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, train_target[rows])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            prob = logits.detach().softmax(-1).gather(1, train_target[rows, None]).mean().item()
            print(f"Step {step}: loss={loss.item():.4f}, P(counterfactual name)={prob:.4f}")
    trained = iia()
    print(f"IIA after training: {trained:.1%}")
    if trained >= 0.9 and trained > floor + 0.5:
        print(f"Finding: a {args.dim}-d subspace at layer {layer} carries which name the model answers: swapping it "
              f"alone gives {trained:.0%} IIA on held-out pairs (whole vector: {upper:.0%}, untrained: {floor:.0%})")
    else:
        print(f"No finding: the learned subspace reaches {trained:.0%} IIA (whole vector {upper:.0%}, untrained "
              f"{floor:.0%}); try more dimensions (--dim), steps or another layer")

    # 5. Analyze the learned rotation (pyvene's older dotted key works too)
    rotation = intervenable.interventions[f"layer.{layer}.comp.block_output.unit.pos.nunit.1#0"][0]
    w = rotation.rotate_layer.weight.detach()  # (d_model, dim), orthonormal columns
    print(f"Learned rotation shape: {tuple(w.shape)}, norm {w.norm():.4f}")

    # Check: the intervention is  b + ((s - b) . w) w  at the final position, nothing elsewhere
    name = f"blocks.{layer}.hook_resid_post"  # the hook behind block_output
    with torch.no_grad():
        _, cache = model.run_with_cache(**test_source, names_filter=[name])

        def swap_direction(x: torch.Tensor, hook) -> torch.Tensor:
            x = x.clone()
            x[:, last] += ((cache[name][:, last] - x[:, last]) @ w) @ w.T
            return x

        by_hand = model.run_with_hooks(**test_base, fwd_hooks=[(name, swap_direction)]).logits
        _, out = intervenable(base=test_base, sources=[test_source], unit_locations=at_last)
    torch.testing.assert_close(out.logits, by_hand, atol=1e-4, rtol=1e-4)
    print("matches b + ((s - b) . w) w applied by hand")

    # Save, reload, and get the same intervened outputs
    os.makedirs(args.out, exist_ok=True)
    save_dir = os.path.join(args.out, "das_intervention")
    intervenable.save(save_dir)
    reloaded = pv.IntervenableModel.load(save_dir, model)
    with torch.no_grad():
        _, again = reloaded(base=test_base, sources=[test_source], unit_locations=at_last)
    torch.testing.assert_close(again.logits, out.logits)
    print(f"saved and reloaded: {save_dir}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy of the counterfactual name")
    ax.set_title(f"DAS, {args.dim}-d subspace at layer {layer} block_output, final position")
    fig.tight_layout()
    path = os.path.join(args.out, "das_training.png")
    fig.savefig(path, dpi=100)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
