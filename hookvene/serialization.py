"""IntervenableModel.save / load: `config.json` (the IntervenableConfig, classes as import paths) plus
`interventions.safetensors` (the state of every trainable or constant-source intervention, keyed `<key>/<name>`;
with include_model also the wrapped model's state under `model/`)."""

import json
import os
from typing import Any

from torch import nn

from hookvene.config import IntervenableConfig

CONFIG, WEIGHTS = "config.json", "interventions.safetensors"


def save_intervenable(iv: Any, save_directory: str, include_model: bool = False) -> None:
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    cfg = iv.config.to_dict()
    cfg["intervention_dimensions"] = [s.intervention.embed_dim for s in iv.slots]
    with open(os.path.join(save_directory, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    tensors = {}
    for s in iv.slots:
        if s.intervention.trainable or s.intervention.source_representation is not None:
            for name, t in s.intervention.state_dict().items():
                tensors[f"{s.key}/{name}"] = t.detach().cpu().contiguous().clone()  # clone: linked ones share
    if include_model:
        tensors |= {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in iv.model.state_dict().items()}
    save_file(tensors, os.path.join(save_directory, WEIGHTS))


def load_intervenable(load_directory: str, model: nn.Module, include_model: bool = False) -> Any:
    from safetensors.torch import load_file

    from hookvene.intervenable import IntervenableModel

    paths = [os.path.join(load_directory, f) for f in (CONFIG, WEIGHTS)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{load_directory!r} was not written by IntervenableModel.save: missing {missing}")
    try:
        with open(paths[0]) as f:
            config = IntervenableConfig.from_dict(json.load(f))
        tensors = load_file(paths[1])
    except ValueError:
        raise
    except Exception as e:  # bad JSON, a missing field, a truncated safetensors file
        raise ValueError(f"cannot read the saved intervention in {load_directory!r}: {type(e).__name__}: {e}") from None
    new = IntervenableModel(config, model)
    for s in new.slots:
        state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == s.key}
        if "source_representation" in state:
            s.intervention.set_source_representation(state["source_representation"])
        if state:
            s.intervention.load_state_dict(state, strict=True)
    if include_model:
        new.model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    return new
