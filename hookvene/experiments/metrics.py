"""Metrics for sweeps: functions of (logits, example index per row) -> one value per row.

Every metric reads the logits at one position per example (`pos`: an int for all, or a tensor with one position
per example, e.g. the last real token of right-padded prompts).
"""

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookvene.experiments.sweep import Metric


def _at(logits: Float[Tensor, "rows pos d_vocab"], ex: Int[Tensor, " rows"],
        pos: int | Tensor) -> Float[Tensor, "rows d_vocab"]:
    rows = torch.arange(logits.shape[0], device=logits.device)
    p = pos[ex] if isinstance(pos, Tensor) else torch.full_like(rows, pos % logits.shape[1])
    return logits[rows, p]


def _ids(x: int | Sequence[int] | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(x, device=device).view(-1)


def logit_diff(answer: int | Sequence[int] | Tensor, wrong: int | Sequence[int] | Tensor,
               pos: int | Tensor = -1) -> Metric:
    """logit[answer] - logit[wrong] (per example ids, or one id for all), e.g. IOI's logit[IO] - logit[S]."""
    def metric(logits: Tensor, ex: Tensor) -> Tensor:
        last = _at(logits, ex, pos)
        a, w = _ids(answer, logits.device), _ids(wrong, logits.device)
        a, w = (a[ex] if a.numel() > 1 else a.expand_as(ex)), (w[ex] if w.numel() > 1 else w.expand_as(ex))
        return last.gather(1, a[:, None]).squeeze(1) - last.gather(1, w[:, None]).squeeze(1)
    metric.__name__ = "logit_diff"
    return metric


def prob(target: int | Sequence[int] | Tensor, pos: int | Tensor = -1) -> Metric:
    """Probability of the target token (per example id, or one id for all)."""
    def metric(logits: Tensor, ex: Tensor) -> Tensor:
        t = _ids(target, logits.device)
        t = t[ex] if t.numel() > 1 else t.expand_as(ex)
        return _at(logits, ex, pos).float().softmax(-1).gather(1, t[:, None]).squeeze(1)
    metric.__name__ = "prob"
    return metric


def kl_div(reference_logits: Float[Tensor, "batch pos d_vocab"], pos: int | Tensor = -1) -> Metric:
    """KL(reference || patched) of the next-token distributions; 0 when patching restores the reference run."""
    def metric(logits: Tensor, ex: Tensor) -> Tensor:
        ref = _at(reference_logits[ex], torch.arange(ex.shape[0], device=ex.device), pos).float().log_softmax(-1)
        got = _at(logits, ex, pos).float().log_softmax(-1)
        return (ref.exp() * (ref - got)).sum(-1)
    metric.__name__ = "kl_div"
    return metric
