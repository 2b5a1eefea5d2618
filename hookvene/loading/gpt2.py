"""HF GPT-2 (`GPT2Model`, `GPT2LMHeadModel`) -> hookvene GPT-2: config translation and the weight table.

Parameters keep the checkpoint's layout (Conv1D weights are (in, out), q/k/v fused), so every rule is a rename.
"""

from typing import Any

from torch import Tensor

from hookvene.loading.common import Rule, check_config, convert_state_dict, empty_model, lm_head_rules
from hookvene.models.gpt2 import GPT2, GPT2LM, GPT2Config

RULES = [
    # HF key (after stripping `transformer.`)  hookvene key
    Rule("wte.weight", "embed.weight"),
    Rule("wpe.weight", "pos_embed.weight"),
    Rule("h.{i}.ln_1.weight", "blocks.{i}.ln1.weight"),
    Rule("h.{i}.ln_1.bias", "blocks.{i}.ln1.bias"),
    Rule("h.{i}.attn.c_attn.weight", "blocks.{i}.attn.qkv.weight"),
    Rule("h.{i}.attn.c_attn.bias", "blocks.{i}.attn.qkv.bias"),
    Rule("h.{i}.attn.c_proj.weight", "blocks.{i}.attn.out.weight"),
    Rule("h.{i}.attn.c_proj.bias", "blocks.{i}.attn.out.bias"),
    Rule("h.{i}.ln_2.weight", "blocks.{i}.ln2.weight"),
    Rule("h.{i}.ln_2.bias", "blocks.{i}.ln2.bias"),
    Rule("h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.fc.weight"),
    Rule("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.fc.bias"),
    Rule("h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.proj.weight"),
    Rule("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.proj.bias"),
    Rule("ln_f.weight", "ln_final.weight"),
    Rule("ln_f.bias", "ln_final.bias"),
    Rule("h.{i}.attn.bias", None),  # causal-mask buffer stored by old checkpoints
    Rule("h.{i}.attn.masked_bias", None),  # same
]

# Options whose non-default values would change the computation.
REQUIRED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


def config_from_hf(hf: dict[str, Any]) -> GPT2Config:
    check_config(hf, REQUIRED, "GPT-2")
    n_embd = hf.get("n_embd", 768)
    return GPT2Config(
        d_vocab=hf.get("vocab_size", 50257), n_ctx=hf.get("n_positions", 1024), d_model=n_embd,
        n_layers=hf.get("n_layer", 12), n_heads=hf.get("n_head", 12), d_mlp=hf.get("n_inner") or 4 * n_embd,
        act_fn=hf.get("activation_function", "gelu_new"), ln_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def convert(hf: dict[str, Any], state: dict[str, Tensor], lm_head: bool, what: str) -> tuple[GPT2, dict[str, Tensor]]:
    """An empty (meta) hookvene model and the converted state dict for it."""
    cfg = config_from_hf(hf)
    with empty_model():
        model = GPT2LM(cfg) if lm_head else GPT2(cfg)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    head_rules, tied = lm_head_rules(lm_head, cfg.tie_word_embeddings)
    return model, convert_state_dict(RULES + head_rules, state, model, what, tied)
