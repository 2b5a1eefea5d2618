"""pyvene component names -> hookvene hook names, per architecture.

A component resolves to a `Site`: the hook it reads and writes, and how pyvene *viewed* that tensor, so the shapes
an intervention sees match pyvene's (e.g. `head_attention_value_output` is `attn.hook_z`, stored as
(batch, pos, head, d_head), seen as (batch, head, pos, d_head)). Views:

    flat         the hook tensor as is: (batch, pos, d) for streams, (batch, d) per step for the GRU
    merge_heads  (batch, pos, head, d_head) seen as (batch, pos, head * d_head)     e.g. query_output
    heads        (batch, pos, head, d_head) seen as (batch, head, pos, d_head)      e.g. head_query_output
    pattern      the attention pattern (batch, head, q_pos, k_pos) as is          attention_weight
    step         the GRU's per-step tensor (batch, d); with `gate`, one third of the fused x2h / h2h projections

Units name view dimensions: `pos` -> 1 on flat/merge_heads views; `h` -> 1 and `h.pos` -> (1, 2) on heads and
pattern views (for attention_weight `h.pos` selects heads, then query positions); `t` -> the GRU time step.
Unlike pyvene, `pos` on a head component is an error instead of silently indexing heads.

Each architecture's table is a literal dict below (component -> Site), registered for its model classes in
`type_to_module_mapping` when this module is imported; users can add aliases there, or register module paths for a
model hookvene does not implement (pyvene's extension point, with `type_to_dimension_mapping` for the sizes).
"""

import re
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from hookvene.hooks import unknown_name_error
from hookvene.models import (
    GPT2,
    GPT2LM,
    GRU,
    GRULM,
    MLP,
    T5,
    T5LM,
    GPTNeo,
    GPTNeoLM,
    GPTNeoX,
    GPTNeoXLM,
    GRUClassifier,
    Llama,
    LlamaLM,
    MLPClassifier,
)

VIEW_UNITS: dict[str, dict[str, tuple[int, ...]]] = {
    "flat": {"pos": (1,)},
    "merge_heads": {"pos": (1,)},
    "heads": {"h": (1,), "h.pos": (1, 2)},
    "pattern": {"h": (1,), "h.pos": (1, 2)},
    "step": {"t": ()},
}


@dataclass(frozen=True)
class Site:
    """Where an intervention acts: one hook (or, for registered foreign models, one module's input/output).

    In the component tables `hook` and `skip_from` are templates with `{layer}` and `dim` is a config expression
    (`"d_model"`, `"n_heads*d_head"`); `at(layer, cfg)` fills them in for one layer of one model."""

    hook: str
    view: str = "flat"
    dim: str | int | None = None  # width of one unit (pyvene's component dimension)
    gate: int | None = None  # the GRU's fused projections: which third of the last dim (0 reset, 1 update, 2 new)
    skip_from: str | None = None  # the hook holding this module's input (for SkipIntervention)
    module_hook: str | None = None  # "register_forward_hook" / "register_forward_pre_hook" for foreign models

    @property
    def units(self) -> dict[str, tuple[int, ...]]:
        return VIEW_UNITS[self.view]

    def at(self, layer: int, cfg: Any) -> "Site":
        dim = eval_dim(cfg, self.dim) if isinstance(self.dim, str) else self.dim
        skip = self.skip_from.format(layer=layer) if self.skip_from else None
        return replace(self, hook=self.hook.format(layer=layer), dim=dim, skip_from=skip)


