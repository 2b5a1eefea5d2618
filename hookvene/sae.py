"""Sparse autoencoders (SAEs) on hook points, in SAELens's on-disk format.

An SAE reads the activation at one hook point (`cfg.hook_name`, e.g. `blocks.2.hook_resid_pre`) and writes it as a
sparse, non-negative combination of learned directions (features):

    acts  = activation(((x - b_dec) @ W_enc + b_enc))      # (..., d_sae): the feature activations
    recon = acts @ W_dec + b_dec                             # (..., d_in):  the reconstruction

with `activation` one of the three architectures SAELens ships for inference: "standard" (ReLU), "jumprelu"
(ReLU, zero wherever the pre-activation is at or below a per-feature `threshold`) and "topk" (keep the k largest
pre-activations per token, then ReLU). Options that change the maths follow SAELens: `apply_b_dec_to_input`
(subtract `b_dec` first) and `normalize_activations` (`constant_norm_rescale`: scale each token to norm sqrt(d_in)
and back; `layer_norm`: standardise each token and undo it on the output; `expected_average_only_in`: a dataset
constant that SAELens folds into the weights when it downloads, so nothing happens at run time).

Splice one into a model (`hookvene.hooks.HookedModule`):

    sae = SAE.load_from_disk("path/to/sae")                       # cfg.json + sae_weights.safetensors
    logits = model.run_with_saes(tokens, saes=[sae])              # the hook's activation -> the reconstruction
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True,
                                              names_filter=f"{sae.cfg.hook_name}.hook_sae_acts_post")
    with model.saes([sae]):                                        # several calls; nothing stays spliced after
        ...

The SAE's hook points carry SAELens's names under the hook's: `blocks.2.hook_resid_pre.hook_sae_acts_post`.
"""

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hookvene.hooks import HookedModule, HookPoint

ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")
CFG_FILENAME, WEIGHTS_FILENAME = "cfg.json", "sae_weights.safetensors"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_output", "hook_sae_recons",
             "hook_sae_error")
