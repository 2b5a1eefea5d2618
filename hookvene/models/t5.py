"""T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer") with a HookPoint on every activation.

Features of the architecture:
- encoder-decoder; one token embedding (`shared`) feeds both stacks;
- no position embeddings: each stack learns one scalar per (relative-distance bucket, head), added to the
  attention scores of all its layers. Buckets are exact for short distances and logarithmic up to
  `max_distance`; the encoder's are bidirectional, the decoder's unidirectional (it only looks back);
- pre-norm blocks with an RMS-style LayerNorm (scale only: no mean subtraction, no bias);
- no 1/sqrt(d_head) score scaling: T5 folded it into the initialisation of `q`;
- the head width `d_kv` is free, so `n_heads * d_kv` may differ from `d_model`;
- decoder blocks add cross-attention (queries from the decoder, keys and values from the encoder output);
- two variants: original T5 (ReLU MLP `wi`/`wo`, unembedding tied to `shared`, decoder output scaled by
  `d_model**-0.5` before it) and v1.1 / FLAN-T5 (gated-GELU MLP `wi_0`/`wi_1`/`wo`, own `lm_head`, no
  scaling).

Parameters mirror the HuggingFace checkpoint except that each stack's relative-position table sits on the
stack (`encoder.relative_attention_bias`), not inside block 0; `hookvene/loading/t5.py` is the renaming table.
"""

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from hookvene.hooks import HookPoint
from hookvene.models.common import (
    ACTIVATIONS,
    HFAliases,
    HookedModel,
    KVCache,
    ModelOutput,
    alias,
    attend,
    causal_mask,
    check_tokens,
    identity_alias,
    merge_heads,
    padding_to_additive,
    runtime_flags,
    split_heads,
)


@runtime_flags
@dataclass(frozen=True, kw_only=True)
class T5Config(HFAliases):
    d_vocab: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head width (d_head)
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    n_heads: int = 8
    num_buckets: int = 32
    max_distance: int = 128
    ln_eps: float = 1e-6
    gated: bool = False  # v1.1 / FLAN gated MLP: wo(act(wi_0 x) * wi_1 x)
    act_fn: str = "relu"
    tie_word_embeddings: bool = True  # unembedding shares `shared.weight`
    scale_decoder_outputs: bool = True  # multiply the decoder output by d_model**-0.5 before the unembedding
    pad_token_id: int = 0
    decoder_start_token_id: int = 0

    # TransformerLens's cfg names (see HFAliases in models/common.py)
    tl_cfg: ClassVar[dict[str, str | None]] = {"normalization_type": "RMS",
                                               "positional_embedding_type": "relative_positional_bias", "n_ctx": None}
    hf_aliases: ClassVar[dict[str, str]] = {
        "vocab_size": "d_vocab", "hidden_size": "d_model", "head_dim": "d_kv", "num_layers": "n_encoder_layers",
        "num_hidden_layers": "n_encoder_layers", "num_decoder_layers": "n_decoder_layers", "num_heads": "n_heads",
        "num_attention_heads": "n_heads", "relative_attention_num_buckets": "num_buckets",
        "relative_attention_max_distance": "max_distance", "layer_norm_epsilon": "ln_eps",
    }

    def __post_init__(self) -> None:
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; choose one of {sorted(ACTIVATIONS)}")

    @property
    def d_head(self) -> int:
        return self.d_kv

    @property
    def d_mlp(self) -> int:
        return self.d_ff


class T5LayerNorm(nn.Module):
    """RMS norm: x / rms(x) * weight, the mean of squares taken in fp32."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:  # any leading dims
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.hook_normalized(self.weight * x.to(self.weight.dtype))


def relative_position_bucket(relative_position: Int[Tensor, "q_pos k_pos"], bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Int[Tensor, "q_pos k_pos"]:
    """Bucket of each `key - query` distance, exactly as Mesh TensorFlow (and `transformers`) compute it.

    Bidirectional: half the buckets for keys before the query, half for keys after. Unidirectional: keys
    after the query (masked anyway) share bucket 0 with distance 0. Within a half of n buckets, distances
    below n // 2 get a bucket each; larger ones share logarithmically wider buckets, up to max_distance."""
    if bidirectional:
        num_buckets //= 2
        offset = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        offset = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return offset + torch.where(distance < max_exact, distance, log_bucket)


