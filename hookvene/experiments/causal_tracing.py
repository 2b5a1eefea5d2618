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
noise draws for every cell, so the whole grid costs about cells x samples / batch_size forward passes.
"""

from typing import Any

import torch
from torch import Tensor, nn

from hookvene.experiments.metrics import prob
from hookvene.experiments.results import SweepResult
from hookvene.experiments.sweep import Patch, metric_values, patch_hooks
from hookvene.models._common import KVCache

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
    """
    if kind not in STATES:
        raise ValueError(f"kind must be one of {list(STATES)}, got {kind!r}")
    inputs = {"input_ids": inputs} if isinstance(inputs, Tensor) else dict(inputs)
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

    def corrupt(example_of_row: Tensor, cell_of_row: Tensor | None) -> list:
        def add_noise(x: Tensor, hook: Any) -> Tensor:
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            return x.index_put((rows, subj[None]), x[rows, subj[None]] + noise[example_of_row])
        return [("hook_embed", add_noise)]

    hooks = [STATES[kind].format(layer=layer) for layer in range(n_layers)]
    resid = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    batch = {k: v.expand(n_samples, *v.shape[1:]) for k, v in inputs.items()}
    metric = prob(target)
    with torch.no_grad():
        out, cache = model.run_with_cache(**inputs, names_filter=hooks)
        with model.hooks(fwd_hooks=corrupt(torch.arange(n_samples, device=ids.device), None)):
            noised_out, noised = model.run_with_cache(**batch, names_filter=resid, use_cache=True)
    clean = float(metric(out.logits, torch.zeros(1, dtype=torch.long)).mean())
    corrupted = float(metric(noised_out.logits, torch.arange(n_samples)).mean())

    def layers_for(layer: int) -> range:
        return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))

    # Restoring position p cannot change positions before it (attention is causal), nor the blocks before the
    # first restored layer: each cell resumes from the noised run's residual stream at that layer, on positions
    # p.. only, with the noised run's keys and values for positions < p (a KV cache). Before the first subject
    # token the clean and noised runs agree, so those cells equal the corrupted baseline without running.
    values = torch.full((n_layers, n_pos), corrupted)
    groups: dict[tuple[int, int], list[int]] = {}
    for layer in range(n_layers):
        for p in range(min(subject), n_pos):
            groups.setdefault((layers_for(layer)[0], p), []).append(layer)
    from tqdm.auto import tqdm

    for (first, p), layers in tqdm(groups.items(), desc=f"causal trace ({kind})", disable=not progress):
        stored = {h: cache[h][:, p:].expand(n_samples, -1, -1) for h in hooks}
        cells = [[Patch(STATES[kind].format(layer=j), (0, None)) for j in layers_for(layer)] for layer in layers]
        per = max(1, batch_size // n_samples)
        for c0 in range(0, len(cells), per):
            chunk = list(range(c0, min(c0 + per, len(cells))))
            cell_of_row = torch.tensor(chunk).repeat_interleave(n_samples)
            example_of_row = torch.arange(n_samples).repeat(len(chunk))
            kv = KVCache()
            for j in range(first, n_layers):
                kv.keys[j] = noised_out.past_key_values.keys[j][example_of_row, :p]
                kv.values[j] = noised_out.past_key_values.values[j][example_of_row, :p]
            state = (noised[resid[first]] if first < n_layers else noised_out.last_hidden_state)[example_of_row, p:]
            hooks_ = patch_hooks(cells, cell_of_row, example_of_row, stored)
            with torch.no_grad(), model.hooks(fwd_hooks=hooks_):
                v = metric_values(model, {"inputs_embeds": state, "start_at_layer": first, "past_key_values": kv},
                                  metric, example_of_row, offset=p)
            values[[layers[i] for i in chunk], p] = v.view(len(chunk), n_samples).mean(1).float().cpu()
    return SweepResult(values, f"causal_trace:{kind}", "prob", "layer", "position",
                       [str(x) for x in range(n_layers)], [str(p) for p in range(n_pos)], clean, corrupted,
                       extra={"subject": list(subject), "window": window, "noise_scale": scale,
                              "n_samples": n_samples, "target": int(target), "noise": noise.cpu()})
