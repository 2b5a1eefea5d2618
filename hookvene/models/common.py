"""Architecture-free helpers shared by the model files: what a model can do (`HookedModel`), head reshapes,
masks, attention, KV cache, outputs, and KV-cached decoding (`generate`)."""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from hookvene.hooks import HookedModule, HookPoint


class HookedModel(HookedModule):
    """Base of every hookvene model. What a model can do is declared once, as class attributes, and read by
    everything above (interventions, generation, sweeps, the CLI) instead of probing signatures or class trees."""

    is_encoder_decoder: ClassVar[bool] = False  # forward takes decoder_input_ids (T5)
    has_lm_head: ClassVar[bool] = False  # forward returns `logits` over the vocabulary
    can_generate: ClassVar[bool] = False  # KV-cached decoding with `generate`
    can_resume: ClassVar[bool] = False  # forward(start_at_layer=, stop_at_layer=), as TransformerLens

    def unembed_resid(self, resid: Float[Tensor, "... d_model"],
                      tokens: Int[Tensor, "... k"] | None = None) -> Float[Tensor, "... d_vocab"]:
        """Logits of residual-stream vectors leaving the last block (final LayerNorm, then unembedding); with
        `tokens`, only those logits (... k). `hook_logits` does not fire."""
        raise ValueError(f"{type(self).__name__} cannot unembed residual vectors: that needs a decoder-only "
                         f"language model with its LM head (GPT2LM, GPTNeoLM)")

    def generate(self, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None,
                 **kwargs: Any) -> Any:
        """KV-cached greedy or sampled decoding; hooks attached with `hooks()` fire on every step (see
        `generate` in this module for the arguments)."""
        return generate(self, input_ids, attention_mask, **kwargs)


class HFAliases:
    """Lets a model config answer to its HuggingFace attribute names (`config.n_embd` -> `config.d_model`)."""

    hf_aliases: ClassVar[dict[str, str]] = {}

    def __getattr__(self, name: str) -> Any:
        alias = type(self).hf_aliases.get(name)
        if alias is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self, alias)


def alias(attr: str) -> property:
    """A read-only HuggingFace name for one of our attributes (`model.wte` is `model.embed`); hook names stay."""
    return property(lambda self: getattr(self, attr), doc=f"HuggingFace-style alias of `{attr}`.")


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def split_heads(x: Float[Tensor, "batch pos d"], n_heads: int) -> Float[Tensor, "batch pos head d_head"]:
    return x.view(*x.shape[:-1], n_heads, -1)


def merge_heads(z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d"]:
    return z.reshape(*z.shape[:-2], -1)


def causal_mask(attention_mask: Int[Tensor, "batch k_pos"] | None, q_len: int, k_len: int, dtype: torch.dtype,
                device: torch.device, fused_ok: bool = True) -> Float[Tensor, "#batch 1 q_pos k_pos"] | None:
    """Additive mask for causal attention over a key sequence whose last `q_len` entries are the queries.

    Returns None when the plain causal mask is enough (no padding, no cached prefix), so attention can use
    the fused causal kernel. Masked entries get the dtype's minimum, not -inf, so that a query with every key
    masked (a left-padding position) yields a uniform pattern instead of NaN, as in `transformers`.
    """
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


def attend(q: Float[Tensor, "batch q_pos head d_head"], k: Float[Tensor, "batch k_pos head d_head"],
           v: Float[Tensor, "batch k_pos head d_head"], mask: Float[Tensor, "#batch #head #q_pos k_pos"] | None,
           *, causal: bool, scale: float, hook_scores: HookPoint,
           hook_pattern: HookPoint) -> Float[Tensor, "batch q_pos head d_head"]:
    """Scaled dot-product attention that exposes scores and pattern only when someone is looking.

    With nothing attached to `hook_scores` / `hook_pattern` this is one fused `scaled_dot_product_attention`
    call. With a hook attached, the same computation is spelled out so the hooks see (and may edit) the
    pre-softmax scores and the pattern. `mask` is additive; `mask=None, causal=True` means plain causal.
    """
    if not (hook_scores.has_hooks or hook_pattern.has_hooks):
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=causal and mask is None, scale=scale)
        return z.transpose(1, 2)
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

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, i: int | str) -> Any:
        return getattr(self, i) if isinstance(i, str) else self.to_tuple()[i]


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
    check_length(offset + input_ids.shape[1], n_ctx)
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= d_vocab:
            raise ValueError(f"token id {hi if hi >= d_vocab else lo} is outside the vocabulary [0, {d_vocab})")


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
