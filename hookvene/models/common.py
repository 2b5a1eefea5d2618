"""Architecture-free helpers shared by the model files: what a model can do (`HookedModel`), head reshapes,
masks, attention, KV cache, outputs, and KV-cached decoding (`generate`)."""

import math
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from hookvene.cache import ActivationCache
from hookvene.hooks import HookPoint
from hookvene.lens import LensModel, is_text


class HookedModel(LensModel):
    """Base of every hookvene model. What a model can do is declared once, as class attributes, and read by
    everything above (interventions, generation, sweeps, the CLI) instead of probing signatures or class trees.
    TransformerLens's model API (tokenizer methods, return_type, weight views, weight processing) comes from
    `hookvene.lens.LensModel`; `run_with_cache` returns `hookvene.cache.ActivationCache`."""

    cache_class = ActivationCache

    is_encoder_decoder: ClassVar[bool] = False  # forward takes decoder_input_ids (T5)
    has_lm_head: ClassVar[bool] = False  # forward returns `logits` over the vocabulary
    can_generate: ClassVar[bool] = False  # KV-cached decoding with `generate`
    can_resume: ClassVar[bool] = False  # forward(start_at_layer=, stop_at_layer=), as TransformerLens
    # What `transformers` returns as `hidden_states` / `attentions` when asked (output_hidden_states=True,
    # output_attentions=True, as call arguments or config flags), read from hooks: hidden_states = the input of
    # every block ({i} = layer), then the final normalised output; attentions = every layer's pattern. None: the
    # model does not offer them.
    hidden_state_hooks: ClassVar[tuple[str, str] | None] = None
    attention_hook: ClassVar[str | None] = None

    @property
    def cfg(self) -> Any:
        """The model's config. Reading it through the model binds it to the model, so that TransformerLens's
        `cfg.device` / `cfg.dtype` follow `model.to(...)` (see `HFAliases`)."""
        cfg = self.__dict__.get("_config")
        if cfg is None:
            raise AttributeError(f"{type(self).__name__} has no cfg")
        bind_config(cfg, self)
        return cfg

    @cfg.setter
    def cfg(self, cfg: Any) -> None:
        self.__dict__["_config"] = cfg

    def __call__(self, *args: Any, output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                 return_dict: bool | None = None, **kwargs: Any) -> Any:
        """`forward`, plus the switches every `transformers` model takes: `output_hidden_states`,
        `output_attentions` (collected from the hook points, so they include interventions) and
        `return_dict=False` (a tuple in `transformers`' order). Unset switches fall back to the config's flags."""
        cfg = getattr(self, "cfg", None)
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(cfg, "output_hidden_states", False))
        if output_attentions is None:
            output_attentions = bool(getattr(cfg, "output_attentions", False))
        wanted = {"hidden_states": output_hidden_states, "attentions": output_attentions}
        for what in [w for w, on in wanted.items() if on]:
            if (self.hidden_state_hooks if what == "hidden_states" else self.attention_hook) is None:
                raise ValueError(f"{type(self).__name__} does not return {what}; models that do: GPT-2, GPT-Neo "
                                 f"(any hook can be read with run_with_cache)")
        hidden: list[Tensor] = []
        patterns: list[Tensor] = []
        names: list[tuple[str, list[Tensor]]] = []
        if output_hidden_states:
            per_block, final = self.hidden_state_hooks
            names += [(per_block.format(i=i), hidden) for i in range(self.cfg.n_layers)] + [(final, hidden)]
        if output_attentions:
            names += [(self.attention_hook.format(i=i), patterns) for i in range(self.cfg.n_layers)]
        hooks = [(n, lambda x, hook, store=store: store.append(x)) for n, store in names]
        if hooks:
            with self.hooks(fwd_hooks=hooks):
                out = super().__call__(*args, **kwargs)
            out.hidden_states = tuple(hidden) if output_hidden_states else None
            out.attentions = tuple(patterns) if output_attentions else None
        else:
            out = super().__call__(*args, **kwargs)
        as_dict = return_dict if return_dict is not None else getattr(cfg, "return_dict", True)
        return out if as_dict or not isinstance(out, ModelOutput) else out.to_tuple()

    def unembed_resid(self, resid: Float[Tensor, "... d_model"],
                      tokens: Int[Tensor, "... k"] | None = None) -> Float[Tensor, "... d_vocab"]:
        """Logits of residual-stream vectors leaving the last block (final LayerNorm, then unembedding); with
        `tokens`, only those logits (... k). `hook_logits` does not fire."""
        raise ValueError(f"{type(self).__name__} cannot unembed residual vectors: that needs a decoder-only "
                         f"language model with its LM head (GPT2LM, GPTNeoLM)")

    def generate(self, input_ids: Int[Tensor, "batch pos"] | str | list[str], attention_mask: Tensor | None = None,
                 **kwargs: Any) -> Any:
        """KV-cached greedy or sampled decoding; hooks attached with `hooks()` fire on every step (see
        `generate` in this module for the arguments). A string (or a list of strings, padded on the left) is
        tokenised as `to_tokens` does and the result decoded back: text in, text out (prompt included for
        decoder-only models, as TransformerLens returns it)."""
        if not is_text(input_ids):
            return generate(self, input_ids, attention_mask, **kwargs)
        ids, mask = self.tokens_and_mask(input_ids, padding_side="left")
        out = generate(self, ids, mask, **kwargs)
        ids_out = out[0] if isinstance(out, tuple) else out
        texts = [self.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ids_out]
        texts = texts[0] if isinstance(input_ids, str) else texts
        return (texts, out[1]) if isinstance(out, tuple) else texts


