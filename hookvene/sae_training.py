"""Training sparse autoencoders on activations streamed from a model (or read from tensors / activation shards).

    batches = activation_batches(model, prompts, "blocks.2.hook_resid_pre", batch_size=1024)   # (1024, d_model)
    sae = SAE(SAEConfig(d_in=128, d_sae=1024, hook_name="blocks.2.hook_resid_pre"))
    log = train_sae(sae, batches, steps=1500, l1_coefficient=5.0)                             # ReLU + L1
    topk = SAE(SAEConfig(d_in=128, d_sae=1024, architecture="topk", k=8, hook_name=...))
    train_sae(topk, batches, steps=1500)                                                        # TopK (+ AuxK)

`train_sae` takes any iterator of (tokens, d_in) batches: `activation_batches` (forwards stopped right after the
hook), a list of tensors, or `hookvene.collect.ActivationShards.batches(hook, batch_size)` read from disk.

The losses are the usual ones (as SAELens defines them): squared error summed over d_in and averaged over tokens,
plus for ReLU SAEs an L1 penalty on feature activations weighted by their decoder norms (so shrinking the decoder
cannot game it), plus for TopK SAEs the auxiliary loss of Gao et al. (2024): the `aux_k` largest pre-activations
of dead features (silent for `dead_feature_window` tokens) must reconstruct the remaining error.
"""

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hookvene.hooks import StopForward, unknown_name_error
from hookvene.sae import SAE


def activation_batches(model: nn.Module, prompts: Iterable[Any], hook_name: str, batch_size: int = 1024,
                       prompts_per_forward: int = 64, buffer_batches: int = 16, epochs: int | None = None,
                       seed: int = 0) -> Iterator[Float[Tensor, "batch d"]]:
    """Shuffled (batch_size, d) batches of the activation at `hook_name`, one row per real token, streamed from
    `model`. `prompts` are token tensors (batch, pos), dicts with `input_ids` (and `attention_mask`: padding rows
    are dropped) or strings (tokenised by `model.to_tokens`). Each forward stops right after the hook fires; rows
    are shuffled within a buffer of `buffer_batches` batches. Runs through `prompts` `epochs` times (None:
    forever)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("activation_batches needs at least one prompt")
    if hook_name not in model.hook_dict:
        raise unknown_name_error(hook_name, model.hook_dict)
    g = torch.Generator().manual_seed(seed)
    buffer: list[Tensor] = []
    rows = 0
    epoch = 0
    while epochs is None or epoch < epochs:
        for chunk in _chunks(prompts, prompts_per_forward):
            buffer.append(_read(model, chunk, hook_name))
            rows += buffer[-1].shape[0]
            if rows >= batch_size * buffer_batches:
                yield from _drain(buffer, batch_size, g, keep_rest=True)
                rows = sum(b.shape[0] for b in buffer)
        epoch += 1
    yield from _drain(buffer, batch_size, g, keep_rest=False)


def _chunks(prompts: list[Any], n: int) -> Iterator[Any]:
    if all(isinstance(p, Tensor | dict) for p in prompts):
        yield from prompts  # already batched tensors / dicts: one forward each
        return
    for i in range(0, len(prompts), n):
        yield prompts[i:i + n]


@torch.no_grad()
def _read(model: nn.Module, batch: Any, hook_name: str) -> Tensor:
    """The hook's activation for one forward, as (real tokens, d): the forward stops once the hook has fired."""
    if isinstance(batch, list):  # strings
        batch = {"input_ids": model.to_tokens(batch)}
    inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
    got: dict[str, Tensor] = {}

    def grab(x: Tensor, hook: Any) -> None:
        got["x"] = x.detach()
        raise StopForward

    with model.hooks([(hook_name, grab)]):
        try:
            model(**inputs)
        except StopForward:
            pass
    x = got["x"]
    mask = inputs.get("attention_mask")
    if mask is not None and x.dim() >= 3 and x.shape[:2] == mask.shape:
        return x[mask.bool()].flatten(1)
    return x.flatten(0, 1).flatten(1) if x.dim() >= 3 else x


def _drain(buffer: list[Tensor], batch_size: int, g: torch.Generator, keep_rest: bool) -> Iterator[Tensor]:
    data = torch.cat(buffer)
    data = data[torch.randperm(data.shape[0], generator=g)]
    n_full = data.shape[0] // batch_size
    buffer.clear()
    for i in range(n_full):
        yield data[i * batch_size:(i + 1) * batch_size]
    rest = data[n_full * batch_size:]
    if rest.shape[0]:
        if keep_rest:
            buffer.append(rest)
        else:
            yield rest


@dataclass
class TrainLog:
    """What `train_sae` measured, every `log_every` steps: step, mse (summed over d_in, mean over tokens),
    explained variance, mean L0 (active features per token) and the fraction of dead features."""

    steps: list[int] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    explained_variance: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)
    tokens: int = 0

    def last(self) -> dict[str, float]:
        return {k: getattr(self, k)[-1] for k in ("mse", "explained_variance", "l0", "dead_fraction")}


