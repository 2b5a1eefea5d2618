"""GPT-NeoX (Black et al. 2022, "GPT-NeoX-20B"; also the Pythia suite, Biderman et al. 2023) with a HookPoint on
every activation.

Features of the architecture:
- no position embeddings: the first `rotary_pct` of each head's dimensions (a quarter in Pythia) of queries and
  keys are rotated by their position (partial rotary embeddings); the rest carry no position;
- parallel residual (the default, and Pythia's): attention and MLP both read the block's input, each through its
  own LayerNorm, and both outputs are added at once: x + attn(ln1(x)) + mlp(ln2(x)). With
  `use_parallel_residual=False` the block is sequential, as GPT-2's;
- q, k, v fused in one projection whose output is laid out head by head ([q_h, k_h, v_h] for each head h);
- MLP with the exact GELU, d_mlp = 4 * d_model;
- a final LayerNorm and an unembedding that is not tied to the embedding (HF: embed_out / lm_head).

Parameters mirror the HuggingFace checkpoint (`nn.Linear` (out, in), q/k/v fused as stored), so loading is a
renaming table (`hookvene/loading/gpt_neox.py`). There is no dropout: this is an analysis model, and
`transformers` in eval mode computes the same function.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hookvene.hooks import HookPoint
from hookvene.models.common import (
    ACTIVATIONS,
    ROPE_TYPES,
    CausalLM,
    HFAliases,
    HookedModel,
    KVCache,
    LayerNorm,
    ModelOutput,
    RotaryEmbedding,
    alias,
    apply_rotary,
    attend,
    causal_mask,
    check_length,
    check_tokens,
    identity_alias,
    layer_slice,
    merge_heads,
    rope_inv_freq,
    rotary_cos_sin,
    runtime_flags,
)


@runtime_flags
@dataclass(frozen=True, kw_only=True)
class GPTNeoXConfig(HFAliases):
    """Defaults are EleutherAI/pythia-160m."""

    d_vocab: int = 50304
    n_ctx: int = 2048
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_mlp: int | None = None  # None: 4 * d_model
    act_fn: str = "gelu"
    ln_eps: float = 1e-5
    rotary_pct: float = 0.25  # fraction of each head's dimensions that are rotated
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "llama3" (see rope_inv_freq in models/common.py)
    rope_factor: float = 1.0
    parallel_residual: bool = True
    attn_bias: bool = True  # biases on the qkv and output projections
    tie_word_embeddings: bool = False

    # TransformerLens's cfg names (see HFAliases in models/common.py)
    tl_cfg: ClassVar[dict[str, str | None]] = {"normalization_type": "LN", "positional_embedding_type": "rotary"}
    hf_aliases: ClassVar[dict[str, str]] = {
        "vocab_size": "d_vocab", "max_position_embeddings": "n_ctx", "hidden_size": "d_model",
        "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "intermediate_size": "d_mlp",
        "hidden_act": "act_fn", "layer_norm_eps": "ln_eps", "use_parallel_residual": "parallel_residual",
        "rotary_emb_base": "rope_theta", "partial_rotary_factor": "rotary_pct", "attention_bias": "attn_bias",
    }

    def __post_init__(self) -> None:
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)  # frozen dataclass: set once, here
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
        if not 0 < self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct={self.rotary_pct} must be in (0, 1]")
        if self.rope_type not in ROPE_TYPES[:2]:
            raise ValueError(f"rope_type={self.rope_type!r} is not implemented for GPT-NeoX; choose one of "
                             f"{ROPE_TYPES[:2]}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_rotary(self) -> int:
        """How many of each head's dimensions are rotated (the first ones)."""
        return int(self.d_head * self.rotary_pct)


