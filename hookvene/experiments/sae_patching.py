"""Patching sweeps over the features of a sparse autoencoder (feature x position), on the one sweep engine.

The SAE is spliced with its error term (`use_error_term=True`), so the unpatched runs are the model's own: a cell
writes one clean feature activation (at one position, in every example) into the corrupted run, and the output of
the SAE moves by exactly that feature's decoded difference. Reached through `activation_patch(..., sae=sae)` and
`attribution_patch(..., sae=sae)` (kind "sae_features"), or directly:

    feature_patch(model, sae, clean, corrupted, metric, features=[12, 40])         exact, batched
    feature_attribution(model, sae, clean, corrupted, metric)                       one forward + one backward

Cells whose clean and corrupted activations are equal in every example (most of them: SAE features are sparse)
keep the corrupted baseline without running; their patch would write the value already there. Unlike the other
sweeps these do not yet split their work across torch.distributed ranks: every rank computes the whole grid.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.experiments.metrics import Metric, metric_output
from hookvene.experiments.results import SweepResult
from hookvene.experiments.sweep import Cell, check_model, first_read_position, record, run_cells, sweep_pair
from hookvene.plan import Patch

KIND = "sae_features"


def _site(sae: nn.Module) -> str:
    name = getattr(getattr(sae, "cfg", None), "hook_name", None)
    if not isinstance(name, str):
        raise ValueError("feature sweeps need an SAE (hookvene.SAE) whose cfg.hook_name names the hook it reads")
    return f"{name}.hook_sae_acts_post"


def _features(sae: nn.Module, features: Sequence[int] | None) -> list[int]:
    d_sae = sae.cfg.d_sae
    if features is None:
        return list(range(d_sae))
    out = [int(f) for f in features]
    bad = [f for f in out if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"feature index {bad[0]} is out of range: this SAE has d_sae={d_sae} features "
                         f"(0..{d_sae - 1})")
    return out


def _result(values: Tensor, kind: str, metric: Metric, features: list[int], n_pos: int, clean: float,
            corrupted: float, extra: dict[str, Any]) -> SweepResult:
    return SweepResult(values, kind, getattr(metric, "__name__", "metric"), "feature", "position",
                       [str(f) for f in features], [str(p) for p in range(n_pos)], clean, corrupted, extra)


def feature_patch(model: nn.Module, sae: nn.Module, clean: Any, corrupted: Any, metric: Metric,
                  features: Sequence[int] | None = None, batch_size: int = 64,
                  progress: bool = False) -> SweepResult:
    """Exact: for each (feature, position) cell, the mean metric of the corrupted run with that feature's clean
    activation written in at that position (every example). `values` is (features, positions); `extra` holds
    `ran`, the number of cells that needed a forward pass (the others equal the corrupted baseline)."""
    check_model(model, "feature_patch")
    site, feats = _site(sae), _features(sae, features)
    clean, corrupted = sweep_pair(model, clean, corrupted)
    n_pos = corrupted["input_ids"].shape[1]
    with model.saes([sae], use_error_term=True):
        source = record(model, clean, metric, [site])
        base = record(model, corrupted, metric, [site], resume=True)
        idx = torch.tensor(feats, device=source.stored[site].device)
        # (pos, feature) pairs where some example's clean and corrupted activations differ: only those can move
        differs = (source.stored[site][..., idx] != base.stored[site][..., idx]).any(dim=0)  # (pos, features)
        read_min = first_read_position(metric, corrupted)
        cells, live = [], []
        for p, j in differs.nonzero().tolist():
            cells.append(Cell((Patch(site, (p, feats[j]), pos_dim=0),), min(p, read_min)))
            live.append(j * n_pos + p)
        values = torch.full((len(feats) * n_pos,), base.metric,
                            dtype=torch.float64 if model.dtype == torch.float64 else None)
        if cells:
            values[live] = run_cells(model, cells, source.stored, metric, base.resume, batch_size,
                                     progress=progress and "patch sae features").cpu().to(values.dtype)
    return _result(values.view(len(feats), n_pos), KIND, metric, feats, n_pos, source.metric, base.metric,
                   {"ran": len(cells), "hook": site})


def feature_attribution(model: nn.Module, sae: nn.Module, clean: Any, corrupted: Any, metric: Metric,
                        features: Sequence[int] | None = None) -> SweepResult:
    """Attribution patching over features: metric(corrupted) + (clean - corrupted activation) x gradient, per
    (feature, position), summed over examples; the first-order estimate of `feature_patch`'s grid from one
    clean forward, one corrupted forward and one backward."""
    check_model(model, "feature_attribution")
    site, feats = _site(sae), _features(sae, features)
    clean, corrupted = sweep_pair(model, clean, corrupted)
    n_pos = corrupted["input_ids"].shape[1]
    acts: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> Tensor:  # differentiable even when the SAE's weights are frozen
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        acts["corrupted"] = x
        return x

    with model.saes([sae], use_error_term=True):
        source = record(model, clean, metric, [site])
        with torch.enable_grad():
            out = model.run_with_hooks(**corrupted, fwd_hooks=[(site, keep)])
            ex = torch.arange(out.logits.shape[0], device=out.logits.device)
            m = metric_output(metric, out.logits, ex).mean()  # per-row metrics averaged; a TL metric as is
            (grad,) = torch.autograd.grad(m, [acts["corrupted"]])
    idx = torch.tensor(feats, device=grad.device)
    # the metric is a mean over examples, so the gradient already holds the 1/B
    effect = ((source.stored[site] - acts["corrupted"].detach()) * grad)[..., idx].sum(dim=0)  # (pos, features)
    values = float(m.detach()) + effect.T
    return _result(values.detach().cpu(), f"attribution:{KIND}", metric, feats, n_pos, source.metric,
                   float(m.detach()), {"hook": site})
