"""Path patching (Wang et al. 2022, "Interpretability in the Wild", IOI; Goldowsky-Dill et al. 2023).

The effect of sender heads on the metric *through* chosen receivers only. For every sender head (l, h), batched:

    receivers="logits"   (the direct path, = the seed's `path_patching_config`): run the clean input with the
                         sender's output (hook_z) taken from the corrupted run and every later attention and MLP
                         output (and the sender layer's MLP) frozen to its clean value; measure the metric.
    receivers=[(hook, head), ...]   e.g. [("blocks.9.attn.hook_q", 6)]: pass 1 runs the clean input with the sender
                         patched from the corrupted run and every other head's output frozen to clean (MLPs
                         recompute), and records the receivers' inputs; pass 2 runs the clean input with only the
                         receivers' inputs replaced by the recorded values; measure the metric.

The result is a layers x heads grid of the metric; the cells patch the clean run (`unpatched="clean"`), so a value
moved from `clean` toward `corrupted` means the path carries the behaviour: `normalized_effect` 1 = the path alone
carries all of it, and `top()` / `table()` rank by the size of the effect, sign shown.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hookvene.experiments.metrics import Metric
from hookvene.experiments.results import SweepResult
from hookvene.experiments.sweep import (
    Cell,
    check_model,
    first_read_position,
    record,
    record_cells,
    run_cells,
    shared_prefix,
    sweep_pair,
)
from hookvene.plan import Patch

Z = "blocks.{layer}.attn.hook_z"


def path_patch(model: nn.Module, clean: Any, corrupted: Any, metric: Metric,
               receivers: str | Sequence[tuple[str, int]] = "logits",
               senders: Sequence[tuple[int, int]] | None = None, batch_size: int = 64) -> SweepResult:
    """Path-patching effect of each sender head (default: every head) through `receivers` (see module doc).

    Every cell resumes from the clean run at the sender's layer (or the first receiver's, if earlier); positions
    where clean and corrupted inputs agree come from the clean run's KV cache."""
    check_model(model, "path_patch")
    clean, corrupted = sweep_pair(model, clean, corrupted)
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    senders = list(senders) if senders is not None else [(lay, h) for lay in range(n_layers) for h in range(n_heads)]
    bad = [s for s in senders if not (0 <= s[0] < n_layers and 0 <= s[1] < n_heads)]
    if bad:
        raise ValueError(f"sender heads {bad} out of range: the model has {n_layers} layers x {n_heads} heads")
    direct = receivers == "logits"
    if not direct:
        receivers = list(receivers)
        per_head = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")
        bad = [r for r, _ in receivers if r not in model.hook_dict or not r.endswith(per_head)]
        if bad:
            raise ValueError(f"receivers must be per-head hooks (attn.hook_q/k/v/z) of this model, e.g. "
                             f"('blocks.2.attn.hook_q', head); got {bad}")
        bad_heads = [(r, h) for r, h in receivers if not 0 <= h < n_heads]
        if bad_heads:
            raise ValueError(f"receiver heads {bad_heads} out of range: the model has {n_heads} heads")
    outs = [f"blocks.{layer}.hook_{k}_out" for layer in range(n_layers) for k in ("attn", "mlp")]
    zs = [Z.format(layer=layer) for layer in range(n_layers)]
    base = record(model, clean, metric, zs + outs, resume=True)  # the run every cell patches
    source = record(model, corrupted, metric, zs)
    stored = {f"clean:{h}": v for h, v in base.stored.items()} | {f"corrupted:{h}": v for h, v in source.stored.items()}
    offset = min(shared_prefix(clean, corrupted), first_read_position(metric, clean))

    def sender(layer: int, head: int) -> Patch:
        return Patch(Z.format(layer=layer), (None, head, None), store=f"corrupted:{Z.format(layer=layer)}")

    def freeze(hook: str, head: int | None = None) -> Patch:  # back to the clean run's value
        return Patch(hook, (None,) if head is None else (None, head, None), store=f"clean:{hook}")

    if direct:
        def later(lay: int) -> list[Patch]:  # every attention and MLP output after the sender's layer
            return [freeze(f"blocks.{j}.hook_{k}_out") for j in range(lay + 1, n_layers) for k in ("attn", "mlp")]
        cells = [Cell((sender(lay, h), freeze(f"blocks.{lay}.hook_mlp_out"), *later(lay)), offset)
                 for lay, h in senders]
    else:  # pass 1 records what the receivers read; pass 2 patches only that in
        first = [Cell((sender(lay, h), *(freeze(Z.format(layer=j), k) for j in range(lay, n_layers)
                                         for k in range(n_heads) if (j, k) != (lay, h)))) for lay, h in senders]
        hooks = sorted({r for r, _ in receivers})
        recorded = record_cells(model, first, stored, hooks, base.resume, batch_size)
        stored |= {f"recorded:{c}:{h}": recorded[h][c] for c in range(len(senders)) for h in hooks}
        cells = [Cell(tuple(Patch(r, (None, head, None), store=f"recorded:{c}:{r}") for r, head in receivers), offset)
                 for c in range(len(senders))]
    values = run_cells(model, cells, stored, metric, base.resume, batch_size).cpu()
    grid = torch.full((n_layers, n_heads), float("nan"))
    for (lay, h), v in zip(senders, values):
        grid[lay, h] = v
    return SweepResult(grid, "path_patch:" + ("logits" if direct else ",".join(f"{r}[{h}]" for r, h in receivers)),
                       getattr(metric, "__name__", "metric"), "layer", "head", [str(x) for x in range(n_layers)],
                       [str(h) for h in range(n_heads)], base.metric, source.metric, unpatched="clean")
