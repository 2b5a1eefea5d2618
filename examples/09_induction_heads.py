"""Tutorial 9: induction heads, found and explained end to end, on the bundled `induction-gpt2`.

A 2-layer GPT-2 (2 heads per layer) trained on random syllables whose second half repeats the first
(scripts/train_induction_model.py). Each step of the circuit's story is measured with the toolkit's own calls:

1. the behaviour: the loss falls from chance to near 0 on the repeated half;
2. attention patterns: a layer-0 head attends to the previous token, the layer-1 heads to the token after the
   earlier copy of the current token;
3. weights: the induction heads' keys read the previous-token head's output (K-composition of the FactoredMatrix
   views OV and QK), well above random matrices; their queries read the other layer-0 head, which attends to the
   current token (Q-composition), and their values read both layer-0 heads (V-composition);
4. ablation: mean-ablating the previous-token head and the induction head takes away most of what the repeat
   taught (the repeated-half loss goes most of the way back to chance);
5. path patching: the previous-token head matters through the induction head's keys;
6. contrast: the same analysis on `ioi-gpt2`, which never saw repeated sequences.

    python examples/09_induction_heads.py [--out out/]
"""

import argparse
import math

import torch

import hookvene as pv
from hookvene.experiments import path_patch
from hookvene.experiments.induction import (
    current_token_scores,
    half_losses,
    head_name,
    induction_analysis,
    induction_scores,
    mean_ablation_hooks,
    per_position_loss,
    prev_token_scores,
    random_composition_baseline,
    random_tokens,
)

parser = argparse.ArgumentParser(description="Induction heads on the bundled induction-gpt2")
parser.add_argument("--out", default="out")
parser.add_argument("--n", type=int, default=200, help="number of repeated random sequences")
args = parser.parse_args()
torch.set_grad_enabled(False)

# TransformerLens's weight processing, so that the weight views (step 3) include the LayerNorm scales.
model = pv.from_pretrained("induction-gpt2", fold_ln=True, center_writing_weights=True)
tokenizer = model.tokenizer
vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]  # the 100 syllables
HALF = 20
tokens = random_tokens(vocab, args.n, HALF, tokenizer.bos_token_id, torch.Generator().manual_seed(0))
print("A sequence:", model.to_string(tokens[0]))

# 1. The behaviour: the first half cannot be predicted (chance: ln 100); the repeated half can, from its 2nd token.
logits, cache = model.run_with_cache(tokens, return_type="logits")
first, repeated = half_losses(logits, tokens)
print(f"Loss on the first half: {first:.3f} (chance {math.log(len(vocab)):.3f}); on the repeated half: {repeated:.3f}")

# 2. Attention: each head's mean attention one step back, to the token after the earlier copy, and to itself.
patterns = torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)])  # layer batch head q k
prev, ind = prev_token_scores(patterns), induction_scores(patterns, HALF)
self_scores = current_token_scores(patterns)  # (layer, head): attention to q itself
for layer in range(model.cfg.n_layers):
    print(f"Layer {layer} previous-token scores:", " ".join(f"{s:.2f}" for s in prev[layer]),
          "| induction scores:", " ".join(f"{s:.2f}" for s in ind[layer]),
          "| current-token scores:", " ".join(f"{s:.2f}" for s in self_scores[layer]))
prev_head, cur_head = (0, int(prev[0].argmax())), (0, int(self_scores[0].argmax()))
ind_head = (1, int(ind[1].argmax()))
print(f"Previous-token head: {head_name(prev_head)} ({prev[prev_head]:.2f}); current-token head: "
      f"{head_name(cur_head)} ({self_scores[cur_head]:.2f}); induction heads: "
      + ", ".join(f"L1H{h} ({s:.2f})" for h, s in enumerate(ind[1]) if s >= 0.4) + f"; the best: {head_name(ind_head)}")

# 3. Weights: how much of each layer-0 head's output (OV) each layer-1 head reads through its keys, queries and
#    values (a composition score between 0 and 1), against random matrices of the same shapes.
baseline = random_composition_baseline(model.cfg.d_model, model.cfg.d_head)
print(f"Composition scores, layer-0 head -> layer-1 head (random matrices: mean {baseline.mean():.3f}, "
      f"95th percentile {baseline.quantile(0.95):.3f}):")
comps = {}
for mode, reads in (("K", "keys"), ("Q", "queries"), ("V", "values")):
    comps[mode] = comp = model.all_composition_scores(mode)[0, :, 1, :]  # (layer-0 head, layer-1 head)
    print(f"  {mode} ({reads}): " + "  ".join(f"L0H{a}->L1H{b} {comp[a, b]:.3f}" for a in range(comp.shape[0])
                                             for b in range(comp.shape[1])))
    print(f"    strongest into {head_name(ind_head)}'s {reads}: L0H{int(comp[:, ind_head[1]].argmax())}")


