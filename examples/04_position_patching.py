"""Tutorial 4: position-specific interventions, on IOI prompts with all names changed.

    base:   "Then, Mary and John went to the store. John gave a drink to"     -> " Mary"
    source: "Then, Alice and David went to the store. David gave a drink to"  -> " Alice"

Patch the source's residual stream (block_output) into the base at one position (the first name), then at
several (both names of the first clause), then at every position in turn: which position's state decides the
answer at this layer? The per-position sweep runs once with the pyvene-style API and once as one row of the
toolkit's `activation_patch(kind="resid_post")`, which must agree.

    python examples/04_position_patching.py [--model ioi-gpt2] [--layer 1] [--out out/]
"""

import argparse
import os

import torch

import hookvene as pv
from hookvene.experiments.ioi import TEMPLATES, name_token
from hookvene.experiments.metrics import logit_diff
from hookvene.experiments.patching import activation_patch


def ioi_prompt(io: str, s: str, template: int = 0) -> str:
    """An ABBA IOI prompt: "Then, [IO] and [S] went to the store. [S] gave a drink to"."""
    t = TEMPLATES["ABBA"][template]
    return t.replace("[A]", io).replace("[B]", s).replace("[PLACE]", "store").replace("[OBJECT]", "drink")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ioi-gpt2", help="bundled model name, local checkpoint dir, or 'gpt2'")
    p.add_argument("--layer", type=int, default=1, help="block_output layer to patch")
    p.add_argument("--out", default="out", help="folder for the figure")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    _, tokenizer, model = pv.create_gpt2_lm(args.model)

    # 1. Setup
    base_inputs = tokenizer(ioi_prompt("Mary", "John"), return_tensors="pt")
    source_inputs = tokenizer(ioi_prompt("Alice", "David"), return_tensors="pt")
    mary, alice = name_token(tokenizer, "Mary"), name_token(tokenizer, "Alice")
    tokens = [tokenizer.decode(t).strip() for t in base_inputs["input_ids"][0]]
    first_name = tokens.index("Mary")
    second_name = tokens.index("John")

    # 2. Position-specific config
    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(
            layer=args.layer,
            component="block_output",
            intervention_type=pv.VanillaIntervention,
            unit="pos",
            max_number_of_units=1,  # a Vanilla intervention acts on each position separately: any number works
        )
    ])
    intervenable = pv.IntervenableModel(config, model)

    def report(label: str, logits: torch.Tensor) -> float:
        last = logits[0, -1]
        probs = last.softmax(-1)
        print(f"{label:<42} P(Mary)={probs[mary]:.4f}  P(Alice)={probs[alice]:.4f}  "
              f"logit diff {last[alice] - last[mary]:+.3f}")
        return float(last[alice] - last[mary])

    report("base", model(**base_inputs).logits)
    report("source", model(**source_inputs).logits)

    # 3. Intervene at the first name's position only (source position -> base position, per example)
    _, outputs = intervenable(
        base=base_inputs,
        sources=[source_inputs],
        unit_locations={"sources->base": ([[[first_name]]], [[[first_name]]])},
    )
    report(f"patched L{args.layer} at pos {first_name} ({tokens[first_name]})", outputs.logits)

    # 4. Intervene at multiple positions
    both = [first_name, second_name]
    _, outputs = intervenable(
        base=base_inputs,
        sources=[source_inputs],
        unit_locations={"sources->base": ([[both]], [[both]])},
    )
    report(f"patched L{args.layer} at pos {both}", outputs.logits)

    # 5. Every position in turn (the shorthand `{"sources->base": pos}` means the same position on both sides)
    print(f"\nlogit(Alice) - logit(Mary) with one position of layer {args.layer} patched:")
    sweep = []
    for pos, tok in enumerate(tokens):
        _, outputs = intervenable(base=base_inputs, sources=[source_inputs], unit_locations={"sources->base": pos})
        last = outputs.logits[0, -1]
        sweep.append(float(last[alice] - last[mary]))
        print(f"  pos {pos:>2} {tok!r:<16} {sweep[-1]:+.3f}")

    # The toolkit's sweep: every layer x position in one batched call; row `layer` is the loop above
    result = activation_patch(model, source_inputs, base_inputs, logit_diff(alice, mary), kind="resid_post")
    torch.testing.assert_close(result.values[args.layer], torch.tensor(sweep), atol=1e-4, rtol=1e-4)
    print("pyvene-style loop and activation_patch agree")

    os.makedirs(args.out, exist_ok=True)
    result.cols = [f"{i}:{t}" for i, t in enumerate(tokens)]
    path = os.path.join(args.out, "position_patching.png")
    result.plot(path, title=f"logit(Alice) - logit(Mary) after {ioi_prompt('Mary', 'John')!r}, one position of "
                            f"block_output (resid_post) patched in from {ioi_prompt('Alice', 'David')!r}")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
