"""Intervention types: pure functions of (base, source, subspaces), wrapped as modules so trainable ones hold weights.

`base` is what the IntervenableModel gathered at the intervention's location (e.g. `(batch, units, d)` for unit
`pos`), `source` the matching activations from a source run (or a constant), `subspaces` the per-example dimension
lists (or subspace-partition ids) that the call touches. Each `forward` returns the new value for `base`; none edits
its inputs in place. Notation in the docstrings: b = base, s = source, S = the selected dimensions, R = rotation.

Departures from pyvene (each a pyvene defect, see README "Semantics"): per-example subspaces apply to their own
example (not the union to all); NoiseIntervention works for any number of units and draws fresh seeded noise;
Boundless/SigmoidMask temperatures are buffers, not trainable parameters.
"""

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


class SubspaceIndexError(ValueError, IndexError):
    """A subspace index or partition id outside the representation: a ValueError (a bad argument) and an IndexError,
    the type pyvene raises for it, so code written for either catches it."""


class Intervention(nn.Module):
    """Base class. Accepts every RepresentationConfig field as a keyword (user subclasses may ignore them)."""

    trainable = False
    is_source_constant = False  # True: needs no source run (constant source, or none at all)
    uses_module_input = False  # True (Skip): the source is the hooked module's *input* on the source run

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.embed_dim: int | None = kwargs.get("embed_dim")
        self.interchange_dim: int | None = self.embed_dim
        self.subspace_partition = kwargs.get("subspace_partition")
        self.keep_last_dim = bool(kwargs.get("keep_last_dim", False))
        self.use_fast = bool(kwargs.get("use_fast", False))  # pyvene's promise that every subspace row is the same
        source = kwargs.get("source_representation")
        self.register_buffer("source_representation", None if source is None else torch.as_tensor(source))
        if source is not None or kwargs.get("hidden_source_representation"):
            self.is_source_constant = True

    @property
    def flattens_units(self) -> bool:
        """Whether the selected units are flattened into one vector before the call, as pyvene does for every
        intervention except localist ones (Vanilla, Addition, Zero, ...), Collect, Boundless DAS, functions, and
        those built with keep_last_dim=True: a rotation then spans all units (embed_dim = width x units)."""
        plain = (LocalistRepresentationIntervention, CollectIntervention, BoundlessRotatedSpaceIntervention,
                 LambdaIntervention)
        return not (self.keep_last_dim or isinstance(self, plain))

    def set_source_representation(self, source: Tensor) -> None:
        self.source_representation = torch.as_tensor(source)
        self.is_source_constant = True

    def set_interchange_dim(self, interchange_dim: int) -> None:
        self.interchange_dim = interchange_dim

    def settings(self) -> dict[str, Any]:
        """Plain values (JSON) that change this intervention's output and are not in its `state_dict`:
        `IntervenableModel.save` writes them and `load` restores them with `apply_settings`. A subclass with more
        such attributes extends both."""
        return {"interchange_dim": self.interchange_dim}

    def apply_settings(self, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - set(self.settings()))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no setting(s) {unknown}; its settings are "
                             f"{sorted(self.settings())}")
        if "interchange_dim" in settings:
            self.set_interchange_dim(settings["interchange_dim"])

    # -- helpers shared by the concrete types --------------------------------------------------------------

    def resolve_source(self, base: Tensor, source: Tensor | None) -> Tensor:
        """The source to use, broadcast to base's shape (a `(d,)` vector covers every example and unit)."""
        if self.source_representation is not None:
            source = self.source_representation
        if source is None:
            raise ValueError(f"{type(self).__name__} needs a source: pass `sources=`, `source_representations=`, "
                             f"or set `source_representation` in its RepresentationConfig")
        source = source.to(device=base.device, dtype=base.dtype)
        if source.shape[-1] != base.shape[-1]:
            raise ValueError(f"source width {source.shape[-1]} does not match the intervened representation's "
                             f"width {base.shape[-1]} (shape {tuple(base.shape)})")
        if source.dim() == 2 and base.dim() > 2 and source.shape[0] == base.shape[0]:
            source = source.view(source.shape[0], *[1] * (base.dim() - 2), source.shape[-1])  # one vector per example
        try:
            return torch.broadcast_to(source, base.shape)
        except RuntimeError:
            raise ValueError(f"source of shape {tuple(source.shape)} cannot be broadcast to the intervened "
                             f"representation's shape {tuple(base.shape)}") from None

    def subspace_dims(self, ids: Any, width: int) -> list[int]:
        """Dimension indices for one example's subspace list (partition ids when a partition is set)."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        if self.subspace_partition is not None:
            parts = self.subspace_partition
            dims: list[int] = []
            for i in ids:
                if not 0 <= i < len(parts):
                    raise SubspaceIndexError(f"subspace partition id {i} out of range: the partition has "
                                             f"{len(parts)} parts {parts}")
                p = parts[i]
                # [a, b] is the half-open range a..b-1 (pyvene's format); a range or a longer list is explicit
                dims += list(range(p[0], p[1])) if isinstance(p, list | tuple) and len(p) == 2 else list(p)
            ids = dims
        bad = [i for i in ids if not -width <= i < width]
        if bad:
            raise SubspaceIndexError(f"subspace index {bad[0]} out of range for a {width}-dimensional "
                                     f"representation")
        return [i % width for i in ids]  # -1 is the last dim; gather takes no negative index

    def subspace_rows(self, base: Tensor, subspaces: Any) -> tuple[list, int]:
        """The subspace rows and the dimension of `base` they index: one row for everything (dim 0, broadcast),
        one row per example (dim 0), or, when the count matches dimension -2 and not the batch, one row per unit
        along dim -2: pyvene's reading of a direct call `iv(base (b, units, d), source, subspaces)`. With
        `use_fast=True` the first row applies to everything (pyvene's fast path: the caller promises the rows are
        equal). Inside an IntervenableModel, rows are always per example."""
        rows = list(subspaces) if isinstance(subspaces, list | tuple) else [subspaces]
        if self.use_fast or len(rows) == 1:
            return rows[:1], 0
        if len(rows) == base.shape[0]:
            return rows, 0
        if base.dim() >= 3 and len(rows) == base.shape[-2]:
            return rows, base.dim() - 2
        raise ValueError(f"subspaces have {len(rows)} rows for a representation of shape {tuple(base.shape)}: "
                         f"give one row for all, one per example ({base.shape[0]}) or, calling the intervention "
                         f"directly, one per unit ({base.shape[-2]})")

    def subspace_mask(self, base: Tensor, subspaces: Any) -> Tensor | None:
        """Boolean mask over base's last dim, broadcastable to base (rows as `subspace_rows` reads them), or None
        when every dimension is touched."""
        width = base.shape[-1]
        if subspaces is None:
            if self.interchange_dim is None or self.interchange_dim >= width:
                return None
            mask = torch.zeros(1, width, dtype=torch.bool)
            mask[:, : self.interchange_dim] = True
            return mask.view(1, *[1] * (base.dim() - 2), width).to(base.device)
        rows, dim = self.subspace_rows(base, subspaces)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, ids in enumerate(rows):
            mask[r, self.subspace_dims(ids, width)] = True
        shape = [1] * base.dim()
        shape[dim], shape[-1] = len(rows), width
        return mask.view(shape).to(base.device)

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        raise NotImplementedError


class TrainableIntervention(Intervention):
    """Has parameters that `IntervenableModel.get_trainable_parameters()` returns and `save()` writes."""

    trainable = True

    def tie_weight(self, linked_intervention: "Intervention") -> None:
        """Linked interventions share one object, so there is nothing to tie."""


class SharedWeightsTrainableIntervention(TrainableIntervention):
    shared_weights = True


class ConstantSourceIntervention(Intervention):
    """Needs no source run (its source is a constant, or it uses none)."""

    is_source_constant = True


class SourcelessIntervention(ConstantSourceIntervention):
    """An intervention that ignores sources altogether."""


class BasisAgnosticIntervention(Intervention):
    basis_agnostic = True


class LocalistRepresentationIntervention(nn.Module):
    """Marker: acts on each unit's vector separately (no flattening)."""

    is_repr_distributed = False