B = "blocks.{layer}."
GPT_COMPONENTS: dict[str, Site] = {  # GPT-2, GPT-Neo, GPT-NeoX (parallel-residual GPT-NeoX has no residual_mid)
    "block_input": Site(B + "hook_resid_pre", "flat", "d_model"),
    "block_output": Site(B + "hook_resid_post", "flat", "d_model", skip_from=B + "hook_resid_pre"),
    "residual_mid": Site(B + "hook_resid_mid", "flat", "d_model"),
    "attention_input": Site(B + "ln1.hook_normalized", "flat", "d_model"),
    "attention_output": Site(B + "hook_attn_out", "flat", "d_model", skip_from=B + "ln1.hook_normalized"),
    "query_output": Site(B + "attn.hook_q", "merge_heads", "n_heads*d_head"),
    "key_output": Site(B + "attn.hook_k", "merge_heads", "n_heads*d_head"),
    "value_output": Site(B + "attn.hook_v", "merge_heads", "n_heads*d_head"),
    "attention_value_output": Site(B + "attn.hook_z", "merge_heads", "n_heads*d_head"),
    "head_query_output": Site(B + "attn.hook_q", "heads", "d_head"),
    "head_key_output": Site(B + "attn.hook_k", "heads", "d_head"),
    "head_value_output": Site(B + "attn.hook_v", "heads", "d_head"),
    "head_attention_value_output": Site(B + "attn.hook_z", "heads", "d_head"),
    "attention_weight": Site(B + "attn.hook_pattern", "pattern", "n_ctx"),
    "attention_scores": Site(B + "attn.hook_attn_scores", "pattern", "n_ctx"),  # not in pyvene: pre-softmax
    "mlp_input": Site(B + "ln2.hook_normalized", "flat", "d_model"),
    "mlp_pre_activation": Site(B + "mlp.hook_pre", "flat", "d_mlp"),  # not in pyvene: the activation's input
    "mlp_activation": Site(B + "mlp.hook_post", "flat", "d_mlp"),
    "mlp_output": Site(B + "hook_mlp_out", "flat", "d_model", skip_from=B + "ln2.hook_normalized"),
}

# Llama / Mistral / Qwen2: grouped-query attention. Query-side components have n_heads heads; key_output,
# value_output and their head_ forms read hook_k / hook_v, which have n_kv_heads heads: unit h of
# head_key_output is key/value head h, shared by query heads h*g .. h*g + g - 1 (g = n_heads / n_kv_heads), so
# patching it changes what all g query heads read. head_attention_value_output (hook_z) is per query head.
# The keys and queries are hooked before the rotation (hook_k, hook_q), as in pyvene; their rotated forms are the
# raw hook names attn.hook_rot_k / attn.hook_rot_q.
LLAMA_COMPONENTS: dict[str, Site] = {
    "block_input": Site(B + "hook_resid_pre", "flat", "d_model"),
    "block_output": Site(B + "hook_resid_post", "flat", "d_model", skip_from=B + "hook_resid_pre"),
    "residual_mid": Site(B + "hook_resid_mid", "flat", "d_model"),
    "attention_input": Site(B + "ln1.hook_normalized", "flat", "d_model"),
    "attention_output": Site(B + "hook_attn_out", "flat", "d_model", skip_from=B + "ln1.hook_normalized"),
    "query_output": Site(B + "attn.hook_q", "merge_heads", "n_heads*d_head"),
    "key_output": Site(B + "attn.hook_k", "merge_heads", "n_kv_heads*d_head"),
    "value_output": Site(B + "attn.hook_v", "merge_heads", "n_kv_heads*d_head"),
    "attention_value_output": Site(B + "attn.hook_z", "merge_heads", "n_heads*d_head"),
    "head_query_output": Site(B + "attn.hook_q", "heads", "d_head"),
    "head_key_output": Site(B + "attn.hook_k", "heads", "d_head"),
    "head_value_output": Site(B + "attn.hook_v", "heads", "d_head"),
    "head_attention_value_output": Site(B + "attn.hook_z", "heads", "d_head"),
    "attention_weight": Site(B + "attn.hook_pattern", "pattern", "n_ctx"),
    "attention_scores": Site(B + "attn.hook_attn_scores", "pattern", "n_ctx"),  # not in pyvene: pre-softmax
    "mlp_input": Site(B + "ln2.hook_normalized", "flat", "d_model"),
    "mlp_pre_activation": Site(B + "mlp.hook_pre", "flat", "d_mlp"),  # not in pyvene: the gate's input
    "mlp_activation": Site(B + "mlp.hook_post", "flat", "d_mlp"),  # act(gate) * up: what down_proj reads
    "mlp_output": Site(B + "hook_mlp_out", "flat", "d_model", skip_from=B + "ln2.hook_normalized"),
}

