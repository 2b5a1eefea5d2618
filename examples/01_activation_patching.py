"""Tutorial 1: basic activation patching, on an IOI prompt.

Two prompts that differ only in the indirect-object (IO) name:

    base:   "Then, Mary and John went to the store. John gave a drink to"    -> " Mary"
    source: "Then, Alice and John went to the store. John gave a drink to"   -> " Alice"

Patching the source's residual stream (block_output) into the base run at the IO name's position tells us at
which layers the name is still read from there. Then a sweep over layers and components, once with the
pyvene-style API (one IntervenableModel per cell) and once with the one-call `activation_patch`, which must agree.

    python examples/01_activation_patching.py [--model ioi-gpt2] [--layer 1] [--out out/]
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
    p.add_argument("--layer", type=int, default=1, help="layer of the single patch (step 3)")
    p.add_argument("--out", default="out", help="folder for the figure")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    # 1. Load model (pyvene's create_gpt2_lm: bundled name, local dir or hub name) and tokenizer
    _, tokenizer, model = pv.create_gpt2_lm(args.model)

    # 2. Prepare inputs: the two prompts line up token by token
    base_io, source_io, s = "Mary", "Alice", "John"
    base_inputs = tokenizer(ioi_prompt(base_io, s), return_tensors="pt")
    source_inputs = tokenizer(ioi_prompt(source_io, s), return_tensors="pt")
    base_tok, source_tok = name_token(tokenizer, base_io), name_token(tokenizer, source_io)
    io_pos = base_inputs["input_ids"][0].tolist().index(base_tok)  # where the names differ
    n_layers = model.cfg.n_layers

    def show(label: str, logits: torch.Tensor) -> None:
        probs = torch.softmax(logits[0, -1], dim=-1)
        print(f"{label:<34} P({base_io})={probs[base_tok]:.4f}  P({source_io})={probs[source_tok]:.4f}")

    show("base run", model(**base_inputs).logits)
    show("source run", model(**source_inputs).logits)

    # 3. Define the intervention: patch block_output of one layer at the IO position
    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=args.layer, component="block_output", intervention_type=pv.VanillaIntervention)
    ])
    intervenable = pv.IntervenableModel(config, model)

    # 4. Run it. Without unit_locations every position is patched: the rest of the run is then the source run's.
    _, everywhere = intervenable(base=base_inputs, sources=[source_inputs])
    show(f"patched L{args.layer} block_output, all pos", everywhere.logits)
    torch.testing.assert_close(everywhere.logits, model(**source_inputs).logits, atol=1e-4, rtol=1e-4)
    _, patched = intervenable(base=base_inputs, sources=[source_inputs], unit_locations={"sources->base": io_pos})
    show(f"patched L{args.layer} block_output @ pos {io_pos}", patched.logits)

    # 5. Sweep: every layer x (residual stream at the IO position, whole attention output, whole MLP output).
    # Metric: logit(source IO) - logit(base IO); the base run is the "corrupted" run patched with "clean" values.
    def metric_of(logits: torch.Tensor) -> float:
        return float(logits[0, -1, source_tok] - logits[0, -1, base_tok])

    sweeps = {"block_output": ("resid_post", io_pos), "attention_output": ("attn_layer", None),
              "mlp_output": ("mlp_layer", None)}
    pyvene_grid = torch.zeros(n_layers, len(sweeps))
    for layer in range(n_layers):
        for j, (component, (_, pos)) in enumerate(sweeps.items()):
            iv = pv.IntervenableModel([pv.RepresentationConfig(layer, component)], model)  # Vanilla by default
            locations = None if pos is None else {"sources->base": pos}
            _, out = iv(base=base_inputs, sources=[source_inputs], unit_locations=locations)
            pyvene_grid[layer, j] = metric_of(out.logits)

    # The same numbers from the experiments toolkit: one call per kind, all cells in one batch.
    metric = logit_diff(source_tok, base_tok)
    results = {kind: activation_patch(model, source_inputs, base_inputs, metric, kind=kind)
               for kind, _ in sweeps.values()}
    toolkit_grid = torch.stack([results[kind].values[:, 0 if pos is None else pos]
                                for kind, pos in sweeps.values()], dim=1)
    torch.testing.assert_close(pyvene_grid, toolkit_grid, atol=1e-4, rtol=1e-4)

    resid = results["resid_post"]
    print(f"\nlogit({source_io}) - logit({base_io}): base {resid.corrupted:+.3f}, source {resid.clean:+.3f}")
    print(f"{'layer':>5}  " + "  ".join(f"{c:>16}" for c in sweeps))
    for layer in range(n_layers):
        print(f"{layer:>5}  " + "  ".join(f"{float(v):>+16.3f}" for v in pyvene_grid[layer]))
    print("pyvene-style loop and activation_patch agree")

    # 6. Figure: the full layers x positions sweep of the residual stream
    os.makedirs(args.out, exist_ok=True)
    resid.cols = [f"{i}:{tokenizer.decode(t).strip()}" for i, t in enumerate(base_inputs["input_ids"][0])]
    path = os.path.join(args.out, "activation_patching.png")
    resid.plot(path, title=f"logit({source_io}) - logit({base_io}) after {ioi_prompt(base_io, s)!r}, with one "
                           f"resid_post state patched in from the {source_io} prompt")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