class DistributedRepresentationIntervention(nn.Module):
    """Marker: the selected units are flattened into one vector before the call (rotations span units)."""

    is_repr_distributed = True


class VanillaIntervention(Intervention, LocalistRepresentationIntervention):
    """Interchange (activation patching): b[..., S] = s[..., S]."""

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        source = self.resolve_source(base, source)
        mask = self.subspace_mask(base, subspaces)
        return source.clone() if mask is None else torch.where(mask, source, base)


class SkipIntervention(BasisAgnosticIntervention, LocalistRepresentationIntervention):
    """b[..., S] = s[..., S] where s is the hooked module's *input* on the source run: skips the module
    (e.g. block_output := block_input at the chosen positions)."""

    uses_module_input = True

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        return VanillaIntervention.forward(self, base, source, subspaces)  # type: ignore[arg-type]


class AdditionIntervention(BasisAgnosticIntervention, LocalistRepresentationIntervention):
    """Steering: b[..., S] += s[..., S]."""

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        source = self.resolve_source(base, source)
        mask = self.subspace_mask(base, subspaces)
        # where, not `source * mask`: an inf or NaN in an unselected dimension of the source must not leak (inf * 0)
        return base + source if mask is None else torch.where(mask, base + source, base)


class SubtractionIntervention(BasisAgnosticIntervention, LocalistRepresentationIntervention):
    """b[..., S] -= s[..., S]."""

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        source = self.resolve_source(base, source)
        mask = self.subspace_mask(base, subspaces)
        return base - source if mask is None else torch.where(mask, base - source, base)  # where: see Addition


