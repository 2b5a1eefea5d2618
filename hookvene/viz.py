"""Figures: labelled heatmaps (matplotlib, PNG/SVG) and attention patterns as a self-contained HTML page."""

import html
import os
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


def in_folder(path: str) -> str:
    """`path`, with its folder created if missing (figures go to an --out folder that may not exist yet)."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    return path


def heatmap(values: Float[Tensor, "rows cols"], rows: Sequence[str], cols: Sequence[str], *, row_label: str = "",
            col_label: str = "", title: str = "", path: str | None = None, center: float | None = None,
            span: float | None = None, vmin: float | None = None, vmax: float | None = None, cmap: str | None = None,
            cbar_label: str = "", annotate: bool | None = None, fmt: str = ".2f") -> Any:
    """A heatmap with one tick per row/column label and a labelled colour bar; saved to `path` (format from the
    extension) if given.

    Two conventions, so that colour means the same thing in every figure:
      diverging (`center`): the colour map's midpoint is `center` (use the value meaning "no effect") and the range
          is symmetric around it, `center ± span` (default span: the largest distance from it);
      sequential (`vmin` / `vmax`, e.g. probabilities on 0..1): one hue from light to dark.
    With neither, values of both signs get a diverging map centred on 0, and one-signed values a sequential map
    from 0. Cell text is black on light cells and white on dark ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = values.detach().float().cpu()
    finite = v[torch.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    if center is None and vmin is None and vmax is None:
        if lo < 0 < hi:
            center = 0.0
        else:
            vmin, vmax = min(0.0, lo), max(0.0, hi)
    if center is not None:
        span = span if span is not None else max(abs(hi - center), abs(lo - center))
        span = span or 1.0  # an all-equal grid: any non-empty range
        lo, hi, cmap = center - span, center + span, cmap or "RdBu_r"
    else:
        lo = lo if vmin is None else vmin
        hi = hi if vmax is None else vmax
        hi = hi if hi > lo else lo + 1.0
        cmap = cmap or "Purples"
    width = max(6.0, min(16, 2.5 + 0.45 * len(cols)))  # wide enough for the title and the colour bar
    height = min(14, 2.0 + 0.35 * len(rows))
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(v.numpy(), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    long_cols = max(map(len, cols), default=0) > 2
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=60 if long_cols else 0,
                  ha="right" if long_cols else "center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=8)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=10, wrap=True)
    if annotate or (annotate is None and v.numel() <= 150):
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                x = float(v[i, j])
                if x != x:  # NaN: a cell the sweep did not compute
                    continue
                ax.text(j, i, format(x, fmt), ha="center", va="center", fontsize=6,
                        color=text_colour(im.cmap(im.norm(x))))
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(cbar_label, fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(in_folder(path), dpi=120)
        plt.close(fig)
    return fig


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of this colour (relative luminance, sRGB weights)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def attention_html(tokens: Sequence[str] | Sequence[Sequence[str]],
                   patterns: Float[Tensor, "head q_pos k_pos"] | Float[Tensor, "example head q_pos k_pos"], path: str,
                   head_names: Sequence[str] | None = None, title: str = "Attention patterns",
                   example_names: Sequence[str] | None = None) -> str:
    """Write a self-contained HTML page: one table per head, row = query token (the position attending), column =
    key token (the position attended to), shade = attention weight, with a legend.

    `patterns` of shape (example, head, q, k) with `tokens` one list per example gives a page where the reader
    picks the example from a menu; (head, q, k) with one token list is a single example."""
    pats = patterns.detach().float().cpu()
    if pats.ndim == 3:
        pats, tokens = pats[None], [list(tokens)]  # type: ignore[list-item]
    if pats.ndim != 4 or len(tokens) != pats.shape[0] or any(isinstance(t, str) for t in tokens):
        raise ValueError(f"attention_html: patterns (head, q, k) need one list of tokens, (example, head, q, k) one "
                         f"list per example; got patterns {tuple(patterns.shape)} and {len(tokens)} token lists")
    n_ex, n_heads = pats.shape[:2]
    head_names = list(head_names) if head_names is not None else [f"head {i}" for i in range(n_heads)]
    example_names = list(example_names) if example_names is not None else [
        "".join(t) for t in tokens]  # type: ignore[arg-type]
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif} table{border-collapse:collapse;margin:0 0 24px}"
             "td,th{border:1px solid #ddd;padding:2px 4px;font-size:11px;text-align:center}"
             "th.q{text-align:right} .legend{display:inline-block;width:160px;height:12px;vertical-align:middle;"
             "background:linear-gradient(to right,rgba(31,119,180,0),rgba(31,119,180,1));border:1px solid #ccc}"
             "</style>", f"<h1>{html.escape(title)}</h1>",
             "<p>Rows: the query position (the token attending). Columns: the key position (the token attended to). "
             "Each row sums to 1. Shade: attention weight 0 <span class='legend'></span> 1.</p>"]
    if n_ex > 1:
        options = "".join(f"<option value='{i}'>{i}: {html.escape(name)}</option>"
                          for i, name in enumerate(example_names))
        parts.append("<p><label>Example: <select onchange=\"for(const d of document.querySelectorAll('div.ex'))"
                     "d.hidden=d.id!=='ex'+this.value\">" + options + "</select></label></p>")
    for e in range(n_ex):
        toks = [html.escape(t) for t in tokens[e]]
        parts.append(f"<div class='ex' id='ex{e}'{' hidden' if e else ''}>")
        for name, pat in zip(head_names, pats[e]):
            parts.append(f"<h2>{html.escape(name)}</h2><table><tr><th>query \\ key</th>"
                         + "".join(f"<th>{t}</th>" for t in toks) + "</tr>")
            for qi, q in enumerate(toks):
                cells = "".join(f"<td style='background:rgba(31,119,180,{float(w):.3f});"
                                f"color:{'white' if w > 0.55 else 'black'}' title='{float(w):.3f}'>{float(w):.2f}</td>"
                                for w in pat[qi, : len(toks)])
                parts.append(f"<tr><th class='q'>{q}</th>{cells}</tr>")
            parts.append("</table>")
        parts.append("</div>")
    with open(in_folder(path), "w") as f:
        f.write("\n".join(parts))
    return path


def line_plot(series: dict[str, Float[Tensor, " n"]], x: Sequence[int | float], *, x_label: str = "", y_label: str = "",
              title: str = "", path: str | None = None, hline: tuple[float, str] | None = None,
              vline: tuple[float, str] | None = None) -> Any:
    """One line per entry of `series` (label -> values at `x`), with an optional labelled horizontal reference
    (`hline=(y, label)`, e.g. the chance loss) and vertical marker (`vline=(x, label)`); saved to `path` if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, values in series.items():
        ax.plot(list(x), values.detach().float().cpu().tolist(), marker=".", label=label)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    if vline is not None:
        ax.axvline(vline[0], color="black", linestyle=":", linewidth=1, label=vline[1])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10, wrap=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(in_folder(path), dpi=120)
        plt.close(fig)
    return fig
