"""SweepResult: a labelled grid of metric values, with baselines, that saves, loads, ranks and plots itself.

One convention for every sweep. A cell's *effect* is how far patching it moves the metric from the run it patches
(`unpatched`: the corrupted run for activation patching and causal tracing, the clean run for path patching); its
*normalized effect* divides that by the clean-corrupted gap, signed so that 1 means "this cell alone moves the
metric all the way to the other run" and 0 means "no effect". Rankings (`top`, `table`) go by the size of the
effect and show its sign; figures (`plot`) show the same number the table leads with, on a diverging colour map
centred on "no effect" (probabilities: a sequential map on 0..1). When the clean and corrupted runs barely differ,
normalizing divides by noise: the result warns, and its table and figure show raw changes instead.
"""

import io
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from hookvene.viz import heatmap

# The smallest clean-corrupted gap worth normalizing by, per metric (in the metric's units). A logit difference of
# 0.5 is an odds ratio of 1.6; below that the "clean behaviour" being restored is hardly there.
MIN_GAP = {"logit_diff": 0.5, "prob": 0.01, "kl_div": 0.01}
DEFAULT_MIN_GAP = 1e-3
RANKINGS = ("magnitude", "toward", "away")


class UnreliableGapWarning(UserWarning):
    """The clean and corrupted runs barely differ, so normalized effects divide by noise."""


