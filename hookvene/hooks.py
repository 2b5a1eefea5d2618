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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
NamesFilter = None | str | Iterable[str] | Callable[[str], bool]


class StopForward(Exception):
    """Raised by a hook function to end a forward pass early, once the run has produced what it was for (e.g. a
    source run whose activations have all been read); the caller catches it."""


class HookPoint(nn.Module):
    """Identity on a named activation; attached functions may read or replace it."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""  # full module path, filled in by HookedModule.hook_dict
        self.fwd_fns: list[HookFn] = []
        self.bwd_fns: list[HookFn] = []
        self.step: int | None = None  # time step, for hook points inside a loop (the GRU)
        self.ctx: dict[str, Any] = {}  # scratch space shared by the functions on this hook

    @property
    def has_hooks(self) -> bool:
        return bool(self.fwd_fns or self.bwd_fns)

    def __call__(self, x: Tensor, step: int | None = None) -> Tensor:
        if not self.fwd_fns and not self.bwd_fns:
            return x
        self.step = step
        for fn in self.fwd_fns:
            out = fn(x, self)
            if out is not None:
                x = out
        if self.bwd_fns and x.requires_grad:
            fns = list(self.bwd_fns)  # the functions attached now, even if removed before backward runs
            x.register_hook(lambda grad: self._run_bwd(fns, grad, step))
        return x

    def _run_bwd(self, fns: list[HookFn], grad: Tensor, step: int | None) -> Tensor:
        self.step = step
        for fn in fns:
            out = fn(grad, self)
            if out is not None:
                grad = out
        return grad

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


class HookedModule(nn.Module):
    """Mixin for models whose activations pass through HookPoints."""

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every HookPoint by full name (its module path), in module order, not always firing order."""
        cached = self.__dict__.get("_hook_dict")
        if cached is None:
            cached = {n: m for n, m in self.named_modules() if isinstance(m, HookPoint)}
            for n, m in cached.items():
                m.name = n
            self.__dict__["_hook_dict"] = cached
        return cached

    def resolve_hook_names(self, names: NamesFilter) -> list[str]:
        """Hook names selected by a name, a list of names, a predicate, or None (all)."""
        hd = self.hook_dict
        if names is None:
            return list(hd)
        if isinstance(names, str):
            names = [names]
        elif callable(names):
            return [n for n in hd if names(n)]
        out = []
        for n in names:
            if n not in hd:
                raise unknown_name_error(n, hd)
            out.append(n)
        return out

    def add_hook(self, name: NamesFilter, fn: HookFn, dir: str = "fwd") -> list[HookHandle]:
        """Attach `fn(tensor, hook) -> tensor | None` to the named hook point(s); returns removable handles."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        handles = []
        for n in self.resolve_hook_names(name):
            point = self.hook_dict[n]
            (point.fwd_fns if dir == "fwd" else point.bwd_fns).append(fn)
            handles.append(HookHandle(point, fn, dir))
        return handles

    def reset_hooks(self) -> None:
        """Remove every function from every hook point."""
        for point in self.hook_dict.values():
            point.fwd_fns.clear()
            point.bwd_fns.clear()

    def has_hooks(self) -> bool:
        return any(p.has_hooks for p in self.hook_dict.values())

    @property
    def device(self) -> torch.device:
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
            for name, fn in fwd_hooks:
                handles += self.add_hook(name, fn, "fwd")
            for name, fn in bwd_hooks:
                handles += self.add_hook(name, fn, "bwd")
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
        cache = ActivationCache()
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


_SHORT = {  # TransformerLens-style shorthand for ActivationCache[("pattern", 3)]
    "resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out", "q": "blocks.{}.attn.hook_q", "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v", "z": "blocks.{}.attn.hook_z", "attn_scores": "blocks.{}.attn.hook_attn_scores",
    "pattern": "blocks.{}.attn.hook_pattern", "pre": "blocks.{}.mlp.hook_pre", "post": "blocks.{}.mlp.hook_post",
}


def act_name(name: str, layer: int | None = None) -> str:
    """`act_name("pattern", 3)` -> `"blocks.3.attn.hook_pattern"`; full names pass through."""
    if layer is None or name not in _SHORT:
        return name
    return _SHORT[name].format(layer)


class ActivationCache(dict):
    """A dict of activations by hook name; also indexable as `cache["pattern", 3]`."""

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        if isinstance(key, tuple):
            key = act_name(*key)
        if key not in self:
            raise unknown_name_error(key, self.keys(), "cached activation")
        return super().__getitem__(key)