# 4. Ablation: replace a head's output by its mean over the batch (it then says nothing about these tokens).
def repeated_loss_with(heads: list) -> float:
    return float(half_losses(model.run_with_hooks(tokens, fwd_hooks=mean_ablation_hooks(heads)).logits, tokens)[1])


both = repeated_loss_with([prev_head, ind_head])
print(f"Mean-ablating {head_name(prev_head)} and {head_name(ind_head)}: repeated-half loss {repeated:.3f} -> "
      f"{both:.3f}")
print("Mean-ablating one head:", ", ".join(f"L{la}H{h} {repeated_loss_with([(la, h)]):.3f}"
                                             for la in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)))

# 5. Path patching: corrupted sequences have another first half. Patching one layer-0 head's corrupted output
#    into the induction head's keys only (everything else clean) shows which head the keys depend on.
corrupted = tokens.clone()
corrupted[:, 1:HALF + 1] = random_tokens(vocab, args.n, HALF, tokenizer.bos_token_id,
                                         torch.Generator().manual_seed(1))[:, 1:HALF + 1]


def repeated_half_loss(logits: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:  # per row, clean targets
    return per_position_loss(logits, tokens[ex])[:, HALF + 1:].mean(-1)


paths = path_patch(model, tokens, corrupted, repeated_half_loss, receivers=[("blocks.1.attn.hook_k", ind_head[1])],
                   senders=[(0, h) for h in range(model.cfg.n_heads)])
print(f"Path patching L0 heads -> {head_name(ind_head)} keys, repeated-half loss:",
      " ".join(f"L0H{h}={v:.3f}" for h, v in enumerate(paths.values[0])),
      f"(clean {paths.clean:.3f}, corrupted {paths.corrupted:.3f})")

# The one-call analysis (what `hookvene induction` runs) finds the same circuit and writes the figures.
report = induction_analysis(model, vocab, tokenizer.bos_token_id, n=args.n, half=HALF, out_dir=args.out,
                            model_name="induction-gpt2")
assert (report.prev_head, report.induction_head) == (prev_head, ind_head)
assert torch.allclose(report.prev_scores, prev) and torch.allclose(report.induction_scores, ind)
assert abs(report.circuit_ablation - both) < 1e-4
print(f"induction_analysis finds the same circuit: found = {report.found}")

# 6. Contrast: ioi-gpt2 was trained on IOI sentences only (its sequences here: 15 + 15 of its own tokens).
ioi = pv.from_pretrained("ioi-gpt2", fold_ln=True, center_writing_weights=True)
ioi_vocab = [i for i in range(len(ioi.tokenizer)) if i not in ioi.tokenizer.all_special_ids]
contrast = induction_analysis(ioi, ioi_vocab, ioi.tokenizer.bos_token_id, n=args.n, out_dir=args.out,
                              model_name="ioi-gpt2")
print(f"ioi-gpt2: first half {contrast.first_half_loss:.3f}, repeated half {contrast.repeated_half_loss:.3f} (chance "
      f"{contrast.chance_loss:.3f}); best induction score {float(contrast.induction_scores[1:].max()):.3f}; circuit "
      f"found: {contrast.found}")
for name, path in {**report.files, **{f"ioi-gpt2 {k}": v for k, v in contrast.files.items()}}.items():
    print(f"{name}: {path}")

p95 = float(baseline.quantile(0.95))
p, c, i = prev_head[1], cur_head[1], ind_head[1]  # the three heads of the circuit
chance = math.log(len(vocab))
lost = (both - repeated) / (chance - repeated)  # share of what the repeat taught that the ablation takes away
supported = (report.found and c != p and not contrast.found and lost > 0.5
             and comps["K"][p, i] > max(p95, comps["K"][c, i]) and comps["Q"][c, i] > max(p95, comps["Q"][p, i])
             and min(comps["V"][p, i], comps["V"][c, i]) > p95
             and paths.values[0][p] - paths.clean > 10 * abs(paths.values[0][c] - paths.clean))
if not supported:
    print("No finding: the numbers above do not show the circuit described in this script's docstring")
    raise SystemExit(0)
print(f"Finding: {head_name(prev_head)} (previous token) feeds {head_name(ind_head)}'s keys (K-composition "
      f"{comps['K'][p, i]:.3f}, against {comps['K'][c, i]:.3f} from {head_name(cur_head)}), {head_name(cur_head)} "
      f"(current token) its queries (Q {comps['Q'][c, i]:.3f}, against {comps['Q'][p, i]:.3f}), and both of them its "
      f"values (V {comps['V'][p, i]:.3f} and {comps['V'][c, i]:.3f}); random matrices score at most {p95:.3f} (95th "
      f"percentile). Mean-ablating {head_name(prev_head)} and {head_name(ind_head)} takes away {lost:.0%} of what "
      f"the repeat taught ({repeated:.3f} -> {both:.3f}, chance {chance:.3f}); through {head_name(ind_head)}'s keys "
      f"alone, {head_name(prev_head)}'s corrupted output raises the loss to {paths.values[0][p]:.3f}.")
