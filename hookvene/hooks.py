"""HookPoint and the hooked-model API shared by every hookvene model.

A `HookPoint` is an identity placed on the line where a model computes an activation:

    pattern = self.hook_pattern(scores.softmax(dim=-1))

Functions attached to it receive `(tensor, hook)` and may return a replacement tensor. With nothing attached a
HookPoint costs one attribute check: it bypasses `nn.Module.__call__` on purpose, so torch's own module hooks
(`register_forward_hook`) on a HookPoint do not fire; attach functions with `add_hook` instead.

Every model inherits `HookedModule`, which names its HookPoints by module path (`blocks.3.attn.hook_pattern`) and
offers `add_hook`, `reset_hooks`, the `hooks()` context manager, `run_with_hooks` and `run_with_cache`.
"""

import difflib
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
NamesFilter = None | str | Iterable[str] | Callable[[str], bool]

# Several threads may attach and detach functions on one model at once (each IntervenableModel call attaches its
# own): every edit of a hook list happens under this lock, and a HookPoint runs a snapshot of its list.
_LOCK = threading.Lock()
# The time step of the call now running each HookPoint, per thread: two threads running the same GRU must not
# read each other's step.
_STEPS = threading.local()


def _steps() -> dict[int, int | None]:
    if not hasattr(_STEPS, "by_hook"):
        _STEPS.by_hook = {}
    return _STEPS.by_hook


class StopForward(Exception):
    """Raised by a hook function to end a forward pass early, once the run has produced what it was for (e.g. a
    source run whose activations have all been read); the caller catches it."""


class HookPoint(nn.Module):
    """Identity on a named activation; attached functions may read or replace it."""

    # A module spliced into this hook (an SAE, `HookedModule.add_sae`): it replaces the activation after the
    # attached functions ran (they see its input). Kept in the instance dict, not registered as a child, so that it
    # never enters the model's parameters or state dict; its own hook points are named under this one's name.
    spliced: nn.Module | None = None

    def __init__(self) -> None:
        super().__init__()
        self.name = ""  # full module path, filled in by HookedModule.hook_dict
        self.fwd_fns: list[HookFn] = []
        self.bwd_fns: list[HookFn] = []
        self.ctx: dict[str, Any] = {}  # scratch space shared by the functions on this hook
        self.__dict__["spliced"] = None  # an instance attribute: read on every call, found first

    @property
    def step(self) -> int | None:
        """The time step this hook is firing for (hook points inside a loop: the GRU), else None; read it inside
        a hook function. Kept per thread, so concurrent forwards of one model do not see each other's."""
        return _steps().get(id(self))

    @property
    def has_hooks(self) -> bool:
        return bool(self.fwd_fns or self.bwd_fns)

    def __call__(self, x: Tensor, step: int | None = None) -> Tensor:
        if not self.fwd_fns and not self.bwd_fns and self.spliced is None:
            return x
        with self._at_step(step):
            for fn in self.fwd_fns[:]:  # a snapshot: another thread may attach or detach meanwhile
                out = fn(x, self)
                if out is not None:
                    x = out
        if self.bwd_fns and x.requires_grad:
            fns = self.bwd_fns[:]  # the functions attached now, even if removed before backward runs
            x.register_hook(lambda grad: self._run_bwd(fns, grad, step))
        spliced = self.spliced
        if spliced is not None:
            x = spliced(x).to(x.dtype)
        return x

    def _run_bwd(self, fns: list[HookFn], grad: Tensor, step: int | None) -> Tensor:
        with self._at_step(step):
            for fn in fns:
                out = fn(grad, self)
                if out is not None:
                    grad = out
        return grad

    @contextmanager
    def _at_step(self, step: int | None) -> Iterator[None]:
        """`self.step` is `step` while the functions run (restored after: a function may run a nested forward)."""
        steps = _steps()
        prev = steps.get(id(self))
        steps[id(self)] = step
        try:
            yield
        finally:
            if prev is None:
                steps.pop(id(self), None)
            else:
                steps[id(self)] = prev

    def forward(self, x: Tensor) -> Tensor:  # for tools that call .forward directly
        return self(x)

    def layer(self) -> int | None:
        """The block index in this hook's name (`blocks.3.attn.hook_z` -> 3), or None."""
        m = re.search(r"(?:blocks|layers)\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, fwd={len(self.fwd_fns)}, bwd={len(self.bwd_fns)}"


class HookHandle:
    """Removes one function from one HookPoint (exactly that one, even if it was added twice)."""

    def __init__(self, point: HookPoint, fn: HookFn, dir: str) -> None:
        self.point, self.fn, self.dir = point, fn, dir

    def remove(self) -> None:
        fns = self.point.fwd_fns if self.dir == "fwd" else self.point.bwd_fns
        with _LOCK:
            for i, f in reversed(list(enumerate(fns))):  # the latest copy: contexts unwind LIFO
                if f is self.fn:
                    del fns[i]
                    return


def unknown_name_error(name: str, valid: Iterable[str], what: str = "hook point") -> ValueError:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown {what} {name!r}.{hint} This model has {len(valid)} hook points, e.g. "
                      f"{', '.join(valid[:4])} ... (see `model.hook_dict`).")


