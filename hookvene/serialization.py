"""The file format of `IntervenableModel.save` / `load`: `config.json` (the IntervenableConfig, classes by name,
plus each intervention's `settings()` under `intervention_settings`) and `interventions.safetensors` (every
intervention's state_dict, keyed `<key>/<name>`; with include_model also the wrapped model's state under `model/`).

Loading never imports or calls anything the files name (class names resolve through the intervention registry) and
never reads a pickle; it fails, naming what it expected and what it found, unless the files fill every slot exactly.

This module knows configs, slots and tensors, not IntervenableModel: the intervenable layer calls it, never the
other way round.
"""

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from hookvene.config import IntervenableConfig, RepresentationConfig
from hookvene.interventions import LambdaIntervention
from hookvene.plan import Slot

CONFIG, WEIGHTS = "config.json", "interventions.safetensors"


def save(directory: str, config: IntervenableConfig, slots: Sequence[Slot], model: nn.Module | None = None) -> None:
    """Write the config and every trainable or constant-source intervention's state; with `model`, its state too."""
    from safetensors.torch import save_file

    for i, s in enumerate(slots):  # refuse before writing anything
        if isinstance(s.intervention, LambdaIntervention) or not isinstance(config.type_of(i), type):
            raise ValueError(f"cannot save intervention {s.key}: it was given as a function or an object "
                             f"({type(config.type_of(i)).__name__}), which no file can hold. Give its class as "
                             f"intervention_type to save it; a function must be passed again when you rebuild")
    os.makedirs(directory, exist_ok=True)
    cfg = config.to_dict()
    cfg["intervention_dimensions"] = [s.intervention.embed_dim for s in slots]
    cfg["intervention_settings"] = {s.key: s.intervention.settings() for s in slots}
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    tensors = {}
    for s in slots:  # every buffer and parameter: anything in the state changes the output (masks, temperature)
        for name, t in s.intervention.state_dict().items():
            tensors[f"{s.key}/{name}"] = t.detach().cpu().contiguous().clone()  # clone: linked ones share
    if model is not None:
        tensors |= {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS))