class ZeroIntervention(ConstantSourceIntervention, LocalistRepresentationIntervention):
    """Ablation: b[..., S] = 0."""

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        mask = self.subspace_mask(base, subspaces)
        return torch.zeros_like(base) if mask is None else base.masked_fill(mask, 0)


class CollectIntervention(ConstantSourceIntervention):
    """Returns b[..., S] for the caller to keep; the model's activation is left untouched."""

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        if subspaces is None:
            return base
        rows, dim = self.subspace_rows(base, subspaces)
        dims = [self.subspace_dims(r, base.shape[-1]) for r in rows]
        if all(d == dims[0] for d in dims):
            return base[..., dims[0]]
        if len({len(d) for d in dims}) != 1:
            raise ValueError(f"CollectIntervention returns one tensor, so every subspace row must select the same "
                             f"number of dims; got {[len(d) for d in dims]} dims for rows {rows}")
        shape = [1] * base.dim()
        shape[dim], shape[-1] = len(dims), -1
        index = torch.tensor(dims, device=base.device).view(shape)
        return base.gather(-1, index.expand(*base.shape[:-1], index.shape[-1]))


class NoiseIntervention(ConstantSourceIntervention, LocalistRepresentationIntervention):
    """ROME-style corruption: b[..., S] += noise_level * N(0, 1).

    `noise_level` is the absolute standard deviation of the added noise. ROME uses 3x the standard deviation of
    the model's token embeddings; the default 0.1346 is that value for GPT-2 XL (pyvene's default). For another
    model pass `noise_level=3 * model.embed.weight.std()` (the experiments toolkit estimates it for you).
    Noise is drawn fresh on every call from the intervention's own generator seeded with `seed` (default 0), so
    a newly built intervention replays the same draws; `reseed()` restarts them. Works for any number of units.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.noise_level = float(kwargs.get("noise_level", kwargs.get("noise_leve", 0.13462981581687927)))
        self.seed = int(kwargs.get("seed", 0))
        self.reseed()

    def reseed(self, seed: int | None = None) -> None:
        self.seed = self.seed if seed is None else seed
        self.generator = torch.Generator().manual_seed(self.seed)

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"noise_level": self.noise_level, "seed": self.seed}

    def apply_settings(self, settings: dict[str, Any]) -> None:
        super().apply_settings({k: v for k, v in settings.items() if k not in ("noise_level", "seed")})
        self.noise_level = float(settings.get("noise_level", self.noise_level))
        self.reseed(int(settings.get("seed", self.seed)))

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        noise = torch.randn(base.shape, generator=self.generator).to(base) * self.noise_level
        mask = self.subspace_mask(base, subspaces)
        return base + (noise if mask is None else noise * mask)


class RotateLayer(nn.Module):
    """x @ W with W (n, m) kept orthonormal by torch's orthogonal parametrization (see `rotation()`)."""

    def __init__(self, n: int, m: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, m or n))
        nn.init.orthogonal_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x.to(self.weight.dtype) @ self.weight


