"""Metrics for sweeps: functions of (logits, example index per row) -> one value per row.

Every metric here reads the next-token logits at one position per example (`pos`: an int for all, or a tensor
with one position per example, e.g. the last real token of right-padded prompts). Knowing that position lets
the sweeps compute the unembedding there only, instead of over every position (a third of GPT-2 small's work on
short prompts). Any function `f(logits (rows, pos, d_vocab), example_idx (rows,)) -> (rows,)` works as a metric
too, just without that saving.

The sweeps also take TransformerLens's kind of metric: `f(logits (batch, pos, d_vocab)) -> one number` (a 0-d
tensor or a float), e.g. `lambda logits: (logits[:, -1, a] - logits[:, -1, b]).mean()`, applied to the logits of
the whole batch of one patched run, as TL's `patching.get_act_patch_*` do. `metric_output` calls a metric either way
and tells the two apart by what it returns: (rows,) is per row, a 0-d value is one number for the batch.
"""

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

# (logits (rows, pos, d_vocab), example index per row) -> (rows,); or TransformerLens's (logits) -> a number
Metric = Callable[[Tensor, Tensor], Tensor] | Callable[[Tensor], Tensor | float]


def takes_example_index(metric: Callable) -> bool:
    """Whether to call `metric(logits, example_idx)` (hookvene's convention) rather than `metric(logits)`
    (TransformerLens's): a function with one required positional argument gets the logits alone, so TL metrics
    with extra defaulted arguments (`def metric(logits, answer_tokens=answer_tokens)`) keep their defaults."""
    if isinstance(metric, PositionMetric):
        return True
    try:
        params = list(inspect.signature(metric).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): hookvene's convention
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


def metric_output(metric: Callable, logits: Float[Tensor, "rows pos d_vocab"], ex: Int[Tensor, " rows"]) -> Tensor:
    """The metric on these rows' logits: a (rows,) tensor from a per-row metric, a 0-d tensor from a
    TransformerLens-style one (one number for the whole batch). Any other shape is an error."""
    raw = metric(logits, ex) if takes_example_index(metric) else metric(logits)
    out = raw
    if not isinstance(out, Tensor):
        try:
            out = torch.tensor(out, dtype=torch.float64, device=logits.device)
        except (TypeError, ValueError, RuntimeError):
            out = None
    if out is not None and (out.ndim == 0 or tuple(out.shape) == (logits.shape[0],)):
        return out
    got = f"shape {tuple(out.shape)}" if out is not None else f"a {type(raw).__name__}"
    raise ValueError(f"metric {getattr(metric, '__name__', type(metric).__name__)!r} returned {got} for logits of "
                     f"shape {tuple(logits.shape)}: a metric returns one number for the whole batch (a 0-d tensor or "
                     f"a float, TransformerLens's patching metrics) or one value per row ({logits.shape[0]},) "
                     f"(hookvene's, called as metric(logits, example_idx))")


class PositionMetric:
    """A metric of the logits at one position per example: `fn(final_logits (rows, d_vocab), ex) -> (rows,)`.

    With `tokens(ex) -> (rows, k)` token ids, the metric reads only those k logits: `fn` then gets them, in that
    order, as (rows, k), and the sweeps compute just those k rows of the unembedding (logit differences need two
    of GPT-2's 50257)."""

    def __init__(self, name: str, fn: Callable[[Tensor, Tensor], Tensor], pos: int | Tensor,
                 tokens: Callable[[Tensor], Tensor] | None = None) -> None:
        if isinstance(pos, Tensor) and (pos.dim() != 1 or pos.dtype.is_floating_point or bool((pos < 0).any())):
            raise ValueError(f"per-example positions must be a 1-d tensor of absolute positions >= 0 (an int pos "
                             f"may be negative, counted from the end), got {pos.tolist()}")
        self.__name__, self.fn, self.pos, self.tokens = name, fn, pos, tokens

    def positions(self, ex: Int[Tensor, " rows"], n_pos: int) -> Int[Tensor, " rows"]:
        """The absolute position each row is read at."""
        if isinstance(self.pos, Tensor):
            if int(self.pos.max()) >= n_pos:
                raise ValueError(f"per-example position {int(self.pos.max())} is out of range for {n_pos} positions")
            return self.pos.to(ex.device)[ex]
        return torch.full_like(ex, self.pos % n_pos)

    def __call__(self, logits: Float[Tensor, "rows pos d_vocab"], ex: Int[Tensor, " rows"]) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        return self.read(logits[rows, self.positions(ex, logits.shape[1])], ex)

    def read(self, final_logits: Float[Tensor, "rows d_vocab"], ex: Int[Tensor, " rows"]) -> Tensor:
        """The metric from each row's full logits at its position."""
        return self.fn(final_logits if self.tokens is None else final_logits.gather(1, self.tokens(ex)), ex)