# config id -> the model it was last read through (`HookedModel.cfg`); a side table, so the config itself stays
# plain data (pickles, prints and compares as before)
_BOUND: dict[int, weakref.ref] = {}


def bind_config(cfg: Any, model: nn.Module) -> None:
    """Remember `model` as the model `cfg` describes (for `cfg.device` / `cfg.dtype`)."""
    ref = _BOUND.get(id(cfg))
    if ref is not None and ref() is model:
        return
    if ref is None:
        try:
            weakref.finalize(cfg, _BOUND.pop, id(cfg), None)
        except TypeError:  # a config that cannot be weakly referenced: no binding
            return
    _BOUND[id(cfg)] = weakref.ref(model)


def bound_model(cfg: Any) -> nn.Module | None:
    """The model `cfg` was last read through, if it is still alive."""
    ref = _BOUND.get(id(cfg))
    return ref() if ref is not None else None


EPS_FIELDS = ("ln_eps", "rms_eps")  # TransformerLens's `cfg.eps` is whichever of these a config has


class HFAliases:
    """Lets a model config answer to its HuggingFace attribute names (`config.n_embd` -> `config.d_model`) and to
    TransformerLens's `cfg` names: `tl_cfg` (one line per config class) maps a TL name to a constant of the
    architecture (`normalization_type`, `positional_embedding_type`, ...); `eps` is the norm's epsilon field;
    `device` and `dtype` follow the model the config was read from (`model.cfg`), so after
    `model.to(torch.float64)` `model.cfg.dtype` is float64 (None for a config not read through a model).
    `normalization_type` follows the model too: "LNPre" once `fold_ln` has folded the LayerNorm weights."""

    hf_aliases: ClassVar[dict[str, str]] = {}
    tl_cfg: ClassVar[dict[str, str | None]] = {}

    @property
    def device(self) -> torch.device | None:
        model = bound_model(self)
        return getattr(model, "device", None)

    @property
    def dtype(self) -> torch.dtype | None:
        model = bound_model(self)
        return getattr(model, "dtype", None)

    def __getattr__(self, name: str) -> Any:
        if name in RUNTIME_FLAGS:  # not set on this config: transformers' default
            return RUNTIME_FLAGS[name]
        tl = type(self).tl_cfg
        if name in tl:
            if name == "normalization_type" and bound_model(self) is not None:
                return getattr(bound_model(self), "normalization_type", tl[name])
            return tl[name]
        if name == "eps":
            for field in EPS_FIELDS:
                if field in self.__dict__:
                    return self.__dict__[field]
        alias = type(self).hf_aliases.get(name)
        if alias is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self, alias)


# `transformers`' run-time switches that code written for it sets on a model's config, with their defaults. They
# change what a forward returns, never the architecture (see `HookedModel.__call__`); `use_cache` is accepted and
# has no effect outside `generate`.
RUNTIME_FLAGS: dict[str, Any] = {"output_attentions": False, "output_hidden_states": False, "return_dict": True,
                                 "use_cache": True}


