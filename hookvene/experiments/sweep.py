"""The one engine behind every sweep: cells of patches, run as stacked batch rows, resumed mid-model.

A *cell* is a set of `Patch`es (see `hookvene.plan`) that overwrite a run's activations with stored ones (e.g. the
clean run's residual stream at layer 3, position 5). A sweep over C cells and B examples is C x B rows stacked along
the batch dimension, `batch_size` rows per forward pass at most; each row's hook functions write only that row. The
stored activations come from one cached run, so nothing is recomputed per cell, and nothing calls `.item()` inside
the loop: the metric is reduced on the device and read once at the end.

    clean = record(model, clean_inputs, metric, hooks=[...])                  # activations to patch in
    base = record(model, corrupted_inputs, metric, resume=True)               # the run the cells resume
    values = run_cells(model, cells, clean.stored, metric, base.resume)       # one mean metric per cell

Cells skip what cannot change: each resumes from the base run's residual stream at the first block it patches
(`Resume`); positions before the cell's `offset` (no patch there, no metric read) come from the base run's KV cache;
rows resuming at different blocks share one staggered forward pass (`staggered_forward`); and when the metric reads
only the last position, the last block and the unembedding run there only.

Under `torchrun` (a torch.distributed process group) the passes are planned as on one process and dealt out to the
ranks whole, balanced by cost; the values are gathered so every rank returns all of them (`hookvene.distributed`).
"""

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.distributed import assign, check_same, gather_objects, is_distributed, is_main, rank, sum_disjoint
from hookvene.experiments.ioi import METRIC_FIELDS
from hookvene.experiments.metrics import Metric, PositionMetric, metric_output, takes_example_index
from hookvene.hooks import StopForward
from hookvene.models.common import KVCache
from hookvene.plan import Attachment, Patch, attach, patch_rows
from hookvene.utils import as_inputs, warn_unknown_tokens

RowHooks = Callable[[Tensor, Tensor], list[Attachment]]  # (example idx, cell idx) per row -> hook functions


@dataclass(frozen=True)
class Cell:
    """One sweep cell: its patches (indices count absolute positions), and the first position it recomputes.
    No patch may touch, and the metric may not read, a position before `offset`."""

    patches: tuple[Patch, ...]
    offset: int = 0


def check_model(model: nn.Module, what: str) -> None:
    """The sweeps resume runs mid-model (`start_at_layer`) and read logits: decoder-only models with an LM head."""
    if not (getattr(model, "can_resume", False) and getattr(model, "has_lm_head", False)):
        raise ValueError(f"{what} works on hookvene's decoder-only language models (GPT-2, GPT-Neo, with their LM "
                         f"head); got {type(model).__name__}. For other models, patch with pv.IntervenableModel.")


def sweep_inputs(model: nn.Module, x: Any, name: str = "the input") -> dict[str, Tensor]:
    """The model's inputs for a sweep, from token ids, a tokenizer's output or a `tokenize_ioi` batch (whose
    io_ids, end_pos, ... describe the examples for the metric and are left out of the model's call). Warns when
    the ids hold the model's unknown token (words its tokenizer does not know)."""
    inputs = {k: v for k, v in as_inputs(x).items() if k not in METRIC_FIELDS}
    if getattr(model, "tokenizer", None) is not None and "input_ids" in inputs:
        warn_unknown_tokens(model.tokenizer, inputs["input_ids"], name)
    return inputs