class Attention(nn.Module):
    """Causal multi-head self-attention with partial rotary embeddings; q, k, v from one fused projection."""

    def __init__(self, cfg: GPTNeoXConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.scale = layer, cfg.n_heads, cfg.d_head**-0.5
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.attn_bias)  # HF: attention.query_key_value
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attn_bias)  # HF: attention.dense
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"], mask: Tensor | None, cache: KVCache | None,
                rope: tuple[Tensor, Tensor]) -> Float[Tensor, "batch pos d_model"]:
        # The fused output is head-major: each head's q, k, v sit side by side (unlike GPT-2's [q | k | v]).
        qkv = self.qkv(x).view(*x.shape[:-1], self.n_heads, -1)  # batch pos head 3*d_head
        q, k, v = qkv.chunk(3, dim=-1)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)  # batch pos head d_head
        # The first d_rotary dimensions of q and k are rotated by angles proportional to the position; the
        # others pass unrotated, so some of each head's dot product ignores position entirely.
        q = self.hook_rot_q(apply_rotary(q, *rope))
        k = self.hook_rot_k(apply_rotary(k, *rope))
        if cache is not None:  # generation: attend to the cached (rotated) prefix too; hooks saw the new positions
            k, v = cache.update(self.layer, k, v)
        # z = softmax(q_rot k_rot^T / sqrt(d_head) + mask) v, per head
        z = attend(q, k, v, mask, causal=True, scale=self.scale,
                   hook_scores=self.hook_attn_scores, hook_pattern=self.hook_pattern)
        z = self.hook_z(z)  # batch pos head d_head: each head's mix of values, before `out`
        return self.out(merge_heads(z))

    # TransformerLens's weight layout, as views of the fused head-major projection (rows [q_h, k_h, v_h] per head
    # h) and the (out, in) output Linear: an edit through them reaches the model. Before the rotary rotation:
    # x @ W_Q + b_Q is `hook_q`. Without attention biases (attn_bias=False) the biases read as zeros.
    def _qkv_part(self, i: int) -> Float[Tensor, "head d_model d_head"]:
        w = self.qkv.weight
        return w.view(self.n_heads, 3, -1, w.shape[1])[:, i].transpose(1, 2)

    def _qkv_bias(self, i: int) -> Float[Tensor, "head d_head"]:
        b = self.qkv.bias if self.qkv.bias is not None else self.qkv.weight.new_zeros(self.qkv.weight.shape[0])
        return b.view(self.n_heads, 3, -1)[:, i]

    W_Q, W_K, W_V = (property(lambda self, i=i: self._qkv_part(i)) for i in range(3))
    b_Q, b_K, b_V = (property(lambda self, i=i: self._qkv_bias(i)) for i in range(3))
    W_O = property(lambda self: self.out.weight.view(self.out.weight.shape[0], self.n_heads, -1).permute(1, 2, 0))
    b_O = property(lambda self: self.out.bias if self.out.bias is not None
                   else self.out.weight.new_zeros(self.out.weight.shape[0]))


class MLP(nn.Module):
    def __init__(self, cfg: GPTNeoXConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp)  # HF: mlp.dense_h_to_4h
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model)  # HF: mlp.dense_4h_to_h
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.fc(x))  # batch pos d_mlp
        post = self.hook_post(self.act(pre))
        return self.proj(post)

    # TransformerLens's names, as views of the (out, in) Linear weights
    W_in, b_in = property(lambda self: self.fc.weight.T), property(lambda self: self.fc.bias)
    W_out, b_out = property(lambda self: self.proj.weight.T), property(lambda self: self.proj.bias)


