"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME).

Corrupt the subject tokens' embeddings with Gaussian noise, then restore the clean value of one state at a time
and measure how much of the clean prediction comes back:

    noise   = noise_scale * N(0, 1) on hook_embed at the subject positions; noise_scale defaults to
              3 x the standard deviation of the token-embedding matrix (ROME uses 3 sigma of subject embeddings)
    restore = the clean value at (layer, position) of the residual stream (kind="resid_post", window 1), or of
              the MLP / attention output ("mlp_out" / "attn_out") at `window` consecutive layers centred on `layer`
              (ROME's window, default 10)
    effect  = P(target | corrupted, restored) averaged over `n_samples` noise draws; the indirect effect is
              that minus P(target | corrupted)

Every (layer, position) cell and every noise sample is one row of a stacked batch of the sweep engine (sweep.py),
with the same noise draws for every cell. A cell recomputes only what restoring can change: the blocks from the
first restored layer on, at the positions from the restored one on (see the comment in `causal_trace`).
"""

from typing import Any

import torch
from torch import Tensor, nn

from hookvene.experiments.metrics import answer_token, prob, warn_if_special
from hookvene.experiments.results import SweepResult
from hookvene.experiments.sweep import Cell, check_model, record, run_cells, sweep_inputs
from hookvene.plan import Attachment, Patch

KINDS = {"resid_post": "blocks.{layer}.hook_resid_post", "mlp_out": "blocks.{layer}.hook_mlp_out",
         "attn_out": "blocks.{layer}.hook_attn_out"}
RENAMED = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}  # their former names


def subject_positions(model: nn.Module, ids: Tensor, subject: str) -> list[int]:
    """Positions of the tokens of `subject`'s first occurrence in the token sequence `ids` (a tokenizer-aware model:
    the subject is tokenized as it reads inside the prompt, e.g. " Mary" with its leading space)."""
    tokens = model.to_tokens(subject, prepend_bos=False)[0].to(ids.device)
    for start in range(len(ids) - len(tokens) + 1):
        if torch.equal(ids[start:start + len(tokens)], tokens):
            return list(range(start, start + len(tokens)))
    raise ValueError(f"subject {subject!r} (tokens {model.to_str_tokens(tokens)}) does not occur in the prompt "
                     f"{model.to_str_tokens(ids)}; mind the leading space (' Mary' inside a sentence)")


def embedding_noise_scale(model: nn.Module, multiple: float = 3.0) -> float:
    """`multiple` x the standard deviation of the token-embedding entries."""
    return multiple * float(model.embed.weight.detach().float().std())


def causal_trace(model: nn.Module, inputs: Any, subject: list[int] | str, target: int | str, kind: str = "resid_post",
                 window: int | None = None, n_samples: int = 10, noise_scale: float | None = None, seed: int = 0,
                 batch_size: int = 128, progress: bool = False) -> SweepResult:
    """The indirect-effect grid (layers x positions) for one prompt.

    Args:
        inputs: one prompt: token ids (1, pos), a tokenizer output for one example, or a string (tokenized with
            the model's tokenizer, `model.to_tokens`: BOS first).
        subject: positions of the subject tokens to corrupt, or a string: the tokens of its first occurrence in
            the prompt (with a tokenizer-aware model).
        target: token id whose probability (at the last position) is traced, or the answer string (e.g. " Paris",
            resolved with `answer_token`: one known token, never the BOS the tokenizer prepends).
        kind: "resid_post", "mlp_out" or "attn_out" (the hook restored, as the sweeps name it); window:
            consecutive layers restored (default 1 for resid_post, 10 otherwise).
        batch_size: the most rows in one forward pass (the memory budget); every cell has n_samples rows.
    """
    check_model(model, "causal_trace")
    if kind in RENAMED:
        raise ValueError(f"kind {kind!r} is now called {RENAMED[kind]!r} (the name of the hook it restores)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    tokenizer = getattr(model, "tokenizer", None)
    inputs = sweep_inputs(model, model.to_tokens(inputs) if isinstance(inputs, str) else inputs)
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError(f"causal_trace takes one prompt, got a batch of {ids.shape[0]}")
    n_layers, n_pos = model.cfg.n_layers, ids.shape[1]
    if isinstance(subject, str):
        subject = subject_positions(model, ids[0], subject)
    if isinstance(target, str):
        target = answer_token(model, target)
    elif tokenizer is not None:
        warn_if_special(tokenizer, int(target), "the traced target")
    bad = [p for p in subject if not 0 <= p < n_pos]
    if not subject or bad:
        raise ValueError(f"subject positions {subject} must be non-empty and within the prompt's {n_pos} tokens")
    if not 0 <= target < model.cfg.d_vocab:
        raise ValueError(f"target token {target} is outside the vocabulary [0, {model.cfg.d_vocab})")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int (noise draws per cell), got {n_samples!r}")
    window = window or (1 if kind == "resid_post" else 10)
    scale = embedding_noise_scale(model) if noise_scale is None else noise_scale
    gen = torch.Generator().manual_seed(seed)
    d_model = model.embed.weight.shape[1]
    noise = (torch.randn(n_samples, len(subject), d_model, generator=gen) * scale).to(model.embed.weight)
    subj = torch.tensor(subject, device=ids.device)

    def add_noise(x: Tensor, hook: Any) -> Tensor:  # batch row i gets noise sample i
        x = x.clone()
        x[:, subj] += noise
        return x

    hooks = [KINDS[kind].format(layer=layer) for layer in range(n_layers)]
    metric = prob(target)
    clean = record(model, inputs, metric, hooks)
    noised = record(model, {k: v.expand(n_samples, *v.shape[1:]) for k, v in inputs.items()}, metric, resume=True,
                    attachments=[Attachment("hook_embed", add_noise)])
    stored = {h: v.expand(n_samples, *v.shape[1:]) for h, v in clean.stored.items()}  # one clean run, every sample

    def layers_for(layer: int) -> range:  # ROME's window: `window` consecutive layers centred on `layer`
        return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))

    # Restoring position p cannot change positions before it (attention is causal), nor the blocks before the
    # first restored layer: each cell resumes from the noised run there (offset p, see sweep.py). Restoring the
    # residual stream leaving block l (window 1) is patching the stream entering block l + 1. Cells equal to the
    # corrupted baseline are not run: before the first subject token the clean and noised runs agree, and
    # restoring the last block's output at a position other than the last changes nothing the metric reads.
    direct = kind == "resid_post" and window == 1
    grid, cells = [], []
    for p in range(min(subject), n_pos):
        for layer in range(n_layers - 1 if direct and p < n_pos - 1 else n_layers):
            if direct and layer < n_layers - 1:
                patches = (Patch(f"blocks.{layer + 1}.hook_resid_pre", (p, None), store=hooks[layer]),)
            else:
                patches = tuple(Patch(hooks[j], (p, None)) for j in layers_for(layer))
            grid.append((layer, p))
            cells.append(Cell(patches, offset=p))
    values = torch.full((n_layers, n_pos), noised.metric)
    effects = run_cells(model, cells, stored, metric, noised.resume, batch_size,
                        progress=progress and f"causal trace ({kind})").float().cpu()
    for (layer, p), v in zip(grid, effects):
        values[layer, p] = v
    tokens = model.to_str_tokens(ids[0]) if tokenizer is not None else [str(p) for p in range(n_pos)]
    cols = [f"{p}:{t.strip()}" + ("*" if p in subject else "") for p, t in enumerate(tokens)]
    return SweepResult(values, f"causal_trace:{kind}", "prob", "layer", "position (* = noised)",
                       [str(x) for x in range(n_layers)], cols, clean.metric, noised.metric,
                       extra={"subject": list(subject), "window": window, "noise_scale": scale,
                              "n_samples": n_samples, "target": int(target), "noise": noise.cpu(),
                              **({"target_text": model.to_single_str_token(int(target))} if tokenizer else {})})