class RelativePositionBias(nn.Embedding):
    """One learned scalar per (distance bucket, head); HF keeps this table in block 0 of each stack."""

    def __init__(self, cfg: T5Config, bidirectional: bool) -> None:
        super().__init__(cfg.num_buckets, cfg.n_heads)
        self.bidirectional, self.max_distance = bidirectional, cfg.max_distance

    def forward(self, q_idx: Int[Tensor, " q_pos"],
                k_idx: Int[Tensor, " k_pos"]) -> Float[Tensor, "1 head q_pos k_pos"]:
        bucket = relative_position_bucket(k_idx[None, :] - q_idx[:, None], self.bidirectional,
                                          self.num_embeddings, self.max_distance)
        return super().forward(bucket).permute(2, 0, 1)[None]


def padding_mask(attention_mask: Int[Tensor, "batch k_pos"] | None,
                 dtype: torch.dtype) -> Float[Tensor, "batch 1 1 k_pos"] | None:
    if attention_mask is None:
        return None
    return padding_to_additive(attention_mask[:, None, None, :].bool(), dtype)


class Attention(nn.Module):
    """Unscaled multi-head attention: self-attention when `x_kv` is `x`, cross-attention when it is the
    encoder output. `mask` is additive and holds the position bias (HF: SelfAttention / EncDecAttention)."""

    def __init__(self, cfg: T5Config, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        d_inner = cfg.n_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, d_inner, bias=False)
        self.k = nn.Linear(cfg.d_model, d_inner, bias=False)
        self.v = nn.Linear(cfg.d_model, d_inner, bias=False)
        self.o = nn.Linear(d_inner, cfg.d_model, bias=False)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch q_pos d_model"], x_kv: Float[Tensor, "batch kv_pos d_model"],
                mask: Float[Tensor, "#batch #head #q_pos k_pos"] | None,
                cache: KVCache | None = None) -> Float[Tensor, "batch q_pos d_model"]:
        q = self.hook_q(split_heads(self.q(x), self.n_heads))  # batch q_pos head d_head
        k = self.hook_k(split_heads(self.k(x_kv), self.n_heads))  # batch kv_pos head d_head (new positions)
        v = self.hook_v(split_heads(self.v(x_kv), self.n_heads))
        if cache is not None:  # decoder generation: prepend the cached keys/values (hooks saw the new ones)
            k, v = cache.update(self.layer, k, v)
        # z = softmax(q k^T + mask) v, per head; the mask holds the relative position bias (and causality in the
        # decoder's self-attention), and there is no 1/sqrt(d_head) (T5 folded it into q's initialisation).
        z = attend(q, k, v, mask, causal=False, scale=1.0,
                   hook_scores=self.hook_attn_scores, hook_pattern=self.hook_pattern)
        z = self.hook_z(z)  # batch q_pos head d_head
        return self.o(merge_heads(z))

    # TransformerLens's weight layout, as views of the (out, in) Linear weights (an edit through them reaches the
    # model), on self-attention and cross-attention alike: x @ W_Q is `hook_q` (cross-attention: W_K / W_V read the
    # encoder output), and z @ W_O per head, summed over heads, is the attention output.
    def _heads_in(self, lin: nn.Linear) -> Float[Tensor, "head d_model d_head"]:
        return lin.weight.view(self.n_heads, -1, lin.weight.shape[1]).transpose(1, 2)

    def _zeros(self, *shape: int) -> Tensor:
        return self.q.weight.new_zeros(shape)

    W_Q = property(lambda self: self._heads_in(self.q), doc=(
        "(head, d_model, d_head), a view of q.weight: x @ W_Q is hook_q. T5 attention has no biases (b_Q, b_K, b_V, "
        "b_O read as zeros, fresh tensors) and no 1/sqrt(d_head) scaling: hook_attn_scores = q . k + position bias "
        "(T5 folded the scaling into W_Q's initialisation)."))
    W_K = property(lambda self: self._heads_in(self.k), doc="(head, d_model, d_head), a view of k.weight")
    W_V = property(lambda self: self._heads_in(self.v), doc="(head, d_model, d_head), a view of v.weight")
    W_O = property(lambda self: self.o.weight.view(self.o.weight.shape[0], self.n_heads, -1).permute(1, 2, 0),
                   doc="(head, d_head, d_model), a view of o.weight")
    b_Q = b_K = b_V = property(lambda self: self._zeros(self.n_heads, self.q.out_features // self.n_heads),
                               doc="(head, d_head) zeros: T5 attention has no biases")
    b_O = property(lambda self: self._zeros(self.o.out_features), doc="(d_model,) zeros: T5 attention has no biases")


class MLP(nn.Module):
    """Original T5: wo(relu(wi x)) (HF: DenseReluDense)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.wi(x))  # batch pos d_mlp
        return self.wo(self.hook_post(self.act(pre)))

    # TransformerLens's names, as views (an edit through them reaches the model): hook_pre = x @ W_in, the output
    # hook_post @ W_out. No biases: b_in / b_out read as zeros (fresh tensors).
    W_in = property(lambda self: self.wi.weight.T, doc="(d_model, d_mlp), a view of wi.weight")
    W_out = property(lambda self: self.wo.weight.T, doc="(d_mlp, d_model), a view of wo.weight")
    b_in = property(lambda self: self.wi.weight.new_zeros(self.wi.out_features), doc="(d_mlp,) zeros: no biases")
    b_out = property(lambda self: self.wo.weight.new_zeros(self.wo.out_features), doc="(d_model,) zeros: no biases")


class GatedMLP(nn.Module):
    """T5 v1.1 / FLAN: wo(gelu(wi_0 x) * wi_1 x) (HF: DenseReluDense, despite the name)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre, self.hook_pre_linear, self.hook_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.wi_0(x))  # batch pos d_mlp
        pre_linear = self.hook_pre_linear(self.wi_1(x))
        return self.wo(self.hook_post(self.act(pre) * pre_linear))

    # TransformerLens's gated-MLP names, as views (an edit through them reaches the model): hook_pre = x @ W_gate
    # (wi_0), hook_pre_linear = x @ W_in (wi_1), the output hook_post @ W_out. No biases: b_in / b_out read as zeros.
    W_gate = property(lambda self: self.wi_0.weight.T, doc="(d_model, d_mlp), a view of wi_0.weight")
    W_in = property(lambda self: self.wi_1.weight.T, doc="(d_model, d_mlp), a view of wi_1.weight")
    W_out = property(lambda self: self.wo.weight.T, doc="(d_mlp, d_model), a view of wo.weight")
    b_in = property(lambda self: self.wi_1.weight.new_zeros(self.wi_1.out_features), doc="(d_mlp,) zeros: no biases")
    b_out = property(lambda self: self.wo.weight.new_zeros(self.wo.out_features), doc="(d_model,) zeros: no biases")