def rotation(n: int, m: int | None = None) -> nn.Module:
    return nn.utils.parametrizations.orthogonal(RotateLayer(n, m))


def _need_embed_dim(kwargs: dict[str, Any], name: str) -> int:
    if kwargs.get("embed_dim") is None:
        raise ValueError(f"{name} needs embed_dim (known for every built-in component; pass it for raw hook names)")
    return int(kwargs["embed_dim"])


class RotatedSpaceIntervention(TrainableIntervention, DistributedRepresentationIntervention):
    """DAS (Geiger et al. 2023): rotate, interchange S, rotate back: out = (Rb with [S] <- Rs) R^T."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rotate_layer = rotation(_need_embed_dim(kwargs, type(self).__name__))

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        source = self.resolve_source(base, source)
        rb, rs = self.rotate_layer(base), self.rotate_layer(source)
        mask = self.subspace_mask(rb, subspaces)
        mixed = rs if mask is None else torch.where(mask, rs, rb)
        return (mixed @ self.rotate_layer.weight.T).to(base.dtype)


class LowRankRotatedSpaceIntervention(TrainableIntervention, DistributedRepresentationIntervention):
    """DAS in a learned k-dim subspace W (n, k), orthonormal columns: out = b + ((s - b) W[:, S]) W[:, S]^T."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        k = kwargs.get("low_rank_dimension")
        if k is None or isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"LowRankRotatedSpaceIntervention needs low_rank_dimension, a positive int (the number "
                             f"of learned directions), got {k!r}")
        self.rotate_layer = rotation(_need_embed_dim(kwargs, type(self).__name__), int(k))
        self.interchange_dim = int(k)

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        source = self.resolve_source(base, source)
        w = self.rotate_layer.weight
        diff = self.rotate_layer(source) - self.rotate_layer(base)  # ... k
        mask = self.subspace_mask(diff, subspaces)
        if mask is not None:
            diff = diff * mask
        return (base.to(w.dtype) + diff @ w.T).to(base.dtype)


def sigmoid_boundary(x: Tensor, lo: Tensor | float, hi: Tensor | float, temperature: Tensor | float) -> Tensor:
    return torch.sigmoid((x - lo) / temperature) * torch.sigmoid((hi - x) / temperature)


class TemperatureMixin:
    """A `temperature` buffer that training schedules anneal (IntervenableModel.set_temperature)."""

    temperature: Tensor

    def get_temperature(self) -> Tensor:
        return self.temperature

    def set_temperature(self, temp: float) -> None:
        self.temperature.fill_(temp)