E, D = "encoder.blocks.{layer}.", "decoder.blocks.{layer}."
T5_ENCODER_COMPONENTS: dict[str, Site] = {
    "encoder.block_input": Site(E + "hook_resid_pre", "flat", "d_model"),
    "encoder.block_output": Site(E + "hook_resid_post", "flat", "d_model", skip_from=E + "hook_resid_pre"),
    "encoder.residual_mid": Site(E + "hook_resid_mid", "flat", "d_model"),
    "encoder.attention_input": Site(E + "ln1.hook_normalized", "flat", "d_model"),
    "encoder.attention_output": Site(E + "hook_attn_out", "flat", "d_model", skip_from=E + "ln1.hook_normalized"),
    "encoder.query_output": Site(E + "attn.hook_q", "merge_heads", "n_heads*d_head"),
    "encoder.key_output": Site(E + "attn.hook_k", "merge_heads", "n_heads*d_head"),
    "encoder.value_output": Site(E + "attn.hook_v", "merge_heads", "n_heads*d_head"),
    "encoder.attention_value_output": Site(E + "attn.hook_z", "merge_heads", "n_heads*d_head"),
    "encoder.head_query_output": Site(E + "attn.hook_q", "heads", "d_head"),
    "encoder.head_key_output": Site(E + "attn.hook_k", "heads", "d_head"),
    "encoder.head_value_output": Site(E + "attn.hook_v", "heads", "d_head"),
    "encoder.head_attention_value_output": Site(E + "attn.hook_z", "heads", "d_head"),
    "encoder.attention_weight": Site(E + "attn.hook_pattern", "pattern", "n_ctx"),
    "encoder.attention_scores": Site(E + "attn.hook_attn_scores", "pattern", "n_ctx"),
    "encoder.mlp_input": Site(E + "ln2.hook_normalized", "flat", "d_model"),
    "encoder.mlp_pre_activation": Site(E + "mlp.hook_pre", "flat", "d_mlp"),
    "encoder.mlp_activation": Site(E + "mlp.hook_post", "flat", "d_mlp"),
    "encoder.mlp_output": Site(E + "hook_mlp_out", "flat", "d_model", skip_from=E + "ln2.hook_normalized"),
}
T5_DECODER_COMPONENTS: dict[str, Site] = {  # ln1 before self-attention, ln2 before cross-attention, ln3 before the MLP
    "decoder.block_input": Site(D + "hook_resid_pre", "flat", "d_model"),
    "decoder.block_output": Site(D + "hook_resid_post", "flat", "d_model", skip_from=D + "hook_resid_pre"),
    "decoder.residual_mid": Site(D + "hook_resid_mid", "flat", "d_model"),
    "decoder.residual_mid_cross": Site(D + "hook_resid_mid_cross", "flat", "d_model"),
    "decoder.attention_input": Site(D + "ln1.hook_normalized", "flat", "d_model"),
    "decoder.attention_output": Site(D + "hook_attn_out", "flat", "d_model", skip_from=D + "ln1.hook_normalized"),
    "decoder.query_output": Site(D + "attn.hook_q", "merge_heads", "n_heads*d_head"),
    "decoder.key_output": Site(D + "attn.hook_k", "merge_heads", "n_heads*d_head"),
    "decoder.value_output": Site(D + "attn.hook_v", "merge_heads", "n_heads*d_head"),
    "decoder.attention_value_output": Site(D + "attn.hook_z", "merge_heads", "n_heads*d_head"),
    "decoder.head_query_output": Site(D + "attn.hook_q", "heads", "d_head"),
    "decoder.head_key_output": Site(D + "attn.hook_k", "heads", "d_head"),
    "decoder.head_value_output": Site(D + "attn.hook_v", "heads", "d_head"),
    "decoder.head_attention_value_output": Site(D + "attn.hook_z", "heads", "d_head"),
    "decoder.attention_weight": Site(D + "attn.hook_pattern", "pattern", "n_ctx"),
    "decoder.attention_scores": Site(D + "attn.hook_attn_scores", "pattern", "n_ctx"),
    "decoder.cross_attention_input": Site(D + "ln2.hook_normalized", "flat", "d_model"),
    "decoder.cross_attention_output": Site(D + "hook_cross_attn_out", "flat", "d_model",
                                           skip_from=D + "ln2.hook_normalized"),
    "decoder.cross_query_output": Site(D + "cross_attn.hook_q", "merge_heads", "n_heads*d_head"),
    "decoder.cross_key_output": Site(D + "cross_attn.hook_k", "merge_heads", "n_heads*d_head"),
    "decoder.cross_value_output": Site(D + "cross_attn.hook_v", "merge_heads", "n_heads*d_head"),
    "decoder.cross_attention_value_output": Site(D + "cross_attn.hook_z", "merge_heads", "n_heads*d_head"),
    "decoder.head_cross_query_output": Site(D + "cross_attn.hook_q", "heads", "d_head"),
    "decoder.head_cross_key_output": Site(D + "cross_attn.hook_k", "heads", "d_head"),
    "decoder.head_cross_value_output": Site(D + "cross_attn.hook_v", "heads", "d_head"),
    "decoder.head_cross_attention_value_output": Site(D + "cross_attn.hook_z", "heads", "d_head"),
    "decoder.cross_attention_weight": Site(D + "cross_attn.hook_pattern", "pattern", "n_ctx"),
    "decoder.mlp_input": Site(D + "ln3.hook_normalized", "flat", "d_model"),
    "decoder.mlp_pre_activation": Site(D + "mlp.hook_pre", "flat", "d_mlp"),
    "decoder.mlp_activation": Site(D + "mlp.hook_post", "flat", "d_mlp"),
    "decoder.mlp_output": Site(D + "hook_mlp_out", "flat", "d_model", skip_from=D + "ln3.hook_normalized"),
}
# A bare T5 component name means the encoder's (pyvene's only T5 precedent).
T5_COMPONENTS: dict[str, Site] = {**T5_ENCODER_COMPONENTS, **T5_DECODER_COMPONENTS,
                                  **{k.removeprefix("encoder."): v for k, v in T5_ENCODER_COMPONENTS.items()}}

