"""`torch.nn.GRU` -> hookvene GRU, hookvene GRU checkpoints (config.json + model.safetensors), and pyvene's
`create_gru*` constructors.

nn.GRU's tensors are already in hookvene's layout (gate order r | z | n, `nn.Linear`'s (out, in)), so the
table is a rename. hookvene's GRU is always batch-first; an nn.GRU built with `batch_first=False` has the same
weights and computes the same function on `x.transpose(0, 1)`.
"""

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.loading.common import (
    CheckpointError,
    Rule,
    convert_state_dict,
    empty_model,
    load_into,
    read_checkpoint_dir,
)
from hookvene.models.gru import GRU, GRULM, GRUClassifier, GRUConfig

RULES = [
    # nn.GRU key          hookvene key
    Rule("weight_ih_l{i}", "layers.{i}.x2h.weight"),
    Rule("bias_ih_l{i}", "layers.{i}.x2h.bias"),
    Rule("weight_hh_l{i}", "layers.{i}.h2h.weight"),
    Rule("bias_hh_l{i}", "layers.{i}.h2h.bias"),
]

CLASSES = {cls.__name__: cls for cls in (GRU, GRUClassifier, GRULM)}


def from_torch_gru(gru: nn.GRU | dict[str, Tensor], dtype: torch.dtype | None = None) -> GRU:
    """A hookvene `GRU` computing what `gru` computes (in eval mode: there is no dropout).

    Args:
        gru: an `nn.GRU` (its Parameters are then shared, not copied) or its `state_dict()`. Either
            `batch_first` setting works: hookvene takes (batch, time, d_in), so feed `x.transpose(0, 1)` for
            a time-first nn.GRU. Bidirectional GRUs and `proj_size > 0` are refused.
        dtype: optional conversion of the weights (which then are copies).
    """
    if isinstance(gru, nn.GRU):
        if gru.bidirectional or gru.proj_size:
            raise ValueError(f"hookvene's GRU is unidirectional without projection; got bidirectional="
                             f"{gru.bidirectional}, proj_size={gru.proj_size}")
        state, what = dict(gru.state_dict(keep_vars=True)), "nn.GRU object"
    elif isinstance(gru, dict):
        state, what = gru, "nn.GRU state dict"
    else:
        raise TypeError(f"from_torch_gru takes an nn.GRU or its state dict, got {type(gru).__name__}")
    if any(k.endswith("_reverse") for k in state) or any(k.startswith("weight_hr_l") for k in state):
        raise ValueError("hookvene's GRU is unidirectional without projection; this state dict has "
                         "`*_reverse` (bidirectional) or `weight_hr_l*` (proj_size) tensors")
    if "weight_ih_l0" not in state or "weight_hh_l0" not in state:
        raise CheckpointError(f"{what} has no weight_ih_l0 / weight_hh_l0: not an nn.GRU state dict "
                              f"(keys: {sorted(state)[:8]})")
    d_hidden, d_in = state["weight_hh_l0"].shape[1], state["weight_ih_l0"].shape[1]
    n_layers = sum(k.startswith("weight_ih_l") for k in state)
    pdrop = gru.dropout if isinstance(gru, nn.GRU) else 0.0
    cfg = GRUConfig(n_layers=n_layers, d_model=d_hidden, d_in=d_in, include_bias="bias_ih_l0" in state,
                    pdrop=pdrop)
    with empty_model():
        model = GRU(cfg)
    return load_into(model, convert_state_dict(RULES, state, model, what), dtype).eval()


def save_pretrained(model: GRU, path: str) -> None:
    """Write `model` (a GRU, GRUClassifier or GRULM) as `path/config.json` + `path/model.safetensors`."""
    from safetensors.torch import save_file

    if type(model) not in CLASSES.values():
        raise TypeError(f"save_pretrained takes one of {sorted(CLASSES)}, got {type(model).__name__}")
    os.makedirs(path, exist_ok=True)
    config = {"architectures": [type(model).__name__], "model_type": "hookvene_gru", **model.cfg.to_dict()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(path, "model.safetensors"))


def load_gru(path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> GRU:
    """Load a model written by `save_pretrained`; its class (GRU, GRUClassifier, GRULM) is in config.json.

    Raises CheckpointError for a missing or malformed config.json and for missing, unexpected or mis-shaped
    tensors."""
    raw, state = read_checkpoint_dir(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}/config.json must hold a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    archs, model_type = raw.pop("architectures", None), raw.pop("model_type", None)
    if model_type != "hookvene_gru" or not isinstance(archs, list) or len(archs) != 1 \
            or archs[0] not in CLASSES:
        raise CheckpointError(f"{path}/config.json is not a hookvene GRU config (needs model_type "
                              f"'hookvene_gru' and architectures one of {[[c] for c in CLASSES]}; got "
                              f"model_type={model_type!r}, architectures={archs!r})")
    try:
        cfg = GRUConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    with empty_model():
        model = CLASSES[archs[0]](cfg)
    rules = [Rule(k, k) for k in model.state_dict()]
    model = load_into(model, convert_state_dict(rules, state, model, f"checkpoint {path!r}"), dtype).eval()
    return model.to(device) if device is not None else model


def _tokenizer(name: str | None, cache_dir: str | None) -> Any:
    if name is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)


def create_gru(config: GRUConfig, tokenizer_name: str | None = None,
               cache_dir: str | None = None) -> tuple[GRUConfig, Any, GRU]:
    """pyvene's `create_gru`: (config, tokenizer or None, a randomly initialised GRU)."""
    return config, _tokenizer(tokenizer_name, cache_dir), GRU(config)


def create_gru_lm(config: GRUConfig, tokenizer_name: str | None = None,
                  cache_dir: str | None = None) -> tuple[GRUConfig, Any, GRULM]:
    """pyvene's `create_gru_lm`: (config, tokenizer or None, a randomly initialised GRULM)."""
    return config, _tokenizer(tokenizer_name, cache_dir), GRULM(config)


def create_gru_classifier(config: GRUConfig, tokenizer_name: str | None = None,
                          cache_dir: str | None = None) -> tuple[GRUConfig, Any, GRUClassifier]:
    """pyvene's `create_gru_classifier`: (config, tokenizer or None, a randomly initialised GRUClassifier)."""
    return config, _tokenizer(tokenizer_name, cache_dir), GRUClassifier(config)


__all__ = ["RULES", "create_gru", "create_gru_classifier", "create_gru_lm", "from_torch_gru", "load_gru",
           "save_pretrained"]
