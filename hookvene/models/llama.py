"""Llama (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models") and its close relatives
Mistral and Qwen2, with a HookPoint on every activation.

Features of the architecture, and where the relatives differ:
- no position embeddings: queries and keys are rotated by their position (rotary embeddings, RoPE), optionally
  with Llama 3's or linear frequency scaling for longer contexts;
- pre-RMSNorm blocks: x + attn(ln1(x)), then x + mlp(ln2(x)); RMSNorm rescales without centring or bias;
- grouped-query attention: n_kv_heads key/value heads, each shared by n_heads / n_kv_heads query heads;
- a gated MLP (SwiGLU): down(silu(gate(x)) * up(x)), no biases;
- Mistral: a sliding window, a query sees only the last `sliding_window` keys (itself included);
- Qwen2: biases on the q, k, v projections (not on the output), a sliding window on some layers only;
- the unembedding is tied to the token embedding or not, per checkpoint.

Parameters mirror the HuggingFace checkpoint (`nn.Linear` (out, in) everywhere), so loading is a renaming table
(`hookvene/loading/llama.py`). There is no dropout: this is an analysis model, and `transformers` in eval mode
computes the same function.
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
    ModelOutput,
    RotaryEmbedding,
    alias,
    apply_rotary,
    attend,
    check_length,
    check_tokens,
    layer_slice,
    merge_heads,
    rope_inv_freq,
    rotary_cos_sin,
    runtime_flags,
    sliding_causal_mask,
    split_heads,
)

LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's names for a layer's attention span


@runtime_flags
@dataclass(frozen=True, kw_only=True)
class LlamaConfig(HFAliases):
    """Defaults are Llama-2-7B. Mistral sets `sliding_window`; Qwen2 sets `qkv_bias` and, with a sliding window,
    `layer_types` (which layers use it)."""

    d_vocab: int = 32000
    n_ctx: int = 4096
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads (plain multi-head attention)
    d_head: int | None = None  # None: d_model // n_heads (Mistral-Nemo-style checkpoints set it)
    d_mlp: int = 11008
    act_fn: str = "silu"
    rms_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2; Llama's `attention_bias` also sets out_bias
    out_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "llama3" (see rope_inv_freq in models/common.py)
    rope_factor: float = 1.0  # linear, llama3: how many times longer the context is than in pretraining
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_n_ctx: int = 8192  # llama3: the pretraining context
    sliding_window: int | None = None  # Mistral, Qwen2: keys a query sees, itself included
    layer_types: tuple[str, ...] | None = None  # per layer; None: every layer slides when sliding_window is set
    tie_word_embeddings: bool = False

    # TransformerLens's cfg names (see HFAliases in models/common.py)
    tl_cfg: ClassVar[dict[str, str | None]] = {"normalization_type": "RMS", "positional_embedding_type": "rotary"}
    hf_aliases: ClassVar[dict[str, str]] = {
        "vocab_size": "d_vocab", "max_position_embeddings": "n_ctx", "hidden_size": "d_model",
        "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
        "head_dim": "d_head", "intermediate_size": "d_mlp", "hidden_act": "act_fn", "rms_norm_eps": "rms_eps",
    }

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)  # frozen dataclass: set once, here
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                                 f"set d_head explicitly")
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                             f"grouped-query attention shares each key/value head among equally many query heads")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not implemented; choose one of {ROPE_TYPES}")
        if self.layer_types is not None and (len(self.layer_types) != self.n_layers
                                             or not set(self.layer_types) <= set(LAYER_TYPES)):
            raise ValueError(f"layer_types must name one of {LAYER_TYPES} for each of the {self.n_layers} layers, "
                             f"got {self.layer_types!r}")

    @property
    def windows(self) -> tuple[int, ...]:
        """How many positions back each layer's queries see (themselves included); n_ctx is everything."""
        if self.sliding_window is None:
            return (self.n_ctx,) * self.n_layers
        types = self.layer_types or ("sliding_attention",) * self.n_layers
        return tuple(self.sliding_window if t == "sliding_attention" else self.n_ctx for t in types)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (normalised in float32, as `transformers` does); the output is a hook."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.hook_normalized(self.weight * normed.to(x.dtype))


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, cfg.n_heads, cfg.n_kv_heads
        self.scale = cfg.d_head**-0.5
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.d_head, bias=cfg.qkv_bias)  # HF: self_attn.q_proj
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=cfg.qkv_bias)  # HF: self_attn.k_proj
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=cfg.qkv_bias)  # HF: self_attn.v_proj
        self.out = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=cfg.out_bias)  # HF: self_attn.o_proj
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"], mask: Tensor | None, cache: KVCache | None,
                rope: tuple[Tensor, Tensor]) -> Float[Tensor, "batch pos d_model"]:
        q = self.hook_q(split_heads(self.q(x), self.n_heads))  # batch pos head d_head
        k = self.hook_k(split_heads(self.k(x), self.n_kv_heads))  # batch pos kv_head d_head
        v = self.hook_v(split_heads(self.v(x), self.n_kv_heads))
        # Position enters only here: q and k are rotated by angles proportional to their position, so that
        # q_rot . k_rot depends on the positions' difference.
        q = self.hook_rot_q(apply_rotary(q, *rope))
        k = self.hook_rot_k(apply_rotary(k, *rope))
        if cache is not None:  # generation: attend to the cached (rotated) prefix too; hooks saw the new positions
            k, v = cache.update(self.layer, k, v)
        # z = softmax(q_rot k_rot^T / sqrt(d_head) + mask) v, query head h reading key/value head
        # h // (n_heads / n_kv_heads); the mask also hides keys outside a sliding window
        z = attend(q, k, v, mask, causal=True, scale=self.scale,
                   hook_scores=self.hook_attn_scores, hook_pattern=self.hook_pattern)
        z = self.hook_z(z)  # batch pos head d_head: each query head's mix of values, before `out`
        return self.out(merge_heads(z))

    # TransformerLens's weight layout as views of the (out, in) Linear weights (an edit through them reaches the
    # model). As TL 3.x's grouped-query attention: `_W_K` / `_W_V` / `_b_K` / `_b_V` are per key/value head (views);
    # `W_K` / `W_V` / `b_K` / `b_V` repeat each for the n_heads / n_kv_heads query heads that read it (copies when
    # grouped), so QK and OV are per query head. Missing biases read as zeros. All are before the rotary rotation:
    # x @ W_Q + b_Q is `hook_q`, not `hook_rot_q`.
    def _heads_in(self, lin: nn.Linear, n: int) -> Float[Tensor, "head d_model d_head"]:
        return lin.weight.view(n, -1, lin.weight.shape[1]).transpose(1, 2)

    def _head_bias(self, lin: nn.Linear, n: int) -> Float[Tensor, "head d_head"]:
        return (lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])).view(n, -1)

    def _per_query_head(self, t: Tensor) -> Tensor:
        group = self.n_heads // self.n_kv_heads
        return t if group == 1 else t.repeat_interleave(group, dim=0)

    W_Q = property(lambda self: self._heads_in(self.q, self.n_heads))
    b_Q = property(lambda self: self._head_bias(self.q, self.n_heads))
    _W_K = property(lambda self: self._heads_in(self.k, self.n_kv_heads))
    _W_V = property(lambda self: self._heads_in(self.v, self.n_kv_heads))
    _b_K = property(lambda self: self._head_bias(self.k, self.n_kv_heads))
    _b_V = property(lambda self: self._head_bias(self.v, self.n_kv_heads))
    W_K = property(lambda self: self._per_query_head(self._W_K))
    W_V = property(lambda self: self._per_query_head(self._W_V))
    b_K = property(lambda self: self._per_query_head(self._b_K))
    b_V = property(lambda self: self._per_query_head(self._b_V))
    W_O = property(lambda self: self.out.weight.view(self.out.weight.shape[0], self.n_heads, -1).permute(1, 2, 0))
    b_O = property(lambda self: self.out.bias if self.out.bias is not None
                   else self.out.weight.new_zeros(self.out.weight.shape[0]))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). Hook names as TransformerLens's gated MLP."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)  # HF: mlp.gate_proj
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)  # HF: mlp.up_proj
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)  # HF: mlp.down_proj
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre, self.hook_pre_linear, self.hook_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.gate(x))  # batch pos d_mlp: the gate's pre-activation
        pre_linear = self.hook_pre_linear(self.up(x))  # the linear (ungated) branch
        post = self.hook_post(self.act(pre) * pre_linear)
        return self.down(post)

    # TransformerLens's gated-MLP names, as views: W_gate (d_model d_mlp) makes hook_pre, W_in / b_in the linear
    # branch hook_pre_linear, W_out / b_out the output. Missing biases read as zeros; b_gate (mlp_bias=True
    # checkpoints only: TL has no gate bias) is the gate's.
    W_gate = property(lambda self: self.gate.weight.T)
    b_gate = property(lambda self: self.gate.bias if self.gate.bias is not None
                      else self.gate.weight.new_zeros(self.gate.weight.shape[0]))
    W_in = property(lambda self: self.up.weight.T)
    W_out = property(lambda self: self.down.weight.T)
    b_in = property(lambda self: self.up.bias if self.up.bias is not None
                    else self.up.weight.new_zeros(self.up.weight.shape[0]))
    b_out = property(lambda self: self.down.bias if self.down.bias is not None
                     else self.down.weight.new_zeros(self.down.weight.shape[0]))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model, cfg.rms_eps)  # HF: input_layernorm
        self.attn = Attention(cfg, layer)
        self.ln2 = RMSNorm(cfg.d_model, cfg.rms_eps)  # HF: post_attention_layernorm
        self.mlp = MLP(cfg)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"], mask: Tensor | None, cache: KVCache | None,
                rope: tuple[Tensor, Tensor]) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), mask, cache, rope))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class Llama(HookedModel):
    """Llama / Mistral / Qwen2 without the LM head: returns `ModelOutput.last_hidden_state` (after the final
    RMSNorm)."""

    can_resume = True  # forward(start_at_layer=, stop_at_layer=): sweeps resume mid-model

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.windows = cfg.windows  # per layer; full-attention layers see the whole context
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)  # HF: model.embed_tokens
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = RMSNorm(cfg.d_model, cfg.rms_eps)  # HF: model.norm
        self.hook_embed = HookPoint()

    def forward(self, input_ids: Int[Tensor, "batch pos"] | None = None,
                attention_mask: Int[Tensor, "batch k_pos"] | None = None,
                position_ids: Int[Tensor, "batch pos"] | None = None,
                inputs_embeds: Float[Tensor, "batch pos d_model"] | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                start_at_layer: int | None = None, stop_at_layer: int | None = None) -> ModelOutput:
        """`attention_mask` covers the cached prefix plus the new positions (1 = real token, 0 = padding).
        Positions (the rotation angles) default to 0, 1, ... after the cached prefix, as in `transformers`;
        left-padded generation passes `position_ids` explicitly. A sliding window counts key slots, padding
        included, as HF does. `start_at_layer` / `stop_at_layer` resume at / stop before a block, as in
        GPT2.forward."""
        blocks = layer_slice(start_at_layer, stop_at_layer, self.cfg.n_layers)
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = len(cache) if cache is not None else 0
        if inputs_embeds is None:
            check_tokens(input_ids, self.cfg.d_vocab, self.cfg.n_ctx, past)
            inputs_embeds = self.embed(input_ids)
        n_pos = inputs_embeds.shape[1]
        check_length(past + n_pos, self.cfg.n_ctx)
        if position_ids is None:
            position_ids = torch.arange(past, past + n_pos, device=inputs_embeds.device).expand(len(inputs_embeds), -1)
        c = self.cfg
        inv_freq = rope_inv_freq(c.d_head, c.rope_theta, c.rope_type, c.rope_factor, c.rope_low_freq_factor,
                                 c.rope_high_freq_factor, c.rope_original_n_ctx)
        rope = rotary_cos_sin(position_ids, inv_freq, inputs_embeds.dtype)  # the same angles for every layer
        masks = {w: sliding_causal_mask(attention_mask, n_pos, past + n_pos, w, inputs_embeds.dtype,
                                        inputs_embeds.device) for w in set(self.windows)}
        x = inputs_embeds if start_at_layer is not None else self.hook_embed(inputs_embeds)
        for block, window in list(zip(self.blocks, self.windows))[blocks]:
            x = block(x, masks[window], cache, rope)
        if stop_at_layer is not None:
            return ModelOutput(last_hidden_state=x, past_key_values=cache)
        return ModelOutput(last_hidden_state=self.ln_final(x), past_key_values=cache)