L = "layers.{layer}."
GRU_COMPONENTS: dict[str, Site] = {  # unit "t": the time step
    "cell_input": Site(L + "hook_in", "step", "d_in"),
    "cell_output": Site(L + "hook_hidden", "step", "d_model", skip_from=L + "hook_in"),
    "reset_gate_input": Site(L + "hook_reset_pre", "step", "d_model"),
    "reset_gate_output": Site(L + "hook_reset", "step", "d_model"),
    "update_gate_input": Site(L + "hook_update_pre", "step", "d_model"),
    "update_gate_output": Site(L + "hook_update", "step", "d_model"),
    "new_gate_input": Site(L + "hook_candidate_pre", "step", "d_model"),
    "new_gate_output": Site(L + "hook_candidate", "step", "d_model"),
    "x2h_output": Site(L + "hook_x2h", "step", "3*d_model"),
    "h2h_output": Site(L + "hook_h2h", "step", "3*d_model"),
    "reset_x2h_output": Site(L + "hook_x2h", "step", "d_model", gate=0),
    "update_x2h_output": Site(L + "hook_x2h", "step", "d_model", gate=1),
    "new_x2h_output": Site(L + "hook_x2h", "step", "d_model", gate=2),
    "reset_h2h_output": Site(L + "hook_h2h", "step", "d_model", gate=0),
    "update_h2h_output": Site(L + "hook_h2h", "step", "d_model", gate=1),
    "new_h2h_output": Site(L + "hook_h2h", "step", "d_model", gate=2),
}

MLP_COMPONENTS: dict[str, Site] = {  # pyvene's MLP classifier (models/mlp.py): one position per example, usually
    "block_input": Site(B + "hook_in", "flat", "d_model"),
    "block_output": Site(B + "hook_out", "flat", "d_model", skip_from=B + "hook_in"),
    "mlp_pre_activation": Site(B + "hook_pre", "flat", "d_model"),  # not in pyvene: ff1's output
    "mlp_activation": Site(B + "hook_post", "flat", "d_model"),
}

