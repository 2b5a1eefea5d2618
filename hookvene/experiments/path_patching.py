"""Path patching (Wang et al. 2022, "Interpretability in the Wild", IOI; Goldowsky-Dill et al. 2023).

The effect of sender heads on the metric *through* chosen receivers only. For every sender head (l, h), batched:

    receivers="logits"   (the direct path, = the seed's `path_patching_config`): run the clean input with the
                         sender's output (hook_z) taken from the corrupted run and every later attention and MLP
                         output (and the sender layer's MLP) frozen to its clean value; measure the metric.
    receivers=[(hook, head), ...]   e.g. [("blocks.9.attn.hook_q", 6)]: pass 1 runs the clean input with the sender
                         patched from the corrupted run and every other head's output frozen to clean (MLPs
                         recompute), and records the receivers' inputs; pass 2 runs the clean input with only the
                         receivers' inputs replaced by the recorded values; measure the metric.

The result is a layers x heads grid; lower than `clean` means the path carries the behaviour.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hookvene.experiments.metrics import Metric
from hookvene.experiments.patching import _baselines, _check_pair
from hookvene.experiments.results import SweepResult
from hookvene.experiments.sweep import Patch, check_model, metric_values, patch_hooks
from hookvene.utils import as_inputs

Z = "blocks.{layer}.attn.hook_z"


def _chunks(n_cells: int, n_ex: int, batch_size: int) -> list[range]:
    per = max(1, batch_size // n_ex)
    return [range(s, min(s + per, n_cells)) for s in range(0, n_cells, per)]


def path_patch(model: nn.Module, clean: Any, corrupted: Any, metric: Metric,
               receivers: str | Sequence[tuple[str, int]] = "logits",
               senders: Sequence[tuple[int, int]] | None = None, batch_size: int = 64) -> SweepResult:
    """Path-patching effect of each sender head (default: every head) through `receivers` (see module doc)."""
    check_model(model, "path_patch")
    clean, corrupted = as_inputs(clean), as_inputs(corrupted)
    _check_pair(clean, corrupted)
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    senders = list(senders) if senders is not None else [(lay, h) for lay in range(n_layers) for h in range(n_heads)]
    bad = [s for s in senders if not (0 <= s[0] < n_layers and 0 <= s[1] < n_heads)]
    if bad:
        raise ValueError(f"sender heads {bad} out of range: the model has {n_layers} layers x {n_heads} heads")
    direct = receivers == "logits"
    outs = [f"blocks.{layer}.hook_{k}_out" for layer in range(n_layers) for k in ("attn", "mlp")]
    zs = [Z.format(layer=layer) for layer in range(n_layers)]
    stored, clean_m, corrupted_m, _ = _baselines(model, clean, corrupted, metric, zs + outs)
    with torch.no_grad():
        _, corr_cache = model.run_with_cache(**corrupted, names_filter=zs)
    stored |= {f"corrupted:{h}": corr_cache[h] for h in zs}
    n_ex = clean["input_ids"].shape[0]

    def sender_patch(layer: int, head: int) -> Patch:
        return Patch(Z.format(layer=layer), (None, head, None), store=f"corrupted:{Z.format(layer=layer)}")

    if direct:
        cells = [[sender_patch(lay, h), Patch(f"blocks.{lay}.hook_mlp_out")]
                 + [Patch(f"blocks.{j}.hook_{k}_out") for j in range(lay + 1, n_layers) for k in ("attn", "mlp")]
                 for lay, h in senders]
    else:
        receivers = list(receivers)
        per_head = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")
        bad = [r for r, _ in receivers if r not in model.hook_dict or not r.endswith(per_head)]
        if bad:
            raise ValueError(f"receivers must be per-head hooks (attn.hook_q/k/v/z) of this model, e.g. "
                             f"('blocks.2.attn.hook_q', head); got {bad}")
        bad_heads = [(r, h) for r, h in receivers if not 0 <= h < n_heads]
        if bad_heads:
            raise ValueError(f"receiver heads {bad_heads} out of range: the model has {n_heads} heads")
        cells = [[sender_patch(lay, h)] + [Patch(Z.format(layer=j), (None, k, None)) for j in range(n_layers)
                                           for k in range(n_heads) if (j, k) != (lay, h)] for lay, h in senders]
    values = torch.empty(len(senders))
    with torch.no_grad():
        for chunk in _chunks(len(senders), n_ex, batch_size):
            cell_of_row = torch.tensor(list(chunk)).repeat_interleave(n_ex)
            ex = torch.arange(n_ex).repeat(len(chunk))
            batch = {k: v[ex] for k, v in clean.items()}
            hooks = patch_hooks(cells, cell_of_row, ex, stored)
            if not direct:
                with model.hooks(fwd_hooks=hooks):  # pass 1: record what the receivers read
                    _, recorded = model.run_with_cache(**batch, names_filter=sorted({r for r, _ in receivers}))
                second = [[Patch(r, (None, head, None), store=f"recorded:{r}") for r, head in receivers]] * len(cells)
                rows = torch.arange(len(ex))
                hooks = patch_hooks(second, cell_of_row, ex, {f"recorded:{k}": v for k, v in recorded.items()},
                                    store_row=rows)
            with model.hooks(fwd_hooks=hooks):
                v = metric_values(model, batch, metric, ex)
            values[chunk.start:chunk.stop] = v.view(len(chunk), n_ex).mean(1).cpu()
    grid = torch.full((n_layers, n_heads), float("nan"))
    for (lay, h), v in zip(senders, values):
        grid[lay, h] = v
    return SweepResult(grid, "path_patch:" + ("logits" if direct else ",".join(f"{r}[{h}]" for r, h in receivers)),
                       getattr(metric, "__name__", "metric"), "layer", "head", [str(x) for x in range(n_layers)],
                       [str(h) for h in range(n_heads)], clean_m, corrupted_m)
