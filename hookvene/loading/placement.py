"""A loaded model spread over devices with `accelerate`'s device maps (`from_pretrained(..., device_map=)`).

hookvene places nothing itself: `accelerate.infer_auto_device_map` decides where each block goes ("auto": fill the
GPUs in order, then CPU), `accelerate.dispatch_model` moves the weights and wraps each placed module so its inputs
move to its device. Hook functions then see each activation on the device of the block that made it; interventions
move a source activation to the device of the activation they write (`hookvene.plan`), and
`run_with_cache(device="cpu")` gathers a cache onto one device.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

NO_ACCELERATE = ("device_map= needs the `accelerate` package: pip install 'hookvene[distributed]' (or pip install "
                 "accelerate); for a single device pass device= instead")


def _accelerate() -> Any:
    try:
        import accelerate
    except ImportError:
        raise ImportError(NO_ACCELERATE) from None
    return accelerate


def block_classes(model: nn.Module) -> list[str]:
    """Classes that must stay whole on one device: the transformer blocks (a residual connection spans each)."""
    names = {type(b).__name__ for name in ("blocks",) for b in getattr(model, name, [])}
    for stack in ("encoder", "decoder"):  # T5
        names |= {type(b).__name__ for b in getattr(getattr(model, stack, None), "blocks", [])}
    return sorted(names)


def resolve_device_map(model: nn.Module, device_map: str | dict[str, Any],
                       max_memory: dict[Any, int | str] | None = None) -> dict[str, Any]:
    """A module name -> device dict: `device_map` itself when it is one (checked to cover every weight), else
    accelerate's plan for "auto" / "balanced" / "balanced_low_0" / "sequential" within `max_memory`."""
    acc = _accelerate()
    if isinstance(device_map, dict):
        acc.utils.check_device_map(model, device_map)  # raises naming the modules that have no device
        for group in acc.utils.find_tied_parameters(model):
            devices = {name: _device_of(device_map, name) for name in group}
            if len(set(map(str, devices.values()))) > 1:
                raise ValueError(f"tied weights are one tensor, so they need one device; device_map puts them on "
                                 f"{devices}")
        return dict(device_map)
    choices = ("auto", "balanced", "balanced_low_0", "sequential")
    if device_map not in choices:
        raise ValueError(f"device_map must be a dict {{module name: device}} or one of {choices}, got {device_map!r}")
    no_split = block_classes(model)
    tied = acc.utils.find_tied_parameters(model)  # e.g. [["embed.weight", "unembed.weight"]]
    with _untied(model, tied):  # accelerate mis-groups ties whose module names contain each other ("embed" in
        # "unembed"): plan as if untied (each copy counted), then put every tied group on its first member's device
        if device_map != "sequential":
            max_memory = acc.utils.get_balanced_memory(model, max_memory=max_memory,
                                                       no_split_module_classes=no_split,
                                                       low_zero=device_map == "balanced_low_0")
        planned = dict(acc.infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split))
    for group in tied:
        first = _device_of(planned, group[0])
        for name in group[1:]:
            key = _module_key(planned, name)
            if key == name.rpartition(".")[0]:  # the module holding it has its own entry: move that entry
                planned[key] = first
    return planned


def _module_key(device_map: dict[str, Any], param: str) -> str:
    """The device map entry that covers `param`: the longest module name that is a prefix of it."""
    keys = [k for k in device_map if k == "" or param == k or param.startswith(k + ".")]
    return max(keys, key=len)


def _device_of(device_map: dict[str, Any], param: str) -> Any:
    return device_map[_module_key(device_map, param)]


@contextmanager
def _untied(model: nn.Module, tied: list[list[str]]) -> Iterator[None]:
    """Within the block, every tied parameter but the first of its group is a separate meta-device stand-in."""
    saved = []
    for group in tied:
        for name in group[1:]:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, nn.Parameter(torch.empty_like(getattr(module, attr), device="meta")))
    try:
        yield
    finally:
        for module, attr, param in saved:
            setattr(module, attr, param)


def dispatch(model: nn.Module, device_map: str | dict[str, Any],
             max_memory: dict[Any, int | str] | None = None) -> nn.Module:
    """Spread a loaded model over devices; `model.hf_device_map` records the map (as in `transformers`)."""
    acc = _accelerate()
    resolved = resolve_device_map(model, device_map, max_memory)
    if "disk" in resolved.values():
        raise ValueError("device_map puts modules on 'disk': hookvene does not offload to disk; give those modules "
                         "a GPU or 'cpu' (or raise max_memory)")
    return acc.dispatch_model(model, resolved)
