"""Tutorial 7: TransformerLens's IOI walkthrough (the "Exploratory Analysis Demo"), with TL's own calls.

Logit difference, logit lens, direct logit attribution per layer and per head, the attention of the top heads, and
activation patching of the residual stream, on the bundled model: the TL demo's steps in fewer lines. The model is
loaded with TL's weight processing, so attributions through the final LayerNorm sum to the logit difference.

    python examples/07_ioi_walkthrough.py [--out out/]
"""

import sys

import torch

import hookvene as pv
from hookvene import viz
from hookvene.experiments import activation_patch, metrics

out_dir = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "out"  # figures go there
torch.set_grad_enabled(False)

model = pv.from_pretrained("ioi-gpt2", fold_ln=True, center_writing_weights=True, center_unembed=True,
                           fold_value_biases=True)
model.set_use_attn_result(True)  # cache each head's output (hook_result)
pairs = [("Mary", "John"), ("Thomas", "James"), ("Sarah", "Daniel"), ("Martin", "Amy")]
names = [p for a, b in pairs for p in ((a, b), (b, a))]  # (indirect object = answer, subject), both orders
prompts = [f"When {io} and {s} went to the store, {s} gave a drink to" for io, s in names]
answer_ids = torch.tensor([[model.to_single_token(" " + n) for n in pair] for pair in names])
direction = torch.tensor([1.0, -1.0]) @ model.tokens_to_residual_directions(answer_ids)  # (prompt, d_model): IO - S
logits, cache = model.run_with_cache(prompts, return_type="logits")
logit_diff = float((logits[:, -1].gather(1, answer_ids) @ torch.tensor([1.0, -1.0])).mean())
print(f"Average logit difference: {logit_diff:.3f}")

# direct logit attribution: (components, batch, d_model) -> the mean logit difference each component writes
attribution = lambda stack: (cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) * direction).sum(-1).mean(-1)
resid, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
print("Logit lens (final = the logit difference):", *(f"{k}={v:.2f}" for k, v in zip(labels, attribution(resid))))
parts, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
per_part = attribution(parts)  # embed, pos_embed, then each layer's attn_out and mlp_out
print("Per-component attribution:", *(f"{k}={v:.2f}" for k, v in zip(labels, per_part)))  # they add up to it all
per_head = attribution(cache.stack_head_results(layer=-1, pos_slice=-1)).view(model.cfg.n_layers, -1)
viz.heatmap(per_head, list(map(str, range(len(per_head)))), list(map(str, range(per_head.shape[1]))), row_label="layer",
            col_label="head", center=0.0, cbar_label="logit diff (IO - S) written directly",
            title=f"Direct logit attribution per head, mean over {len(prompts)} prompts like {prompts[0]!r}",
            path=f"{out_dir}/ioi_head_attribution.png")
top_heads = [divmod(int(i), per_head.shape[1]) for i in per_head.flatten().abs().topk(3).indices]  # either sign
print("Top heads by direct logit attribution:", ", ".join(f"L{la}H{h}={per_head[la, h]:+.2f}" for la, h in top_heads))
assert abs(float(per_head.sum())) < 0.1 * logit_diff, "the finding below no longer holds"
print(f"Finding: the heads write {per_head.sum():+.2f} of the {logit_diff:.2f} directly, the MLPs "
      f"{per_part[3::2].sum():+.2f}: unlike GPT-2's name movers, this model's heads act through the MLPs after them")
io_pos, s_pos = model.get_token_position(" Mary", prompts[0]), model.get_token_position(" John", prompts[0])
for layer, head in top_heads:
    att = cache["pattern", layer][:, head, -1]  # from the final position
    print(f"L{layer}H{head} attends from the end to IO {att[:, io_pos].mean():.2f}, S1 {att[:, s_pos].mean():.2f}")
viz.attention_html(model.to_str_tokens(prompts[0]), torch.stack([cache["pattern", la][0, h] for la, h in top_heads]),
                   f"{out_dir}/ioi_top_heads.html", [f"L{la}H{h}" for la, h in top_heads])

corrupted = [prompts[i ^ 1] for i in range(len(prompts))]  # names in the other order: the answers swap
patched = activation_patch(model, model.to_tokens(prompts), model.to_tokens(corrupted),
                           metrics.logit_diff(answer_ids[:, 0], answer_ids[:, 1]), kind="resid_pre")
patched.plot(f"{out_dir}/ioi_patching.png", title="Patching resid_pre from each prompt into its name-swapped twin")
(layer, pos, value), = patched.top(1, by="toward")
print(f"Patching resid_pre restores most at layer {layer}, position {pos} ({value:.2f} of clean {patched.clean:.2f})")