class SoftRotatedSpaceIntervention(TemperatureMixin, TrainableIntervention, DistributedRepresentationIntervention):
    """Rotate, mix with a soft mask m over the rotated dims, rotate back: out = ((1 - m) Rb + m Rs) R^T.
    Subclasses define `mask(n)`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rotate_layer = rotation(_need_embed_dim(kwargs, type(self).__name__))
        self.register_buffer("temperature", torch.tensor(50.0))

    def mask(self, n: int) -> Tensor:
        raise NotImplementedError

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        source = self.resolve_source(base, source)
        rb, rs = self.rotate_layer(base), self.rotate_layer(source)
        m = self.mask(rb.shape[-1]).to(rb.dtype)
        return (((1 - m) * rb + m * rs) @ self.rotate_layer.weight.T).to(base.dtype)


class BoundlessRotatedSpaceIntervention(SoftRotatedSpaceIntervention):
    """Boundless DAS (Wu et al. 2023): a learned soft boundary beta picks the rotated dims to interchange:
    m_i = sigmoid(i / T) * sigmoid((beta n - i) / T). Set T with `set_temperature` (annealed during training);
    it is a buffer, not a parameter."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n = self.rotate_layer.weight.shape[0]
        self.intervention_boundaries = nn.Parameter(torch.tensor([0.5]))
        self.register_buffer("intervention_population", torch.arange(n, dtype=torch.float32), persistent=False)

    def get_boundary_parameters(self) -> Tensor:
        return self.intervention_boundaries

    def set_intervention_boundaries(self, value: float) -> None:
        with torch.no_grad():
            self.intervention_boundaries.fill_(value)

    def mask(self, n: int) -> Tensor:
        beta = torch.clamp(self.intervention_boundaries, 1e-3, 1.0)
        return sigmoid_boundary(self.intervention_population[:n], 0.0, beta * n, self.temperature)


class SigmoidMaskRotatedSpaceIntervention(SoftRotatedSpaceIntervention):
    """A learned per-dimension soft mask in the rotated space: m = sigmoid(masks / T)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.masks = nn.Parameter(torch.full((self.rotate_layer.weight.shape[0],), 100.0))

    def get_boundary_parameters(self) -> Tensor:
        return self.masks

    def mask(self, n: int) -> Tensor:
        return torch.sigmoid(self.masks / self.temperature)


class SigmoidMaskIntervention(TemperatureMixin, TrainableIntervention, LocalistRepresentationIntervention):
    """A learned soft mask in the original basis: m = sigmoid(mask / T); out = (1 - m) b + m s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mask = nn.Parameter(torch.zeros(_need_embed_dim(kwargs, type(self).__name__)))
        self.register_buffer("temperature", torch.tensor(0.01))

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        source = self.resolve_source(base, source)
        m = torch.sigmoid(self.mask / self.temperature).to(base.dtype)
        return (1 - m) * base + m * source