def clamp_fp16(x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """In float16, `transformers`' T5 clamps the residual stream after every sublayer to the largest finite value
    (minus 1000 where something overflowed): T5's activations overflow fp16, and an inf turns into NaN at the next
    norm. We do the same, at the same places, so fp16 logits match it; other dtypes pass through."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class EncoderBlock(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: T5Config, layer: int) -> None:
        super().__init__()
        self.ln1 = T5LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: layer.0.layer_norm
        self.attn = Attention(cfg, layer)  # HF: layer.0.SelfAttention
        self.ln2 = T5LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: layer.1.layer_norm
        self.mlp = (GatedMLP if cfg.gated else MLP)(cfg)  # HF: layer.1.DenseReluDense
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"],
                mask: Float[Tensor, "#batch head pos pos"]) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        x = self.ln1(resid_pre)
        attn_out = self.hook_attn_out(self.attn(x, x, mask))
        resid_mid = self.hook_resid_mid(clamp_fp16(resid_pre + attn_out))
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(clamp_fp16(resid_mid + mlp_out))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, MLP; each pre-normed and residual:

        resid_pre ──ln1──attn (causal + position bias)──(+)── resid_mid
        resid_mid ──ln2──cross_attn (k, v: encoder output)──(+)── resid_mid_cross
        resid_mid_cross ──ln3──mlp──(+)── resid_post
    """

    def __init__(self, cfg: T5Config, layer: int) -> None:
        super().__init__()
        self.ln1 = T5LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: layer.0.layer_norm
        self.attn = Attention(cfg, layer)  # HF: layer.0.SelfAttention
        self.ln2 = T5LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: layer.1.layer_norm
        self.cross_attn = Attention(cfg, layer)  # HF: layer.1.EncDecAttention
        self.ln3 = T5LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: layer.2.layer_norm
        self.mlp = (GatedMLP if cfg.gated else MLP)(cfg)  # HF: layer.2.DenseReluDense
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_resid_mid_cross, self.hook_attn_out = HookPoint(), HookPoint()
        self.hook_cross_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"],
                mask: Float[Tensor, "#batch head pos k_pos"], enc: Float[Tensor, "batch enc_pos d_model"],
                enc_mask: Float[Tensor, "batch 1 1 enc_pos"] | None,
                cache: KVCache | None) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        x = self.ln1(resid_pre)
        attn_out = self.hook_attn_out(self.attn(x, x, mask, cache))
        resid_mid = self.hook_resid_mid(clamp_fp16(resid_pre + attn_out))
        # cross-attention k, v are recomputed from the encoder output at every call (not cached), so its hooks
        # always see all encoder positions
        cross_out = self.hook_cross_attn_out(self.cross_attn(self.ln2(resid_mid), enc, enc_mask))
        resid_mid_cross = self.hook_resid_mid_cross(clamp_fp16(resid_mid + cross_out))
        mlp_out = self.hook_mlp_out(self.mlp(self.ln3(resid_mid_cross)))
        return self.hook_resid_post(clamp_fp16(resid_mid_cross + mlp_out))