def runtime_flags(cls: type) -> type:
    """Class decorator for model configs (applied above `@dataclass`): HF-style flag assignment
    (`model.config.output_attentions = True`) works, while the architecture fields, already built into the
    weights, refuse to change with a clear error. Other new attributes are allowed, as on a `transformers` config."""
    field_names = {f.name for f in fields(cls)}

    def __setattr__(self: Any, name: str, value: Any) -> None:
        target = type(self).hf_aliases.get(name, name)
        if target in field_names and target in self.__dict__:
            flags = ", ".join(RUNTIME_FLAGS)
            raise AttributeError(f"{type(self).__name__}.{name} is an architecture field: the model was built with "
                                 f"{name}={getattr(self, target)!r} and its weights cannot follow a change. Build a "
                                 f"new model from a new config instead; flags you can set: {flags}")
        object.__setattr__(self, name, value)

    def __delattr__(self: Any, name: str) -> None:
        if name in field_names:
            raise AttributeError(f"{type(self).__name__}.{name} is an architecture field and cannot be deleted")
        object.__delattr__(self, name)

    cls.__setattr__, cls.__delattr__ = __setattr__, __delattr__
    return cls


def alias(attr: str) -> property:
    """A read-only HuggingFace name for one of our attributes (`model.wte` is `model.embed`); hook names stay."""
    return property(lambda self: getattr(self, attr), doc=f"HuggingFace-style alias of `{attr}`.")


_IDENTITY = nn.Identity()


def identity_alias(hf_name: str) -> property:
    """A HuggingFace submodule hookvene leaves out (dropout: the models compute the eval-mode function), answering
    as an identity module so that code calling `block.attn.resid_dropout(x)` keeps working."""
    return property(lambda self: _IDENTITY, doc=f"HuggingFace's `{hf_name}`: the identity here (no dropout).")


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


# Head splits are plain views: einops' rearrange reads the same but costs ~20 us a call, ~1 ms per GPT-2 small
# forward, several percent of a one-token decode step.
def split_heads(x: Float[Tensor, "batch pos d"], n_heads: int) -> Float[Tensor, "batch pos head d_head"]:
    return x.view(*x.shape[:-1], n_heads, -1)  # (head d_head) -> head, d_head


def merge_heads(z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d"]:
    return z.reshape(*z.shape[:-2], -1)  # head, d_head -> (head d_head)


def causal_mask(attention_mask: Int[Tensor, "batch k_pos"] | None, q_len: int, k_len: int, dtype: torch.dtype,
                device: torch.device, fused_ok: bool = True) -> Float[Tensor, "#batch 1 q_pos k_pos"] | None:
    """Additive mask for causal attention over a key sequence whose last `q_len` entries are the queries.

    Returns None when the plain causal mask is enough (no padding, no cached prefix), so attention can use
    the fused causal kernel. Masked entries get the dtype's minimum, not -inf, so that a query with every key
    masked (a left-padding position) yields a uniform pattern instead of NaN, as in `transformers`.
    """
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[1] != k_len):
        raise ValueError(f"attention_mask must have shape (batch, {k_len}): one entry per position, a cached "
                         f"prefix included; got {tuple(attention_mask.shape)}")
    if fused_ok and attention_mask is None and q_len == k_len:
        return None
    q_idx = torch.arange(k_len - q_len, k_len, device=device)
    allowed = q_idx[:, None] >= torch.arange(k_len, device=device)[None, :]  # q_pos k_pos
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    return padding_to_additive(allowed, dtype)


def padding_to_additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def sliding_causal_mask(attention_mask: Int[Tensor, "batch k_pos"] | None, q_len: int, k_len: int,
                        window: int, dtype: torch.dtype,
                        device: torch.device) -> Float[Tensor, "batch 1 q_pos k_pos"] | None:
    """`causal_mask` that also hides keys `window` or more positions behind the query: query i sees keys j
    with i - window < j <= i (`transformers` bands its causal mask the same way for GPT-Neo's local layers
    and Mistral's sliding window). Positions are indices into the key sequence, cached prefix included, so
    the window holds with a KV cache."""
    if window >= k_len:  # the band covers every key: plain causal attention (the fused kernel when possible)
        return causal_mask(attention_mask, q_len, k_len, dtype, device)
    mask = causal_mask(attention_mask, q_len, k_len, dtype, device, fused_ok=False)
    q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    too_far = torch.arange(k_len, device=device)[None, :] <= q_idx - window  # q_pos k_pos
    return mask.masked_fill(too_far, torch.finfo(dtype).min)