class AutoencoderLayer(nn.Module):
    """pyvene's autoencoder (same module names, so its state dicts load): z = relu((x - b_dec) W_enc^T + b_enc),
    x' = z W_dec^T + b_dec, with `encoder[0]` / `decoder[0]` the two Linear layers (b_dec is `decoder[0].bias`)."""

    def __init__(self, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.input_dim, self.latent_dim = input_dim, latent_dim
        self.encoder = nn.Sequential(nn.Linear(input_dim, latent_dim, bias=True), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(latent_dim, input_dim, bias=True))

    def encode(self, x: Tensor) -> Tensor:
        x = x.to(self.encoder[0].weight.dtype)
        return self.encoder(x - self.decoder[0].bias)

    def decode(self, latent: Tensor) -> Tensor:
        return self.decoder(latent)

    def forward(self, base: Tensor) -> dict[str, Tensor]:
        latent = self.encode(base)
        return {"latent": latent, "output": self.decode(latent)}


def _positive(kwargs: dict[str, Any], key: str, name: str) -> int:
    v = kwargs.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} needs {key}, a positive int (the SAE's number of features), got {v!r}")
    return v


class AutoencoderIntervention(TrainableIntervention):
    """pyvene's: encode base and source with an autoencoder (`latent_dim` features), give the base the source's
    latents at the selected features, decode: out = dec(z_b with [F] <- z_s[F]). The output is the reconstruction
    (no error term). Features F: `subspaces` (feature indices per example), else `interchange_dim` as pyvene uses
    it, an index into the latents (`set_interchange_dim(torch.tensor([3, 7]))` picks features 3 and 7). Like
    pyvene's, selected units are flattened first, so embed_dim = width x max_number_of_units."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.autoencoder = AutoencoderLayer(_need_embed_dim(kwargs, type(self).__name__),
                                            _positive(kwargs, "latent_dim", type(self).__name__))

    def set_interchange_dim(self, interchange_dim: int | list[int] | Tensor) -> None:
        self.interchange_dim = interchange_dim

    def settings(self) -> dict[str, Any]:
        dim = self.interchange_dim
        return {"interchange_dim": dim.tolist() if isinstance(dim, Tensor) else dim}

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        source = self.resolve_source(base, source)
        zb, zs = self.autoencoder.encode(base), self.autoencoder.encode(source)
        if subspaces is not None:
            mask = self.subspace_mask(zb, subspaces)
            mixed = zs if mask is None else torch.where(mask, zs, zb)
        else:
            mixed = zb.clone()
            sel = self.interchange_dim
            sel = torch.as_tensor(sel, device=zb.device) if isinstance(sel, list | tuple) else sel
            mixed[..., sel] = zs[..., sel]
        return self.autoencoder.decode(mixed).to(base.dtype)


class JumpReLUAutoencoderIntervention(TrainableIntervention):
    """pyvene's JumpReLU SAE (Gemma Scope's format, `low_rank_dimension` features): z = relu(pre) * (pre > threshold)
    with pre = x W_enc + b_enc; the base takes the source's latents at the selected features (`subspaces`, else
    the first `interchange_dim`); out = z W_dec + b_dec (the reconstruction, no error term). Parameters start at
    zero, to be loaded: `load_sae(sae)` copies a hookvene/SAELens SAE in. Acts on each unit separately."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "keep_last_dim": True})
        d, k = _need_embed_dim(kwargs, type(self).__name__), _positive(kwargs, "low_rank_dimension",
                                                                     type(self).__name__)
        self.W_enc = nn.Parameter(torch.zeros(d, k))
        self.W_dec = nn.Parameter(torch.zeros(k, d))
        self.threshold = nn.Parameter(torch.zeros(k))
        self.b_enc = nn.Parameter(torch.zeros(k))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def encode(self, x: Tensor) -> Tensor:
        pre = x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc
        return (pre > self.threshold) * torch.relu(pre)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    @torch.no_grad()
    def load_sae(self, sae: nn.Module) -> "JumpReLUAutoencoderIntervention":
        """Copy a hookvene `SAE` in (standard or jumprelu, no activation normalisation). `apply_b_dec_to_input` is
        folded into b_enc, (x - b_dec) W_enc + b_enc = x W_enc + (b_enc - b_dec W_enc), so the maths is exact."""
        cfg = sae.cfg
        if cfg.architecture not in ("standard", "jumprelu") or cfg.normalize_activations not in (
                "none", "expected_average_only_in") or cfg.reshape_activations != "none":
            raise ValueError(f"JumpReLUAutoencoderIntervention computes relu/jumprelu SAEs without activation "
                             f"normalisation or reshaping; this SAE is {cfg.architecture!r} with normalize_activations="
                             f"{cfg.normalize_activations!r}, reshape_activations={cfg.reshape_activations!r}")
        if tuple(self.W_enc.shape) != (cfg.d_in, cfg.d_sae):
            raise ValueError(f"this intervention is {tuple(self.W_enc.shape)} (embed_dim, low_rank_dimension) but the "
                             f"SAE has d_in={cfg.d_in}, d_sae={cfg.d_sae}")
        b_enc = sae.b_enc - sae.b_dec @ sae.W_enc if cfg.apply_b_dec_to_input else sae.b_enc
        for name, value in (("W_enc", sae.W_enc), ("W_dec", sae.W_dec), ("b_enc", b_enc), ("b_dec", sae.b_dec)):
            getattr(self, name).copy_(value)
        self.threshold.copy_(sae.threshold if cfg.architecture == "jumprelu" else torch.zeros_like(self.threshold))
        return self

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        source = self.resolve_source(base, source)
        zb, zs = self.encode(base), self.encode(source)
        mask = self.subspace_mask(zb, subspaces)
        mixed = zs if mask is None else torch.where(mask, zs, zb)
        return self.decode(mixed).to(base.dtype)


