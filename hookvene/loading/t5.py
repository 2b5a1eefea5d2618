"""HF T5 (`T5Model`, `T5ForConditionalGeneration`) -> hookvene T5: config translation and the weight table.

Every rule is a rename. Two facts the table encodes:
- each stack's relative-position table lives in HF's block 0 (`block.0.layer.0.SelfAttention.
  relative_attention_bias`) and on the stack here (`encoder.relative_attention_bias`);
- `encoder.embed_tokens` and `decoder.embed_tokens` are `shared` itself, so they are dropped.

Whether the unembedding is tied and whether the decoder output is scaled by d_model**-0.5 are separate
questions since `transformers` 5, which always writes `tie_word_embeddings: true` and records the scaling as
`scale_decoder_outputs` (earlier versions scaled iff tied, and wrote FLAN-T5 as untied). As in `transformers`,
a checkpoint whose `lm_head.weight` differs from `shared.weight` keeps its own unembedding whatever the
config says.
"""

import dataclasses
from typing import Any

import torch
from torch import Tensor

from hookvene.loading.common import Rule, check_config, convert_state_dict, empty_model
from hookvene.models.t5 import T5, T5LM, T5Config

RULES = [
    # HF key                                                              hookvene key
    Rule("shared.weight", "shared.weight"),
    Rule("encoder.embed_tokens.weight", None),  # the same tensor as shared.weight
    Rule("decoder.embed_tokens.weight", None),  # same
    Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         "encoder.relative_attention_bias.weight"),
    Rule("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         "decoder.relative_attention_bias.weight"),
    Rule("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None),  # old files; unused
    *[Rule(f"{stack}.block.{{i}}.layer.0.SelfAttention.{p}.weight", f"{stack}.blocks.{{i}}.attn.{p}.weight")
      for stack in ("encoder", "decoder") for p in "qkvo"],
    *[Rule(f"decoder.block.{{i}}.layer.1.EncDecAttention.{p}.weight",
           f"decoder.blocks.{{i}}.cross_attn.{p}.weight") for p in "qkvo"],
    *[Rule(f"encoder.block.{{i}}.layer.1.DenseReluDense.{w}.weight", f"encoder.blocks.{{i}}.mlp.{w}.weight")
      for w in ("wi", "wi_0", "wi_1", "wo")],
    *[Rule(f"decoder.block.{{i}}.layer.2.DenseReluDense.{w}.weight", f"decoder.blocks.{{i}}.mlp.{w}.weight")
      for w in ("wi", "wi_0", "wi_1", "wo")],
    Rule("encoder.block.{i}.layer.0.layer_norm.weight", "encoder.blocks.{i}.ln1.weight"),
    Rule("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.blocks.{i}.ln2.weight"),
    Rule("decoder.block.{i}.layer.0.layer_norm.weight", "decoder.blocks.{i}.ln1.weight"),
    Rule("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.blocks.{i}.ln2.weight"),  # before cross-attn
    Rule("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.blocks.{i}.ln3.weight"),  # before the MLP
    Rule("encoder.final_layer_norm.weight", "encoder.ln_final.weight"),
    Rule("decoder.final_layer_norm.weight", "decoder.ln_final.weight"),
]

# feed_forward_proj -> (gated, act_fn); `transformers` maps "gated-gelu" to the tanh approximation
FEED_FORWARD = {"relu": (False, "relu"), "gated-gelu": (True, "gelu_new")}

# Options whose other values would change the computation.
REQUIRED = {
    "feed_forward_proj": lambda v: v in FEED_FORWARD,
    "is_encoder_decoder": True,
    "is_decoder": False,
    "add_cross_attention": False,
}


def config_from_hf(hf: dict[str, Any]) -> T5Config:
    check_config(hf, REQUIRED, "T5")
    gated, act_fn = FEED_FORWARD[hf.get("feed_forward_proj", "relu")]
    tie = hf.get("tie_word_embeddings", True)
    n_encoder_layers = hf.get("num_layers", 6)
    n_decoder_layers = hf.get("num_decoder_layers") or n_encoder_layers
    pad = hf.get("pad_token_id")
    start = hf.get("decoder_start_token_id")
    return T5Config(
        d_vocab=hf.get("vocab_size", 32128), d_model=hf.get("d_model", 512), d_kv=hf.get("d_kv", 64),
        d_ff=hf.get("d_ff", 2048), n_encoder_layers=n_encoder_layers, n_decoder_layers=n_decoder_layers,
        n_heads=hf.get("num_heads", 8), num_buckets=hf.get("relative_attention_num_buckets", 32),
        max_distance=hf.get("relative_attention_max_distance", 128),
        ln_eps=hf.get("layer_norm_epsilon", 1e-6),
        gated=gated, act_fn=act_fn, tie_word_embeddings=tie,
        scale_decoder_outputs=hf.get("scale_decoder_outputs", tie),  # transformers < 5 scaled iff tied
        pad_token_id=0 if pad is None else pad, decoder_start_token_id=0 if start is None else start,
    )


def _distinct(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return False
    if a.device.type == "meta" or b.device.type == "meta" or a.shape != b.shape:
        return True
    return not torch.equal(a, b)


def convert(hf: dict[str, Any], state: dict[str, Tensor], lm_head: bool,
            what: str) -> tuple[T5, dict[str, Tensor]]:
    """An empty (meta) hookvene model and the converted state dict for it."""
    cfg = config_from_hf(hf)
    head, shared = state.get("lm_head.weight"), state.get("shared.weight")
    if head is not None and shared is not None and _distinct(head, shared):
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    with empty_model():
        model = T5LM(cfg) if lm_head else T5(cfg)
    rules = list(RULES)
    tied = {}
    if lm_head and cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", None))  # the same tensor as shared.weight
        tied["unembed.weight"] = "shared.weight"
    else:
        rules.append(Rule("lm_head.weight", "unembed.weight" if lm_head else None))
    return model, convert_state_dict(rules, state, model, what, tied)