@dataclass
class SweepResult:
    """`values[i, j]` is the metric with cell (rows[i], cols[j]) patched (or restored)."""

    values: Tensor
    kind: str  # e.g. "resid_pre", "heads", "causal_trace:mlp"
    metric: str
    row_label: str
    col_label: str
    rows: list[str]
    cols: list[str]
    clean: float = float("nan")  # metric on the clean run
    corrupted: float = float("nan")  # metric on the corrupted run
    extra: dict[str, Any] = field(default_factory=dict)
    unpatched: str = "corrupted"  # the run the cells patch: "corrupted" (denoising) or "clean" (path patching)

    def __post_init__(self) -> None:
        if self.unpatched not in ("clean", "corrupted"):
            raise ValueError(f"unpatched must be 'clean' or 'corrupted' (the run the cells patch), got "
                             f"{self.unpatched!r}")
        if not self.reliable:
            warnings.warn(f"{self.kind}: clean and corrupted {self.metric} differ by only {self.gap:+.4g} (clean "
                          f"{self.clean:.4g}, corrupted {self.corrupted:.4g}; at least {self.min_gap:g} is needed to "
                          f"normalize), so normalized effects would divide by noise: the table and figure do not "
                          f"normalize. Check that the model does the task on the clean inputs and that the corruption "
                          f"removes it.", UnreliableGapWarning, stacklevel=3)

    @property
    def normalized(self) -> Tensor:
        """(value - corrupted) / (clean - corrupted): 1 = the cell's run has the clean metric, 0 = the corrupted."""
        return (self.values - self.corrupted) / (self.clean - self.corrupted)

    @property
    def baseline(self) -> float:
        """The metric of the run the cells patch (with no cell patched)."""
        return self.corrupted if self.unpatched == "corrupted" else self.clean

    @property
    def other(self) -> str:
        """The run the patches come from: the one that is not `unpatched`."""
        return "clean" if self.unpatched == "corrupted" else "corrupted"

    @property
    def gap(self) -> float:
        """clean - corrupted: how much behaviour there is to restore (or to remove)."""
        return self.clean - self.corrupted

    @property
    def min_gap(self) -> float:
        return MIN_GAP.get(self.metric, DEFAULT_MIN_GAP)

    @property
    def reliable(self) -> bool:
        """Whether the clean-corrupted gap is large enough to normalize by (unknown baselines count as reliable:
        there is nothing to normalize)."""
        return not math.isfinite(self.gap) or abs(self.gap) >= self.min_gap

    @property
    def effect(self) -> Tensor:
        """value - baseline: how far patching the cell moves the metric from the unpatched run."""
        return self.values - self.baseline

    @property
    def normalized_effect(self) -> Tensor:
        """effect / (other run - baseline): 0 = no effect, 1 = the cell alone moves the metric all the way from the
        unpatched run to the other one (equal to `normalized` for activation patching)."""
        return self.effect / (getattr(self, self.other) - self.baseline)

    def top(self, k: int = 5, by: str = "magnitude") -> list[tuple[str, str, float]]:
        """The k cells that matter most, as (row, col, value). `by`: "magnitude" (largest |effect| first, either
        sign), "toward" (moves the metric furthest toward the other run: restores the clean behaviour in
        activation patching, removes it in path patching) or "away" (the opposite direction)."""
        n_cols = self.values.shape[1]
        return [(self.rows[i // n_cols], self.cols[i % n_cols], float(self.values.flatten()[i]))
                for i in self._ranked(k, by)]

    def _ranked(self, k: int, by: str) -> list[int]:
        """Flat indices of the top-k cells (see `top`)."""
        if by not in RANKINGS:
            raise ValueError(f"by must be one of {RANKINGS}, got {by!r}")
        effect = self.effect.flatten()
        computed = torch.isfinite(effect)  # path_patch over a subset of senders leaves the other cells NaN
        toward = -1.0 if self.baseline > getattr(self, self.other) else 1.0
        score = {"magnitude": effect.abs(), "toward": toward * effect, "away": -toward * effect}[by]
        ranked = torch.where(computed, score, float("-inf"))
        return torch.topk(ranked, min(k, int(computed.sum()))).indices.tolist()

    def reported(self) -> tuple[Tensor, str]:
        """The grid that `table` leads with and `plot` shows, and its name: probabilities as they are; otherwise the
        normalized effect, or the raw effect when the gap is too small to normalize by."""
        if self.metric == "prob":
            return self.values, f"P({self.extra['target_text']!r})" if "target_text" in self.extra else "P(target)"
        if self.reliable and math.isfinite(self.gap):
            return self.normalized_effect, (f"normalized effect on {self.metric}\n(patched - {self.unpatched}) / "
                                            f"({self.other} - {self.unpatched})")
        return self.effect, f"change in {self.metric} vs the\nunpatched {self.unpatched} run (not normalized)"

    def save(self, path: str) -> None:
        """Write the result for `load`, which reads with `torch.load(weights_only=True)` (no pickled objects): tensors,
        numbers, strings, lists and dicts of them. Anything else in `extra` is refused here, before writing."""
        state = asdict(self)
        state["values"] = self.values.detach().cpu()
        for key, value in [(f"extra[{k!r}]", v) for k, v in state["extra"].items()] + [("the result", state)]:
            if not _loadable(value):
                raise ValueError(f"SweepResult.save: {key} ({type(value).__name__}) could not be read back by "
                                 f"SweepResult.load, which loads no pickled objects; store tensors, numbers, "
                                 f"strings, lists or dicts (e.g. torch.as_tensor(array) for a numpy array)")
        torch.save(state, path)

    @classmethod
    def load(cls, path: str) -> "SweepResult":
        """Read a result written by `save` (weights_only: a file cannot run code)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**state)

    def plot(self, path: str | None = None, title: str | None = None, **kwargs: Any) -> Any:
        """Heatmap (matplotlib) of `reported()`, the number `table` leads with, labelled with the row/column names and
        a colour bar naming it; saved to `path` (PNG/SVG by extension). Effects use a diverging map centred on 0
        (no effect) with a symmetric range of at least ±1 when normalized (so noise does not fill the scale);
        probabilities a sequential map on 0..1. Keyword arguments go to `hookvene.viz.heatmap`."""
        values, label = self.reported()
        if self.metric == "prob":
            style: dict[str, Any] = {"vmin": 0.0, "vmax": 1.0}
        else:
            finite = values[torch.isfinite(values)]
            largest = float(finite.abs().max()) if finite.numel() else 0.0
            normalized = self.reliable and math.isfinite(self.gap)
            style = {"center": 0.0, "span": max(1.0, largest) if normalized else (largest or 1.0)}
        style = {"cbar_label": label, **style, **kwargs}
        return heatmap(values, self.rows, self.cols, row_label=self.row_label, col_label=self.col_label,
                       title=title or f"{self.kind}: {label.splitlines()[0]}", path=path, **style)

    def table(self, k: int = 5, by: str = "magnitude") -> str:
        """The clean and corrupted metric, their gap, and the top-k cells (`top(k, by)`) with value, effect and
        normalized effect (left out, with a note, when the gap is too small to normalize by)."""
        lines = [f"{self.kind} ({self.metric}): clean {self.clean:+.3f}, corrupted {self.corrupted:+.3f}, "
                 f"gap {self.gap:+.3f}; cells patch the {self.unpatched} run"]
        normalize = self.reliable and math.isfinite(self.gap)
        if not normalize:
            lines.append(f"  the gap is below {self.min_gap:g}: normalized effects would divide by noise (not shown)")
        order = "largest |effect| first" if by == "magnitude" else f"ranked by effect {by} the {self.other} run"
        lines.append(f"  {order}; effect = value - {self.unpatched}"
                     + (f", normalized = effect / ({self.other} - {self.unpatched})" if normalize else ""))
        n_cols = self.values.shape[1]
        values, effects, normalized = (t.flatten() for t in (self.values, self.effect, self.normalized_effect))
        for i in self._ranked(k, by):
            line = (f"  {self.row_label} {self.rows[i // n_cols]:>6}  {self.col_label} {self.cols[i % n_cols]:>10}  "
                    f"value {float(values[i]):+.3f}  effect {float(effects[i]):+.3f}")
            lines.append(line + (f"  normalized {float(normalized[i]):+.2f}" if normalize else ""))
        return "\n".join(lines)


def _loadable(value: Any) -> bool:
    """Whether `torch.load(weights_only=True)` reads `value` back."""
    buf = io.BytesIO()
    try:
        torch.save(value, buf)  # a lambda does not even pickle
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception:  # the pickler and unpickler refuse objects with various error types
        return False
    return True
