"""The batched engine behind every sweep: many patching cells, one forward pass per chunk of rows.

A *cell* is a list of `Patch`es (hook, index) that overwrite a run's activation with a stored one (e.g. the clean
run's residual stream at layer 3, position 5). A sweep over C cells and B examples becomes C x B rows stacked along
the batch dimension and run in chunks of `batch_size` rows; each row's hook functions write only that row. The
stored activations come from one cached run, so nothing is recomputed per cell, and nothing calls `.item()`
inside the loop: the metric is reduced on the device and read once at the end.

Cells skip what cannot change: each resumes from the unpatched run's residual stream at the first block it
patches (`Resume`), positions before any patch come from a KV cache, and rows resuming at different blocks
share one staggered forward pass (`staggered_forward`).
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.experiments.metrics import Metric, PositionMetric
from hookvene.hooks import StopForward
from hookvene.models._common import KVCache
from hookvene.models.gpt2 import GPT2LM
from hookvene.models.gpt_neo import GPTNeoLM

RowHooks = Callable[[Tensor, Tensor], list[tuple[str, Callable]]]  # (example idx, cell idx) per row -> hooks


@dataclass(frozen=True)
class Patch:
    """Overwrite `hook`'s activation at `index` (over the dims after batch; None = the whole dim) with the
    stored activation `stored[store or hook]` at the same index."""

    hook: str
    index: tuple[int | None, ...] = ()
    store: str | None = None


def check_model(model: nn.Module, what: str) -> None:
    """The sweeps resume runs mid-model (`start_at_layer`) and read logits: decoder-only models with an LM head."""
    if not isinstance(model, (GPT2LM, GPTNeoLM)):
        raise ValueError(f"{what} works on hookvene's decoder-only language models (GPT-2, GPT-Neo, with their LM "
                         f"head); got {type(model).__name__}. For other models, patch with pv.IntervenableModel.")


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
        final = hidden[rows, at]
        if metric.tokens is None:
            return metric.fn(model.unembed(final), example_of_row)
        ids = metric.tokens(example_of_row)  # only these rows of the unembedding
        logits = torch.einsum("rd,rkd->rk", final, model.unembed.weight[ids])
        bias = getattr(model.unembed, "bias", None)
        return metric.fn(logits if bias is None else logits + bias[ids], example_of_row)
    return metric(model(**batch).logits, example_of_row)


@dataclass
class Entry:
    """Rows that join a staggered run at block `layer`, with the residual stream entering that block."""

    layer: int
    state: Tensor  # (rows, pos, d_model)
    example_of_row: Tensor  # (rows,)
    cell_of_row: Tensor  # (rows,)


def staggered_forward(model: nn.Module, entries: Sequence[Entry], row_hooks: RowHooks | None = None,
                      prefix: KVCache | None = None, attention_mask: Tensor | None = None,
                      last_position_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Run rows that resume at different blocks as one growing batch, one block at a time.

    At block l the batch holds every row that entered at or before l, so cells that resume late share the
    forward passes of those that resumed early: many small cells make a few large matmuls (the same arithmetic
    as running them apart, at far better throughput on small batches). `row_hooks(example_of_row, cell_of_row)`
    gives the hooks for the current batch. `prefix` holds, per example, the keys and values of the positions
    before the rows' first one, for runs that recompute only a suffix of the prompt; `attention_mask` is per
    example and covers those too. Returns the residual stream after the last block (rows, pos, d_model) with
    each row's example and cell index, rows in order of entry.

    `last_position_only`: only the final position's output will be read, so the last block computes keys and
    values at every position but the rest of the block (attention output, MLP) at the final position only,
    unless a row hook acts inside that block; the returned stream then has that one position.
    """
    n_layers = model.cfg.n_layers
    entries = sorted(entries, key=lambda e: e.layer)
    x, ex, cell = entries[0].state, entries[0].example_of_row, entries[0].cell_of_row
    joining = iter(entries[1:])
    nxt = next(joining, None)
    hooks: list = []
    stale = row_hooks is not None  # the hooks index rows: (re)build them only when the batch has changed
    for layer in range(entries[0].layer, n_layers + 1):
        while nxt is not None and nxt.layer == layer:
            state = nxt.state[:, -x.shape[1]:]  # rows joining after the last block: x may be cut to one position
            x, ex = torch.cat([x, state]), torch.cat([ex, nxt.example_of_row])
            cell = torch.cat([cell, nxt.cell_of_row])
            nxt, stale = next(joining, None), row_hooks is not None
        if layer == n_layers:
            break
        if stale:
            hooks, stale = row_hooks(ex, cell), False
        cache = None
        if prefix is not None and layer in prefix.keys:
            cache = KVCache()
            cache.keys[layer], cache.values[layer] = prefix.keys[layer][ex], prefix.values[layer][ex]
        mask = attention_mask[ex] if attention_mask is not None else None
        if last_position_only and layer == n_layers - 1 and not any(h.startswith(f"blocks.{layer}.") for h, _ in hooks):
            x = _last_block_at_last_position(model, x, cache, mask)
            continue
        with model.hooks(fwd_hooks=hooks):
            x = model(inputs_embeds=x, start_at_layer=layer, stop_at_layer=layer + 1, past_key_values=cache,
                      attention_mask=mask).last_hidden_state
    if last_position_only:
        x = x[:, -1:]
    return x, ex, cell


