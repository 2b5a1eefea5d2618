"""The file format of `IntervenableModel.save` / `load`: `config.json` (the IntervenableConfig, classes as import
paths) plus `interventions.safetensors` (the state of every trainable or constant-source intervention, keyed
`<key>/<name>`; with include_model also the wrapped model's state under `model/`).

This module knows configs, slots and tensors, not IntervenableModel: the intervenable layer calls it, never the
other way round.
"""

import json
import os
from collections.abc import Sequence

from torch import Tensor, nn

from hookvene.config import IntervenableConfig
from hookvene.plan import Slot

CONFIG, WEIGHTS = "config.json", "interventions.safetensors"


def save(directory: str, config: IntervenableConfig, slots: Sequence[Slot], model: nn.Module | None = None) -> None:
    """Write the config and every trainable or constant-source intervention's state; with `model`, its state too."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    cfg = config.to_dict()
    cfg["intervention_dimensions"] = [s.intervention.embed_dim for s in slots]
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    tensors = {}
    for s in slots:
        if s.intervention.trainable or s.intervention.source_representation is not None:
            for name, t in s.intervention.state_dict().items():
                tensors[f"{s.key}/{name}"] = t.detach().cpu().contiguous().clone()  # clone: linked ones share
    if model is not None:
        tensors |= {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS))


def read(directory: str) -> tuple[IntervenableConfig, dict[str, Tensor]]:
    """The saved config and tensors, with a clear error for a folder `save` did not write or a damaged file."""
    from safetensors.torch import load_file

    paths = [os.path.join(directory, f) for f in (CONFIG, WEIGHTS)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{directory!r} was not written by IntervenableModel.save: missing {missing}")
    try:
        with open(paths[0]) as f:
            config = IntervenableConfig.from_dict(json.load(f))
        tensors = load_file(paths[1])
    except ValueError:
        raise
    except Exception as e:  # bad JSON, a missing field, a truncated safetensors file
        raise ValueError(f"cannot read the saved intervention in {directory!r}: {type(e).__name__}: {e}") from None
    return config, tensors


def restore(slots: Sequence[Slot], tensors: dict[str, Tensor], model: nn.Module | None = None) -> None:
    """Load saved states into freshly built slots (and, given `model`, the saved model state into it)."""
    for s in slots:
        state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == s.key}
        if "source_representation" in state:
            s.intervention.set_source_representation(state["source_representation"])
        if state:
            s.intervention.load_state_dict(state, strict=True)
    if model is not None:
        model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