class LlamaLM(CausalLM, Llama):
    """Llama / Mistral / Qwen2 with the unembedding (tied to the token embedding when the config says so): also
    returns `logits`, and `loss` when `labels` are given."""


# -- HuggingFace attribute names ----------------------------------------------------------------------------------
# Code written for `transformers` reaches into the model by HF's names (`model.model.layers[3]`,
# `model.model.embed_tokens`, `config.hidden_size`): these aliases answer to them. Hook names do not change.
Llama.config, Llama.embed_tokens = alias("cfg"), alias("embed")
Llama.layers, Llama.norm = alias("blocks"), alias("ln_final")
Llama.model = property(lambda self: self, doc="HuggingFace's `model.model`: the model itself.")
LlamaLM.lm_head = alias("unembed")
# Inside the model (pyvene's Llama oracle rebuilds the forward from these): `model.rotary_emb`,
# `layers[i].self_attn.q_proj`, `layers[i].mlp.gate_proj`, ...
Llama.rotary_emb = property(lambda self: RotaryEmbedding(rope_inv_freq(
    self.cfg.d_head, self.cfg.rope_theta, self.cfg.rope_type, self.cfg.rope_factor, self.cfg.rope_low_freq_factor,
    self.cfg.rope_high_freq_factor, self.cfg.rope_original_n_ctx)), doc="HuggingFace's `model.rotary_emb`.")
