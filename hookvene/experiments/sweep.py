"""The batched engine behind every sweep: many patching cells, one forward pass per chunk of rows.

A *cell* is a list of `Patch`es (hook, index) that overwrite a run's activation with a stored one (e.g. the clean
run's residual stream at layer 3, position 5). A sweep over C cells and B examples becomes C x B rows stacked along
the batch dimension and run in chunks of `batch_size` rows; each row's hook functions write only that row. The
stored activations come from one cached run, so nothing is recomputed per cell, and nothing calls `.item()`
inside the loop: the metric is reduced on the device and read once at the end.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.experiments.metrics import Metric, PositionMetric
from hookvene.models._common import KVCache

RowHooks = Callable[[Tensor, Tensor], list[tuple[str, Callable]]]  # (example idx, cell idx) per row -> hooks


@dataclass(frozen=True)
class Patch:
    """Overwrite `hook`'s activation at `index` (over the dims after batch; None = the whole dim) with the
    stored activation `stored[store or hook]` at the same index."""

    hook: str
    index: tuple[int | None, ...] = ()
    store: str | None = None


def _index(rows: Tensor, ints: Tensor, pattern: tuple[bool, ...], shape: Sequence[int]) -> tuple[Tensor, ...]:
    """Advanced index selecting, per row, the given ints at int dims and everything at None dims."""
    n, n_full = rows.shape[0], sum(1 for is_int in pattern if not is_int)
    lead = (n,) + (1,) * n_full
    idx, col, axis = [rows.view(lead)], 0, 1
    for dim, is_int in enumerate(pattern):
        if is_int:
            idx.append(ints[:, col].view(lead))
            col += 1
        else:
            size = [1] * (1 + n_full)
            size[axis] = shape[dim]
            idx.append(torch.arange(shape[dim], device=rows.device).view(size))
            axis += 1
    return tuple(idx)


def patch_hooks(cells: Sequence[Sequence[Patch]], cell_of_row: Tensor, example_of_row: Tensor,
                stored: dict[str, Tensor], store_row: Tensor | None = None) -> list[tuple[str, Callable]]:
    """Hook functions that apply every row's patches, one vectorised index_put per (hook, store, index pattern).

    Row r reads `stored[...][store_row[r]]` (default: its example index)."""
    store_row = example_of_row if store_row is None else store_row
    groups: dict[tuple[str, str, tuple[bool, ...]], tuple[list[int], list[list[int]]]] = {}
    cell_rows: dict[int, list[int]] = {}
    for r, c in enumerate(cell_of_row.tolist()):
        cell_rows.setdefault(c, []).append(r)
    for c, rows in cell_rows.items():
        for p in cells[c]:
            key = (p.hook, p.store or p.hook, tuple(i is not None for i in p.index))
            rs, ints = groups.setdefault(key, ([], []))
            rs += rows
            ints += [[i for i in p.index if i is not None]] * len(rows)
    hooks = []
    device = example_of_row.device
    for (hook, store, pattern), (rs, ints) in groups.items():
        rows_t = torch.tensor(rs, device=device)
        ints_t = torch.tensor(ints, dtype=torch.long, device=device).view(len(rs), -1)
        src = stored[store]

        def fn(x: Tensor, _hook: Any, rows_t: Tensor = rows_t, ints_t: Tensor = ints_t, pattern=pattern,
               src: Tensor = src) -> Tensor:
            dst = _index(rows_t, ints_t, pattern, x.shape[1:])
            val = src[(store_row[rows_t].view(dst[0].shape),) + dst[1:]]
            return x.index_put(dst, val.to(x.dtype))
        hooks.append((hook, fn))
    return hooks


def _stack_forward(model: nn.Module) -> Callable[..., Any]:
    """The model's forward without its unembedding (GPT2LM -> GPT2.forward), for metrics read at one position."""
    for cls in type(model).__mro__[1:]:
        if "forward" in cls.__dict__:
            return lambda **kw: cls.forward(model, **kw)
    raise ValueError(f"{type(model).__name__} has no base forward")


def metric_values(model: nn.Module, batch: dict[str, Tensor], metric: Metric, example_of_row: Tensor,
                  offset: int = 0) -> Tensor:
    """One forward pass (hooks already attached) -> the metric per row. A PositionMetric gets the unembedding
    computed at its positions only (hook_logits does not fire then); `offset` is the absolute position of the
    batch's first position (runs that resume from a KV cache)."""
    if isinstance(metric, PositionMetric) and getattr(model, "unembed", None) is not None:
        hidden = _stack_forward(model)(**batch).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at = metric.positions(example_of_row, offset + hidden.shape[1]) - offset
        return metric.fn(model.unembed(hidden[rows, at]), example_of_row)
    return metric(model(**batch).logits, example_of_row)


@dataclass
class Entry:
    """Rows that join a staggered run at block `layer`, with the residual stream entering that block."""

    layer: int
    state: Tensor  # (rows, pos, d_model)
    example_of_row: Tensor  # (rows,)
    cell_of_row: Tensor  # (rows,)