def read(directory: str, intervention_types: Iterable[type] = ()) -> tuple[IntervenableConfig, dict[str, Tensor]]:
    """The saved config and tensors, with a clear error for a folder `save` did not write or a damaged file.
    Type names resolve to hookvene's classes, registered ones and `intervention_types` only."""
    from safetensors.torch import load_file

    paths = [os.path.join(directory, f) for f in (CONFIG, WEIGHTS)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing == [paths[1]] and is_pyvene_layout(directory):
        return read_pyvene(directory, intervention_types)
    if missing:
        raise FileNotFoundError(f"{directory!r} was not written by IntervenableModel.save: missing {missing}")
    try:
        with open(paths[0]) as f:
            config = IntervenableConfig.from_dict(json.load(f), intervention_types)
        tensors = load_file(paths[1])
    except ValueError:
        raise
    except Exception as e:  # bad JSON, a missing field, a truncated safetensors file
        raise ValueError(f"cannot read the saved intervention in {directory!r}: {type(e).__name__}: {e}") from None
    return config, tensors


# -- pyvene's layout: config.json (a transformers PretrainedConfig) + one intkey_{key}.bin per saved intervention ----

PYVENE_BUFFERS = ("embed_dim", "interchange_dim")  # pyvene keeps these sizes as buffers; hookvene as settings
PYVENE_DROPPED = ("intervention_population",)  # recomputed from the size here (a non-persistent buffer)


def is_pyvene_layout(directory: str) -> bool:
    """Whether `directory` was written by pyvene's `IntervenableModel.save` (representations saved as lists)."""
    try:
        with open(os.path.join(directory, CONFIG)) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    reps = d.get("representations") if isinstance(d, dict) else None
    return isinstance(reps, list) and bool(reps) and all(isinstance(r, list) for r in reps)


def read_pyvene(directory: str,
                intervention_types: Iterable[type] = ()) -> tuple[IntervenableConfig, dict[str, Tensor]]:
    """A directory saved by pyvene, as `read` returns hookvene's: the config (types from pyvene's
    `"<class 'pyvene.models.interventions.X'>"` strings, resolved like hookvene's names: nothing is imported) and
    the tensors keyed `<key>/<name>`. Each `intkey_{key}.bin` is read with `torch.load(weights_only=True)`, which
    refuses anything but tensors and plain containers; pyvene's `interchange_dim` buffer becomes the setting."""
    import torch

    from hookvene.interventions import intervention_class

    with open(os.path.join(directory, CONFIG)) as f:
        d = json.load(f)
    reps, types = d["representations"], d.get("intervention_types")
    types = types if isinstance(types, list) else [types] * len(reps)
    if len(types) != len(reps):
        raise ValueError(f"pyvene config in {directory!r} has {len(types)} intervention_types for {len(reps)} "
                         f"representations")
    fields = RepresentationConfig._fields
    built = []
    for r, t in zip(reps, types):
        if len(r) > len(fields):
            raise ValueError(f"pyvene representation {r!r} has {len(r)} fields; RepresentationConfig has {fields}")
        rep = dict(zip(fields, r))
        rep["intervention_type"] = intervention_class(t, intervention_types) if isinstance(t, str) else None
        rep["intervention"] = None
        built.append(RepresentationConfig(**rep))
    keys = [k.replace(".", "_") for k in d.get("sorted_keys") or []]  # pyvene's older dotted keys
    tensors: dict[str, Tensor] = {}
    settings: dict[str, dict[str, int]] = {}
    for key in keys:
        path = os.path.join(directory, f"intkey_{key}.bin")
        dotted = os.path.join(directory, "intkey_" + key.replace("_", ".") + ".bin")
        path = path if os.path.isfile(path) else dotted
        if not os.path.isfile(path):
            continue  # pyvene writes no file for interventions without weights or a constant source
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle holding anything but tensors, or a damaged file
            raise ValueError(f"cannot read {path!r} as tensors (torch.load weights_only=True): "
                             f"{type(e).__name__}: {e}") from None
        for name, t in state.items():
            if name == "interchange_dim" and t is not None and t.numel() == 1:
                settings[key] = {"interchange_dim": int(t)}
            if name not in PYVENE_BUFFERS + PYVENE_DROPPED and t is not None:
                tensors[f"{key}/{name}"] = t
    config = IntervenableConfig(built, mode=d.get("mode", "parallel"), sorted_keys=keys or None,
                                intervention_settings=settings or None)
    return config, tensors


def restore(slots: Sequence[Slot], tensors: dict[str, Tensor], model: nn.Module | None = None,
            settings: dict[str, dict[str, Any]] | None = None) -> None:
    """Load saved states (and settings) into freshly built slots, and, given `model`, the saved model state into
    it. Every slot must find exactly its tensors: a missing one would leave a freshly initialised (random)
    intervention, an unused one means the file describes other slots; both are errors naming the keys."""
    model_state = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    found: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if not k.startswith("model/"):
            key, _, name = k.partition("/")
            found.setdefault(key, {})[name] = v
    expected = {s.key: set(s.intervention.state_dict()) | _hidden_source(s, found.get(s.key, {})) for s in slots}
    want = sorted(f"{k}/{n}" for k, names in expected.items() for n in names)
    have = sorted(f"{k}/{n}" for k, names in found.items() for n in names)
    if want != have:
        missing, unused = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise ValueError(f"the saved interventions do not fit the slots built from the saved config: missing "
                         f"{missing}, unused {unused}. Expected the tensors {want}; the file holds {have}")
    settings = settings or {}
    unknown = sorted(set(settings) - set(expected))
    if unknown:
        raise ValueError(f"intervention_settings for unknown keys {unknown}; the slots are {sorted(expected)}")
    for s in slots:
        state = found.get(s.key, {})
        if "source_representation" in state:
            s.intervention.set_source_representation(state["source_representation"])
        if state:
            s.intervention.load_state_dict(state, strict=True)
        if s.key in settings:
            s.intervention.apply_settings(settings[s.key])
    if model is not None:
        if not model_state:
            raise ValueError("include_model=True, but the interventions were saved without the model (save with "
                             "include_model=True)")
        try:
            model.load_state_dict(model_state)
        except RuntimeError as e:  # torch lists the missing and unexpected keys
            raise ValueError(f"the saved model state does not fit this model: {e}") from None


def _hidden_source(slot: Slot, found: dict[str, Tensor]) -> set[str]:
    """A constant source saved by `save` comes back in the file, not in the config (the config only says
    `hidden_source_representation`, which pyvene also sets without a saved tensor)."""
    return {"source_representation"} if slot.rep.hidden_source_representation and "source_representation" in found \
        else set()
