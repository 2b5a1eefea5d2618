"""Figures: labelled heatmaps (matplotlib, PNG/SVG) and attention patterns as a self-contained HTML page."""

import html
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


def heatmap(values: Float[Tensor, "rows cols"], rows: Sequence[str], cols: Sequence[str], *, row_label: str = "",
            col_label: str = "", title: str = "", path: str | None = None, center: float | None = None,
            cmap: str = "RdBu_r", annotate: bool | None = None) -> Any:
    """A heatmap with one tick per row/column label; saved to `path` (format from the extension) if given.

    `center` fixes the colour scale's midpoint (default: symmetric around 0 when values have both signs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = values.detach().float().cpu()
    finite = v[torch.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    if center is None and lo < 0 < hi:
        center = 0.0
    if center is not None:
        span = max(abs(hi - center), abs(lo - center)) or 1.0
        lo, hi = center - span, center + span
    width = max(6.0, min(16, 2 + 0.45 * len(cols)))  # wide enough for the title
    height = min(14, 1.5 + 0.35 * len(rows))
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(v.numpy(), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=60 if max(map(len, cols), default=0) > 2 else 0,
                  ha="right" if max(map(len, cols), default=0) > 2 else "center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=8)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=10, wrap=True)
    if annotate or (annotate is None and v.numel() <= 150):
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                ax.text(j, i, f"{float(v[i, j]):.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def attention_html(tokens: Sequence[str], patterns: Float[Tensor, "head q_pos k_pos"], path: str,
                   head_names: Sequence[str] | None = None, title: str = "Attention patterns") -> str:
    """Write an HTML page with one table per head: row = query token, column = key token, shade = weight."""
    head_names = list(head_names) if head_names is not None else [f"head {i}" for i in range(patterns.shape[0])]
    toks = [html.escape(t) for t in tokens]
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif} table{border-collapse:collapse;margin:0 0 24px}"
             "td,th{border:1px solid #ddd;padding:2px 4px;font-size:11px;text-align:center}"
             "th.q{text-align:right}</style>", f"<h1>{html.escape(title)}</h1>"]
    for name, pat in zip(head_names, patterns.detach().float().cpu()):
        parts.append(f"<h2>{html.escape(name)}</h2><table><tr><th></th>"
                     + "".join(f"<th>{t}</th>" for t in toks) + "</tr>")
        for qi, q in enumerate(toks):
            cells = "".join(f"<td style='background:rgba(31,119,180,{float(w):.3f})' title='{float(w):.3f}'>"
                            f"{float(w):.2f}</td>" for w in pat[qi, : len(toks)])
            parts.append(f"<tr><th class='q'>{q}</th>{cells}</tr>")
        parts.append("</table>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