# Which weights each architecture holds, with their shapes in terms of the config.
_WEIGHTS = {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",)}


@dataclass
class SAEConfig:
    """What an SAE computes. `hook_name` lives in SAELens's `metadata` on disk (with the model name, dataset, ...);
    here it is a field, and the rest of the metadata is kept as read, so a round trip writes it back."""

    d_in: int
    d_sae: int
    architecture: str = "standard"
    hook_name: str | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    k: int | None = None  # topk only: active features per token
    rescale_acts_by_decoder_norm: bool = False  # topk only: select on pre-activations x decoder row norms
    reshape_activations: str = "none"  # "hook_z": the hook holds (..., n_heads, d_head), the SAE reads n_heads*d_head
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"SAE config: {name} must be a positive int, got {v!r}")
        _choice("architecture", self.architecture, ARCHITECTURES)
        _choice("normalize_activations", self.normalize_activations, NORMALIZATIONS)
        _choice("reshape_activations", self.reshape_activations, RESHAPES)
        self.dtype = str(self.dtype).removeprefix("torch.")
        _choice("dtype", self.dtype, tuple(DTYPES))
        if self.architecture == "topk":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 0 < self.k <= self.d_sae:
                raise ValueError(f"a topk SAE needs k, an int in 1..d_sae={self.d_sae}, got {self.k!r}")
        elif self.k is not None or self.rescale_acts_by_decoder_norm:
            raise ValueError(f"k and rescale_acts_by_decoder_norm are the topk architecture's settings; this SAE is "
                             f"{self.architecture!r}")

    def to_dict(self) -> dict[str, Any]:
        """SAELens's cfg.json layout (hook_name inside `metadata`)."""
        topk_only = ("k", "rescale_acts_by_decoder_norm")
        skip = ("hook_name", "metadata", *topk_only)
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        if self.architecture == "topk":
            out.update({n: getattr(self, n) for n in topk_only})
        out["metadata"] = {**self.metadata, "hook_name": self.hook_name}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "SAEConfig":
        """From SAELens's cfg.json: the current layout (`metadata`/`meta` holding hook_name) or the older flat
        one (hook_name at the top; TopK as `activation_fn: topk` with `activation_fn_kwargs: {k}`). Options this
        implementation does not compute are refused by name, never ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: an SAE config is a JSON object, got {type(d).__name__}")
        meta = dict(d.get("metadata") or d.get("meta") or {})
        missing = [k for k in ("d_in", "d_sae") if k not in d]
        if missing:
            raise ValueError(f"{source}: not an SAE config, it lacks {missing} (SAELens's cfg.json has d_in, d_sae, "
                             f"architecture and metadata.hook_name)")
        arch = d.get("architecture", "standard")
        act = d.get("activation_fn") or d.get("activation_fn_str") or "relu"
        k = d.get("k")
        if arch == "standard" and act == "topk":  # SAELens before 6.0 wrote TopK SAEs this way
            arch, k = "topk", (d.get("activation_fn_kwargs") or {}).get("k", k)
        elif act not in ("relu", "topk"):
            raise ValueError(f"{source}: activation function {act!r} is not supported; hookvene computes relu "
                             f"(standard, jumprelu) and topk")
        if arch not in ARCHITECTURES:
            raise ValueError(f"{source}: SAE architecture {arch!r} is not supported; choose one of "
                             f"{', '.join(ARCHITECTURES)}")
        if d.get("finetuning_scaling_factor"):
            raise ValueError(f"{source}: finetuning_scaling_factor=true is not supported (an old SAELens option); "
                             f"fold the scaling factor into W_dec and set it to false")
        for key in ("hook_name", "hook_point", "model_name", "hook_head_index", "context_size", "dataset_path",
                    "prepend_bos"):
            if key in d and key not in meta:
                meta[key] = d[key]
        hook_name = meta.pop("hook_name", None) or meta.pop("hook_point", None)
        return cls(d_in=d["d_in"], d_sae=d["d_sae"], architecture=arch, hook_name=hook_name,
                   apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)),
                   normalize_activations=d.get("normalize_activations") or "none", k=k if arch == "topk" else None,
                   rescale_acts_by_decoder_norm=bool(d.get("rescale_acts_by_decoder_norm")) and arch == "topk",
                   reshape_activations=d.get("reshape_activations") or "none",
                   dtype=d.get("dtype") or "float32", device=d.get("device") or "cpu", metadata=meta)


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"SAE config: {name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


class SAE(HookedModule):
    """A sparse autoencoder for one hook point. `SAE(cfg)` starts with SAELens's initialisation (W_enc = W_dec^T,
    Kaiming-uniform; zero biases and thresholds); load trained weights with `load_from_disk` or `from_pretrained`.

    `use_error_term=True` makes `forward` return reconstruction + error, where the error is computed from a
    second, unhooked pass and detached (SAELens's definition): unhooked, the output equals the input, yet edits of
    the feature activations (hooks on `hook_sae_acts_post`) still change the output by exactly their decoded
    difference."""

    def __init__(self, cfg: SAEConfig | dict[str, Any], use_error_term: bool = False) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, SAEConfig) else SAEConfig.from_dict(cfg)
        self.use_error_term = use_error_term
        c, kw = self.cfg, {"dtype": DTYPES[self.cfg.dtype], "device": self.cfg.device}
        w_dec = torch.empty(c.d_sae, c.d_in, **kw)
        nn.init.kaiming_uniform_(w_dec)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(c.d_in, **kw))
        if c.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(c.d_sae, **kw))
        for name in SAE_HOOKS:
            setattr(self, name, HookPoint())
        self._norm: Any = None  # the last `encode`'s normalisation statistics, which `decode` undoes (SAELens)

    @property
    def hook_name(self) -> str | None:
        return self.cfg.hook_name

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        return f"{c.architecture}{k}, hook_name={c.hook_name!r}, d_in={c.d_in}, d_sae={c.d_sae}"

    # -- the maths -------------------------------------------------------------------------------------------------

    def _normalize_in(self, x: Float[Tensor, "*tok d_in"]) -> tuple[Tensor, Any]:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True)
            return x * coeff, coeff
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)  # unbiased, and eps added to std (not to the variance): as SAELens
            return x / (std + 1e-5), (mu, std)
        return x, None

    def _normalize_out(self, y: Float[Tensor, "*tok d_in"], state: Any) -> Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return y / state
        if mode == "layer_norm":
            mu, std = state
            return y * std + mu
        return y

    def activation_fn(self, pre: Float[Tensor, "*tok d_sae"]) -> Float[Tensor, "*tok d_sae"]:
        arch = self.cfg.architecture
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def _flat_in(self, x: Tensor) -> Tensor:
        """The hook's activation as the SAE's input: `hook_z` SAEs read the heads concatenated; a wrong width is
        reported with the hook's name and shape."""
        if self.cfg.reshape_activations == "hook_z":
            if x.dim() < 2:
                raise ValueError(f"a hook_z SAE reads (..., n_heads, d_head); got shape {tuple(x.shape)}")
            x = x.flatten(-2)
        if x.shape[-1] != self.cfg.d_in:
            where = f" at {self.cfg.hook_name!r}" if self.cfg.hook_name else ""
            raise ValueError(f"this SAE has d_in={self.cfg.d_in}, but the activation{where} has width "
                             f"{x.shape[-1]} (shape {tuple(x.shape)}): it was trained for another hook or model "
                             f"(cfg.hook_name={self.cfg.hook_name!r}, model {self.cfg.metadata.get('model_name')!r})")
        return x.to(self.W_enc.dtype)

    def _hook(self, name: str, x: Tensor, edits: list[str] | None) -> Tensor:
        """`x` through one of the SAE's hook points, or past it when `edits` is None (the unhooked pass of the
        error term). Notes in `edits` whether a function replaced the tensor or wrote into it (torch's version
        counter counts in-place writes): only then can the unhooked pass differ, so only then is it run."""
        point = getattr(self, name)
        if edits is None or not point.fwd_fns:
            return x
        version = x._version
        y = point(x)
        if y is not x or y._version != version:
            edits.append(name)
        return y

    def _encode(self, x: Tensor, edits: list[str] | None) -> tuple[Float[Tensor, "... d_sae"], Any]:
        """Feature activations of a raw hook activation, and the normalisation state `_decode` undoes."""
        sae_in, state = self._normalize_in(self._hook("hook_sae_input", self._flat_in(x), edits))
        if self.cfg.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        pre = self._hook("hook_sae_acts_pre", sae_in @ self.W_enc + self.b_enc, edits)
        if self.cfg.rescale_acts_by_decoder_norm:  # the features then read as if the decoder rows had unit norm
            pre = pre * self.W_dec.norm(dim=-1)
        return self._hook("hook_sae_acts_post", self.activation_fn(pre), edits), state

    def _decode(self, acts: Float[Tensor, "*tok d_sae"], state: Any, like: Tensor | None,
                edits: list[str] | None) -> Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        recon = self._hook("hook_sae_recons", acts @ self.W_dec + self.b_dec, edits)
        recon = self._normalize_out(recon, state)
        if self.cfg.reshape_activations == "hook_z" and like is not None:
            recon = recon.view(*recon.shape[:-1], *like.shape[-2:])
        return recon

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations (through the SAE's hook points); a `hook_z` SAE takes (..., n_heads, d_head).
        Remembers the input's normalisation statistics for the next `decode`, as SAELens does (they matter only
        with `normalize_activations`)."""
        acts, self._norm = self._encode(x, [])
        return acts

    def decode(self, feature_acts: Float[Tensor, "*tok d_sae"]) -> Float[Tensor, "*tok d_in"]:
        """The reconstruction `feature_acts @ W_dec + b_dec` (then the last `encode`'s normalisation undone)."""
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm") and self._norm is None:
            raise ValueError(f"normalize_activations={self.cfg.normalize_activations!r}: decode undoes the "
                             f"normalisation of the last encode; call encode first (or forward)")
        return self._decode(feature_acts, self._norm, None, [])

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """The reconstruction of `x`, plus the (detached) error when `use_error_term` is on."""
        edits: list[str] = []
        acts, state = self._encode(x, edits)
        out = self._decode(acts, state, x, edits)
        if self.use_error_term:
            with torch.no_grad():
                if edits:  # a hook changed the pass: the error comes from an unhooked one, as in SAELens
                    clean_acts, clean_state = self._encode(x, None)
                    clean = self._decode(clean_acts, clean_state, x, None)
                else:  # nothing changed it (reading hooks, e.g. a cache, leave it be): it is the unhooked pass
                    clean = out
                error = self.hook_sae_error(x.to(out.dtype) - clean.detach())
            out = out + error
        return self.hook_sae_output(out)

    # -- weights --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Give every decoder row unit norm, moving the norm into the encoder (and the JumpReLU threshold): the
        reconstruction is unchanged and feature activations read in units of their decoder direction. (A topk SAE
        only with rescale_acts_by_decoder_norm: otherwise the k largest features could change.)"""
        if self.cfg.architecture == "topk" and not self.cfg.rescale_acts_by_decoder_norm:
            raise ValueError("folding decoder norms into a topk SAE changes which k features win unless "
                             "rescale_acts_by_decoder_norm is on")
        norms = self.W_dec.norm(dim=-1)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        if self.cfg.architecture == "jumprelu":
            self.threshold.mul_(norms)

    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write SAELens's format: `cfg.json` and `sae_weights.safetensors` in the folder `path`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights, cfg = path / WEIGHTS_FILENAME, path / CFG_FILENAME
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(weights))
        cfg.write_text(json.dumps(self.cfg.to_dict(), indent=2))
        return weights, cfg

    @classmethod
    def load_from_disk(cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
                       use_error_term: bool = False) -> "SAE":
        """Read SAELens's format from the folder `path` (`cfg.json` + `sae_weights.safetensors`). Every weight is
        checked against the config (names and shapes); a corrupt or mismatched file is an error naming it."""
        path = Path(path)
        cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found: an SAE folder in SAELens's format holds {CFG_FILENAME} and "
                                        f"{WEIGHTS_FILENAME} (written by SAE.save_model)")
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); the SAE folder is corrupt") from None
        cfg = SAEConfig.from_dict(raw, str(cfg_path))
        cfg.device = str(device)
        if dtype is not None:
            cfg.dtype = str(dtype).removeprefix("torch.")
            _choice("dtype", cfg.dtype, tuple(DTYPES))
        sae = cls(cfg, use_error_term=use_error_term)
        sae.load_weights(_read_safetensors(weights_path))
        return sae

    def load_weights(self, state: dict[str, Tensor], source: str = "the SAE weights") -> None:
        """Copy `state` (SAELens's tensor names) in, after checking names and shapes against the config. A
        JumpReLU training checkpoint's `log_threshold` is accepted as `threshold = exp(log_threshold)`."""
        state = dict(state)
        if "log_threshold" in state and "threshold" not in state:
            state["threshold"] = state.pop("log_threshold").exp()
        c = self.cfg
        expected = {k: tuple(getattr(c, d) for d in dims) for k, dims in _WEIGHTS.items()}
        if c.architecture == "jumprelu":
            expected["threshold"] = (c.d_sae,)
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"{source} do not fit a {c.architecture} SAE: missing {missing or 'none'}, unexpected "
                             f"{extra or 'none'} (expected {sorted(expected)})")
        wrong = {k: tuple(state[k].shape) for k in expected if tuple(state[k].shape) != expected[k]}
        if wrong:
            raise ValueError(f"{source} do not match the config (d_in={c.d_in}, d_sae={c.d_sae}): "
                             + ", ".join(f"{k} is {s}, expected {expected[k]}" for k, s in wrong.items()))
        with torch.no_grad():
            for k, v in state.items():
                getattr(self, k).copy_(v)

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, device: str | torch.device = "cpu",
                        use_error_term: bool = False) -> "SAE":
        """Download an SAE in SAELens's format from the Hugging Face Hub: `release` is a repo id (`"owner/name"`)
        or one of the SAELens release names in `PRETRAINED`, `sae_id` the folder inside it. Offline (or where
        the download fails) this raises one error saying how to load a local copy with `load_from_disk`.
        `cfg.metadata["model_from_pretrained_kwargs"]` says how SAELens loads the model for it: gpt2-small-res-jb
        was trained with `center_writing_weights=True` (`pv.from_pretrained("gpt2", center_writing_weights=True)`)."""
        repo, folder = PRETRAINED.get(release, (release, None))
        if "/" not in repo:
            raise ValueError(f"unknown SAE release {release!r}: give a Hugging Face repo id ('owner/name') or one of "
                             f"{', '.join(sorted(PRETRAINED))}")
        folder = (folder or "{sae_id}").format(sae_id=sae_id)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(repo, allow_patterns=[f"{folder}/*"], local_files_only=offline)
        except Exception as e:  # any failure (offline, no such repo, network) gets the same advice
            why = (str(e).splitlines() or [""])[0].rstrip(".")
            raise OSError(f"could not fetch SAE {sae_id!r} of {release!r} (repo {repo}, folder {folder}): "
                          f"{type(e).__name__}: {why}. To use it offline, copy that folder ({CFG_FILENAME} + "
                          f"{WEIGHTS_FILENAME}) to this machine and call hookvene.SAE.load_from_disk(path).") from None
        sae = cls.load_from_disk(Path(local) / folder, device=device, use_error_term=use_error_term)
        if release in MODEL_KWARGS:  # e.g. trained on TransformerLens-processed weights: load the model likewise
            sae.cfg.metadata["model_from_pretrained_kwargs"] = MODEL_KWARGS[release]
        return sae

    @contextmanager
    def error_term(self, on: bool = True) -> Iterator["SAE"]:
        """Set `use_error_term` for a `with` block."""
        before, self.use_error_term = self.use_error_term, on
        try:
            yield self
        finally:
            self.use_error_term = before


# SAELens release names whose folders are in SAELens's format -> (Hugging Face repo, folder template). Any
# "owner/name" repo id works as a release too. (SAELens's own registry has hundreds more, many in other formats.)
PRETRAINED: dict[str, tuple[str, str | None]] = {
    "gpt2-small-res-jb": ("jbloom/GPT2-Small-SAEs-Reformatted", "{sae_id}"),
}
# What SAELens's registry says the model needs for a release: recorded in the SAE's metadata on download.
MODEL_KWARGS = {"gpt2-small-res-jb": {"center_writing_weights": True}}


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); the SAE folder is "
                         f"corrupt") from None


def sae_site(sae: SAE, hook: str = "hook_sae_acts_post") -> str:
    """The full hook name of one of a spliced SAE's hook points: `blocks.2.hook_resid_pre.hook_sae_acts_post`.
    Use it as an IntervenableModel component (feature indices as subspaces) or a sweep's hook."""
    if hook not in SAE_HOOKS:
        raise ValueError(f"unknown SAE hook {hook!r}; choose one of {', '.join(SAE_HOOKS)}")
    if not sae.cfg.hook_name:
        raise ValueError("this SAE's cfg.hook_name is not set: set it to the hook it reads, e.g. "
                         "'blocks.0.hook_resid_pre'")
    return f"{sae.cfg.hook_name}.{hook}"