# pyvene's module-path components ("h[0].mlp.output", "transformer.h[10].attn.attn_dropout.input"): the HF module
# whose input or output the string names -> the hook holding the same tensor. `{layer}` is the first index in
# brackets; an LM's `transformer.` prefix (GPT-2, GPT-Neo) and a classifier's `gru.` / `mlp.` are dropped first.
# The tensor is seen as pyvene sees that module's input/output: flat (so unit `pos` is dimension 1, which for an
# attention pattern means heads, as in pyvene), merged heads for the inputs of output projections.
H = "h[{layer}]."
GPT_MODULE_PATHS: dict[str, Site] = {  # GPT-2 and GPT-Neo share these HF names
    "wte.output": Site("hook_embed"),
    "wpe.output": Site("hook_pos_embed"),
    H + "input": Site(B + "hook_resid_pre", "flat", "d_model"),
    H + "ln_1.input": Site(B + "hook_resid_pre", "flat", "d_model"),
    H + "ln_1.output": Site(B + "ln1.hook_normalized", "flat", "d_model"),
    H + "attn.input": Site(B + "ln1.hook_normalized", "flat", "d_model"),
    H + "attn.output": Site(B + "hook_attn_out", "flat", "d_model"),
    H + "ln_2.input": Site(B + "hook_resid_mid", "flat", "d_model"),
    H + "ln_2.output": Site(B + "ln2.hook_normalized", "flat", "d_model"),
    H + "mlp.input": Site(B + "ln2.hook_normalized", "flat", "d_model"),
    H + "mlp.c_fc.input": Site(B + "ln2.hook_normalized", "flat", "d_model"),
    H + "mlp.c_fc.output": Site(B + "mlp.hook_pre", "flat", "d_mlp"),
    H + "mlp.act.input": Site(B + "mlp.hook_pre", "flat", "d_mlp"),
    H + "mlp.act.output": Site(B + "mlp.hook_post", "flat", "d_mlp"),
    H + "mlp.c_proj.input": Site(B + "mlp.hook_post", "flat", "d_mlp"),
    H + "mlp.c_proj.output": Site(B + "hook_mlp_out", "flat", "d_model"),
    H + "mlp.dropout.input": Site(B + "hook_mlp_out", "flat", "d_model"),
    H + "mlp.dropout.output": Site(B + "hook_mlp_out", "flat", "d_model"),
    H + "mlp.output": Site(B + "hook_mlp_out", "flat", "d_model"),
    H + "output": Site(B + "hook_resid_post", "flat", "d_model"),
    "ln_f.output": Site("ln_final.hook_normalized"),
    "lm_head.output": Site("hook_logits"),
}
GPT2_MODULE_PATHS: dict[str, Site] = {
    **GPT_MODULE_PATHS,
    H + "attn.c_proj.input": Site(B + "attn.hook_z", "merge_heads", "n_heads*d_head"),
    H + "attn.c_proj.output": Site(B + "hook_attn_out", "flat", "d_model"),
    H + "attn.attn_dropout.input": Site(B + "attn.hook_pattern", "flat", "n_ctx"),
    H + "attn.attn_dropout.output": Site(B + "attn.hook_pattern", "flat", "n_ctx"),
    H + "attn.resid_dropout.input": Site(B + "hook_attn_out", "flat", "d_model"),
    H + "attn.resid_dropout.output": Site(B + "hook_attn_out", "flat", "d_model"),
}
A = H + "attn.attention."  # GPT-Neo's attention sits one level down (HF: attn.attention)
GPT_NEO_MODULE_PATHS: dict[str, Site] = {
    **GPT_MODULE_PATHS,
    A + "input": Site(B + "ln1.hook_normalized", "flat", "d_model"),
    A + "output": Site(B + "hook_attn_out", "flat", "d_model"),
    A + "q_proj.output": Site(B + "attn.hook_q", "merge_heads", "n_heads*d_head"),
    A + "k_proj.output": Site(B + "attn.hook_k", "merge_heads", "n_heads*d_head"),
    A + "v_proj.output": Site(B + "attn.hook_v", "merge_heads", "n_heads*d_head"),
    A + "out_proj.input": Site(B + "attn.hook_z", "merge_heads", "n_heads*d_head"),
    A + "out_proj.output": Site(B + "hook_attn_out", "flat", "d_model"),
    A + "attn_dropout.input": Site(B + "attn.hook_pattern", "flat", "n_ctx"),
    A + "attn_dropout.output": Site(B + "attn.hook_pattern", "flat", "n_ctx"),
    A + "resid_dropout.output": Site(B + "hook_attn_out", "flat", "d_model"),
}
EB, DB = "encoder.block[{layer}].", "decoder.block[{layer}]."
# T5: the encoder's FF is layer[1]; the decoder's cross-attention is layer[1] and its FF layer[2]
T5_MODULE_PATHS: dict[str, Site] = {
    EB + "input": Site(E + "hook_resid_pre", "flat", "d_model"),
    EB + "output": Site(E + "hook_resid_post", "flat", "d_model"),
    EB + "layer[0].input": Site(E + "hook_resid_pre", "flat", "d_model"),
    EB + "layer[0].layer_norm.output": Site(E + "ln1.hook_normalized", "flat", "d_model"),
    EB + "layer[0].SelfAttention.output": Site(E + "hook_attn_out", "flat", "d_model"),
    EB + "layer[0].SelfAttention.q.output": Site(E + "attn.hook_q", "merge_heads", "n_heads*d_head"),
    EB + "layer[0].SelfAttention.k.output": Site(E + "attn.hook_k", "merge_heads", "n_heads*d_head"),
    EB + "layer[0].SelfAttention.v.output": Site(E + "attn.hook_v", "merge_heads", "n_heads*d_head"),
    EB + "layer[0].SelfAttention.o.input": Site(E + "attn.hook_z", "merge_heads", "n_heads*d_head"),
    EB + "layer[0].output": Site(E + "hook_resid_mid", "flat", "d_model"),
    EB + "layer[1].input": Site(E + "hook_resid_mid", "flat", "d_model"),
    EB + "layer[1].layer_norm.output": Site(E + "ln2.hook_normalized", "flat", "d_model"),
    EB + "layer[1].DenseReluDense.input": Site(E + "ln2.hook_normalized", "flat", "d_model"),
    EB + "layer[1].DenseReluDense.wo.input": Site(E + "mlp.hook_post", "flat", "d_mlp"),
    EB + "layer[1].DenseReluDense.output": Site(E + "hook_mlp_out", "flat", "d_model"),
    EB + "layer[1].output": Site(E + "hook_resid_post", "flat", "d_model"),
    DB + "input": Site(D + "hook_resid_pre", "flat", "d_model"),
    DB + "output": Site(D + "hook_resid_post", "flat", "d_model"),
    DB + "layer[0].layer_norm.output": Site(D + "ln1.hook_normalized", "flat", "d_model"),
    DB + "layer[0].SelfAttention.output": Site(D + "hook_attn_out", "flat", "d_model"),
    DB + "layer[0].output": Site(D + "hook_resid_mid", "flat", "d_model"),
    DB + "layer[1].layer_norm.output": Site(D + "ln2.hook_normalized", "flat", "d_model"),
    DB + "layer[1].EncDecAttention.output": Site(D + "hook_cross_attn_out", "flat", "d_model"),
    DB + "layer[1].output": Site(D + "hook_resid_mid_cross", "flat", "d_model"),
    DB + "layer[2].layer_norm.output": Site(D + "ln3.hook_normalized", "flat", "d_model"),
    DB + "layer[2].DenseReluDense.wo.input": Site(D + "mlp.hook_post", "flat", "d_mlp"),
    DB + "layer[2].DenseReluDense.output": Site(D + "hook_mlp_out", "flat", "d_model"),
    DB + "layer[2].output": Site(D + "hook_resid_post", "flat", "d_model"),
}
C = "cells[{layer}]."
GRU_MODULE_PATHS: dict[str, Site] = {  # pyvene's GRU module names (unit t)
    C + "input": Site(L + "hook_in", "step", "d_in"),
    C + "output": Site(L + "hook_hidden", "step", "d_model"),
    C + "x2h.output": Site(L + "hook_x2h", "step", "3*d_model"),
    C + "h2h.output": Site(L + "hook_h2h", "step", "3*d_model"),
    C + "reset_act.input": Site(L + "hook_reset_pre", "step", "d_model"),
    C + "reset_act.output": Site(L + "hook_reset", "step", "d_model"),
    C + "update_act.input": Site(L + "hook_update_pre", "step", "d_model"),
    C + "update_act.output": Site(L + "hook_update", "step", "d_model"),
    C + "new_act.input": Site(L + "hook_candidate_pre", "step", "d_model"),
    C + "new_act.output": Site(L + "hook_candidate", "step", "d_model"),
}
MLP_MODULE_PATHS: dict[str, Site] = {
    H + "input": Site(B + "hook_in", "flat", "d_model"),
    H + "output": Site(B + "hook_out", "flat", "d_model"),
    H + "ff1.output": Site(B + "hook_pre", "flat", "d_model"),
    H + "act.input": Site(B + "hook_pre", "flat", "d_model"),
    H + "act.output": Site(B + "hook_post", "flat", "d_model"),
    H + "dropout.output": Site(B + "hook_out", "flat", "d_model"),
    "score.output": Site("hook_logits"),
}
MODULE_PATH_PREFIXES = ("transformer.", "gru.", "mlp.")

