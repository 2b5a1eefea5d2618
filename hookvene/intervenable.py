"""IntervenableModel: compiles an IntervenableConfig into functions on hook points and runs base and source passes.

One call = (optional) source runs that *read* activations at each intervention's site, then one base run whose
hook functions *write* the intervened values. Source runs stop as soon as every site they feed has fired, so they
skip the later layers and the LM head. Nothing stays attached after a call, failed or not; hooks the user attached
are left alone; the wrapped model is never frozen or switched to eval mode unless asked.
"""

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hookvene import serialization
from hookvene.components import table_for
from hookvene.config import IntervenableConfig
from hookvene.generate import intervened_generate
from hookvene.interventions import Intervention
from hookvene.loading import from_pretrained
from hookvene.plan import Slot, build_slots, make_plan
from hookvene.utils import as_inputs


@dataclass
class IntervenableModelOutput:
    original_outputs: Any = None
    intervened_outputs: Any = None
    collected_activations: list[Tensor] | None = None


class InterventionEntry(tuple):
    """`(intervention, hook name)`, as pyvene's older `interventions[key]` returned; attribute access goes to the
    intervention, so `model.interventions[key].rotate_layer` works too."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self[0], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling the entry calls the intervention, as current pyvene's `interventions[key](base, source)`."""
        return self[0](*args, **kwargs)


class InterventionsView(Mapping):
    """`model.interventions[key]`; accepts the current key format and pyvene's older dotted one."""

    def __init__(self, slots: list[Slot]) -> None:
        self._slots = {s.key: s for s in slots}

    def __getitem__(self, key: str) -> InterventionEntry:
        slot = self._slots.get(key) or self._slots.get(key.replace(".", "_"))
        if slot is None:
            raise KeyError(f"no intervention {key!r}; keys: {list(self._slots)}")
        return InterventionEntry((slot.intervention, slot.site.hook))

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)


def as_hooked_model(model: nn.Module) -> nn.Module:
    """A hookvene model as is; a `transformers` model converted (weights shared); a user-registered model as is."""
    if hasattr(model, "hook_dict") or table_for(model) is not None:
        return model
    return from_pretrained(model)


