"""Shared machinery for turning a HuggingFace checkpoint into a hookvene model.

Each architecture's loader is a config translation plus a table of `Rule(hf_key, our_key)` rows; `{i}` stands
for a layer index. `convert_state_dict` applies a table and refuses to guess: every checkpoint tensor must be
used or explicitly dropped, every model tensor must be provided, and shapes must match.
"""

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.models.common import ROPE_TYPES


@contextmanager
def empty_model() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers: the weights are about to be
    replaced, and torch's init functions on meta tensors are slow (they import torch._dynamo)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "orthogonal_", "zeros_", "ones_", "xavier_uniform_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, _orig=saved[n], **k: t if t.is_meta else _orig(t, *a, **k))
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Rule:
    src: str  # HF key, `{i}` = layer index
    dst: str | None  # hookvene key; None drops the tensor
    transform: Callable[[Tensor], Tensor] = same

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.src).replace(r"\{i\}", r"(\d+)") + "$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors, or a bad file."""


def convert_state_dict(rules: list[Rule], src: dict[str, Tensor], model: nn.Module, what: str = "checkpoint",
                       tied: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Rename `src` into `model`'s keys by `rules`; raise one error listing every mismatch.

    `tied` maps a model key to another model key whose tensor it shares (a tied unembedding)."""
    compiled = [(r, r.pattern()) for r in rules]
    out: dict[str, Tensor] = {}
    unexpected = []
    for key, tensor in src.items():
        for rule, pat in compiled:
            m = pat.match(key)
            if m:
                if rule.dst is not None:
                    out[rule.dst.replace("{i}", m.group(1)) if m.groups() else rule.dst] = rule.transform(tensor)
                break
        else:
            unexpected.append(key)
    for dst, src_key in (tied or {}).items():
        if src_key in out:
            out[dst] = out[src_key]
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in out]
    extra = [k for k in out if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in out if k in expected and out[k].shape != expected[k].shape]
    problems = []
    if unexpected:
        problems.append(f"unexpected tensors (no rule uses them): {unexpected[:12]}")
    if missing:
        problems.append(f"missing tensors: {missing[:12]}")
    if extra:
        problems.append(f"tensors for layers the config does not have: {extra[:12]}")
    if shapes:
        problems.append(f"mis-shaped tensors: {shapes[:12]}")
    if problems:
        raise CheckpointError(f"{what} does not match the model:\n  " + "\n  ".join(problems))
    return out


def lm_head_rules(lm_head: bool, tied: bool) -> tuple[list[Rule], dict[str, str]]:
    """Rules for HF's `lm_head.weight`, and the tied keys: with a tied head it is the token embedding itself
    (dropped, and `unembed.weight` shares `embed.weight`); without a head it is dropped."""
    if lm_head and tied:
        return [Rule("lm_head.weight", None)], {"unembed.weight": "embed.weight"}
    return [Rule("lm_head.weight", "unembed.weight" if lm_head else None)], {}


def check_config(hf_config: dict[str, Any], required: dict[str, Callable[[Any], bool] | Any], arch: str) -> None:
    """Refuse HF config options this implementation does not compute (penzai-style), naming each one.

    `required` maps an attribute to the value it must have (or a predicate); absent attributes are fine.
    """
    bad = []
    for attr, want in required.items():
        if attr not in hf_config:
            continue
        value = hf_config[attr]
        ok = want(value) if callable(want) else value == want
        if not ok:
            bad.append(f"{attr}={value!r}")
    if bad:
        raise ValueError(f"hookvene's {arch} does not implement these config options: {', '.join(bad)}")


def rope_from_hf(hf_config: dict[str, Any], arch: str, theta: float = 10000.0,
                 partial: float = 1.0) -> dict[str, Any]:
    """Rotary-embedding settings of an HF config, in either spelling: the hub's (`rope_scaling` {"type" or
    "rope_type", "factor", llama3 fields}, `rope_theta`; GPT-NeoX's `rotary_pct`, `rotary_emb_base`) or
    transformers 5's `rope_parameters` (`rope_type`, `rope_theta`, `partial_rotary_factor`, the same fields).

    Returns {"rope_type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}; raises ValueError naming a rope type hookvene does not compute."""
    params = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"hookvene's {arch} does not implement per-layer-type rope parameters: "
                         f"rope_parameters={params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"hookvene's {arch} does not implement rope type {rope_type!r} (rope_scaling / "
                         f"rope_parameters); implemented: {', '.join(ROPE_TYPES)}")
    return {
        "rope_type": rope_type,
        "rope_theta": params.get("rope_theta", hf_config.get("rope_theta", hf_config.get("rotary_emb_base", theta))),
        "partial_rotary_factor": params.get(
            "partial_rotary_factor", hf_config.get("partial_rotary_factor", hf_config.get("rotary_pct", partial))),
        "factor": params.get("factor", 1.0),
        "low_freq_factor": params.get("low_freq_factor", 1.0),
        "high_freq_factor": params.get("high_freq_factor", 4.0),
        "original_max_position_embeddings": params.get("original_max_position_embeddings",
                                                       hf_config.get("original_max_position_embeddings",
                                                                     hf_config.get("max_position_embeddings", 8192))),
    }


def cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """`t` in `dtype` when it holds floats (integer tensors keep theirs); `t` itself when nothing changes."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def load_into(model: nn.Module, state: dict[str, Tensor], dtype: torch.dtype | None = None) -> nn.Module:
    """Put converted tensors into a model built on the meta device, sharing them (no copy) where possible. The
    model takes the tensors' dtype (a bf16 checkpoint gives a bf16 model) unless `dtype` is given."""
    if dtype is not None:
        converted: dict[int, Tensor] = {}
        for v in state.values():
            converted.setdefault(id(v), cast(v, dtype))
        state = {k: converted[id(v)] for k, v in state.items()}
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    made: dict[int, nn.Parameter] = {}  # one Parameter per source tensor, so tied weights stay one Parameter

    def as_param(v: Tensor) -> nn.Parameter:
        if isinstance(v, nn.Parameter):
            return v
        if id(v) not in made:
            made[id(v)] = nn.Parameter(v.detach())
        return made[id(v)]

    state = {k: as_param(v) if k in params else v for k, v in state.items()}
    # assign=True copies the new module's requires_grad onto the assigned Parameters; they may be the user's own
    # (a frozen transformers model shares them), so put every given Parameter's flag back
    flags = {id(v): v.requires_grad for v in state.values() if isinstance(v, nn.Parameter)}
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        if id(p) in flags:
            p.requires_grad_(flags[id(p)])
    return model


PICKLE_OPT_IN = ("pass allow_pickle=True to load it (only if you trust its source; it is then read with "
                 "torch.load(weights_only=True)), or convert it to model.safetensors")


def read_checkpoint_dir(path: str, allow_pickle: bool = False, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json as a dict, state dict) of a local HF checkpoint directory: model.safetensors (sharded or not);
    a pickle checkpoint (pytorch_model.bin) only with `allow_pickle=True`.

    Lean: safetensors files are read one tensor at a time straight onto `device` (default CPU), each converted to
    `dtype` as it is read, so the peak is the loaded weights plus one tensor: never the checkpoint twice, nor a
    bf16 checkpoint through fp32. Without `dtype` every tensor keeps its stored dtype."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path!r} has no config.json, so it is not a HuggingFace checkpoint directory")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    files = _weight_files(path)
    pickles = [f for f in files if not f.endswith(".safetensors")]
    if pickles and not allow_pickle:
        raise CheckpointError(f"{path!r} holds only pickle weights ({os.path.basename(pickles[0])}), which can run "
                              f"code when read; hookvene reads safetensors by default: {PICKLE_OPT_IN}")
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(file, framework="pt", device=str(device or "cpu")) as f:
                    for key in f.keys():
                        state[key] = cast(f.get_tensor(key), dtype)
            else:
                loaded = torch.load(file, map_location=device or "cpu", weights_only=True)
                state.update({k: cast(v, dtype) for k, v in loaded.items()})
        except Exception as e:  # safetensors and torch raise many types for truncated or garbled files
            raise CheckpointError(f"cannot read weights from {file} (corrupt or truncated?): {e}") from None
    return config, state


def _weight_files(path: str) -> list[str]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise CheckpointError(f"{path!r} has no model.safetensors or pytorch_model.bin weights")
