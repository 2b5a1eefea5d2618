"""HF Llama, Mistral and Qwen2 (`LlamaModel` / `LlamaForCausalLM`, `Mistral...`, `Qwen2...`) -> hookvene Llama:
config translation and the weight table.

Every weight is an `nn.Linear` (out, in) on both sides, so every rule is a rename. What differs between the three
families is config, not weights: Mistral's sliding window, Qwen2's q/k/v biases and per-layer sliding window,
Llama's optional `attention_bias` (q, k, v and output) and `mlp_bias`. Rotary settings are read in either
spelling (`rope_from_hf`).
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
from hookvene.models.llama import LAYER_TYPES, Llama, LlamaConfig, LlamaLM

RULES = [
    # HF key (after stripping `model.`)  hookvene key
    Rule("embed_tokens.weight", "embed.weight"),
    Rule("layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight"),
    *[Rule(f"layers.{{i}}.self_attn.{p}_proj.{w}", f"blocks.{{i}}.attn.{p}.{w}")
      for p in "qkv" for w in ("weight", "bias")],
    Rule("layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.out.weight"),
    Rule("layers.{i}.self_attn.o_proj.bias", "blocks.{i}.attn.out.bias"),
    Rule("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln2.weight"),
    *[Rule(f"layers.{{i}}.mlp.{p}_proj.{w}", f"blocks.{{i}}.mlp.{p}.{w}")
      for p in ("gate", "up", "down") for w in ("weight", "bias")],
    Rule("norm.weight", "ln_final.weight"),
    Rule("layers.{i}.self_attn.rotary_emb.inv_freq", None),  # a buffer old checkpoints stored; recomputed
]


def _absent_or(*ok: Any) -> Any:
    return lambda v: v is None or v in ok


# Options whose other values would change the computation (or that belong to relatives hookvene does not compute:
# mixture of experts, soft-capping, q/k norms).
REQUIRED = {
    "hidden_act": lambda name: name in ACTIVATIONS,
    "num_experts": _absent_or(0, 1),
    "num_local_experts": _absent_or(0, 1),
    "attn_logit_softcapping": _absent_or(),
    "final_logit_softcapping": _absent_or(),
    "use_qk_norm": _absent_or(False),
    "layer_types": lambda types: types is None or set(types) <= set(LAYER_TYPES),
}
FAMILIES = ("llama", "mistral", "qwen2")


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """hookvene's config for an HF Llama / Mistral / Qwen2 config dict (`config.to_dict()` or a config.json).

    Raises ValueError naming each HF option hookvene does not implement."""
    family = hf.get("model_type", "llama")
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not a Llama-family model; hookvene's llama.py computes "
                         f"{', '.join(FAMILIES)}")
    check_config(hf, REQUIRED, family)
    rope = rope_from_hf(hf, family)
    if rope["partial_rotary_factor"] != 1.0:
        raise ValueError(f"hookvene's {family} does not implement partial_rotary_factor="
                         f"{rope['partial_rotary_factor']} (every head dimension is rotated)")
    n_layers = hf.get("num_hidden_layers", 32)
    window, layer_types = hf.get("sliding_window"), None
    if family == "qwen2":  # the window applies only with use_sliding_window, to layers >= max_window_layers
        window = window if hf.get("use_sliding_window", False) else None
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(n_layers)]
    elif family == "llama":
        window = None  # Llama has no sliding window (a stray key in a config.json does nothing in HF either)
    llama_bias = family == "llama" and hf.get("attention_bias", False)  # Mistral and Qwen2 ignore the key
    return LlamaConfig(
        d_vocab=hf.get("vocab_size", 32000), n_ctx=hf.get("max_position_embeddings", 2048),
        d_model=hf.get("hidden_size", 4096), n_layers=n_layers, n_heads=hf.get("num_attention_heads", 32),
        n_kv_heads=hf.get("num_key_value_heads"), d_head=hf.get("head_dim"),
        d_mlp=hf.get("intermediate_size", 11008), act_fn=hf.get("hidden_act", "silu"),
        rms_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=family == "qwen2" or llama_bias, out_bias=llama_bias,
        mlp_bias=family == "llama" and hf.get("mlp_bias", False),
        rope_theta=rope["rope_theta"], rope_type=rope["rope_type"], rope_factor=rope["factor"],
        rope_low_freq_factor=rope["low_freq_factor"], rope_high_freq_factor=rope["high_freq_factor"],
        rope_original_n_ctx=rope["original_max_position_embeddings"],
        sliding_window=window, layer_types=tuple(layer_types) if layer_types else None,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def convert(hf: dict[str, Any], state: dict[str, Tensor], lm_head: bool,
            what: str) -> tuple[Llama, dict[str, Tensor]]:
    """An empty (meta) hookvene model and the converted state dict for it."""
    cfg = config_from_hf(hf)
    with empty_model():
        model = LlamaLM(cfg) if lm_head else Llama(cfg)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    head_rules, tied = lm_head_rules(lm_head, cfg.tie_word_embeddings)
    return model, convert_state_dict(RULES + head_rules, state, model, what, tied)