class IntervenableModel(nn.Module):
    """Wraps a model and a config; `forward` runs sources and base with the configured interventions.

    Args:
        config: an IntervenableConfig, or a dict / list of dicts / RepresentationConfigs.
        model: a hookvene model, a `transformers` model of a supported architecture (converted, weights shared),
            or any model whose class the user registered in `type_to_module_mapping` (pyvene-style module paths).
            The model is never frozen, unfrozen or switched to eval/train here, and a `transformers` model keeps
            each parameter's `requires_grad`. Its weights are shared, not copied: in-place edits, and moving or
            casting this wrapper (`.to()`, `.half()`), reach the `transformers` model too; pass
            `hookvene.from_pretrained(hf_model, copy=True)` instead to work on a copy.

    Each call's hook functions act only on that call's own forward passes (see `hookvene.plan.attach`), so the
    same model may run plain forwards, or other calls, in other threads meanwhile.
    """

    def __init__(self, config: Any, model: nn.Module, **kwargs: Any) -> None:
        """`**kwargs` takes pyvene's other constructor options (e.g. `use_fast`), which change nothing here."""
        super().__init__()
        self.config = config if isinstance(config, IntervenableConfig) else IntervenableConfig(config)
        self.model = as_hooked_model(model)
        self.mode = self.config.mode
        self.model_gradients = False
        self.slots = build_slots(self.config, self.model)
        self.intervention_modules = nn.ModuleDict({s.key: s.intervention for s in self.slots})
        self.config.sorted_keys = [s.key for s in self.slots]
        self.config.model_type = type(self.model).__name__
        self.n_groups = max((s.group for s in self.slots), default=-1) + 1

    @property
    def interventions(self) -> InterventionsView:
        return InterventionsView(self.slots)

    @property
    def sorted_keys(self) -> list[str]:
        return [s.key for s in self.slots]

    def forward(self, base: Any, sources: Any = None, unit_locations: Any = None,
                source_representations: Any = None, subspaces: Any = None, labels: Tensor | None = None,
                output_original_output: bool = False, return_dict: bool | None = None, use_cache: bool | None = None,
                activations_sources: Any = None) -> Any:
        """Run the interventions.

        Returns `(original_outputs, intervened_outputs)`; with a CollectIntervention,
        `((original_outputs, collected_activations), intervened_outputs)`; with `return_dict=True` an
        IntervenableModelOutput. `original_outputs` is None unless `output_original_output=True`.
        """
        base = as_inputs(base)
        given = source_representations if source_representations is not None else activations_sources
        plan = make_plan(self.slots, base, sources=sources, unit_locations=unit_locations, subspaces=subspaces,
                         source_representations=given, mode=self.mode)
        extra = {k: v for k, v in (("labels", labels), ("use_cache", use_cache)) if v is not None}
        original = self.model(**base, **extra) if output_original_output else None
        plan.read_sources(self.model)
        with plan.attached(self.model):
            out = self.model(**base, **extra)
        acts = plan.collected() if plan.has_collect() else None
        if return_dict:
            return IntervenableModelOutput(original, out, acts)
        return ((original, acts), out) if acts is not None else (original, out)


    def generate(self, base: Any, sources: Any = None, unit_locations: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        """Generate with interventions; see `hookvene.generate.intervened_generate` for the arguments. `sources` and
        `unit_locations` may be given by position, in pyvene's order."""
        return intervened_generate(self.model, self.slots, base, mode=self.mode, sources=sources,
                                   unit_locations=unit_locations, **kwargs)

    # -- parameters, modes, devices ---------------------------------------------------------------------------

    def unique_interventions(self) -> list[Intervention]:
        out: list[Intervention] = []
        for s in self.slots:
            if not any(s.intervention is o for o in out):
                out.append(s.intervention)
        return out

    def get_trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of trainable interventions (linked ones once), plus the model's after
        `enable_model_gradients()`."""
        params = [p for iv in self.unique_interventions() if iv.trainable for p in iv.parameters() if p.requires_grad]
        if self.model_gradients:
            params += [p for p in self.model.parameters() if p.requires_grad]
        return params

    def print_intervention_info(self) -> None:
        """Print one line per intervention: its key, the hook it acts on, its class, source group and trainable
        parameter count (pyvene's `print_intervention_info`)."""
        print(f"{len(self.slots)} intervention(s), mode={self.mode}, on {type(self.model).__name__}")
        for s in self.slots:
            n = sum(p.numel() for p in s.intervention.parameters() if p.requires_grad) if s.intervention.trainable \
                else 0
            print(f"  {s.key}: {type(s.intervention).__name__} on {s.site.hook} (group {s.group}, "
                  f"{n} trainable parameters)")

    def count_parameters(self, include_model: bool = False) -> int:
        n = sum(p.numel() for iv in self.unique_interventions() if iv.trainable
                for p in iv.parameters() if p.requires_grad)
        if include_model:
            n += sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return n

    def enable_model_gradients(self) -> None:
        """Train the wrapped model too (IIT): gradients on, train mode, parameters in get_trainable_parameters()."""
        self.model.train()
        self.model.requires_grad_(True)
        self.model_gradients = True

    def disable_model_gradients(self) -> None:
        """Freeze the wrapped model: gradients off and eval mode (pyvene does this at construction; we ask first)."""
        self.model.eval()
        self.model.requires_grad_(False)
        self.model_gradients = False

    def set_device(self, device: str | torch.device, set_model: bool = True) -> "IntervenableModel":
        for iv in self.unique_interventions():
            iv.to(device)
        if set_model:
            self.model.to(device)
        return self

    def get_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_temperature(self, temp: float) -> None:
        for iv in self.unique_interventions():
            if hasattr(iv, "set_temperature"):
                iv.set_temperature(temp)

    # -- save / load (the file format is in hookvene/serialization.py) ---------------------------------------

    def save(self, save_directory: str, include_model: bool = False, **_: Any) -> None:
        """Write `config.json` and `interventions.safetensors` (trainable weights and constant sources)."""
        serialization.save(save_directory, self.config, self.slots, self.model if include_model else None)

    @staticmethod
    def load(load_directory: str, model: nn.Module, include_model: bool = False,
             intervention_types: Iterable[type] = (), **_: Any) -> "IntervenableModel":
        """Rebuild a saved IntervenableModel on `model` (weights, constant sources and settings restored).

        The saved config names its intervention classes; they resolve to hookvene's classes, classes registered
        with `hookvene.register_intervention`, or those in `intervention_types`, never to anything imported
        by name. Fails unless the saved tensors fill every intervention exactly."""
        config, tensors = serialization.read(load_directory, intervention_types)
        new = IntervenableModel(config, model)
        serialization.restore(new.slots, tensors, new.model if include_model else None,
                              config.intervention_settings)
        return new