class Encoder(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.relative_attention_bias = RelativePositionBias(cfg, bidirectional=True)
        self.blocks = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.n_encoder_layers))  # HF: block
        self.ln_final = T5LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: final_layer_norm
        self.hook_embed, self.hook_position_bias = HookPoint(), HookPoint()

    def forward(self, embed: Float[Tensor, "batch pos d_model"],
                attention_mask: Int[Tensor, "batch pos"] | None) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_embed(embed)
        idx = torch.arange(x.shape[1], device=x.device)
        bias = self.hook_position_bias(self.relative_attention_bias(idx, idx))  # once for all layers
        pad = padding_mask(attention_mask, x.dtype)
        mask = bias if pad is None else bias + pad
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_final(x)


class Decoder(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.relative_attention_bias = RelativePositionBias(cfg, bidirectional=False)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_decoder_layers))  # HF: block
        self.ln_final = T5LayerNorm(cfg.d_model, cfg.ln_eps)  # HF: final_layer_norm
        self.hook_embed, self.hook_position_bias = HookPoint(), HookPoint()

    def forward(self, embed: Float[Tensor, "batch pos d_model"],
                attention_mask: Int[Tensor, "batch k_pos"] | None,
                enc: Float[Tensor, "batch enc_pos d_model"],
                enc_attention_mask: Int[Tensor, "batch enc_pos"] | None,
                cache: KVCache | None) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_embed(embed)
        past, n_pos = (len(cache) if cache is not None else 0), x.shape[1]
        q_idx = torch.arange(past, past + n_pos, device=x.device)  # absolute: the cache holds the prefix
        k_idx = torch.arange(past + n_pos, device=x.device)
        bias = self.hook_position_bias(self.relative_attention_bias(q_idx, k_idx))  # 1 head pos k_pos
        mask = bias + causal_mask(attention_mask, n_pos, past + n_pos, x.dtype, x.device, fused_ok=False)
        enc_mask = padding_mask(enc_attention_mask, x.dtype)
        for block in self.blocks:
            x = block(x, mask, enc, enc_mask, cache)
        return self.ln_final(x)


