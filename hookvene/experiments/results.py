"""SweepResult: a labelled grid of metric values, with baselines, that saves, loads and plots itself."""

import io
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from hookvene.viz import heatmap


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
    clean: float = float("nan")  # metric on the run the patches come from
    corrupted: float = float("nan")  # metric on the run being patched, unpatched
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def normalized(self) -> Tensor:
        """(value - corrupted) / (clean - corrupted): 1 = patching this cell alone restores the clean metric."""
        return (self.values - self.corrupted) / (self.clean - self.corrupted)

    def top(self, k: int = 5, largest: bool = True) -> list[tuple[str, str, float]]:
        """The k cells with the largest (or smallest) effect relative to the corrupted baseline."""
        effect = (self.values - self.corrupted).flatten()
        computed = torch.isfinite(effect)  # path_patch over a subset of senders leaves the other cells NaN
        ranked = torch.where(computed, effect if largest else -effect, float("-inf"))
        idx = torch.topk(ranked, min(k, int(computed.sum()))).indices.tolist()
        n_cols = self.values.shape[1]
        return [(self.rows[i // n_cols], self.cols[i % n_cols], float(self.values.flatten()[i])) for i in idx]

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
        """Heatmap (matplotlib) labelled with the row/column names; saved to `path` (PNG/SVG by extension)."""
        return heatmap(self.values, self.rows, self.cols, row_label=self.row_label, col_label=self.col_label,
                       title=title or f"{self.kind}: {self.metric}", path=path, **kwargs)

    def table(self, k: int = 5) -> str:
        lines = [f"{self.kind} ({self.metric}); clean {self.clean:.3f}, corrupted {self.corrupted:.3f}"]
        lines += [f"  {self.row_label} {r:>6}  {self.col_label} {c:>10}  {v:+.3f}" for r, c, v in self.top(k)]
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
