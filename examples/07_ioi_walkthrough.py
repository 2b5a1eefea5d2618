"""Tutorial 7: TransformerLens's IOI walkthrough (the "Exploratory Analysis Demo"), with TL's own calls.

Logit difference, logit lens, direct logit attribution per layer and per head, the attention of the top heads, and
activation patching of the residual stream, on the bundled model: the TL demo's steps in fewer lines. The model is
loaded with TL's weight processing, so attributions through the final LayerNorm sum to the logit difference.

    python examples/07_ioi_walkthrough.py [--out out/]
"""

import argparse
import os

import torch

import hookvene as pv
from hookvene import viz
from hookvene.experiments import activation_patch, metrics

parser = argparse.ArgumentParser(description="TransformerLens's IOI walkthrough")
out_dir = parser.add_argument("--out", default="out") and parser.parse_args().out
os.makedirs(out_dir, exist_ok=True)
torch.set_grad_enabled(False)

model = pv.from_pretrained("ioi-gpt2", fold_ln=True, center_writing_weights=True, center_unembed=True,
                           fold_value_biases=True)
model.set_use_attn_result(True)  # cache each head's output (hook_result)
names = [("Mary", "John"), ("John", "Mary"), ("Thomas", "James"), ("James", "Thomas"), ("Sarah", "Daniel"),
         ("Daniel", "Sarah"), ("Martin", "Amy"), ("Amy", "Martin")]  # (indirect object = answer, subject)
prompts = [f"When {io} and {s} went to the store, {s} gave a drink to" for io, s in names]
answer_ids = torch.tensor([[model.to_single_token(" " + n) for n in pair] for pair in names])
directions = model.tokens_to_residual_directions(answer_ids)  # (prompt, 2, d_model)
direction = directions[:, 0] - directions[:, 1]
logits, cache = model.run_with_cache(prompts, return_type="logits")
answer_logits = logits[:, -1].gather(1, answer_ids)
logit_diff = (answer_logits[:, 0] - answer_logits[:, 1]).mean()
print(f"Average logit difference: {logit_diff:.3f}")


def attribution(stack: torch.Tensor) -> torch.Tensor:  # (components, batch, d_model) -> mean logit diff written
    return (cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) * direction).sum(-1).mean(-1)


resid, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
lens = attribution(resid)
assert abs(lens[-1] - logit_diff) < 1e-3  # processed weights: the final residual accounts for all of it
print("Logit lens (final = the logit difference):", " ".join(f"{lbl}={v:.2f}" for lbl, v in zip(labels, lens)))
parts, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
print("Per-component attribution:", " ".join(f"{lbl}={v:.2f}" for lbl, v in zip(labels, attribution(parts))))
assert abs(attribution(parts).sum() - logit_diff) < 1e-3  # the components add up (output biases centred away)

per_head = attribution(cache.stack_head_results(layer=-1, pos_slice=-1)).view(model.cfg.n_layers, -1)
viz.heatmap(per_head, [str(i) for i in range(len(per_head))], [str(h) for h in range(per_head.shape[1])],
            row_label="layer", col_label="head", center=0.0, cbar_label="logit diff (IO - S) written directly",
            title=f"Direct logit attribution per head, mean over {len(prompts)} prompts like {prompts[0]!r}",
            path=os.path.join(out_dir, "ioi_head_attribution.png"))
top_heads = [divmod(int(i), per_head.shape[1]) for i in per_head.flatten().abs().topk(3).indices]  # either sign
print("Top heads by direct logit attribution:", ", ".join(f"L{la}H{h}={per_head[la, h]:+.2f}" for la, h in top_heads))
mlps = sum(float(v) for lbl, v in zip(labels, attribution(parts)) if lbl.endswith("mlp_out"))
if abs(float(per_head.sum())) < 0.1 * float(logit_diff):
    print(f"Finding: the heads write {float(per_head.sum()):+.2f} of the {float(logit_diff):.2f} directly, the MLPs "
          f"{mlps:+.2f}: unlike GPT-2's name movers, this model's heads (which patching shows matter) act through the "
          f"MLPs after them, not on the logits")
else:
    print(f"No finding: the heads write {float(per_head.sum()):+.2f} of the {float(logit_diff):.2f} directly")
io_pos, s_pos = model.get_token_position(" Mary", prompts[0]), model.get_token_position(" John", prompts[0])
for layer, head in top_heads:
    att = cache["pattern", layer][:, head, -1]  # from the final position
    print(f"L{layer}H{head} attends from the end to IO {att[:, io_pos].mean():.2f}, S1 {att[:, s_pos].mean():.2f}")
viz.attention_html(model.to_str_tokens(prompts[0]), torch.stack([cache["pattern", la][0, h] for la, h in top_heads]),
                   os.path.join(out_dir, "ioi_top_heads.html"), [f"L{la}H{h}" for la, h in top_heads])

corrupted = [prompts[i ^ 1] for i in range(len(prompts))]  # names in the other order: the answers swap
patched = activation_patch(model, model.to_tokens(prompts), model.to_tokens(corrupted),
                           metrics.logit_diff(answer_ids[:, 0], answer_ids[:, 1]), kind="resid_pre")
patched.cols = [f"{i}:{t}" for i, t in enumerate(model.to_str_tokens(prompts[0]))]  # one template: positions align
patched.plot(os.path.join(out_dir, "ioi_patching.png"),
             title=f"Patching resid_pre from each prompt (e.g. {prompts[0]!r}) into its name-swapped twin")
(layer, pos, value), = patched.top(1, by="toward")
print(f"Patching resid_pre restores most at layer {layer}, position {pos} "
      f"({value:.2f} of clean {patched.clean:.2f})")