# model class -> {pyvene module path: Site}
type_to_module_paths: dict[type, dict[str, Site]] = {
    cls: table for classes, table in (((GPT2, GPT2LM), GPT2_MODULE_PATHS), ((GPTNeo, GPTNeoLM), GPT_NEO_MODULE_PATHS),
                                      ((T5, T5LM), T5_MODULE_PATHS), ((GRU, GRUClassifier, GRULM), GRU_MODULE_PATHS),
                                      ((MLP, MLPClassifier), MLP_MODULE_PATHS)) for cls in classes
}

# model class -> component table (pyvene's registry). Users add aliases, or register module paths for a model
# hookvene does not implement: {component: (module path with %s for the layer, "register_forward_hook")}.
type_to_module_mapping: dict[type, dict[str, Any]] = {
    cls: dict(table) for classes, table in (((GPT2, GPT2LM, GPTNeo, GPTNeoLM, GPTNeoX, GPTNeoXLM), GPT_COMPONENTS),
                                            ((Llama, LlamaLM), LLAMA_COMPONENTS),
                                            ((T5, T5LM), T5_COMPONENTS),
                                            ((GRU, GRUClassifier, GRULM), GRU_COMPONENTS),
                                            ((MLP, MLPClassifier), MLP_COMPONENTS)) for cls in classes
}
# model class -> {component: (config-attribute expressions, ...)} for foreign models registered by users
type_to_dimension_mapping: dict[type, dict[str, tuple[str, ...]]] = {}