# -- rotary position embeddings (Su et al. 2021, "RoFormer"), as Llama and GPT-NeoX use them -----------------------

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_n_ctx: int = 8192) -> Float[Tensor, " half_rot"]:
    """The rotation speed theta**(-2i/dim) of each of the dim/2 rotated pairs, in float32 as `transformers`
    computes it. `linear` divides every speed by `factor` (positions stretched); `llama3` divides only the slow
    ones (wavelength above original_n_ctx / low_freq_factor), keeps the fast ones (below original_n_ctx /
    high_freq_factor) and interpolates smoothly in between."""
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not implemented; choose one of {ROPE_TYPES}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        wavelen = 2 * math.pi / inv_freq
        slow = wavelen > original_n_ctx / low_freq_factor
        fast = wavelen < original_n_ctx / high_freq_factor
        smooth = (original_n_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(slow, inv_freq / factor, torch.where(fast, inv_freq, between))
    return inv_freq


def rotary_cos_sin(position_ids: Int[Tensor, "batch pos"], inv_freq: Float[Tensor, " half_rot"],
                   dtype: torch.dtype) -> tuple[Float[Tensor, "batch pos 1 d_rot"], Float[Tensor, "batch pos 1 d_rot"]]:
    """cos and sin of each position's rotation angles (computed in float32, then cast, as `transformers` does),
    shaped to broadcast over heads. Each angle appears twice: pair i is (dim i, dim i + d_rot/2)."""
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # batch pos half_rot
    angles = torch.cat([angles, angles], dim=-1)[:, :, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Float[Tensor, "batch pos head d_head"], cos: Tensor,
                 sin: Tensor) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate each pair (x_i, x_{i + d_rot/2}) of the first d_rot dimensions by its angle; dimensions past d_rot
    (GPT-NeoX's partial rotary) pass through unchanged. This is `transformers`' "rotate_half" layout, not the
    interleaved (x_2i, x_2i+1) pairs of the original paper: checkpoints' q/k weights are permuted to match it."""
    d_rot = cos.shape[-1]
    x_rot, x_pass = x[..., :d_rot], x[..., d_rot:]
    x1, x2 = x_rot[..., : d_rot // 2], x_rot[..., d_rot // 2:]
    rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat([rotated, x_pass], dim=-1)


class RotaryEmbedding(nn.Module):
    """HuggingFace's `model.rotary_emb` (Llama's, GPT-NeoX's), for code that rebuilds the forward by HF's names:
    `rotary_emb(x, position_ids) -> (cos, sin)`, each (batch, pos, d_rot) in x's dtype, from the angles the model
    itself rotates by. The models build one on access (an alias): it holds no parameters and is never registered."""

    attention_scaling = 1.0  # HF's factor on cos and sin: 1 for every rope type hookvene implements

    def __init__(self, inv_freq: Float[Tensor, " half_rot"]) -> None:
        super().__init__()
        self.inv_freq = inv_freq

    def forward(self, x: Tensor, position_ids: Int[Tensor, "batch pos"]) -> tuple[Tensor, Tensor]:
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, x.dtype)  # batch pos 1 d_rot
        return cos.squeeze(2), sin.squeeze(2)


def attend(q: Float[Tensor, "batch q_pos head d_head"], k: Float[Tensor, "batch k_pos kv_head d_head"],
           v: Float[Tensor, "batch k_pos kv_head d_head"], mask: Float[Tensor, "#batch #head #q_pos k_pos"] | None,
           *, causal: bool, scale: float, hook_scores: HookPoint,
           hook_pattern: HookPoint) -> Float[Tensor, "batch q_pos head d_head"]:
    """Scaled dot-product attention that exposes scores and pattern only when someone is looking.

    With nothing attached to `hook_scores` / `hook_pattern` this is one fused `scaled_dot_product_attention`
    call. With a hook attached, the same computation is spelled out so the hooks see (and may edit) the
    pre-softmax scores and the pattern. `mask` is additive; `mask=None, causal=True` means plain causal.
    Grouped-query attention: with fewer key/value heads than query heads (kv_head divides head), query head h
    reads key/value head h // (head / kv_head), as in `transformers`' `repeat_kv`.
    """
    group = q.shape[2] // k.shape[2]
    if not (hook_scores.has_hooks or hook_pattern.has_hooks):
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                           enable_gqa=group > 1)
        return z.transpose(1, 2)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is None and causal:
        mask = causal_mask(None, q.shape[1], k.shape[1], scores.dtype, scores.device, fused_ok=False)
    if mask is not None:
        scores = scores + mask
    scores = hook_scores(scores)
    pattern = hook_pattern(scores.softmax(dim=-1))
    return torch.einsum("bhqk,bkhd->bqhd", pattern, v)


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored as (in, out), so checkpoints load without a transpose."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with TransformerLens's hooks: `hook_scale` (batch pos 1), sqrt(var + eps) of the centred input,
    and `hook_normalized`, the output (after the affine map; with weights folded by `fold_ln` the two agree).

    Unhooked, it is torch's fused layer_norm; with something on `hook_scale` the same arithmetic is spelled out so
    the scale can be read or replaced (freezing it is how direct logit attribution is made exact)."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__(d_model, eps=eps)
        self.hook_scale, self.hook_normalized = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if not self.hook_scale.has_hooks:
            return self.hook_normalized(super().forward(x))
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.weight + self.bias)