def sweep_pair(model: nn.Module, clean: Any, corrupted: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """`sweep_inputs` of a clean and a corrupted input, checked to line up position by position."""
    clean = sweep_inputs(model, clean, "the clean input")
    corrupted = sweep_inputs(model, corrupted, "the corrupted input")
    check_pair(clean, corrupted)
    return clean, corrupted


def position_labels(model: nn.Module, clean: dict[str, Tensor], corrupted: dict[str, Tensor]) -> list[str]:
    """One label per position for a sweep's figure and table: "5:John" where every clean and corrupted prompt has
    that token, "3:Mary/Alice" where one clean and one corrupted prompt differ, "3:(varies)" in a batch whose
    prompts differ there; plain numbers without a tokenizer."""
    ids = torch.cat([clean["input_ids"], corrupted["input_ids"]])
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [str(p) for p in range(ids.shape[1])]
    labels = []
    for p in range(ids.shape[1]):
        column = ids[:, p].unique(sorted=False)
        if len(column) == 1:
            text = tokenizer.decode(column).strip()
        elif ids.shape[0] == 2:
            text = "/".join(tokenizer.decode(t).strip() for t in ids[:, p])
        else:
            text = "(varies)"
        labels.append(f"{p}:{text}")
    return labels


def check_pair(clean: dict[str, Tensor], corrupted: dict[str, Tensor]) -> None:
    a, b = clean["input_ids"].shape, corrupted["input_ids"].shape
    if a != b:
        raise ValueError(f"clean {tuple(a)} and corrupted {tuple(b)} inputs must have the same shape to be patched "
                         f"position by position")


def shared_prefix(clean: dict[str, Tensor], corrupted: dict[str, Tensor]) -> int:
    """How many leading positions have the same inputs (ids, padding mask, position ids) in every example of both
    runs. Attention is causal, so both runs compute the same activations there: patching them changes nothing."""
    known = {"input_ids", "attention_mask", "position_ids"}
    if set(clean) - known or set(corrupted) - known:
        return 0  # inputs we cannot reason about
    ids = clean["input_ids"]
    same = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)
    for key in known:
        a, b = clean.get(key), corrupted.get(key)
        if key == "attention_mask" and (a is None) != (b is None):
            a, b = (torch.ones_like(ids) if a is None else a), (torch.ones_like(ids) if b is None else b)
        if a is None and b is None:
            continue
        if a is None or b is None:
            return 0
        same &= (a == b).all(dim=0)
    return int(same.long().cumprod(0).sum())


def first_read_position(metric: Metric, inputs: dict[str, Tensor]) -> int:
    """The earliest position the metric reads (0 for a plain function metric, which may read every position)."""
    if not isinstance(metric, PositionMetric):
        return 0
    ids = inputs["input_ids"]
    return int(metric.positions(torch.arange(ids.shape[0], device=ids.device), ids.shape[1]).min())


def metric_values(model: nn.Module, resid: Tensor, metric: Metric, example_of_row: Tensor, offset: int = 0) -> Tensor:
    """The metric per row from the residual stream leaving the last block, `resid` (rows, pos, d_model), whose
    first position is absolute position `offset`. A PositionMetric gets the unembedding at its positions only
    (and of its tokens only, when it names them). A TransformerLens-style metric (one number for the batch)
    returns a 0-d tensor (see `metric_output`)."""
    if not isinstance(metric, PositionMetric):
        return metric_output(metric, model.unembed_resid(resid), example_of_row)
    rows = torch.arange(resid.shape[0], device=resid.device)
    final = resid[rows, metric.positions(example_of_row, offset + resid.shape[1]) - offset]
    tokens = None if metric.tokens is None else metric.tokens(example_of_row)
    return metric.fn(model.unembed_resid(final, tokens), example_of_row)


@dataclass
class Resume:
    """A run that sweep cells resume from: `states[l]` is its residual stream entering block l (examples, pos,
    d_model), `kv` its keys and values (needed to resume after position 0), `attention_mask` its padding mask."""

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


@dataclass
class Run:
    """What a sweep keeps of one unpatched run: its mean metric, activations at chosen hooks, and (if asked) what
    cells need to resume it."""

    metric: float
    stored: dict[str, Tensor]
    resume: Resume | None = None


def record(model: nn.Module, inputs: dict[str, Tensor], metric: Metric, hooks: Sequence[str] = (),
           resume: bool = False, attachments: Sequence[Attachment] = (), examples: Tensor | None = None) -> Run:
    """One run (with `attachments` on, e.g. noise): the mean metric, the activations at `hooks`, and with `resume`
    its residual stream entering every block and its KV cache. It stops after the last block: the metric unembeds
    only where it reads. `examples`: the metric's example index of each input row (default 0, 1, ...), for a
    run over a slice of the examples (one rank's share)."""
    n_layers = model.cfg.n_layers
    resid = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] if resume else []
    names = sorted(set(hooks) | set(resid))
    with torch.no_grad(), attach(model, attachments):
        out, cache = model.run_with_cache(**inputs, names_filter=names, use_cache=resume, stop_at_layer=n_layers)
        x = out.last_hidden_state
        ex = torch.arange(x.shape[0], device=x.device) if examples is None else examples.to(x.device)
        value = float(metric_values(model, x, metric, ex).mean())
    states = Resume({layer: cache[h] for layer, h in enumerate(resid)}, out.past_key_values,
                    inputs.get("attention_mask")) if resume else None
    return Run(value, {h: cache[h] for h in hooks}, states)