def _n_layers(model: nn.Module, component: str) -> int | None:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if component.startswith("decoder."):
        return getattr(cfg, "n_decoder_layers", None)
    for attr in ("n_encoder_layers", "n_layers", "n_layer", "num_layers", "num_hidden_layers"):
        if getattr(cfg, attr, None) is not None:
            return getattr(cfg, attr)
    return None


def table_for(model: nn.Module) -> dict[str, Any] | None:
    """The component table registered for this model's class, or None."""
    return type_to_module_mapping.get(type(model))


def resolve(model: nn.Module, layer: int, component: str, unit: str) -> Site:
    """The Site for (layer, component, unit) on `model`; clear errors for anything unknown or out of range."""
    table = table_for(model)
    hook_dict: dict[str, Any] | None = getattr(model, "hook_dict", None)
    if hook_dict is not None and component in hook_dict:  # a raw hook name: taken as is, flat view
        return _check_unit(Site(component, "flat"), component, unit, raw=True)
    if table is None:
        raise ValueError(f"no component table for {type(model).__name__}: register one in "
                         f"hookvene.type_to_module_mapping[{type(model).__name__}], or pass a hookvene model")
    if component not in table and hook_dict is not None and component.endswith((".input", ".output")):
        return module_path_site(model, component, unit)
    if component not in table:
        names = list(table) + (list(hook_dict) if hook_dict else [])
        raise unknown_name_error(component, names, f"component for {type(model).__name__}")
    entry = table[component]
    if hook_dict is not None and isinstance(entry, tuple | list):  # pyvene-style (module path, hook type) entry
        suffix = ".input" if entry[1] == "register_forward_pre_hook" else ".output"
        return module_path_site(model, (entry[0] % layer if "%s" in entry[0] else entry[0]) + suffix, unit)
    n_layers = _n_layers(model, component)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range for {component!r}: the model has {n_layers} layers "
                         f"(0..{n_layers - 1})")
    if hook_dict is None:  # a foreign model registered pyvene-style: (module path with %s, hook type)
        return _foreign_site(model, layer, component, entry)
    if not isinstance(entry, Site):
        raise ValueError(f"component {component!r} of {type(model).__name__} is registered as {entry!r}; table "
                         f"entries for hooked models are Sites, e.g. Site('blocks.{{layer}}.hook_resid_pre')")
    site = entry.at(layer, model.cfg)
    if site.hook not in hook_dict:
        raise ValueError(f"component {component!r} maps to hook {site.hook!r}, which this model does not have")
    return _check_unit(site, component, unit)