def train_sae(sae: SAE, batches: Iterable[Tensor], steps: int, lr: float = 1e-3, l1_coefficient: float = 1.0,
              l1_warm_up_steps: int | None = None, aux_k_coefficient: float = 1 / 32, aux_k: int | None = None,
              dead_feature_window: int = 20_000, decoder_init_norm: float = 0.1, init_b_dec: str = "mean",
              log_every: int = 50, callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainLog:
    """Train `sae` (architecture "standard": ReLU + L1, or "topk") in place on `steps` batches of (tokens, d_in)
    activations; returns the `TrainLog`. Adam with a linear learning-rate decay over the last 20% of steps; the L1
    coefficient ramps up over `l1_warm_up_steps` (default: the first 5%). `init_b_dec="mean"` starts b_dec at the
    first batch's mean (SAELens's "mean" initialisation), "zeros" leaves it. Decoder rows start at norm
    `decoder_init_norm` with W_enc = W_dec^T; a TopK SAE keeps its decoder rows at unit norm."""
    cfg = sae.cfg
    if cfg.architecture not in ("standard", "topk"):
        raise ValueError(f"train_sae trains 'standard' (ReLU + L1) and 'topk' SAEs; this one is {cfg.architecture!r} "
                         f"(train JumpReLU SAEs with SAELens and load them with SAE.load_from_disk)")
    if cfg.normalize_activations != "none":
        raise ValueError("train_sae trains SAEs without activation normalisation (normalize_activations='none')")
    if init_b_dec not in ("mean", "zeros"):
        raise ValueError(f"init_b_dec must be 'mean' or 'zeros', got {init_b_dec!r}")
    topk = cfg.architecture == "topk"
    aux_k = aux_k or max(1, cfg.d_in // 2)
    warm = max(1, steps // 20) if l1_warm_up_steps is None else max(1, l1_warm_up_steps)
    it = iter(batches)
    first = _next_batch(it, cfg.d_in, 0)
    with torch.no_grad():
        w = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(w if topk else w * decoder_init_norm)
        sae.W_enc.copy_(sae.W_dec.T)
        if init_b_dec == "mean":
            sae.b_dec.copy_(first.to(sae.b_dec).mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    decay_from = int(steps * 0.8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / max(1, steps - decay_from)))
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=sae.W_enc.device)
    log = TrainLog()
    sae.train()
    batch = first
    for step in range(steps):
        if step:
            batch = _next_batch(it, cfg.d_in, step)
        x = batch.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
        pre = (x - sae.b_dec if cfg.apply_b_dec_to_input else x) @ sae.W_enc + sae.b_enc
        acts = sae.activation_fn(pre)
        recon = acts @ sae.W_dec + sae.b_dec
        mse = (recon - x).pow(2).sum(-1).mean()
        fired = (acts > 0).any(0)
        since_fired = torch.where(fired, 0, since_fired + x.shape[0])
        if topk:
            loss = mse + aux_k_coefficient * _aux_k_loss(sae, x, recon, pre, since_fired >= dead_feature_window,
                                                         aux_k)
        else:
            l1 = (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
            loss = mse + l1_coefficient * min(1.0, (step + 1) / warm) * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if topk:  # the unit-norm constraint: remove the gradient along each decoder row before stepping
            with torch.no_grad():
                w, g = sae.W_dec, sae.W_dec.grad
                g -= (g * w).sum(-1, keepdim=True) * w
        opt.step()
        sched.step()
        if topk:
            with torch.no_grad():
                sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        log.tokens += x.shape[0]
        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():
                resid_var = (x - recon).pow(2).sum(-1)
                total_var = (x - x.mean(0)).pow(2).sum(-1)
                stats = {"mse": float(mse), "explained_variance": float(1 - resid_var.mean() / total_var.mean()),
                         "l0": float((acts > 0).float().sum(-1).mean()),
                         "dead_fraction": float((since_fired >= dead_feature_window).float().mean())}
            log.steps.append(step)
            for k, v in stats.items():
                getattr(log, k).append(v)
            if callback is not None:
                callback(step, stats)
    sae.eval()
    return log


def _next_batch(it: Iterator[Tensor], d_in: int, step: int) -> Tensor:
    try:
        x = next(it)
    except StopIteration:
        raise ValueError(f"the activation batches ran out after {step} steps; pass more data (or epochs=None "
                         f"to activation_batches) or fewer steps") from None
    if x.dim() != 2 or x.shape[-1] != d_in:
        raise ValueError(f"activation batches must be (tokens, d_in={d_in}); got shape {tuple(x.shape)}")
    return x


def _aux_k_loss(sae: SAE, x: Tensor, recon: Tensor, pre: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """Gao et al.'s AuxK: the top `aux_k` dead features' pre-activations, decoded (no bias), should reconstruct
    the residual x - recon; scaled down while few features are dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    k = min(aux_k, n_dead)
    residual = (x - recon).detach()
    top = torch.where(dead, pre, -math.inf).topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return (acts @ sae.W_dec - residual).pow(2).sum(-1).mean() * min(1.0, n_dead / aux_k)