def attention_input(block: nn.Module, resid_pre: Float[Tensor, "batch pos d_model"]) -> Any:
    """What a pre-LayerNorm block feeds its attention: ln1(resid_pre), or with TransformerLens's opt-in split
    inputs (`set_use_split_qkv_input`, `set_use_attn_in`) a (q, k, v) triple of per-head copies (batch pos head
    d_model), each through ln1 after its hook (`hook_q_input`, ... or one `hook_attn_in`), so one head's query,
    key or value input can be patched alone."""
    if not (block.use_split_qkv_input or block.use_attn_in):
        return block.ln1(resid_pre)
    heads = resid_pre[:, :, None].repeat(1, 1, block.attn.n_heads, 1)  # a copy: hooks may edit one head's
    if block.use_attn_in:
        heads = block.hook_attn_in(heads)
    if block.use_split_qkv_input:  # ln1 (and its hooks) then runs once per input, as in TransformerLens
        return tuple(block.ln1(h(heads.clone())) for h in (block.hook_q_input, block.hook_k_input, block.hook_v_input))
    x = block.ln1(heads)
    return x, x, x


def project_heads(x: Float[Tensor, "batch pos head d_model"], W: Float[Tensor, "head d_model d_head"],
                  b: Float[Tensor, "head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
    """Each head's projection of its own copy of the input (TransformerLens's split q/k/v inputs)."""
    return torch.einsum("bphm,hmd->bphd", x, W) + b


class KVCache:
    """Keys and values of every attention layer for the positions seen so far (generation)."""

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def __len__(self) -> int:
        """Number of cached positions."""
        return next(iter(self.keys.values())).shape[1] if self.keys else 0

    def update(self, layer: int, k: Float[Tensor, "batch pos head d_head"],
               v: Float[Tensor, "batch pos head d_head"]) -> tuple[Tensor, Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, index: Int[Tensor, " batch"]) -> None:
        """Keep only (or repeat) the batch rows in `index`."""
        for d in (self.keys, self.values):
            for layer in d:
                d[layer] = d[layer].index_select(0, index)


@dataclass
class ModelOutput:
    """What a hookvene model returns; field names follow `transformers` so existing code keeps working."""

    last_hidden_state: Tensor
    logits: Tensor | None = None
    loss: Tensor | None = None
    past_key_values: KVCache | None = None
    encoder_last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are set, in the order `transformers` uses for the same model class, so that code
        indexing `outputs[0]` reads the same tensor: with an LM or classification head `(loss, logits, ...)`
        (loss only when labels were given), without one
        `(last_hidden_state, ...)`. With a head, hookvene's extra `last_hidden_state` comes last."""
        head = ("loss", "logits") if self.logits is not None else ("last_hidden_state",)
        names = head + ("past_key_values", "hidden_states", "attentions", "encoder_last_hidden_state")
        if self.logits is not None:  # hookvene's extra field, after every field transformers has
            names += ("last_hidden_state",)
        return tuple(getattr(self, n) for n in names if getattr(self, n) is not None)

    def __getitem__(self, i: int | str) -> Any:
        return getattr(self, i) if isinstance(i, str) else self.to_tuple()[i]


LOSSES = {  # problem_type -> loss(logits, labels), as transformers' sequence classifiers compute it
    "single_label_classification": lambda logits, labels: F.cross_entropy(logits, labels.view(-1)),
    "multi_label_classification": lambda logits, labels: F.binary_cross_entropy_with_logits(
        logits, labels.to(logits.dtype)),
    "regression": lambda logits, labels: F.mse_loss(logits, labels.to(logits.dtype).view_as(logits)),
}


def lm_loss(logits: Float[Tensor, "batch pos d_vocab"], labels: Int[Tensor, "batch pos"]) -> Tensor:
    """Next-token cross-entropy as `transformers` computes it: labels shifted inside, -100 ignored."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def check_length(n_tokens: int, n_ctx: int | None) -> None:
    if n_ctx is not None and n_tokens > n_ctx:
        raise ValueError(f"sequence of {n_tokens} tokens is longer than the model's context of {n_ctx} (n_ctx)")


def layer_slice(start_at_layer: int | None, stop_at_layer: int | None, n_layers: int) -> slice:
    """The blocks a forward with TransformerLens's `start_at_layer` / `stop_at_layer` runs, with clear errors.

    start: None runs from the tokens (embeddings included); l in [0, n_layers] resumes at block l.
    stop: None runs to the end; l in [-n_layers, n_layers] stops before block l (negative counts from the end)."""
    for name, value, low in (("start_at_layer", start_at_layer, 0), ("stop_at_layer", stop_at_layer, -n_layers)):
        if value is not None and not (isinstance(value, int) and low <= value <= n_layers):
            raise ValueError(f"{name}={value!r} is out of range: the model has {n_layers} layers, so it must be an "
                             f"int in [{low}, {n_layers}] or None")
    return slice(start_at_layer or 0, stop_at_layer)


def check_tokens(input_ids: Tensor | None, d_vocab: int, n_ctx: int | None, offset: int = 0) -> None:
    """Clear errors instead of an IndexError deep inside an embedding lookup."""
    if input_ids is None:
        raise ValueError("pass input_ids or inputs_embeds")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, pos), got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype} (for vectors, pass "
                         f"inputs_embeds)")
    if 0 in input_ids.shape:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): a forward needs at least one "
                         f"example and one token")
    check_length(offset + input_ids.shape[1], n_ctx)
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= d_vocab:
            raise ValueError(f"token id {hi if hi >= d_vocab else lo} is outside the vocabulary [0, {d_vocab})")


class CausalLM:
    """The LM head shared by the decoder-only models (GPT-2, GPT-Neo, GPT-NeoX, Llama): mixed in before the base
    model (`class GPT2LM(CausalLM, GPT2)`), it adds the unembedding, tied to the token embedding when the config
    says so, `logits` (through `hook_logits`) and the next-token `loss` when `labels` are given."""

    has_lm_head = can_generate = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)  # HF: lm_head
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.embed.weight
        self.hook_logits = HookPoint()

    def forward(self, *args: Any, labels: Int[Tensor, "batch pos"] | None = None, **kwargs: Any) -> "ModelOutput":
        """The base model's forward (same arguments), then the unembedding."""
        out = super().forward(*args, **kwargs)
        if kwargs.get("stop_at_layer") is not None:  # the residual stream mid-model: nothing to unembed
            return out
        out.logits = self.hook_logits(self.unembed(out.last_hidden_state))
        if labels is not None:
            out.loss = lm_loss(out.logits, labels)
        return out

    def unembed_resid(self, resid: Float[Tensor, "... d_model"],
                      tokens: Int[Tensor, "... k"] | None = None) -> Float[Tensor, "... d_vocab"]:
        """Logits of residual vectors leaving the last block: ln_final, then the unembedding (only the `tokens`
        rows of it when given: a logit difference needs two of the vocabulary). `hook_logits` does not fire."""
        x = self.ln_final(resid)
        if tokens is None:
            return self.unembed(x)
        logits = torch.einsum("...d,...kd->...k", x, self.unembed.weight[tokens])
        return logits if self.unembed.bias is None else logits + self.unembed.bias[tokens]  # bias: fold_ln made one


# -- decoding ----------------------------------------------------------------------------------------------------

def new_token_count(prompt_len: int, max_new_tokens: int | None, max_length: int | None) -> int:
    """How many tokens to generate, from `max_new_tokens` or `max_length` (which includes the prompt)."""
    if max_new_tokens is not None and max_length is not None and prompt_len + max_new_tokens != max_length:
        raise ValueError(f"conflicting lengths: max_new_tokens={max_new_tokens} and max_length={max_length} with a "
                         f"{prompt_len}-token prompt; pass one of them")
    if max_new_tokens is None:
        if max_length is None:
            raise ValueError("pass max_new_tokens or max_length")
        max_new_tokens = max_length - prompt_len
    if max_new_tokens < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={max_new_tokens} (max_length includes the prompt)")
    return max_new_tokens


def pick_next(logits: Float[Tensor, "batch d_vocab"], do_sample: bool, temperature: float, top_k: int | None,
              top_p: float | None, generator: torch.Generator | None) -> Int[Tensor, " batch"]:
    """Greedy argmax, or a sample after temperature, top-k and nucleus (top-p) filtering."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model: HookedModel, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None, *,
             max_new_tokens: int | None = None, max_length: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None, seed: int | None = None,
             use_cache: bool = True, output_scores: bool = False,
             around: Callable[[int], AbstractContextManager] | None = None) -> Any:
    """Decode up to `max_new_tokens` for a causal LM (GPT-2, GPT-Neo) or T5's decoder; returns the ids (prompt +
    new; for T5 the decoder ids), and with `output_scores=True` also the logits of every step (batch, new, d_vocab).

    Hooks fire on every forward pass: first the prompt pass (hook tensors cover the whole prompt), then one pass
    per new token (hook tensors cover only that token: the KV cache holds the rest). Left-padded batches get
    position ids counted from each row's first real token, as in `transformers`. `around(step)` wraps each
    forward pass (0 = prompt, k = the k-th decode pass) in a context manager: this is how interventions attach
    per step. `use_cache=False` recomputes the whole sequence each step (slow; for checking the cache).
    """
    if not getattr(model, "can_generate", False):
        raise ValueError(f"{type(model).__name__} cannot generate: generation needs a causal LM with an LM head "
                         f"(GPT2LM, GPTNeoLM) or T5LM, not a base model, classifier or GRU")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int (keep the k likeliest tokens) or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (the probability mass to sample from) or None, got {top_p!r}")
    around = around or (lambda step: nullcontext())
    enc_dec = model.is_encoder_decoder
    new = new_token_count(1 if enc_dec else input_ids.shape[1], max_new_tokens, max_length)  # T5: counts the start
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and input_ids.shape[1] + new > n_ctx:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + {new} new tokens exceeds the model's context of {n_ctx}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    batch = input_ids.shape[0]
    if enc_dec:
        start = getattr(model.cfg, "decoder_start_token_id", 0)
        ids = torch.full((batch, 1), start, dtype=torch.long, device=input_ids.device)
    else:
        ids = input_ids
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    cache, enc_out, scores = (KVCache() if use_cache else None), None, []
    for step in range(new):
        feed = ids[:, -1:] if cache is not None and step > 0 else ids
        with around(step):
            if enc_dec:
                out = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=feed,
                            encoder_outputs=enc_out, past_key_values=cache, use_cache=cache is not None)
                enc_out = out.encoder_last_hidden_state
            else:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count from the first real token
                out = model(input_ids=feed, attention_mask=mask, position_ids=positions[:, -feed.shape[1]:],
                            past_key_values=cache, use_cache=cache is not None)
        logits = out.logits[:, -1]
        scores.append(logits)
        token = pick_next(logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, pad), token)
            done |= token == eos_token_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        if not enc_dec:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return (ids, torch.stack(scores, dim=1)) if output_scores else ids