def _last_block_at_last_position(model: nn.Module, x: Tensor, cache: KVCache | None, mask: Tensor | None) -> Tensor:
    """The last block's output at the final position only: first the earlier positions through the key/value
    projections into a KV cache (the run stops at hook_z, before the output projection and MLP), then the final
    position through the whole block, attending to that cache. Hooks of this block see the two parts apart."""
    layer, cache = model.cfg.n_layers - 1, cache if cache is not None else KVCache()

    def stop(z: Tensor, hook: Any) -> None:
        raise StopForward

    if x.shape[1] > 1:
        try:
            with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", stop)]):
                model(inputs_embeds=x[:, :-1], start_at_layer=layer, past_key_values=cache,
                      attention_mask=None if mask is None else mask[:, :-1])
        except StopForward:
            pass
    return model(inputs_embeds=x[:, -1:], start_at_layer=layer, stop_at_layer=layer + 1, past_key_values=cache,
                 attention_mask=mask).last_hidden_state


def start_layer(cell: Sequence[Patch]) -> int:
    """The first block a cell touches."""
    layers = [re.match(r"blocks\.(\d+)\.", p.hook) for p in cell]
    if not all(layers):
        raise ValueError(f"sweep cells resume at a block, so every patch must be inside one; got "
                         f"{[p.hook for p, m in zip(cell, layers) if not m]}")
    return min(int(m.group(1)) for m in layers)


@dataclass
class Resume:
    """The unpatched run that sweep cells resume from: `states[l]` is its residual stream entering block l
    (examples, pos, d_model), `kv` its keys and values (needed to resume after position 0), `attention_mask` its
    padding mask."""

    states: dict[int, Tensor]
    kv: KVCache | None = None
    attention_mask: Tensor | None = None

    def prefix(self, offset: int) -> KVCache | None:
        """Keys and values of the positions before `offset`."""
        if not offset:
            return None
        if self.kv is None:
            raise ValueError("resuming after position 0 needs the unpatched run's keys and values (Resume.kv)")
        cut = KVCache()
        for layer in self.kv.keys:
            cut.keys[layer], cut.values[layer] = self.kv.keys[layer][:, :offset], self.kv.values[layer][:, :offset]
        return cut


def run_cells(model: nn.Module, cells: Sequence[Sequence[Patch]], stored: dict[str, Tensor], metric: Metric,
              resume: Resume, offset: int = 0, batch_size: int = 64, progress: bool | str = False) -> Tensor:
    """Mean metric over the examples for each cell; returns a (len(cells),) tensor.

    Every cell resumes at position `offset` (earlier positions come from the KV cache: no cell may patch them,
    and the metric may not read them), at the first block it patches (the blocks before compute the same values
    for every cell). `stored[hook]` holds the (examples, ...) activations patched in, cut to positions `offset`..
    like the run, and patch indices count from there. Cells are taken in order of their first block,
    `batch_size // examples` at a time, and run staggered (see `staggered_forward`), so `batch_size` bounds the
    rows of one forward pass (the memory budget).
    """
    from tqdm.auto import tqdm

    n_ex, n_pos = next(iter(resume.states.values())).shape[:2]
    device = next(model.parameters()).device
    starts = [start_layer(c) for c in cells]
    order = sorted(range(len(cells)), key=starts.__getitem__)
    per = max(1, batch_size // n_ex)
    chunks = [order[i:i + per] for i in range(0, len(order), per)]
    out = torch.empty(len(cells), device=device, dtype=torch.float64 if model.dtype == torch.float64 else None)
    examples = torch.arange(n_ex, device=device)
    last_only = isinstance(metric, PositionMetric) and bool((metric.positions(examples, n_pos) == n_pos - 1).all())
    prefix = resume.prefix(offset)

    def hooks(ex: Tensor, cell: Tensor) -> list:
        return patch_hooks(cells, cell, ex, stored)
    bar = tqdm(chunks, desc=progress if isinstance(progress, str) else "sweep", disable=not progress, unit="chunk")
    with torch.no_grad():
        for ids in bar:
            entries = []
            for s in sorted({starts[i] for i in ids}):
                members = torch.tensor([i for i in ids if starts[i] == s], device=device)
                ex = examples.repeat(len(members))
                entries.append(Entry(s, resume.states[s][ex, offset:], ex, members.repeat_interleave(n_ex)))
            x, ex, cell = staggered_forward(model, entries, hooks, prefix, resume.attention_mask, last_only)
            values = metric_values(model, {"inputs_embeds": x, "start_at_layer": model.cfg.n_layers}, metric, ex,
                                   offset=n_pos - x.shape[1])
            sums = torch.zeros(len(cells), dtype=out.dtype, device=device).index_add_(0, cell, values.to(out.dtype))
            out[ids] = sums[ids] / n_ex
    return out