def staggered_forward(model: nn.Module, entries: Sequence[Entry], row_hooks: RowHooks | None = None,
                      prefix: KVCache | None = None,
                      attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Run rows that resume at different blocks as one growing batch, one block at a time.

    At block l the batch holds every row that entered at or before l, so cells that resume late share the
    forward passes of those that resumed early: many small cells make a few large matmuls (the same arithmetic
    as running them apart, at far better throughput on small batches). `row_hooks(example_of_row, cell_of_row)`
    gives the hooks for the current batch. `prefix` holds, per example, the keys and values of the positions
    before the rows' first one, for runs that recompute only a suffix of the prompt; `attention_mask` is per
    example and covers those too. Returns the residual stream after the last block (rows, pos, d_model) with
    each row's example and cell index, rows in order of entry.
    """
    n_layers = model.cfg.n_layers
    entries = sorted(entries, key=lambda e: e.layer)
    x, ex, cell = entries[0].state, entries[0].example_of_row, entries[0].cell_of_row
    joining = iter(entries[1:])
    nxt = next(joining, None)
    for layer in range(entries[0].layer, n_layers + 1):
        while nxt is not None and nxt.layer == layer:
            x, ex = torch.cat([x, nxt.state]), torch.cat([ex, nxt.example_of_row])
            cell = torch.cat([cell, nxt.cell_of_row])
            nxt = next(joining, None)
        if layer == n_layers:
            break
        kw: dict[str, Any] = {}
        if prefix is not None and layer in prefix.keys:
            kw["past_key_values"] = KVCache()
            kw["past_key_values"].keys[layer] = prefix.keys[layer][ex]
            kw["past_key_values"].values[layer] = prefix.values[layer][ex]
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask[ex]
        with model.hooks(fwd_hooks=row_hooks(ex, cell) if row_hooks else []):
            x = model(inputs_embeds=x, start_at_layer=layer, stop_at_layer=layer + 1, **kw).last_hidden_state
    return x, ex, cell


def start_layer(cell: Sequence[Patch]) -> int:
    """The first block a cell touches (0 if any patch is outside the blocks)."""
    layers = [re.match(r"blocks\.(\d+)\.", p.hook) for p in cell]
    return min((int(m.group(1)) if m else 0 for m in layers), default=0)


def run_cells(model: nn.Module, inputs: dict[str, Tensor], cells: Sequence[Sequence[Patch]], stored: dict[str, Tensor],
              metric: Metric, batch_size: int = 64, row_hooks: RowHooks | None = None,
              progress: bool | str = False, resume: dict[int, Tensor] | None = None) -> Tensor:
    """Mean metric over the examples of `inputs` for each cell; returns a (len(cells),) tensor.

    `stored[hook]` holds (B, ...) activations for the B examples; `row_hooks` adds per-chunk hooks that depend on
    the rows (e.g. causal tracing's noise). `batch_size` is the number of rows per forward pass (memory budget).
    `resume[l]` (optional) is the residual stream entering block l on the unpatched run, (B, pos, d_model): a
    cell whose first patch is in block l then starts there, skipping blocks that would compute the same values
    for every cell; cells are grouped by that layer.
    """
    from tqdm.auto import tqdm

    n_ex = next(iter(inputs.values())).shape[0]
    device = next(model.parameters()).device
    starts = [start_layer(c) if resume else 0 for c in cells]
    starts = [s if s in (resume or {}) else 0 for s in starts]
    per = max(1, batch_size // n_ex)
    chunks = []
    for s in sorted(set(starts)):
        ids = [i for i, x in enumerate(starts) if x == s]
        chunks += [(s, ids[i:i + per]) for i in range(0, len(ids), per)]
    out = torch.empty(len(cells), device=device, dtype=torch.float64 if model.dtype == torch.float64 else None)
    bar = tqdm(chunks, desc=progress if isinstance(progress, str) else "sweep", disable=not progress, unit="chunk")
    with torch.no_grad():
        for s, ids in bar:
            cell_ids = torch.tensor(ids, device=device)
            cell_of_row = cell_ids.repeat_interleave(n_ex)
            example_of_row = torch.arange(n_ex, device=device).repeat(len(ids))
            batch = {k: v[example_of_row] for k, v in inputs.items()}
            if s:
                batch = {"inputs_embeds": resume[s][example_of_row], "start_at_layer": s,
                         **({"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {})}
            hooks = patch_hooks(cells, cell_of_row, example_of_row, stored)
            if row_hooks is not None:
                hooks = row_hooks(example_of_row, cell_of_row) + hooks
            with model.hooks(fwd_hooks=hooks):
                values = metric_values(model, batch, metric, example_of_row)
            out[cell_ids] = values.view(len(ids), n_ex).mean(dim=1).to(out.dtype)
    return out