class Block(nn.Module):
    """Parallel: resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre)); there is no residual stream
    between attention and MLP, so no `hook_resid_mid`. Sequential: as GPT-2's block, with `hook_resid_mid`."""

    def __init__(self, cfg: GPTNeoXConfig, layer: int) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: input_layernorm
        self.attn = Attention(cfg, layer)
        self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: post_attention_layernorm (the MLP's input norm)
        self.mlp = MLP(cfg)
        self.hook_resid_pre, self.hook_resid_post = HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()
        if not self.parallel:
            self.hook_resid_mid = HookPoint()

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"], mask: Tensor | None, cache: KVCache | None,
                rope: tuple[Tensor, Tensor]) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), mask, cache, rope))
        if self.parallel:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_pre)))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class GPTNeoX(HookedModel):
    """GPT-NeoX / Pythia without the LM head: returns `ModelOutput.last_hidden_state` (after the final LayerNorm)."""

    can_resume = True  # forward(start_at_layer=, stop_at_layer=): sweeps resume mid-model

    def __init__(self, cfg: GPTNeoXConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)  # HF: gpt_neox.embed_in
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: gpt_neox.final_layer_norm
        self.hook_embed = HookPoint()

    def forward(self, input_ids: Int[Tensor, "batch pos"] | None = None,
                attention_mask: Int[Tensor, "batch k_pos"] | None = None,
                position_ids: Int[Tensor, "batch pos"] | None = None,
                inputs_embeds: Float[Tensor, "batch pos d_model"] | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                start_at_layer: int | None = None, stop_at_layer: int | None = None) -> ModelOutput:
        """`attention_mask` covers the cached prefix plus the new positions (1 = real token, 0 = padding).
        Positions (the rotation angles) default to 0, 1, ... after the cached prefix, as in `transformers`;
        left-padded generation passes `position_ids` explicitly. `start_at_layer` / `stop_at_layer` resume at /
        stop before a block, as in GPT2.forward."""
        c = self.cfg
        blocks = layer_slice(start_at_layer, stop_at_layer, c.n_layers)
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = len(cache) if cache is not None else 0
        if inputs_embeds is None:
            check_tokens(input_ids, c.d_vocab, c.n_ctx, past)
            inputs_embeds = self.embed(input_ids)
        n_pos = inputs_embeds.shape[1]
        check_length(past + n_pos, c.n_ctx)
        if position_ids is None:
            position_ids = torch.arange(past, past + n_pos, device=inputs_embeds.device).expand(len(inputs_embeds), -1)
        inv_freq = rope_inv_freq(c.d_rotary, c.rope_theta, c.rope_type, c.rope_factor)
        rope = rotary_cos_sin(position_ids, inv_freq, inputs_embeds.dtype)
        mask = causal_mask(attention_mask, n_pos, past + n_pos, inputs_embeds.dtype, inputs_embeds.device)
        x = inputs_embeds if start_at_layer is not None else self.hook_embed(inputs_embeds)
        for block in self.blocks[blocks]:
            x = block(x, mask, cache, rope)
        if stop_at_layer is not None:
            return ModelOutput(last_hidden_state=x, past_key_values=cache)
        return ModelOutput(last_hidden_state=self.ln_final(x), past_key_values=cache)


class GPTNeoXLM(CausalLM, GPTNeoX):
    """GPT-NeoX / Pythia with its (untied, unless the config says otherwise) unembedding: also returns `logits`,
    and `loss` when `labels` are given."""


# -- HuggingFace attribute names ----------------------------------------------------------------------------------
# Code written for `transformers` reaches into the model by HF's names (`model.gpt_neox.layers[3]`,
# `model.embed_out`, `config.hidden_size`): these aliases answer to them. Hook names do not change.
GPTNeoX.config, GPTNeoX.embed_in = alias("cfg"), alias("embed")
GPTNeoX.layers, GPTNeoX.final_layer_norm = alias("blocks"), alias("ln_final")
GPTNeoX.gpt_neox = property(lambda self: self, doc="HuggingFace's `model.gpt_neox`: the model itself.")
GPTNeoXLM.embed_out, GPTNeoXLM.lm_head = alias("unembed"), alias("unembed")
# Inside the model (for code that rebuilds the forward by HF's names): `gpt_neox.rotary_emb`,
# `layers[i].attention.query_key_value`, `layers[i].mlp.dense_h_to_4h`, ...
GPTNeoX.rotary_emb = property(lambda self: RotaryEmbedding(rope_inv_freq(
    self.cfg.d_rotary, self.cfg.rope_theta, self.cfg.rope_type, self.cfg.rope_factor)),
    doc="HuggingFace's `gpt_neox.rotary_emb`.")
GPTNeoX.emb_dropout = identity_alias("emb_dropout")
Block.input_layernorm, Block.post_attention_layernorm = alias("ln1"), alias("ln2")
Block.attention, Block.use_parallel_residual = alias("attn"), alias("parallel")
Block.post_attention_dropout, Block.post_mlp_dropout = identity_alias("post_attention_dropout"), \
    identity_alias("post_mlp_dropout")
Attention.query_key_value, Attention.dense = alias("qkv"), alias("out")
Attention.num_attention_heads, Attention.scaling, Attention.layer_idx = alias("n_heads"), alias("scale"), \
    alias("layer")
Attention.head_size = property(lambda self: self.out.in_features // self.n_heads, doc="d_head.")
Attention.attention_dropout = 0.0  # HF's dropout probability: there is no dropout here
MLP.dense_h_to_4h, MLP.dense_4h_to_h = alias("fc"), alias("proj")
# `outputs.hidden_states` / `outputs.attentions` (see HookedModel.__call__)
GPTNeoX.hidden_state_hooks = ("blocks.{i}.hook_resid_pre", "ln_final.hook_normalized")
GPTNeoX.attention_hook = "blocks.{i}.attn.hook_pattern"