Block.input_layernorm, Block.post_attention_layernorm = alias("ln1"), alias("ln2")
Block.self_attn = alias("attn")
Attention.q_proj, Attention.k_proj, Attention.v_proj = alias("q"), alias("k"), alias("v")
Attention.o_proj, Attention.scaling, Attention.layer_idx = alias("out"), alias("scale"), alias("layer")
Attention.num_heads, Attention.num_key_value_heads = alias("n_heads"), alias("n_kv_heads")
Attention.head_dim = property(lambda self: self.q.out_features // self.n_heads, doc="d_head.")
Attention.num_key_value_groups = property(lambda self: self.n_heads // self.n_kv_heads,
                                          doc="Query heads per key/value head.")
Attention.attention_dropout = 0.0  # HF's dropout probability: there is no dropout here
MLP.gate_proj, MLP.up_proj, MLP.down_proj, MLP.act_fn = alias("gate"), alias("up"), alias("down"), alias("act")
RMSNorm.variance_epsilon = alias("eps")
# `outputs.hidden_states` / `outputs.attentions` (see HookedModel.__call__)
Llama.hidden_state_hooks = ("blocks.{i}.hook_resid_pre", "ln_final.hook_normalized")
Llama.attention_hook = "blocks.{i}.attn.hook_pattern"
