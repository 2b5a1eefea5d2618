"""Tutorial 2: causal tracing (ROME-style), on an IOI prompt.

    clean:  "Then, Mary and John went to the store. John gave a drink to"   -> P(" Mary")

Corrupt the IO name's embedding with Gaussian noise (3 x the embedding std), then restore the clean residual
stream (block_output) of one layer at one position: where restoring brings P(IO) back, that state carries the
answer. The sweep runs once with the pyvene-style API and once with the one-call `causal_trace`, which agree
cell for cell (they are given the same noise draws).

    python examples/02_causal_tracing.py [--model ioi-gpt2] [--samples 10] [--out out/]
"""

import argparse
import os

import torch

import hookvene as pv
from hookvene.experiments.causal_tracing import causal_trace, embedding_noise_scale
from hookvene.experiments.ioi import TEMPLATES, name_token


def ioi_prompt(io: str, s: str, template: int = 0) -> str:
    """An ABBA IOI prompt: "Then, [IO] and [S] went to the store. [S] gave a drink to"."""
    t = TEMPLATES["ABBA"][template]
    return t.replace("[A]", io).replace("[B]", s).replace("[PLACE]", "store").replace("[OBJECT]", "drink")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ioi-gpt2", help="bundled model name, local checkpoint dir, or 'gpt2'")
    p.add_argument("--samples", type=int, default=10, help="noise draws averaged per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="folder for the figure")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    _, tokenizer, model = pv.create_gpt2_lm(args.model)

    # 1. The prompt, the corrupted "subject" (the IO name) and the traced answer
    io, s = "Mary", "John"
    clean_inputs = tokenizer(ioi_prompt(io, s), return_tensors="pt")
    target = name_token(tokenizer, io)
    ids = clean_inputs["input_ids"]
    subject = [ids[0].tolist().index(target)]  # position(s) to corrupt
    last = ids.shape[1] - 1
    n, d_model, n_layers = args.samples, model.cfg.d_model, model.cfg.n_layers

    # 2. Clean baseline
    clean_prob = torch.softmax(model(**clean_inputs).logits[0, -1], dim=-1)[target].item()
    print(f"Clean P({io}): {clean_prob:.4f}")

    # The corruption. pyvene's NoiseIntervention draws fresh noise on each call (shown first); to compare cell by
    # cell with `causal_trace` we hand the *same* draws to an AdditionIntervention as a constant source.
    scale = embedding_noise_scale(model)  # 3 x std of the token embeddings
    batch = {k: v.expand(n, -1) for k, v in clean_inputs.items()}  # one row per noise sample
    noise_iv = pv.NoiseIntervention(noise_level=scale, seed=args.seed)
    noiser = pv.IntervenableModel([pv.RepresentationConfig(0, "block_input", intervention=noise_iv)], model)
    _, out = noiser(base=batch, unit_locations={"base": subject})
    print(f"Corrupted P({io}), NoiseIntervention: {out.logits[:, -1].softmax(-1)[:, target].mean():.4f}")

    generator = torch.Generator().manual_seed(args.seed)  # causal_trace's draws: (samples, subject tokens, d)
    noise = torch.randn(n, len(subject), d_model, generator=generator) * scale

    noise_rep = pv.RepresentationConfig(0, "block_input", intervention_type=pv.AdditionIntervention,
                                        max_number_of_units=len(subject))
    adder = pv.IntervenableModel([noise_rep], model)
    _, out = adder(base=batch, source_representations=noise, unit_locations={"base": subject})
    corrupted_prob = out.logits[:, -1].softmax(-1)[:, target].mean().item()
    print(f"Corrupted P({io}), same draws as causal_trace: {corrupted_prob:.4f}\n")

    # 3. Sweep over layers: add the noise at the input, restore the clean block_output at (layer, position)
    def restored_prob(layer: int, pos: int) -> float:
        config = pv.IntervenableConfig(representations=[
            noise_rep,  # corrupt the subject ...
            pv.RepresentationConfig(layer, "block_output", intervention_type=pv.VanillaIntervention),  # ... restore
        ])
        intervenable = pv.IntervenableModel(config, model)
        locations = [[subject] * n, [[pos]] * n]  # per intervention, per example: the positions
        _, outputs = intervenable(
            base=batch,
            sources=[None, batch],  # the noise reads no source run; restoring reads the clean run
            source_representations=[noise, None],
            unit_locations={"sources->base": (locations, locations)},
        )
        return outputs.logits[:, -1].softmax(-1)[:, target].mean().item()

    results = {}
    for pos, where in ((subject[-1], "the IO name"), (last, "the last token")):
        results[pos] = torch.tensor([restored_prob(layer, pos) for layer in range(n_layers)])
        for layer, prob in enumerate(results[pos]):
            print(f"Restore layer {layer} at {where} (pos {pos}): P({io}) = {prob:.4f}")

    # 4. What the numbers show: the share of the drop in P(IO) that restoring one state brings back. A layer is
    # only called critical if it stands out from the others; with no drop, there is nothing to trace.
    gap = clean_prob - corrupted_prob
    print()
    if gap < 0.01:
        print(f"The noise barely changes P({io}) ({gap:+.4f}): this model gives no drop to trace")
    else:
        share = {pos: (probs - corrupted_prob) / gap for pos, probs in results.items()}
        for pos, where in ((subject[-1], "the IO name"), (last, "the last token")):
            spread = float(share[pos].max() - share[pos].min())
            if spread < 0.1:
                print(f"At {where}, restoring any layer brings back {float(share[pos].mean()):.0%} of the drop "
                      f"(spread {spread:.1%} across layers): no layer stands out")
            else:
                ranked = share[pos].sort(descending=True)
                listing = ", ".join(f"layer {i}: {float(x):.0%}" for i, x in enumerate(share[pos]))
                if float(ranked.values[0] - ranked.values[1]) >= 0.1:  # ahead of every other layer by 10 points
                    print(f"At {where}, layer {int(ranked.indices[0])} stands out ({listing} of the drop restored)")
                else:
                    print(f"At {where}, restoring brings back {listing} of the drop: no single layer stands out")
        if float(share[last].min()) > 0.9 and float(share[subject[-1]].max()) < 0.1:
            print(f"Finding: the answer leaves the IO name within layer 0. Restoring the last token's state after any "
                  f"layer recovers P({io}); restoring the name's own state after layer 0 does not: the last token "
                  f"reads the name in layer 0, and what later layers read there does not bring the answer back.")
        else:
            print("No finding beyond the lines above")

    # The same grid, every layer x position, from the experiments toolkit in one call
    trace = causal_trace(model, ids, subject, target, kind="resid_post", n_samples=n, seed=args.seed)
    assert abs(trace.clean - clean_prob) < 1e-5 and abs(trace.corrupted - corrupted_prob) < 1e-5
    for pos, probs in results.items():
        torch.testing.assert_close(trace.values[:, pos], probs, atol=1e-5, rtol=1e-4)
    print("pyvene-style loop and causal_trace agree")
    print(trace.table())

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "causal_tracing.png")
    trace.plot(path, title=f"P({io!r}) after {ioi_prompt(io, s)!r}: IO name noised (*), block_output restored at "
                           f"one (layer, position); clean {trace.clean:.3f}, noised {trace.corrupted:.3f}")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