def check_mask(mask: Tensor | None, shape: tuple[int, int], name: str) -> None:
    if mask is not None and tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (batch, positions), got {tuple(mask.shape)}")


class T5(HookedModel):
    """T5 without the LM head: returns the decoder output after its final norm, and the encoder output."""

    is_encoder_decoder = True

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.d_vocab, cfg.d_model)  # HF: shared (= {encoder,decoder}.embed_tokens)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, input_ids: Int[Tensor, "batch enc_pos"] | None = None,
               attention_mask: Int[Tensor, "batch enc_pos"] | None = None,
               inputs_embeds: Float[Tensor, "batch enc_pos d_model"] | None = None,
               ) -> Float[Tensor, "batch enc_pos d_model"]:
        """The encoder output (after its final norm), reusable as `encoder_outputs=` in later calls."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds (or encoder_outputs instead)")
        if inputs_embeds is None:
            check_tokens(input_ids, self.cfg.d_vocab, None)
            inputs_embeds = self.shared(input_ids)
        check_mask(attention_mask, tuple(inputs_embeds.shape[:2]), "attention_mask")
        return self.encoder(inputs_embeds, attention_mask)

    def forward(self, input_ids: Int[Tensor, "batch enc_pos"] | None = None,
                attention_mask: Int[Tensor, "batch enc_pos"] | None = None,
                decoder_input_ids: Int[Tensor, "batch pos"] | None = None,
                decoder_attention_mask: Int[Tensor, "batch k_pos"] | None = None,
                encoder_outputs: Float[Tensor, "batch enc_pos d_model"] | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                inputs_embeds: Float[Tensor, "batch enc_pos d_model"] | None = None) -> ModelOutput:
        """Encode (unless `encoder_outputs` is given), then decode `decoder_input_ids` against the encoding.

        `attention_mask` marks real encoder tokens (1) and padding (0); pass it at every step, since
        cross-attention needs it. `decoder_attention_mask` covers the cached decoder prefix plus the new
        positions. `past_key_values` caches decoder self-attention keys and values only; decoder positions
        continue after the cached prefix."""
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, inputs_embeds)
        elif not (isinstance(encoder_outputs, Tensor) and encoder_outputs.dim() == 3
                  and encoder_outputs.shape[-1] == self.cfg.d_model):
            raise ValueError(f"encoder_outputs must be a (batch, enc_pos, {self.cfg.d_model}) tensor of "
                             f"encoder hidden states, e.g. from model.encode(...)")
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (T5LM builds it from labels when given labels)")
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = len(cache) if cache is not None else 0
        check_tokens(decoder_input_ids, self.cfg.d_vocab, None)
        batch, n_pos = decoder_input_ids.shape
        if encoder_outputs.shape[0] != batch:
            raise ValueError(f"encoder batch {encoder_outputs.shape[0]} != decoder batch {batch}")
        check_mask(attention_mask, tuple(encoder_outputs.shape[:2]), "attention_mask")
        check_mask(decoder_attention_mask, (batch, past + n_pos), "decoder_attention_mask (cached + new)")
        embed = self.shared(decoder_input_ids)
        x = self.decoder(embed, decoder_attention_mask, encoder_outputs, attention_mask, cache)
        return ModelOutput(last_hidden_state=x, past_key_values=cache,
                           encoder_last_hidden_state=encoder_outputs)


class T5LM(T5):
    """T5 with its unembedding: also returns `logits`, and `loss` when `labels` are given."""

    has_lm_head = can_generate = True

    def __init__(self, cfg: T5Config) -> None:
        super().__init__(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)  # HF: lm_head
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.shared.weight
        # original T5 rescales the decoder output before its tied unembedding; v1.1 / FLAN does not
        self.output_scale = cfg.d_model**-0.5 if cfg.scale_decoder_outputs else 1.0
        self.hook_logits = HookPoint()

    def shift_right(self, labels: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
        """Teacher-forcing decoder inputs: the start token, then all labels but the last; -100 -> padding."""
        start = labels.new_full((labels.shape[0], 1), self.cfg.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.cfg.pad_token_id)

    def forward(self, input_ids: Int[Tensor, "batch enc_pos"] | None = None,
                attention_mask: Int[Tensor, "batch enc_pos"] | None = None,
                decoder_input_ids: Int[Tensor, "batch pos"] | None = None, *,
                labels: Int[Tensor, "batch pos"] | None = None, **kwargs: Any) -> ModelOutput:
        """T5.forward (same arguments), then the unembedding. `labels` are the target tokens aligned with the
        decoder positions (-100 = ignore); without
        `decoder_input_ids` they are shifted right to make them, as in `transformers`."""
        if labels is not None:
            check_tokens(labels.masked_fill(labels == -100, 0), self.cfg.d_vocab, None)  # -100 = ignore
            if decoder_input_ids is None:
                decoder_input_ids = self.shift_right(labels)
            if labels.shape != decoder_input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} and decoder_input_ids "
                                 f"{tuple(decoder_input_ids.shape)} must have the same shape")
        out = super().forward(input_ids, attention_mask, decoder_input_ids, **kwargs)
        out.logits = self.hook_logits(self.unembed(out.last_hidden_state * self.output_scale))
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return out


# -- HuggingFace attribute names ----------------------------------------------------------------------------------
# `shared`, `encoder` and `decoder` are the real submodules; these answer to the rest of HF's names.
T5.config = alias("cfg")
T5LM.lm_head = alias("unembed")
T5LM.model_dim = property(lambda self: self.cfg.d_model, doc="HuggingFace's model_dim: d_model.")
# Inside the stacks (for code that rebuilds the forward by HF's names): `encoder.block[i].layer[0].SelfAttention.q`,
# `layer[1].DenseReluDense.wi`, the decoder's `layer[1].EncDecAttention`, `final_layer_norm`. HF's `layer` list is
# a tuple here of plain namespaces holding our submodules (each sublayer's norm, then its attention or MLP).
Encoder.block, Encoder.final_layer_norm, Encoder.dropout = alias("blocks"), alias("ln_final"), identity_alias("dropout")
Decoder.block, Decoder.final_layer_norm, Decoder.dropout = alias("blocks"), alias("ln_final"), identity_alias("dropout")
EncoderBlock.layer = property(lambda self: (
    SimpleNamespace(layer_norm=self.ln1, SelfAttention=self.attn, dropout=nn.Identity()),
    SimpleNamespace(layer_norm=self.ln2, DenseReluDense=self.mlp, dropout=nn.Identity())),
    doc="HuggingFace's block.layer: (self-attention, feed-forward).")
DecoderBlock.layer = property(lambda self: (
    SimpleNamespace(layer_norm=self.ln1, SelfAttention=self.attn, dropout=nn.Identity()),
    SimpleNamespace(layer_norm=self.ln2, EncDecAttention=self.cross_attn, dropout=nn.Identity()),
    SimpleNamespace(layer_norm=self.ln3, DenseReluDense=self.mlp, dropout=nn.Identity())),
    doc="HuggingFace's block.layer: (self-attention, cross-attention, feed-forward).")
Attention.key_value_proj_dim = property(lambda self: self.q.out_features // self.n_heads, doc="d_kv.")
Attention.inner_dim, Attention.layer_idx = property(lambda self: self.q.out_features, doc="n_heads * d_kv."), \
    alias("layer")
MLP.dropout = GatedMLP.dropout = identity_alias("dropout")
T5LayerNorm.variance_epsilon = alias("eps")