def answer_token(tokenizer: Any, text: str) -> int:
    """The token id of an answer string, e.g. " Mary" (with GPT-2's leading space), checked to be exactly one known
    token. The tokenizer's special tokens are not added: the bundled model's tokenizer prepends <|endoftext|>, so
    `tokenizer(" Mary").input_ids[0]` is that BOS, not Mary. `tokenizer` may be a model that carries one."""
    tok = getattr(tokenizer, "tokenizer", None) if isinstance(tokenizer, torch.nn.Module) else tokenizer
    if tok is None:
        raise ValueError(f"{type(tokenizer).__name__} has no tokenizer to resolve {text!r}; pass the token id, or a "
                         f"tokenizer")
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens for this tokenizer ({tok.convert_ids_to_tokens(ids)}); pass a "
                         f"single-token answer (with its leading space, e.g. ' Paris')")
    if ids[0] == getattr(tok, "unk_token_id", None):
        raise ValueError(f"{text!r} is not in this tokenizer's vocabulary (it encodes to the unknown token "
                         f"{tok.unk_token!r})")
    return ids[0]


def warn_if_special(tokenizer: Any, token: int, what: str = "the target") -> None:
    """Warn when an answer id is one of the tokenizer's special tokens (BOS, EOS, padding, unknown): almost always
    `tokenizer(text).input_ids[0]` picking up the BOS that the tokenizer prepends, rather than the answer."""
    special = {getattr(tokenizer, f"{k}_token_id", None): k for k in ("unk", "pad", "eos", "bos")}
    if token in special:
        warnings.warn(f"{what} is token {token}, the tokenizer's {special[token]} token "
                      f"{tokenizer.convert_ids_to_tokens(token)!r}, not a word: did `tokenizer(answer).input_ids[0]` "
                      f"pick up the BOS it prepends? Pass the answer string (e.g. ' Mary') to resolve it safely",
                      stacklevel=3)


def _ids(x: int | Sequence[int] | Tensor, ex: Tensor) -> Tensor:
    t = torch.as_tensor(x, device=ex.device).view(-1)
    return t[ex] if t.numel() > 1 else t.expand_as(ex)


Answer = int | str | Sequence[int] | Sequence[str] | Tensor


def resolve_answers(x: Answer, tokenizer: Any = None) -> int | Sequence[int] | Tensor:
    """Token ids of answers given as strings (one, or one per example) with `answer_token`; ids pass through, with
    a warning for a special token (see `warn_if_special`) when the tokenizer is known."""
    strings = isinstance(x, str) or (isinstance(x, list | tuple) and len(x) > 0 and isinstance(x[0], str))
    tok = getattr(tokenizer, "tokenizer", None) if isinstance(tokenizer, torch.nn.Module) else tokenizer
    if strings:
        if tok is None:
            raise ValueError(f"answers given as text ({x!r}) need the tokenizer: pass tokenizer=model (or the "
                             f"tokenizer), or token ids")
        return answer_token(tok, x) if isinstance(x, str) else [answer_token(tok, a) for a in x]
    if tok is not None:
        for t in {int(i) for i in torch.as_tensor(x).view(-1).tolist()}:
            warn_if_special(tok, t, "an answer")
    return x


def logit_diff(answer: Answer, wrong: Answer, pos: int | Tensor = -1, tokenizer: Any = None) -> PositionMetric:
    """logit[answer] - logit[wrong] (per example ids, or one id for all), e.g. IOI's logit[IO] - logit[S]. Answers
    may be strings (" Mary", or one per example) with `tokenizer` (a tokenizer, or a model that carries one)."""
    answer, wrong = resolve_answers(answer, tokenizer), resolve_answers(wrong, tokenizer)

    def tokens(ex: Tensor) -> Tensor:
        return torch.stack([_ids(answer, ex), _ids(wrong, ex)], dim=1)

    def fn(pair: Tensor, ex: Tensor) -> Tensor:
        return pair[:, 0] - pair[:, 1]
    return PositionMetric("logit_diff", fn, pos, tokens)


def prob(target: Answer, pos: int | Tensor = -1, tokenizer: Any = None) -> PositionMetric:
    """Probability of the target token (per example id, or one id for all; strings with `tokenizer`)."""
    target = resolve_answers(target, tokenizer)

    def fn(last: Tensor, ex: Tensor) -> Tensor:
        return last.float().softmax(-1).gather(1, _ids(target, ex)[:, None]).squeeze(1)
    return PositionMetric("prob", fn, pos)


def kl_div(reference_logits: Float[Tensor, "batch pos d_vocab"], pos: int | Tensor = -1) -> PositionMetric:
    """KL(reference || patched) of the next-token distributions; 0 when patching restores the reference run."""
    metric: PositionMetric

    def fn(last: Tensor, ex: Tensor) -> Tensor:
        ref = reference_logits.to(ex.device)[ex, metric.positions(ex, reference_logits.shape[1])]
        ref, got = ref.float().log_softmax(-1), last.float().log_softmax(-1)
        return (ref.exp() * (ref - got)).sum(-1)
    metric = PositionMetric("kl_div", fn, pos)
    return metric
