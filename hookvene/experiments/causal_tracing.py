"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME).

Corrupt the subject tokens' embeddings with Gaussian noise, then restore the clean value of one state at a time
and measure how much of the clean prediction comes back:

    noise   = noise_scale * N(0, 1) on hook_embed at the subject positions; noise_scale defaults to
              3 x the standard deviation of the token-embedding matrix (ROME uses 3 sigma of subject embeddings)
    restore = the clean value at (layer, position) of the residual stream (hook_resid_post, window 1), or of the
              MLP / attention output at `window` consecutive layers centred on `layer` (ROME's window, default 10)
    effect  = P(target | corrupted, restored) averaged over `n_samples` noise draws; the indirect effect is
              that minus P(target | corrupted)

Every (layer, position) cell and every noise sample is one row of a stacked batch (see sweep.py), with the same
noise draws for every cell. A cell recomputes only what restoring can change: the blocks after the first restored
layer, at the positions from the restored one on (see the comment in `causal_trace`).
"""

from typing import Any

import torch
from torch import Tensor, nn

from hookvene.experiments.metrics import prob
from hookvene.experiments.results import SweepResult
from hookvene.experiments.sweep import (
    Entry,
    Patch,
    Resume,
    check_model,
    metric_values,
    patch_hooks,
    staggered_forward,
)
from hookvene.utils import as_inputs

STATES = {"resid": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
          "attn": "blocks.{layer}.hook_attn_out"}


def embedding_noise_scale(model: nn.Module, multiple: float = 3.0) -> float:
    """`multiple` x the standard deviation of the token-embedding entries."""
    return multiple * float(model.embed.weight.detach().float().std())


def causal_trace(model: nn.Module, inputs: Any, subject: list[int], target: int, kind: str = "resid",
                 window: int | None = None, n_samples: int = 10, noise_scale: float | None = None, seed: int = 0,
                 batch_size: int = 128, progress: bool = False) -> SweepResult:
    """The indirect-effect grid (layers x positions) for one prompt.

    Args:
        inputs: one prompt: token ids (1, pos) or a tokenizer output for one example.
        subject: positions of the subject tokens to corrupt.
        target: token id whose probability (at the last position) is traced.
        kind: "resid", "mlp" or "attn"; window: consecutive layers restored (default 1 for resid, 10 otherwise).
        batch_size: the most rows in one forward pass (the memory budget); every cell has n_samples rows.
    """
    check_model(model, "causal_trace")
    if kind not in STATES:
        raise ValueError(f"kind must be one of {list(STATES)}, got {kind!r}")
    inputs = as_inputs(inputs)
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError(f"causal_trace takes one prompt, got a batch of {ids.shape[0]}")
    n_layers, n_pos = model.cfg.n_layers, ids.shape[1]
    bad = [p for p in subject if not 0 <= p < n_pos]
    if not subject or bad:
        raise ValueError(f"subject positions {subject} must be non-empty and within the prompt's {n_pos} tokens")
    if not 0 <= target < model.cfg.d_vocab:
        raise ValueError(f"target token {target} is outside the vocabulary [0, {model.cfg.d_vocab})")
    window = window or (1 if kind == "resid" else 10)
    scale = embedding_noise_scale(model) if noise_scale is None else noise_scale
    gen = torch.Generator().manual_seed(seed)
    d_model = model.embed.weight.shape[1]
    noise = (torch.randn(n_samples, len(subject), d_model, generator=gen) * scale).to(model.embed.weight)
    subj = torch.tensor(subject, device=ids.device)

    def add_noise(x: Tensor, hook: Any) -> Tensor:  # batch row i gets noise sample i
        x = x.clone()
        x[:, subj] += noise
        return x

    hooks = [STATES[kind].format(layer=layer) for layer in range(n_layers)]
    # entering[l]: the residual stream entering block l (entering[n_layers]: leaving the last block)
    entering = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    batch = {k: v.expand(n_samples, *v.shape[1:]) for k, v in inputs.items()}
    metric = prob(target)
    samples = torch.arange(n_samples, device=ids.device)
    with torch.no_grad():  # both runs stop after the last block; the metric unembeds the last position only
        out, cache = model.run_with_cache(**inputs, names_filter=hooks, stop_at_layer=n_layers)
        with model.hooks(fwd_hooks=[("hook_embed", add_noise)]):
            noised_out, noised_cache = model.run_with_cache(**batch, names_filter=entering, use_cache=True,
                                                            stop_at_layer=n_layers)
        clean, corrupted = (float(metric_values(model, {"inputs_embeds": o.last_hidden_state[:, -1:],
                                                        "start_at_layer": n_layers}, metric, rows, n_pos - 1).mean())
                            for o, rows in ((out, samples[:1]), (noised_out, samples)))

    def layers_for(layer: int) -> range:
        return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))

    # Restoring position p cannot change positions before it (attention is causal), nor the blocks before the
    # first restored layer. So each cell resumes from the noised run's residual stream at that layer, on positions
    # p.. only, with the noised run's keys and values for positions < p (a KV cache), and the cells of one
    # position run as one staggered batch (see sweep.staggered_forward). Restoring the residual stream leaving
    # block l (window 1) is resuming at block l + 1 from the noised stream with position p's clean value.
    # Cells equal to the corrupted baseline are not run: before the first subject token the clean and noised runs
    # agree, and restoring the last block's output at a position other than the last changes nothing read.
    values = torch.full((n_layers, n_pos), corrupted)
    direct = kind == "resid" and window == 1
    per = max(1, batch_size // n_samples)
    jobs = []
    for p in range(min(subject), n_pos):
        layers = list(range(n_layers - 1 if direct and p < n_pos - 1 else n_layers))
        jobs += [(p, layers[i:i + per]) for i in range(0, len(layers), per)]
    noised = Resume({layer: noised_cache[h] for layer, h in enumerate(entering)}, noised_out.past_key_values,
                    batch.get("attention_mask"))
    from tqdm.auto import tqdm

    for p, layers in tqdm(jobs, desc=f"causal trace ({kind})", disable=not progress):
        stored = {h: cache[h][:, p:].expand(n_samples, -1, -1) for h in hooks}
        entries, cells = [], []
        for i, layer in enumerate(layers):
            cell_rows = torch.full_like(samples, i)
            if direct:
                state = noised.states[layer + 1][:, p:].clone()
                state[:, 0] = stored[hooks[layer]][:, 0]
                entries.append(Entry(layer + 1, state, samples, cell_rows))
            else:
                first = layers_for(layer)[0]
                entries.append(Entry(first, noised.states[first][:, p:], samples, cell_rows))
                cells.append([Patch(hooks[j], (0, None)) for j in layers_for(layer)])

        def restore(ex: Tensor, cell: Tensor, cells: list = cells, stored: dict = stored) -> list:
            return patch_hooks(cells, cell, ex, stored)
        with torch.no_grad():
            x, ex, cell = staggered_forward(model, entries, None if direct else restore, noised.prefix(p),
                                            noised.attention_mask, last_position_only=True)
            v = metric_values(model, {"inputs_embeds": x, "start_at_layer": n_layers}, metric, ex, offset=n_pos - 1)
        sums = torch.zeros(len(layers), dtype=v.dtype, device=v.device).index_add_(0, cell, v)
        values[layers, p] = (sums / n_samples).float().cpu()
    return SweepResult(values, f"causal_trace:{kind}", "prob", "layer", "position",
                       [str(x) for x in range(n_layers)], [str(p) for p in range(n_pos)], clean, corrupted,
                       extra={"subject": list(subject), "window": window, "noise_scale": scale,
                              "n_samples": n_samples, "target": int(target), "noise": noise.cpu()})
