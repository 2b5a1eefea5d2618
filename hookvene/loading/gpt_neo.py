"""HF GPT-Neo (`GPTNeoModel`, `GPTNeoForCausalLM`) -> hookvene GPT-Neo: config translation, weight table.

Every weight is an `nn.Linear` (out, in) on both sides, so every rule is a rename. The global/local layout
(`attention_layers`) and `window_size` go to the config, not the table.
"""

from typing import Any

from torch import Tensor

from hookvene.loading.common import Rule, check_config, convert_state_dict, empty_model, lm_head_rules
from hookvene.models.common import ACTIVATIONS
from hookvene.models.gpt_neo import GPTNeo, GPTNeoConfig, GPTNeoLM

RULES = [
    # HF key (after stripping `transformer.`)  hookvene key
    Rule("wte.weight", "embed.weight"),
    Rule("wpe.weight", "pos_embed.weight"),
    Rule("h.{i}.ln_1.weight", "blocks.{i}.ln1.weight"),
    Rule("h.{i}.ln_1.bias", "blocks.{i}.ln1.bias"),
    Rule("h.{i}.attn.attention.q_proj.weight", "blocks.{i}.attn.q.weight"),
    Rule("h.{i}.attn.attention.k_proj.weight", "blocks.{i}.attn.k.weight"),
    Rule("h.{i}.attn.attention.v_proj.weight", "blocks.{i}.attn.v.weight"),
    Rule("h.{i}.attn.attention.out_proj.weight", "blocks.{i}.attn.out.weight"),
    Rule("h.{i}.attn.attention.out_proj.bias", "blocks.{i}.attn.out.bias"),
    Rule("h.{i}.ln_2.weight", "blocks.{i}.ln2.weight"),
    Rule("h.{i}.ln_2.bias", "blocks.{i}.ln2.bias"),
    Rule("h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.fc.weight"),
    Rule("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.fc.bias"),
    Rule("h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.proj.weight"),
    Rule("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.proj.bias"),
    Rule("ln_f.weight", "ln_final.weight"),
    Rule("ln_f.bias", "ln_final.bias"),
    Rule("h.{i}.attn.attention.bias", None),  # banded causal-mask buffer stored by old checkpoints
    Rule("h.{i}.attn.attention.masked_bias", None),  # same
]

# Options whose other values would change the computation (or that hookvene does not compute).
REQUIRED = {
    "activation_function": lambda name: name in ACTIVATIONS,
    "attention_layers": lambda types: set(types) <= {"global", "local"},
    "add_cross_attention": False,
}


def expand_attention_types(attention_types: list[Any]) -> list[str]:
    """HF's compact layout `[[["global", "local"], 12]]` -> one type per layer (HF's `attention_layers`)."""
    return [t for types, repeat in attention_types for _ in range(repeat) for t in types]


def config_from_hf(hf: dict[str, Any]) -> GPTNeoConfig:
    """hookvene's config for an HF GPT-Neo config dict (`config.to_dict()` or a checkpoint's config.json).

    Raises ValueError naming each HF option hookvene does not implement."""
    hf = dict(hf)
    if "attention_layers" not in hf:  # config.json files may carry only the compact form
        compact = hf.get("attention_types") or [[["global", "local"], 12]]  # HF's default
        hf["attention_layers"] = expand_attention_types(compact)
    check_config(hf, REQUIRED, "GPT-Neo")
    d_model = hf.get("hidden_size", 2048)
    return GPTNeoConfig(
        d_vocab=hf.get("vocab_size", 50257), n_ctx=hf.get("max_position_embeddings", 2048), d_model=d_model,
        n_layers=hf.get("num_layers", 24), n_heads=hf.get("num_heads", 16),
        d_mlp=hf.get("intermediate_size") or 4 * d_model, act_fn=hf.get("activation_function", "gelu_new"),
        ln_eps=hf.get("layer_norm_epsilon", 1e-5), window_size=hf.get("window_size", 256),
        attention_types=tuple(hf["attention_layers"]),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def convert(hf: dict[str, Any], state: dict[str, Tensor], lm_head: bool,
            what: str) -> tuple[GPTNeo, dict[str, Tensor]]:
    """An empty (meta) hookvene model and the converted state dict for it."""
    cfg = config_from_hf(hf)
    with empty_model():
        model = GPTNeoLM(cfg) if lm_head else GPTNeo(cfg)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    head_rules, tied = lm_head_rules(lm_head, cfg.tie_word_embeddings)
    return model, convert_state_dict(RULES + head_rules, state, model, what, tied)