class LambdaIntervention(Intervention):
    """Wraps a plain function `f(base, source)` or `f(base, source, subspaces)`; it gets no flattening."""

    def __init__(self, fn: Callable[..., Tensor], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fn = fn
        params = inspect.signature(fn).parameters.values()
        self.takes_subspaces = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3

    def forward(self, base: Tensor, source: Tensor | None = None, subspaces: Any = None) -> Tensor:
        return self.fn(base, source, subspaces) if self.takes_subspaces else self.fn(base, source)


def build_intervention(kind: Any, **kwargs: Any) -> Intervention:
    """An intervention from a class, an existing object (used as is), or a plain function."""
    if isinstance(kind, type) and issubclass(kind, nn.Module):
        return kind(**kwargs)
    if isinstance(kind, nn.Module):
        return kind
    if callable(kind):
        out = LambdaIntervention(kind, **kwargs)
        out.is_source_constant = kwargs.get("source_representation") is not None
        return out
    raise ValueError(f"not an intervention: {kind!r} (give an Intervention class, object, or a function)")


# -- the classes a saved config may name -------------------------------------------------------------------------
# A saved config names intervention classes; loading builds only classes registered here (hookvene's own, plus the
# user's) or passed to `IntervenableModel.load`. Nothing a file names is ever imported or called.

INTERVENTION_REGISTRY: dict[str, type[nn.Module]] = {}


def register_intervention(cls: type[nn.Module], name: str | None = None) -> type[nn.Module]:
    """Let saved configs name `cls` (by its class name, or `name`) so that `IntervenableModel.load` can rebuild
    it; usable as a class decorator. Registering another class under a taken name is an error."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_intervention takes an intervention class (an nn.Module subclass), got {cls!r}")
    if issubclass(cls, LambdaIntervention):
        raise TypeError("a LambdaIntervention wraps a function, which a saved file cannot name; it cannot be "
                        "registered")
    key = name or cls.__qualname__
    taken = INTERVENTION_REGISTRY.get(key)
    if taken is not None and taken is not cls:
        raise ValueError(f"{key!r} is already registered for {taken.__module__}.{taken.__qualname__}; register "
                         f"{cls.__qualname__} under another name")
    INTERVENTION_REGISTRY[key] = cls
    return cls


def intervention_class(saved: str, extra: Iterable[type] = ()) -> type[nn.Module]:
    """The class a saved type name refers to: `"module:Qualname"` (hookvene's format), pyvene's
    `"<class 'module.Name'>"`, or a bare name; looked up among `extra` (matched by name or full path), then the
    registry. An unknown name is an error listing the known ones."""
    path = saved.removeprefix("<class '").removesuffix("'>")
    name = path.partition(":")[2] if ":" in path else path.rpartition(".")[2]
    if name == LambdaIntervention.__qualname__:
        raise ValueError("the saved config names a LambdaIntervention, which wraps a function that no file can "
                         "hold; build the IntervenableModel with the function again instead of loading it")
    for cls in extra:
        if not isinstance(cls, type):
            raise TypeError(f"intervention_types passed to load must be classes, got {cls!r}")
        if path in (cls.__qualname__, f"{cls.__module__}:{cls.__qualname__}", f"{cls.__module__}.{cls.__name__}"):
            return cls
    for key in (path, name):  # a name registered with dots in it, else the class name
        if key in INTERVENTION_REGISTRY:
            return INTERVENTION_REGISTRY[key]
    known = sorted(INTERVENTION_REGISTRY) + [c.__qualname__ for c in extra]
    raise ValueError(f"unknown intervention type {saved!r}: loading never imports classes named by a file. Known "
                     f"types: {', '.join(known)}. For your own class, call hookvene.register_intervention(cls) or "
                     f"pass intervention_types=[cls] to IntervenableModel.load")


for _cls in list(globals().values()):  # every class above; keep this loop at the end of the module
    if isinstance(_cls, type) and issubclass(_cls, Intervention) and _cls is not LambdaIntervention:
        register_intervention(_cls)
del _cls