def _find_hook_points(module: nn.Module, prefix: str, found: dict[str, HookPoint], seen: set[int]) -> None:
    """`named_modules()` restricted to HookPoints, naming each by its first path; about 4x faster, since it runs on
    every `hook_dict` access (HookPoints have no children, so the walk stops at them, or goes on into a spliced
    module's hook points: `blocks.0.hook_resid_pre.hook_sae_acts_post`)."""
    for name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        if isinstance(child, HookPoint):
            child.name = prefix + name
            found[child.name] = child
            if child.spliced is not None:
                _find_hook_points(child.spliced, child.name + ".", found, seen)
        else:
            _find_hook_points(child, f"{prefix}{name}.", found, seen)


class HookedModule(nn.Module):
    """Mixin for models whose activations pass through HookPoints."""

    # What `run_with_cache` returns; models swap in the subclass that knows their architecture.
    cache_class: type["ActivationCache"]

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every HookPoint by full name (its module path), in module order, not always firing order.

        Built afresh on every access (one walk over the modules, not cached), so a replaced submodule
        (`model.blocks[0] = ...`) is seen at once; the methods below walk once per call."""
        found: dict[str, HookPoint] = {}
        _find_hook_points(self, "", found, set())
        return found

    def resolve_hook_names(self, names: NamesFilter, hook_dict: dict[str, HookPoint] | None = None) -> list[str]:
        """Hook names selected by a name, a list of names, a predicate, or None (all); `hook_dict` saves a walk
        when the caller already has it."""
        hd = self.hook_dict if hook_dict is None else hook_dict
        if names is None:
            return list(hd)
        if isinstance(names, str):
            names = [names]
        elif callable(names):
            return [n for n in hd if names(n)]
        elif not isinstance(names, Iterable):
            raise TypeError(f"names must be a hook name, a list of hook names, a predicate or None, got "
                            f"{type(names).__name__} {names!r}")
        out = []
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"hook names are strings such as {next(iter(hd), 'hook_embed')!r}, got "
                                f"{type(n).__name__} {n!r}")
            if n not in hd:
                raise unknown_name_error(n, hd)
            out.append(n)
        return out

    def add_hook(self, name: NamesFilter, fn: HookFn, dir: str = "fwd") -> list[HookHandle]:
        """Attach `fn(tensor, hook) -> tensor | None` to the named hook point(s); returns removable handles."""
        handles: list[HookHandle] = []
        self._add_hooks([(name, fn)], dir, self.hook_dict, handles)
        return handles

    def _add_hooks(self, hooks: Iterable[tuple[NamesFilter, HookFn]], dir: str, hd: dict[str, HookPoint],
                   handles: list[HookHandle]) -> None:
        """Attach each (names, fn); every name of a pair is checked before any is attached, and `handles` grows
        as functions attach, so that a failure part-way leaves only removable ones."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        for name, fn in hooks:
            for n in self.resolve_hook_names(name, hd):
                point = hd[n]
                with _LOCK:
                    (point.fwd_fns if dir == "fwd" else point.bwd_fns).append(fn)
                handles.append(HookHandle(point, fn, dir))

    def add_perma_hook(self, name: NamesFilter, fn: HookFn, dir: str = "fwd") -> list[HookHandle]:
        """`add_hook`, but kept by `reset_hooks()` (TransformerLens's permanent hooks): only
        `reset_hooks(including_permanent=True)` or the returned handles remove it."""
        handles = self.add_hook(name, fn, dir)
        self.__dict__.setdefault("permanent_hooks", []).extend(handles)
        return handles

    def reset_hooks(self, including_permanent: bool = False) -> None:
        """Remove every function from every hook point, except permanent ones (`add_perma_hook`) unless
        `including_permanent`."""
        keep = [] if including_permanent else self.__dict__.get("permanent_hooks", [])
        for point in self.hook_dict.values():
            with _LOCK:
                point.fwd_fns[:] = [f for f in point.fwd_fns if any(h.point is point and h.fn is f for h in keep)]
                point.bwd_fns[:] = [f for f in point.bwd_fns if any(h.point is point and h.fn is f for h in keep)]
        if including_permanent:
            self.__dict__["permanent_hooks"] = []

    def has_hooks(self) -> bool:
        return any(p.has_hooks for p in self.hook_dict.values())

    @property
    def device(self) -> torch.device:
        """Where the parameters are (`transformers`' `model.device`)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = (),
              bwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = ()) -> Iterator["HookedModule"]:
        """Attach hooks for the duration of a `with` block; exactly these are removed on exit, even on error."""
        handles: list[HookHandle] = []
        try:
            hd = self.hook_dict  # one walk over the modules for all of them
            self._add_hooks(fwd_hooks, "fwd", hd, handles)
            self._add_hooks(bwd_hooks, "bwd", hd, handles)
            yield self
        finally:
            for h in reversed(handles):
                h.remove()

    def run_with_hooks(self, *args: Any, fwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = (),
                       bwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = (), **kwargs: Any) -> Any:
        """One forward pass with the given hooks attached. Backward hooks fire on a later `.backward()`
        too: they are captured when the forward runs."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(self, *args: Any, names_filter: NamesFilter = None, device: str | torch.device | None = None,
                       incl_bwd: bool = False, **kwargs: Any) -> tuple[Any, "ActivationCache"]:
        """Run forward and return `(output, cache)`, the cache holding every selected activation (detached).
        Hooks that fire once per time step (the GRU's) are stacked into (batch, time, ...).

        `incl_bwd=True` also runs backward from the output's `loss` (pass `labels=`) or from a scalar output,
        and stores each gradient under `"<hook name>_grad"`.
        """
        cache = self.cache_class(model=self)
        names = self.resolve_hook_names(names_filter)

        steps: dict[str, list[Tensor]] = {}  # hooks inside a time loop (GRU) fire once per step

        def save(key: str) -> HookFn:
            def fn(t: Tensor, hook: HookPoint) -> None:
                t = t.detach().to(device) if device is not None else t.detach()
                if hook.step is None:
                    cache[key] = t
                else:
                    steps.setdefault(key, []).append(t)
            return fn

        fwd = [(n, save(n)) for n in names]
        bwd = [(n, save(n + "_grad")) for n in names] if incl_bwd else []
        with self.hooks(fwd, bwd):
            out = self(*args, **kwargs)
            if incl_bwd:
                target = out if isinstance(out, Tensor) else getattr(out, "loss", None)
                if target is None or target.numel() != 1:
                    raise ValueError("incl_bwd=True needs a scalar to differentiate: pass labels=... so the "
                                     "output has a loss, or use run_with_hooks with bwd_hooks.")
                target.backward()
        for key, ts in steps.items():  # per-step activations stacked along a time dim: (batch, time, ...)
            cache[key] = torch.stack(ts, dim=1)
        return out, cache

    # -- modules spliced into hook points: sparse autoencoders (hookvene.sae), SAELens's HookedSAETransformer API --

    @property
    def acts_to_saes(self) -> dict[str, nn.Module]:
        """The SAEs spliced in now, by hook name."""
        return {n: p.spliced for n, p in self.hook_dict.items() if p.spliced is not None}

    def _sae_points(self, saes: "nn.Module | Iterable[nn.Module]") -> list[tuple[HookPoint, nn.Module]]:
        """Each SAE with the hook point its `cfg.hook_name` names, all checked before any is spliced."""
        saes = [saes] if isinstance(saes, nn.Module) else list(saes)
        hd, out = self.hook_dict, []
        for sae in saes:
            name = getattr(getattr(sae, "cfg", None), "hook_name", None)
            if not isinstance(sae, nn.Module) or not isinstance(name, str):
                raise ValueError(f"cannot splice {type(sae).__name__}: an SAE (hookvene.SAE) whose cfg.hook_name "
                                 f"names a hook point, e.g. 'blocks.0.hook_resid_pre', is needed; got hook_name "
                                 f"{name!r}")
            if name not in hd:
                raise unknown_name_error(name, hd, "hook point (the SAE's cfg.hook_name)")
            if any(p is hd[name] for p, _ in out):
                raise ValueError(f"two SAEs for one hook point {name!r}: splice one SAE per hook")
            out.append((hd[name], sae))
        return out

    def add_sae(self, sae: nn.Module, use_error_term: bool | None = None) -> None:
        """Splice `sae` into the hook point `sae.cfg.hook_name` until `reset_saes()`. The hook's activation becomes
        `sae(activation)`: the reconstruction, or with `use_error_term` reconstruction plus error, so that the
        forward is unchanged while the SAE's hook points (`<hook>.hook_sae_acts_post`, ...) show its features.
        Functions attached to the hook itself see the SAE's input. `use_error_term`, if given, overrides the SAE's
        own setting while it is spliced. An SAE already at that hook is restored when this one is removed."""
        ((point, sae),) = self._sae_points([sae])
        _splice(point, sae, use_error_term)

    def reset_saes(self, act_names: str | Iterable[str] | None = None) -> None:
        """Remove every SAE spliced at these hooks (default: all), restoring each SAE's own `use_error_term`."""
        spliced = {n: p for n, p in self.hook_dict.items() if p.spliced is not None}
        names = list(spliced) if act_names is None else [act_names] if isinstance(act_names, str) else list(act_names)
        missing = [n for n in names if n not in spliced]
        if missing:
            raise ValueError(f"no SAE is spliced at {missing}; spliced now: {sorted(spliced) or 'none'}")
        for n in names:
            while spliced[n].spliced is not None:
                _unsplice(spliced[n])

    @contextmanager
    def saes(self, saes: "nn.Module | Iterable[nn.Module]" = (), reset_saes_end: bool = True,
             use_error_term: bool | None = None) -> Iterator["HookedModule"]:
        """Splice SAEs for the duration of a `with` block; on exit (even on error) exactly these are removed and
        whatever was spliced before is back (`reset_saes_end=False` leaves them in)."""
        done: list[HookPoint] = []
        try:
            for point, sae in self._sae_points(saes):
                _splice(point, sae, use_error_term)
                done.append(point)
            yield self
        finally:
            if reset_saes_end:
                for point in reversed(done):
                    _unsplice(point)

    def run_with_saes(self, *args: Any, saes: "nn.Module | Iterable[nn.Module]" = (), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, **kwargs: Any) -> Any:
        """One forward pass with `saes` spliced in."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self(*args, **kwargs)

    def run_with_cache_with_saes(self, *args: Any, saes: "nn.Module | Iterable[nn.Module]" = (),
                                 reset_saes_end: bool = True, use_error_term: bool | None = None,
                                 **kwargs: Any) -> tuple[Any, "ActivationCache"]:
        """`run_with_cache` with `saes` spliced in: the SAEs' hook points can be cached (`names_filter`) like any."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_cache(*args, **kwargs)

    def run_with_hooks_with_saes(self, *args: Any, saes: "nn.Module | Iterable[nn.Module]" = (),
                                 fwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = (),
                                 bwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, **kwargs: Any) -> Any:
        """`run_with_hooks` with `saes` spliced in: hooks may name the SAEs' hook points."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_hooks(*args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, **kwargs)


def _splice(point: HookPoint, module: nn.Module, use_error_term: bool | None) -> None:
    """Splice `module` into `point`, remembering what to restore: the module spliced before, and the new module's
    own `use_error_term` when this splice overrides it."""
    with _LOCK:
        own = getattr(module, "use_error_term", None) if use_error_term is not None else None
        point.__dict__.setdefault("splice_stack", []).append((point.spliced, module, own))
        if use_error_term is not None:
            module.use_error_term = use_error_term
        point.__dict__["spliced"] = module


def _unsplice(point: HookPoint) -> None:
    """Undo the latest `_splice` on `point`."""
    with _LOCK:
        prev, module, own = point.__dict__["splice_stack"].pop()
        if own is not None:
            module.use_error_term = own
        if prev is None:
            point.__dict__.pop("spliced", None)
        else:
            point.__dict__["spliced"] = prev


# TransformerLens's activation shorthands (`utils.get_act_name`): short name -> the sublayer it lives in.
_ACT_SUBLAYER = {
    "resid_pre": "", "resid_mid": "", "resid_post": "", "attn_out": "", "mlp_out": "", "attn_in": "",
    "q_input": "", "k_input": "", "v_input": "", "mlp_in": "",
    "q": "attn", "k": "attn", "v": "attn", "z": "attn", "result": "attn", "attn_scores": "attn", "pattern": "attn",
    "rot_q": "attn", "rot_k": "attn",
    "pre": "mlp", "post": "mlp", "mid": "mlp",
    "scale": None, "normalized": None,  # a LayerNorm's: `layer_type` names it (ln1, ln2), else ln_final
}
_ACT_GLOBAL = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "tokens": "hook_tokens", "logits": "hook_logits"}
_ACT_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
                "mlp_pre": "pre", "mlp_post": "post", "mlp_mid": "mid"}
_LAYER_TYPES = {"a": "attn", "attn": "attn", "attention": "attn", "m": "mlp", "mlp": "mlp", "b": "", "block": "",
                "blocks": "", "": "", "ln1": "ln1", "ln2": "ln2", "ln_final": "ln_final"}


def act_name(name: str, layer: int | None = None, layer_type: str | None = None, n_layers: int | None = None) -> str:
    """A full hook name from TransformerLens's shorthand (`utils.get_act_name`), e.g.

        act_name("pattern", 3) -> "blocks.3.attn.hook_pattern"     act_name("k", 6, "a") -> "blocks.6.attn.hook_k"
        act_name("pre5") -> "blocks.5.mlp.hook_pre"                act_name("scale4ln1") -> "blocks.4.ln1.hook_scale"
        act_name("scale") -> "ln_final.hook_scale"                 act_name("resid_post", -1, n_layers=4) -> ... 3 ...

    Full names (containing a dot or starting with `hook_`) pass through. A negative layer counts from the end and
    needs `n_layers` (a cache or model supplies it). Unknown shorthands raise, listing the known ones."""
    if layer is None and layer_type is None and ("." in name or name.startswith("hook_")):
        return name
    m = re.fullmatch(r"([a-z_]+?)(\d+)([a-z_]*\d?)", name) if layer is None else None
    if m:  # "pre5", "scale4ln1"
        name, layer, layer_type = m.group(1), int(m.group(2)), m.group(3) or layer_type
    name = _ACT_ALIASES.get(name, name)
    if name in _ACT_GLOBAL and layer is None:
        return _ACT_GLOBAL[name]
    if name not in _ACT_SUBLAYER:
        raise ValueError(f"unknown activation name {name!r}; use a full hook name or one of "
                         f"{', '.join(sorted([*_ACT_SUBLAYER, *_ACT_GLOBAL, *_ACT_ALIASES]))}")
    if layer_type is not None and layer_type not in _LAYER_TYPES:
        raise ValueError(f"unknown layer_type {layer_type!r}; choose one of {', '.join(sorted(_LAYER_TYPES))}")
    sub = _ACT_SUBLAYER[name]
    if sub is None:  # a LayerNorm's scale or output
        sub = _LAYER_TYPES[layer_type] if layer_type else ("ln_final" if layer is None else "")
        if layer is not None and sub not in ("ln1", "ln2"):
            raise ValueError(f"{name!r} of block {layer} needs layer_type 'ln1' or 'ln2'")
        if layer is None:
            return f"ln_final.hook_{name}"
    if layer is None:
        raise ValueError(f"{name!r} is per block: pass a layer, e.g. act_name({name!r}, 0)")
    if layer < 0:
        if n_layers is None:
            raise ValueError(f"layer {layer} counts from the end: pass n_layers (or index a cache of the model)")
        if layer < -n_layers:
            raise ValueError(f"layer {layer} is out of range for a model of {n_layers} layers")
        layer += n_layers
    return f"blocks.{layer}." + (f"{sub}." if sub else "") + f"hook_{name}"


class ActivationCache(dict):
    """A dict of activations by hook name (TransformerLens's `ActivationCache`), from `run_with_cache`.

    Also indexable by shorthand: `cache["pattern", 3]`, `cache["resid_post", -1]` (negative layers count from the
    end), `cache["scale", 2, "ln1"]`, `cache["pre5"]`. It keeps a reference to the model that filled it
    (`cache.model`), which the model-aware analysis methods of `hookvene.cache.ActivationCache` read."""

    def __init__(self, *args: Any, model: nn.Module | None = None, has_batch_dim: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model, self.has_batch_dim = model, has_batch_dim

    @property
    def n_layers(self) -> int | None:
        return getattr(getattr(self.model, "cfg", None), "n_layers", None)

    def __getitem__(self, key: str | tuple) -> Tensor:
        if isinstance(key, tuple):
            key = act_name(*key, n_layers=self.n_layers)
        elif key not in self and not key.startswith("hook_") and "." not in key:
            try:
                key = act_name(key)  # "pre5", "embed"
            except ValueError:
                pass  # not a shorthand either: reported below as a missing activation
        if key not in self:
            raise unknown_name_error(key, self.keys(), "cached activation")
        return super().__getitem__(key)

    def like(self, data: dict[str, Tensor], has_batch_dim: bool | None = None) -> "ActivationCache":
        """A cache of the same class and model holding `data`."""
        return type(self)(data, model=self.model,
                          has_batch_dim=self.has_batch_dim if has_batch_dim is None else has_batch_dim)

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch dim of a batch-1 cache, in place (TransformerLens's semantics); returns the cache."""
        if not self.has_batch_dim:
            return self
        sizes = {k: v.shape[0] for k, v in self.items()}
        if any(n != 1 for n in sizes.values()):
            raise ValueError(f"remove_batch_dim needs a batch of 1; this cache's batch sizes are {set(sizes.values())}")
        for k in list(self):
            dict.__setitem__(self, k, dict.__getitem__(self, k)[0])
        self.has_batch_dim = False
        return self

    def to(self, device: str | torch.device) -> "ActivationCache":
        """Move every activation to `device`, in place; returns the cache."""
        for k in list(self):
            dict.__setitem__(self, k, dict.__getitem__(self, k).to(device))
        return self

    def apply_slice_to_batch_dim(self, batch_slice: int | slice | list[int] | Tensor) -> "ActivationCache":
        """A new cache holding only some examples (an int index drops the batch dim, as in TransformerLens)."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dim (remove_batch_dim was called)")
        if isinstance(batch_slice, list):
            batch_slice = torch.tensor(batch_slice)
        return self.like({k: v[batch_slice] for k, v in self.items()}, has_batch_dim=not isinstance(batch_slice, int))


HookedModule.cache_class = ActivationCache
