"""Activation patching sweeps (exact, batched) and attribution patching (their gradient approximation).

Convention (TransformerLens's "denoising"): run the *corrupted* input and patch in activations of the *clean* run,
one cell at a time; a cell whose patch restores the clean metric matters. Swap the arguments for "noising".

    activation_patch(model, clean, corrupted, metric, kind="heads")      exact: one batched sweep
    attribution_patch(model, clean, corrupted, metric, kind="heads")     approximate: one forward + one backward

Kinds (cells, and the grid they fill):

    resid_pre / resid_mid / resid_post / attn_out / mlp_out   (layer, position)   layers x positions
    attn_layer / mlp_layer                                     (layer)             layers x ["all"]
    heads                                                      (layer, head)       layers x heads    (hook_z)
    heads_pos                                                  (layer, head, pos)  "L{l}H{h}" x positions
    pattern                                                    (layer, head)       layers x heads    (hook_pattern)
    heads_q / heads_k / heads_v                                (layer, head)       layers x heads    (hook_q/k/v)
    heads_q_pos / heads_k_pos / heads_v_pos                    (layer, head, pos)  "L{l}H{h}" x positions
    sae_features (pass sae=...)                                (feature, pos)      features x positions
                                                               (hookvene.experiments.sae_patching)

The q/k/v kinds are TransformerLens's `get_act_patch_attn_head_{q,k,v}_all_pos` and `..._by_pos`: one head's query,
key or value vectors (`blocks.{l}.attn.hook_q` / `hook_k` / `hook_v`, before any rotary rotation, as in TL). Under
grouped-query attention (Llama-family models with n_kv_heads < n_heads) the k and v cells are key/value heads
(n_kv_heads of them per layer, labelled "L{l}KV{h}" in the _pos grids): one cell changes what all the query heads of
its group read.

`metric` is a hookvene per-row metric (`logit_diff`, `prob`, ..., or `f(logits, example_idx) -> (rows,)`; a cell's
value is its mean over the examples) or a TransformerLens-style metric, `f(logits) -> one number` (a 0-d tensor or
a float), applied to the patched logits of the whole batch, as TL's `patching.get_act_patch_*` apply it. A function
with one required argument is called with the logits alone; the shape of what it returns tells the two apart
(`hookvene.experiments.metrics.metric_output`).
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.distributed import all_sum, check_same, is_distributed, rank, world_size
from hookvene.experiments.metrics import Metric, metric_output
from hookvene.experiments.results import SweepResult
from hookvene.experiments.sae_patching import KIND as SAE_KIND
from hookvene.experiments.sae_patching import feature_attribution, feature_patch
from hookvene.experiments.sweep import (
    Cell,
    check_model,
    first_read_position,
    position_labels,
    record,
    run_cells,
    shared_prefix,
    sweep_pair,
)
from hookvene.plan import Patch


@dataclass(frozen=True)
class Kind:
    hook: str  # template with {layer}
    layout: tuple[str, ...]  # names of the hook tensor's dims after batch
    cell: tuple[str, ...]  # the dims a cell fixes (besides the layer)
    heads: str = "n_heads"  # the config field counting the hook's heads (n_kv_heads: grouped keys and values)


KINDS = {
    "resid_pre": Kind("blocks.{layer}.hook_resid_pre", ("pos", "d"), ("pos",)),
    "resid_mid": Kind("blocks.{layer}.hook_resid_mid", ("pos", "d"), ("pos",)),
    "resid_post": Kind("blocks.{layer}.hook_resid_post", ("pos", "d"), ("pos",)),
    "attn_out": Kind("blocks.{layer}.hook_attn_out", ("pos", "d"), ("pos",)),
    "mlp_out": Kind("blocks.{layer}.hook_mlp_out", ("pos", "d"), ("pos",)),
    "attn_layer": Kind("blocks.{layer}.hook_attn_out", ("pos", "d"), ()),
    "mlp_layer": Kind("blocks.{layer}.hook_mlp_out", ("pos", "d"), ()),
    "heads": Kind("blocks.{layer}.attn.hook_z", ("pos", "head", "d"), ("head",)),
    "heads_pos": Kind("blocks.{layer}.attn.hook_z", ("pos", "head", "d"), ("head", "pos")),
    "pattern": Kind("blocks.{layer}.attn.hook_pattern", ("head", "q", "k"), ("head",)),
}

# Each head's query, key and value vectors (TransformerLens's get_act_patch_attn_head_{q,k,v}_all_pos / _by_pos).
QKV_KINDS = {
    f"heads_{x}{suffix}": Kind(f"blocks.{{layer}}.attn.hook_{x}", ("pos", "head", "d"), cell,
                               "n_heads" if x == "q" else "n_kv_heads")
    for x in "qkv" for suffix, cell in (("", ("head",)), ("_pos", ("head", "pos")))
}
ALL_KINDS = {**KINDS, **QKV_KINDS}


def _need_sae(sae: Any, kind: str) -> Any:
    if sae is None or kind not in (SAE_KIND, "resid_pre"):  # "resid_pre" is the default: sae= alone is enough
        raise ValueError(f"kind {kind!r} with sae={type(sae).__name__}: feature sweeps are kind={SAE_KIND!r} with "
                         f"sae=<a hookvene.SAE>; the other kinds take no sae")
    return sae


def _kind(kind: str) -> Kind:
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown sweep kind {kind!r}; choose one of {', '.join(ALL_KINDS)}, or {SAE_KIND} "
                         f"(with sae=...)")
    return ALL_KINDS[kind]


def _grid(model: nn.Module, kind: Kind, n_pos: int) -> tuple[list[list[Any]], list[str], list[str], str, str]:
    """Cells as (layer, {dim: value}) in row-major grid order, with row/col labels."""
    cfg = model.cfg
    n_heads = getattr(cfg, kind.heads, None) or cfg.n_heads  # n_kv_heads: only grouped-query configs have it
    grouped = n_heads != cfg.n_heads
    sizes = {"pos": n_pos, "head": n_heads}
    layers = list(range(cfg.n_layers))
    if kind.cell == ("head", "pos"):
        rows = [(layer, h) for layer in layers for h in range(n_heads)]
        cells = [[layer, {"head": h, "pos": p}] for layer, h in rows for p in range(n_pos)]
        return cells, [f"L{layer}{'KV' if grouped else 'H'}{h}" for layer, h in rows], \
            [str(p) for p in range(n_pos)], "kv head" if grouped else "head", "position"
    if not kind.cell:
        return [[layer, {}] for layer in layers], [str(x) for x in layers], ["all"], "layer", ""
    (dim,) = kind.cell
    cells = [[layer, {dim: i}] for layer in layers for i in range(sizes[dim])]
    label = "position" if dim == "pos" else ("kv head" if grouped else "head")
    return cells, [str(x) for x in layers], [str(i) for i in range(sizes[dim])], "layer", label


def activation_patch(model: nn.Module, clean: Any, corrupted: Any, metric: Metric, kind: str = "resid_pre",
                     batch_size: int = 64, progress: bool = False, sae: Any = None,
                     features: Any = None) -> SweepResult:
    """Exact patching sweep: for every cell, the mean metric of the corrupted run with that one clean activation
    patched in. All cells x examples run as stacked batch rows, `batch_size` rows per forward pass.

    With a metric read at one position (`PositionMetric`, e.g. `logit_diff`), positions before a cell's patch
    are not recomputed (attention is causal: they come from the corrupted run's KV cache), and cells patching
    where clean and corrupted inputs agree equal the corrupted baseline without running.

    `sae=` (kind "sae_features"): the cells are an SAE's features x positions (`features=` a subset), see
    `hookvene.experiments.sae_patching.feature_patch`."""
    if sae is not None or kind == SAE_KIND:
        return feature_patch(model, _need_sae(sae, kind), clean, corrupted, metric, features, batch_size, progress)
    check_model(model, "activation_patch")
    k = _kind(kind)
    clean, corrupted = sweep_pair(model, clean, corrupted)
    n_pos = corrupted["input_ids"].shape[1]
    grid, rows, cols, row_label, col_label = _grid(model, k, n_pos)
    if col_label == "position":
        cols = position_labels(model, clean, corrupted)
    hooks = sorted({k.hook.format(layer=c[0]) for c in grid})
    source = record(model, clean, metric, hooks)
    base = record(model, corrupted, metric, resume=True)

    # The first position each cell recomputes: the one it patches (or the earliest position the metric reads, if
    # that comes first); for cells without a position, the first where clean and corrupted inputs differ. Cells
    # patching where the inputs agree change nothing: they keep the corrupted baseline without running.
    read_min = first_read_position(metric, corrupted)
    shared = min(shared_prefix(clean, corrupted), read_min)
    pos_dim = next(i for i, d in enumerate(k.layout) if d in ("pos", "q"))  # query positions in the index
    cells, live = [], []
    for i, (layer, fixed) in enumerate(grid):
        if fixed.get("pos", shared) < shared:
            continue
        index = tuple(fixed.get(d) for d in k.layout)
        cells.append(Cell((Patch(k.hook.format(layer=layer), index, pos_dim=pos_dim),),
                          min(fixed["pos"], read_min) if "pos" in fixed else shared))
        live.append(i)
    values = torch.full((len(grid),), base.metric, dtype=torch.float64 if model.dtype == torch.float64 else None)
    values[live] = run_cells(model, cells, source.stored, metric, base.resume, batch_size,
                             progress=progress and f"patch {kind}").cpu().to(values.dtype)
    return SweepResult(values.view(len(rows), len(cols)), kind, getattr(metric, "__name__", "metric"),
                       row_label, col_label, rows, cols, source.metric, base.metric)


def attribution_patch(model: nn.Module, clean: Any, corrupted: Any, metric: Metric,
                      kind: str = "resid_pre", sae: Any = None, features: Any = None) -> SweepResult:
    """Attribution patching (Nanda 2023): the first-order estimate of every cell of `activation_patch` from one
    clean forward, one corrupted forward and one backward: metric(corrupted) + sum((clean - corrupted) * grad).
    Exact when the metric is linear in the patched activation; the values are comparable to the exact sweep's.

    Under torch.distributed each rank differentiates a share of the examples (every world_size-th) and the sums
    are added across ranks: every rank returns the whole result.

    `sae=` (kind "sae_features"): over an SAE's features x positions, see `sae_patching.feature_attribution`."""
    if sae is not None or kind == SAE_KIND:
        return feature_attribution(model, _need_sae(sae, kind), clean, corrupted, metric, features)
    check_model(model, "attribution_patch")
    k = _kind(kind)
    clean, corrupted = sweep_pair(model, clean, corrupted)
    grid, rows, cols, row_label, col_label = _grid(model, k, corrupted["input_ids"].shape[1])
    if col_label == "position":
        cols = position_labels(model, clean, corrupted)
    layers = sorted({c[0] for c in grid})
    hooks = [k.hook.format(layer=layer) for layer in layers]
    n = corrupted["input_ids"].shape[0]
    mine = torch.arange(n, device=corrupted["input_ids"].device)  # the examples this process differentiates
    split = is_distributed() and n >= world_size()  # fewer examples than ranks: each rank does them all
    if split:
        check_same("attribution_patch", examples=n)
        mine = mine[rank()::world_size()]
        clean, corrupted = ({key: v[mine] for key, v in d.items()} for d in (clean, corrupted))
    source = record(model, clean, metric, hooks, examples=mine)
    stored, clean_m = source.stored, source.metric * len(mine) / n  # this share's part of the mean
    acts: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> None:
        acts[hook.name] = x

    def leaf(x: Tensor, hook: Any) -> Tensor:  # make activations differentiable even if the model is frozen
        return x if x.requires_grad else x.detach().requires_grad_(True)

    with torch.enable_grad():
        out = model.run_with_hooks(**corrupted, fwd_hooks=[("hook_embed", leaf)] + [(h, keep) for h in hooks])
        m = metric_output(metric, out.logits, mine.to(out.logits.device))
        if m.ndim == 0 and split:
            raise ValueError("attribution_patch under torch.distributed splits the examples between ranks, so it "
                             "needs a per-row metric (f(logits, example_idx) -> (rows,)), not one number for the "
                             "whole batch")
        m = m if m.ndim == 0 else m.sum() / n  # per row: this share's part of the mean over all n
        grads = torch.autograd.grad(m, [acts[h] for h in hooks], allow_unused=True)
    keep_dims = [i + 1 for i, d in enumerate(k.layout) if d in k.cell]
    sum_dims = [i + 1 for i, d in enumerate(k.layout) if d not in k.cell]
    per_layer = []
    for h, g in zip(hooks, grads):
        effect = (stored[h] - acts[h].detach()) * (torch.zeros_like(stored[h]) if g is None else g)
        effect = effect.sum(dim=sum_dims) if sum_dims else effect
        effect = effect.sum(dim=0)  # the metric is a mean over examples, so the gradient already holds the 1/B
        order = [k.layout[d - 1] for d in keep_dims]
        if order != list(k.cell):  # put the cell dims in the grid's order, e.g. (head, pos)
            effect = effect.permute([order.index(d) for d in k.cell])
        per_layer.append(effect.reshape(-1))
    effects, m = torch.stack(per_layer).detach(), m.detach()
    if split:  # the shares' sums make the whole: effects and both metrics, in one reduction
        total = all_sum(torch.cat([effects.reshape(-1), m.reshape(1), m.new_tensor([clean_m])]))
        effects, m, clean_m = total[:-2].view_as(effects), total[-2], float(total[-1])
    values = float(m) + effects.reshape(len(rows), len(cols))
    return SweepResult(values.cpu(), f"attribution:{kind}", getattr(metric, "__name__", "metric"), row_label,
                       col_label, rows, cols, clean_m, float(m))


def compare(exact: SweepResult, approx: SweepResult) -> dict[str, float]:
    """Agreement of an attribution sweep with the exact one: correlation of effects and max abs difference."""
    a = (exact.values - exact.corrupted).flatten()
    b = (approx.values - approx.corrupted).flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    return {"correlation": float(corr), "max_abs_diff": float((a - b).abs().max())}


