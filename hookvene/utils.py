"""Small helpers from pyvene's public surface (`embed_to_distrib`, `top_vals`, `format_token`, `set_seed`) and
`as_inputs`, the one place model inputs are normalised."""

import random
from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn


def as_inputs(x: Any) -> dict[str, Any]:
    """Model keyword inputs from a token tensor (batch, pos) or a tokenizer's output (any mapping)."""
    if isinstance(x, Tensor):
        return {"input_ids": x}
    if isinstance(x, Mapping):
        return dict(x)
    raise ValueError(f"model inputs must be a dict of tensors (a tokenizer's output) or a tensor, "
                     f"not {type(x).__name__}")


def unembedding_weight(model: nn.Module) -> Tensor:
    """(d_vocab, d_model): the LM head if the model has one, else the (tied) token embedding."""
    head = getattr(model, "unembed", None)
    if head is not None:
        return head.weight
    embed = getattr(model, "embed", None) or getattr(model, "shared", None)
    if embed is None:
        raise ValueError(f"{type(model).__name__} has no token embedding to project onto")
    return embed.weight


def embed_to_distrib(model: nn.Module, embed: Float[Tensor, "... d_model"], log: bool = False,
                     logits: bool = False) -> Float[Tensor, "... d_vocab"]:
    """Project hidden states onto the vocabulary: softmax (or log-softmax, or raw logits) of `embed @ W_U^T`."""
    with torch.inference_mode():
        scores = embed @ unembedding_weight(model).T
        if logits:
            return scores
        return scores.log_softmax(dim=-1) if log else scores.softmax(dim=-1)


def format_token(tokenizer: Any, tok: int) -> str:
    """Decoded token with spaces shown as `_` and newlines as `\\n`."""
    return tokenizer.decode(tok).replace(" ", "_").replace("\n", "\\n")


def top_vals(tokenizer: Any, res: Float[Tensor, " d_vocab"], n: int = 10,
             return_results: bool = False) -> list[tuple[str, float]] | None:
    """Print (or return) the n highest-valued tokens of a distribution."""
    top = torch.topk(res, n)
    out = [(format_token(tokenizer, int(i)), float(v)) for v, i in zip(top.values, top.indices)]
    if return_results:
        return out
    for tok, v in out:
        print(f"{tok:<20} {v}")
    return None


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