def module_path_site(model: nn.Module, path: str, unit: str = "pos") -> Site:
    """The Site for a pyvene module-path component (`"h[0].mlp.output"`) on a hooked model: the hook that holds
    that module's input or output; a clear error where no hook does. Any unit is dimension 1 of that tensor."""
    table = type_to_module_paths.get(type(model), {})
    rel = path
    for prefix in MODULE_PATH_PREFIXES:
        rel = rel.removeprefix(prefix)
    match = re.search(r"\[(\d+)\]", rel)
    layer = int(match.group(1)) if match else 0
    template = rel[:match.start()] + "[{layer}]" + rel[match.end():] if match else rel
    if template not in table:
        known = sorted(table) or ["(none: use component names or hook names)"]
        raise ValueError(f"module path {path!r} has no hook point in {type(model).__name__}: hookvene maps pyvene "
                         f"module paths to the hooks holding the same tensor, and none holds this one. Paths it "
                         f"maps ({{layer}} = a layer index): {', '.join(known)}; or pass a hook name "
                         f"(model.hook_dict) as the component")
    n_layers = _n_layers(model, "decoder." if template.startswith("decoder.") else "")
    if "{layer}" in template and n_layers is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} in {path!r} is out of range: the model has {n_layers} layers")
    # The tables hold flat, merge_heads (pos is dimension 1 of both) and the GRU's step views only.
    return _check_unit(table[template].at(layer, model.cfg), path, unit)


def _check_unit(site: Site, component: str, unit: str, raw: bool = False) -> Site:
    if raw and unit not in ("pos", "t"):
        raise ValueError(f"raw hook name {component!r} takes unit 'pos' (dimension 1) or 't', not {unit!r}")
    if raw and unit == "t":
        return Site(site.hook, "step", site.dim)
    if unit not in site.units:
        hint = " (pyvene's 'pos' here silently meant heads)" if unit == "pos" and "h" in site.units else ""
        raise ValueError(f"unit {unit!r} is not valid for component {component!r}{hint}; valid units: "
                         f"{', '.join(site.units)}")
    return site


def _foreign_site(model: nn.Module, layer: int, component: str, entry: Any) -> Site:
    path, hook_type = entry[0], entry[1]
    path = path % layer if "%s" in path else path
    module_at(model, path)  # fail now, with a clear message, if the path is wrong
    dims = type_to_dimension_mapping.get(type(model), {}).get(component, ())
    cfg = getattr(model, "config", None)
    dim = next((d for d in (eval_dim(cfg, e) for e in dims) if d is not None), None)
    return Site(path, "flat", dim, module_hook=hook_type)


def eval_dim(cfg: Any, expr: str) -> int | None:
    """pyvene's dimension proposals: config attributes combined with * and / (e.g. "d_model/num_heads")."""
    try:
        value: float = 1.0
        for i, part in enumerate(expr.replace("/", "*/").split("*")):
            if not part:
                continue
            div = part.startswith("/")
            v = float(part[1:] if div else part) if part.lstrip("/").isdigit() else getattr(cfg, part.lstrip("/"))
            value = value / v if div else (v if i == 0 else value * v)
        return int(value)
    except (AttributeError, TypeError, ValueError):
        return None


def module_at(model: nn.Module, path: str) -> nn.Module:
    """`encoder.block[3].layer[1]` -> that submodule."""
    m: Any = model
    for part in path.replace("]", "").replace("[", ".").split("."):
        try:
            m = m[int(part)] if part.isdigit() else getattr(m, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ValueError(f"module path {path!r} does not exist in {type(model).__name__}") from None
    return m

