"""HF GPT-NeoX / Pythia (`GPTNeoXModel`, `GPTNeoXForCausalLM`) -> hookvene GPT-NeoX: config translation and the
weight table.

Every weight is an `nn.Linear` (out, in) on both sides and q/k/v stay fused in the checkpoint's head-major layout,
so every rule is a rename. The unembedding is `embed_out` in hub checkpoints and `lm_head` in `transformers` 5
objects; both are read. Rotary settings are read in either spelling (`rotary_pct` / `rotary_emb_base`, or
`rope_parameters`).
"""

from typing import Any

from torch import Tensor

from hookvene.loading.common import (
    Rule,
    check_config,
    convert_state_dict,
    empty_model,
    lm_head_rules,
    rope_from_hf,
)
from hookvene.models.common import ACTIVATIONS
from hookvene.models.gpt_neox import GPTNeoX, GPTNeoXConfig, GPTNeoXLM

RULES = [
    # HF key (after stripping `gpt_neox.`)  hookvene key
    Rule("embed_in.weight", "embed.weight"),
    Rule("layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight"),
    Rule("layers.{i}.input_layernorm.bias", "blocks.{i}.ln1.bias"),
    Rule("layers.{i}.attention.query_key_value.weight", "blocks.{i}.attn.qkv.weight"),
    Rule("layers.{i}.attention.query_key_value.bias", "blocks.{i}.attn.qkv.bias"),
    Rule("layers.{i}.attention.dense.weight", "blocks.{i}.attn.out.weight"),
    Rule("layers.{i}.attention.dense.bias", "blocks.{i}.attn.out.bias"),
    Rule("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln2.weight"),
    Rule("layers.{i}.post_attention_layernorm.bias", "blocks.{i}.ln2.bias"),
    Rule("layers.{i}.mlp.dense_h_to_4h.weight", "blocks.{i}.mlp.fc.weight"),
    Rule("layers.{i}.mlp.dense_h_to_4h.bias", "blocks.{i}.mlp.fc.bias"),
    Rule("layers.{i}.mlp.dense_4h_to_h.weight", "blocks.{i}.mlp.proj.weight"),
    Rule("layers.{i}.mlp.dense_4h_to_h.bias", "blocks.{i}.mlp.proj.bias"),
    Rule("final_layer_norm.weight", "ln_final.weight"),
    Rule("final_layer_norm.bias", "ln_final.bias"),
    Rule("layers.{i}.attention.rotary_emb.inv_freq", None),  # buffers old checkpoints stored; recomputed
    Rule("layers.{i}.attention.bias", None),
    Rule("layers.{i}.attention.masked_bias", None),
]

# Options whose other values would change the computation.
REQUIRED = {
    "hidden_act": lambda name: name in ACTIVATIONS,
    "add_cross_attention": False,
}


def config_from_hf(hf: dict[str, Any]) -> GPTNeoXConfig:
    """hookvene's config for an HF GPT-NeoX config dict (`config.to_dict()` or a checkpoint's config.json).

    Raises ValueError naming each HF option hookvene does not implement."""
    check_config(hf, REQUIRED, "GPT-NeoX")
    rope = rope_from_hf(hf, "GPT-NeoX", partial=0.25)  # HF's default rotary_pct
    if rope["rope_type"] == "llama3":
        raise ValueError("hookvene's GPT-NeoX does not implement rope type 'llama3'; implemented: default, linear")
    d_model = hf.get("hidden_size", 6144)
    return GPTNeoXConfig(
        d_vocab=hf.get("vocab_size", 50432), n_ctx=hf.get("max_position_embeddings", 2048), d_model=d_model,
        n_layers=hf.get("num_hidden_layers", 44), n_heads=hf.get("num_attention_heads", 64),
        d_mlp=hf.get("intermediate_size") or 4 * d_model, act_fn=hf.get("hidden_act", "gelu"),
        ln_eps=hf.get("layer_norm_eps", 1e-5), rotary_pct=rope["partial_rotary_factor"],
        rope_theta=rope["rope_theta"], rope_type=rope["rope_type"], rope_factor=rope["factor"],
        parallel_residual=hf.get("use_parallel_residual", True), attn_bias=hf.get("attention_bias", True),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def convert(hf: dict[str, Any], state: dict[str, Tensor], lm_head: bool,
            what: str) -> tuple[GPTNeoX, dict[str, Tensor]]:
    """An empty (meta) hookvene model and the converted state dict for it."""
    cfg = config_from_hf(hf)
    with empty_model():
        model = GPTNeoXLM(cfg) if lm_head else GPTNeoX(cfg)
    state = {k.removeprefix("gpt_neox."): v for k, v in state.items()}
    state = {"lm_head.weight" if k == "embed_out.weight" else k: v for k, v in state.items()}  # hub spelling
    head_rules, tied = lm_head_rules(lm_head, cfg.tie_word_embeddings)
    return model, convert_state_dict(RULES + head_rules, state, model, what, tied)