def start_layer(hooks: Sequence[str]) -> int:
    """The first block any of these hooks is in."""
    layers = [re.match(r"blocks\.(\d+)\.", h) for h in hooks]
    if not all(layers):
        raise ValueError(f"sweep cells resume at a block, so every patch must be inside one; got "
                         f"{[h for h, m in zip(hooks, layers) if not m]}")
    return min(int(m.group(1)) for m in layers)


@dataclass
class Entry:
    """Rows that join a staggered run at block `layer`, with the residual stream entering that block."""

    layer: int
    state: Tensor  # (rows, pos, d_model)
    example_of_row: Tensor  # (rows,)
    cell_of_row: Tensor  # (rows,)


def staggered_forward(model: nn.Module, entries: Sequence[Entry], row_hooks: RowHooks, prefix: KVCache | None,
                      attention_mask: Tensor | None, last_position_only: bool,
                      stop_at_layer: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Run rows that resume at different blocks as one growing batch, one block at a time.

    At block l the batch holds every row that entered at or before l, so cells that resume late share the
    forward passes of those that resumed early: many small cells make a few large matmuls (the same arithmetic
    as running them apart, at far better throughput on small batches). `row_hooks(example_of_row, cell_of_row)`
    gives the hooks for the current batch. `prefix` holds, per example, the keys and values of the positions
    before the rows' first one, for runs that recompute only a suffix of the prompt; `attention_mask` is per
    example and covers those too. Returns the residual stream entering block `stop_at_layer` (None: leaving
    the last block), (rows, pos, d_model), with each row's example and cell index, rows in order of entry.

    `last_position_only`: only the final position's output will be read, so the last block computes keys and
    values at every position but the rest of the block (attention output, MLP) at the final position only,
    unless a row hook acts inside that block; the returned stream then has that one position.
    """
    end = model.cfg.n_layers if stop_at_layer is None else stop_at_layer
    entries = sorted(entries, key=lambda e: e.layer)
    x, ex, cell = entries[0].state, entries[0].example_of_row, entries[0].cell_of_row
    joining = iter(entries[1:])
    nxt = next(joining, None)
    hooks: list[Attachment]  # the hooks index rows: (re)built, at the first block and whenever the batch changed
    stale = True
    for layer in range(entries[0].layer, end):  # (every entry's block is before `end`: it holds a patch or a hook)
        while nxt is not None and nxt.layer == layer:
            x, ex = torch.cat([x, nxt.state]), torch.cat([ex, nxt.example_of_row])
            cell = torch.cat([cell, nxt.cell_of_row])
            nxt, stale = next(joining, None), True
        if stale:
            hooks, stale = row_hooks(ex, cell), False
        cache = None
        if prefix is not None and layer in prefix.keys:
            cache = KVCache()
            cache.keys[layer], cache.values[layer] = prefix.keys[layer][ex], prefix.values[layer][ex]
        mask = attention_mask[ex] if attention_mask is not None else None
        in_block = any(a.name.startswith(f"blocks.{layer}.") for a in hooks)
        if last_position_only and layer == model.cfg.n_layers - 1 and not in_block:
            x = _last_block_at_last_position(model, x, cache, mask)
            continue
        with attach(model, hooks):
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
        try:  # keys and values are projections of each position alone: no mask needed to cache them
            with attach(model, [Attachment(f"blocks.{layer}.attn.hook_z", stop)]):
                model(inputs_embeds=x[:, :-1], start_at_layer=layer, past_key_values=cache)
        except StopForward:
            pass
    return model(inputs_embeds=x[:, -1:], start_at_layer=layer, stop_at_layer=layer + 1, past_key_values=cache,
                 attention_mask=mask).last_hidden_state


@dataclass
class Chunk:
    """One staggered forward pass of a sweep: which cells it ran, and its output rows."""

    cells: list[int]  # indices into the sweep's cells
    x: Tensor  # the residual stream the pass returned
    example_of_row: Tensor
    cell_of_row: Tensor  # indices into the sweep's cells


def _chunks(model: nn.Module, cells: Sequence[Cell], stored: dict[str, Tensor], resume: Resume, batch_size: int,
            progress: bool | str, last_position_only: bool, record_hooks: dict[str, Callable] | None = None,
            stop_at_layer: int | None = None) -> Iterator[Chunk]:
    """Every cell, resumed and run: cells are grouped by offset, cut to positions offset.. (stored activations and
    patch indices alike), ordered by their first block, and run `batch_size // examples` cells at a time."""
    from tqdm.auto import tqdm

    n_ex = next(iter(resume.states.values())).shape[0]
    device = next(model.parameters()).device
    examples = torch.arange(n_ex, device=device)
    per = max(1, batch_size // n_ex)
    plan = []
    for offset in sorted({c.offset for c in cells}):
        ids = [i for i, c in enumerate(cells) if c.offset == offset]
        cut = {}
        for p in (p for c in ids for p in cells[c].patches):
            key = p.store or p.hook
            if key not in cut:
                cut[key] = stored[key].narrow(p.pos_dim + 1, offset, stored[key].shape[p.pos_dim + 1] - offset)
        starts = {i: start_layer([p.hook for p in cells[i].patches] + list(record_hooks or ())) for i in ids}
        # A patch of the stream entering the cell's first block is written into the resumed state itself, not by a
        # hook: a hook inside the last block would stop it from running at the last position only.
        entry, inside = {}, {}
        for i in ids:
            shifted = [_shift(p, offset) for p in cells[i].patches]
            entry[i] = [p for p in shifted if p.hook == f"blocks.{starts[i]}.hook_resid_pre"]
            inside[i] = [p for p in shifted if p.hook != f"blocks.{starts[i]}.hook_resid_pre"]
        order = sorted(ids, key=starts.__getitem__)
        plan += [(offset, order[i:i + per], entry, inside, cut, starts) for i in range(0, len(order), per)]
    if is_distributed():
        # Under torchrun each rank runs a share of the passes planned above, whole: a pass keeps the rows it has on
        # one process, so every value comes from the same arithmetic as there. A pass costs about (blocks it runs)
        # x (positions it recomputes) per cell; `assign` balances that.
        n_pos, end = next(iter(resume.states.values())).shape[1], stop_at_layer or model.cfg.n_layers
        check_same("a sweep", cells=len(cells), examples=n_ex, positions=n_pos, passes=len(plan))
        costs = [sum(end - starts[c] for c in chunk) * (n_pos - offset) for offset, chunk, _, _, _, starts in plan]
        plan = [p for p, owner in zip(plan, assign(costs)) if owner == rank()]
    # `progress` may be the bar's label ("patch heads"): test it, keep it
    bar = tqdm(plan, desc=progress if isinstance(progress, str) else "sweep", disable=not (progress and is_main()),
               unit="chunk")
    for offset, chunk, entry, inside, cut, starts in bar:
        def hooks(ex: Tensor, cell: Tensor, inside: dict = inside, cut: dict = cut) -> list[Attachment]:
            rows = patch_rows(inside, cell, ex, cut)
            return rows + [Attachment(h, make(ex, cell)) for h, make in (record_hooks or {}).items()]
        entries = []
        for s in sorted({starts[c] for c in chunk}):
            members = torch.tensor([c for c in chunk if starts[c] == s], device=device)
            ex, cell = examples.repeat(len(members)), members.repeat_interleave(n_ex)
            state = resume.states[s][ex, offset:]
            for write in patch_rows(entry, cell, ex, cut):
                state = write.fn(state, None)
            entries.append(Entry(s, state, ex, cell))
        x, ex, cell = staggered_forward(model, entries, hooks, resume.prefix(offset), resume.attention_mask,
                                        last_position_only, stop_at_layer)
        yield Chunk(chunk, x, ex, cell)


def _shift(p: Patch, offset: int) -> Patch:
    """The patch with its position index counted from `offset` (the first recomputed position)."""
    if not offset or len(p.index) <= p.pos_dim or p.index[p.pos_dim] is None:
        return p
    index = list(p.index)
    index[p.pos_dim] -= offset
    return replace(p, index=tuple(index))


def run_cells(model: nn.Module, cells: Sequence[Cell], stored: dict[str, Tensor], metric: Metric, resume: Resume,
              batch_size: int = 64, progress: bool | str = False) -> Tensor:
    """The mean metric over the examples of each cell's patched run: a (len(cells),) tensor. A TransformerLens-style
    metric (one number for a batch, see `metrics.metric_output`) is applied to each cell's rows, in example order.

    `stored[key]` holds the (examples, ...) activations patches read; `resume` is the run being patched.
    `batch_size` bounds the rows of one forward pass (the memory budget). Under torch.distributed the ranks share
    the passes and every rank returns all the values (see `hookvene.distributed`)."""
    if not cells:
        return torch.empty(0)
    n_ex, n_pos = next(iter(resume.states.values())).shape[:2]
    device = next(model.parameters()).device
    examples = torch.arange(n_ex, device=device)
    last_only = isinstance(metric, PositionMetric) and bool((metric.positions(examples, n_pos) == n_pos - 1).all())
    # zeros: under torch.distributed each rank fills its own cells and the ranks' tensors are summed
    out = torch.zeros(len(cells), device=device, dtype=torch.float64 if model.dtype == torch.float64 else None)
    with torch.no_grad():
        for chunk in _chunks(model, cells, stored, resume, batch_size, progress, last_only):
            # a TransformerLens-style metric (logits -> one number) is written for one batch: call it per cell
            values = None if not takes_example_index(metric) else metric_values(
                model, chunk.x, metric, chunk.example_of_row, offset=n_pos - chunk.x.shape[1])
            if values is None or values.ndim == 0:
                logits = model.unembed_resid(chunk.x)  # (a chunk holds every row of each of its cells)
                for c in chunk.cells:
                    rows = (chunk.cell_of_row == c).nonzero().squeeze(1)
                    rows = rows[chunk.example_of_row[rows].argsort()]  # the batch in example order, as TL runs it
                    out[c] = metric_output(metric, logits[rows], chunk.example_of_row[rows]).to(out.dtype)
                continue
            sums = torch.zeros(len(cells), dtype=out.dtype, device=device)
            sums.index_add_(0, chunk.cell_of_row, values.to(out.dtype))
            out[chunk.cells] = sums[chunk.cells] / n_ex
    return sum_disjoint(out) if is_distributed() else out


def record_cells(model: nn.Module, cells: Sequence[Cell], stored: dict[str, Tensor], hooks: Sequence[str],
                 resume: Resume, batch_size: int) -> dict[str, Tensor]:
    """Each cell's patched run read at `hooks` instead of a metric: {hook: (cells, examples, pos - offset, ...)}.
    The runs stop after the last block holding one of the hooks. Every cell must have the same offset."""
    offsets = {c.offset for c in cells}
    if len(offsets) > 1:
        raise ValueError(f"record_cells needs one offset for all cells, got {sorted(offsets)}")
    n_ex = next(iter(resume.states.values())).shape[0]
    out: dict[str, Tensor] = {}

    def saver(h: str) -> Callable[[Tensor, Tensor], Callable]:
        def make(ex: Tensor, cell: Tensor) -> Callable:
            def save(x: Tensor, hook: Any) -> None:
                if h not in out:
                    out[h] = x.new_zeros(len(cells), n_ex, *x.shape[1:])
                out[h][cell, ex] = x.detach()
            return save
        return make
    with torch.no_grad():
        for _ in _chunks(model, cells, stored, resume, batch_size, False, False, {h: saver(h) for h in hooks},
                         stop_at_layer=max(start_layer([h]) for h in hooks) + 1):
            pass
    if is_distributed():  # each rank filled its own cells (zeros elsewhere); a rank that ran no pass has no shapes
        known = {h: v for shapes in gather_objects({h: (t.shape, t.dtype) for h, t in out.items()})
                 for h, v in shapes.items()}
        device = next(model.parameters()).device
        # every rank builds `known` from the same gathered list, so the all-reduces below come in the same order
        out = {h: sum_disjoint(out[h] if h in out else torch.zeros(shape, dtype=dtype, device=device))
               for h, (shape, dtype) in known.items()}
    return out
