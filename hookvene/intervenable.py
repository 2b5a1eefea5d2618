"""IntervenableModel: compiles an IntervenableConfig into functions on hook points and runs base and source passes.

One call = (optional) source runs that *read* activations at each intervention's site, then one base run whose
hook functions *write* the intervened values. Source runs stop as soon as every site they feed has fired, so they
skip the later layers and the LM head. Nothing stays attached after a call, failed or not; hooks the user attached
are left alone; the wrapped model is never frozen or switched to eval mode unless asked.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.components import Site, module_at, resolve
from hookvene.config import IntervenableConfig, RepresentationConfig
from hookvene.hooks import StopForward
from hookvene.interventions import CollectIntervention, Intervention, LambdaIntervention, build_intervention
from hookvene.locations import Selection, make_selection, parse_pair, parse_subspaces
from hookvene.utils import as_inputs


@dataclass
class IntervenableModelOutput:
    original_outputs: Any = None
    intervened_outputs: Any = None
    collected_activations: list[Tensor] | None = None


@dataclass
class Slot:
    """One configured intervention: its key, where it acts, what it does, and which source group feeds it."""

    key: str
    rep: RepresentationConfig
    site: Site
    intervention: Intervention
    group: int


@dataclass
class Plan:
    """One slot's instructions for one call."""

    base_sel: Selection | None
    src_sel: Selection | None
    subspaces: Any
    source: str  # "none" (constant / no source needed), "given" (source_representations), "run", "skip"
    given: Tensor | None = None
    store: dict[Any, Tensor] = field(default_factory=dict)  # activations read on the source run


class InterventionEntry(tuple):
    """`(intervention, hook name)`, as pyvene's older `interventions[key]` returned; attribute access goes to the
    intervention, so `model.interventions[key].rotate_layer` works too."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self[0], name)


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


def representation_key(rep: RepresentationConfig, seen: dict[str, int]) -> str:
    unit = rep.unit.replace(".", "_")
    comp = rep.component.replace(".", "_")
    stem = f"layer_{rep.layer}_comp_{comp}_unit_{unit}_nunit_{rep.max_number_of_units}"
    n = seen.get(stem, 0)
    seen[stem] = n + 1
    return f"{stem}#{n}"


def as_hooked_model(model: nn.Module) -> nn.Module:
    """A hookvene model as is; a `transformers` model converted (weights shared); a user-registered model as is."""
    from hookvene.components import table_for

    if hasattr(model, "hook_dict") or table_for(model) is not None:
        return model
    from hookvene.loading import from_pretrained

    return from_pretrained(model)


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for v in inputs.values():
        if isinstance(v, Tensor):
            return v.shape[0]
    raise ValueError("inputs hold no tensor: pass the tokenizer's output (a dict with input_ids) or inputs_embeds")


# -- views: how pyvene saw each hook tensor (see components.py) ----------------------------------------------------

def to_view(site: Site, x: Tensor) -> Tensor:
    if site.view == "merge_heads":
        return x.reshape(*x.shape[:2], -1)
    if site.view == "heads":
        return x.permute(0, 2, 1, 3)
    if site.view == "step_slice":
        return x[..., site.last_slice[0]:site.last_slice[1]]
    return x


def from_view(site: Site, v: Tensor, x: Tensor) -> Tensor:
    if site.view == "merge_heads":
        return v.reshape(x.shape)
    if site.view == "heads":
        return v.permute(0, 2, 1, 3)
    if site.view == "step_slice":
        a, b = site.last_slice
        return torch.cat([x[..., :a], v, x[..., b:]], dim=-1)
    return v


def flatten_collected(slots: list[Slot], collected: dict[str, list[Tensor]]) -> list[Tensor]:
    """pyvene's layout: one tensor per example (batch dim dropped) per hook call, keys in order."""
    return [row for s in slots for t in collected[s.key] for row in t]


UNIT_NAMES = {"pos": ("position",), "h": ("head",), "h.pos": ("head", "position"), "t": ("time step",)}


class IntervenableModel(nn.Module):
    """Wraps a model and a config; `forward` runs sources and base with the configured interventions.

    Args:
        config: an IntervenableConfig, or a dict / list of dicts / RepresentationConfigs.
        model: a hookvene model, a `transformers` model of a supported architecture (converted, weights shared),
            or any model whose class the user registered in `type_to_module_mapping` (pyvene-style module paths).
    """

    def __init__(self, config: Any, model: nn.Module, use_fast: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.config = config if isinstance(config, IntervenableConfig) else IntervenableConfig(config)
        self.model = as_hooked_model(model)
        self.mode = self.config.mode
        self.use_fast = use_fast
        self.model_gradients = False
        self.slots: list[Slot] = []
        self.groups = self._group_index()
        seen: dict[str, int] = {}
        linked: dict[Any, Intervention] = {}
        for i, rep in enumerate(self.config.representations):
            site = resolve(self.model, rep.layer, rep.component, rep.unit)
            key = representation_key(rep, seen)
            link = rep.intervention_link_key
            if link is not None and link in linked:
                intervention = linked[link]  # linked representations share one object (and its weights)
            else:
                args = {k: v for k, v in rep._asdict().items() if k not in ("intervention_type", "intervention")}
                dim = site.dim * rep.max_number_of_units if site.dim is not None else None
                intervention = build_intervention(self.config.type_of(i), **args, embed_dim=dim, use_fast=use_fast)
                if link is not None:
                    linked[link] = intervention
            self.slots.append(Slot(key, rep, site, intervention, self.groups[i]))
        self.intervention_modules = nn.ModuleDict({s.key: s.intervention for s in self.slots})
        self.config.sorted_keys = [s.key for s in self.slots]
        self.config.model_type = type(self.model).__name__
        self.n_groups = max(self.groups, default=-1) + 1

    def _group_index(self) -> list[int]:
        """Group id per representation: sources[g] feeds group g; groups are ordered by group_key."""
        keys = [r.group_key for r in self.config.representations]
        if all(k is None for k in keys):
            return list(range(len(keys)))
        if any(k is None for k in keys):
            raise ValueError("group_key is set on some representations but not all; set it on every one")
        order = sorted(set(keys))
        return [order.index(k) for k in keys]

    @property
    def interventions(self) -> InterventionsView:
        return InterventionsView(self.slots)

    @property
    def sorted_keys(self) -> list[str]:
        return [s.key for s in self.slots]

    # -- parsing a call --------------------------------------------------------------------------------------------

    def _locations(self, unit_locations: Any, batch: int) -> list[tuple[Any, Any]]:
        """Per slot: (source location, base location); None = the whole tensor."""
        n = len(self.slots)
        if unit_locations is None:
            return [(None, None)] * n
        if not isinstance(unit_locations, Mapping):
            raise ValueError("unit_locations must be a dict such as {'sources->base': 3} or {'base': [0, 1]}")
        out: list[tuple[Any, Any]] = [(None, None)] * n
        if self.mode == "parallel":
            valid = {"sources->base", "base"}
            bad = set(unit_locations) - valid
            if bad or len(unit_locations) != 1:
                raise ValueError(f"parallel mode takes one unit_locations key, 'sources->base' or 'base'; got "
                                 f"{list(unit_locations)}")
            key, value = next(iter(unit_locations.items()))
            return list(zip(*parse_pair(value, n, batch, key == "base")))
        last = f"source_{self.n_groups - 1}->base"
        valid = {f"source_{g}->source_{g + 1}" for g in range(self.n_groups - 1)} | {last}
        bad = set(unit_locations) - valid
        if bad:
            raise ValueError(f"serial mode keys are {sorted(valid)}; got unknown {sorted(bad)}")
        for g in range(self.n_groups):
            key = f"source_{g}->base" if g == self.n_groups - 1 else f"source_{g}->source_{g + 1}"
            members = [i for i, s in enumerate(self.slots) if s.group == g]
            if key not in unit_locations:
                raise ValueError(f"serial mode needs unit_locations[{key!r}]")
            src, base = parse_pair(unit_locations[key], len(members), batch, False)
            for i, s, b in zip(members, src, base):
                out[i] = (s, b)
        return out

    def _sources(self, sources: Any) -> list[Any] | None:
        if sources is None:
            return None
        sources = [sources] if isinstance(sources, Mapping | Tensor) else list(sources)  # never the caller's list
        if len(sources) == 1 and self.n_groups > 1:
            sources = sources * self.n_groups
        if len(sources) != self.n_groups:
            raise ValueError(f"{len(sources)} sources for {self.n_groups} intervention groups; pass one source per "
                             f"group (None skips that group) or a single source for all")
        return [None if s is None else as_inputs(s) for s in sources]

    def _given(self, reps: Any) -> list[Tensor | None]:
        n = len(self.slots)
        if reps is None:
            return [None] * n
        if isinstance(reps, Tensor):
            return [reps] * n
        if isinstance(reps, Mapping):
            keys = {s.key for s in self.slots}
            bad = [k for k in reps if k not in keys and k.replace(".", "_") not in keys]
            if bad:
                raise ValueError(f"source_representations for unknown keys {bad}; keys: {sorted(keys)}")
            norm = {k.replace(".", "_"): v for k, v in reps.items()}
            return [norm.get(s.key) for s in self.slots]
        reps = list(reps)
        if len(reps) != n:
            raise ValueError(f"{len(reps)} source_representations for {n} interventions")
        return reps

    def _plan(self, base: dict[str, Any], sources: list[Any] | None, unit_locations: Any, subspaces: Any,
              given: list[Tensor | None]) -> list[Plan]:
        batch = _batch_size(base)
        locs = self._locations(unit_locations, batch)
        subs = parse_subspaces(subspaces, len(self.slots), batch)
        plans = []
        for slot, (src_loc, base_loc), sub, rep in zip(self.slots, locs, subs, given):
            what = f"intervention {slot.key} ({slot.site.hook})"
            unit = slot.rep.unit if slot.site.view not in ("step", "step_slice") else "t"
            iv = slot.intervention
            needs_source = not (iv.is_source_constant or isinstance(iv, CollectIntervention))
            if rep is not None:
                source = "given"
            elif not needs_source:
                source = "none"
            elif sources is None:
                if isinstance(iv, LambdaIntervention):
                    source = "none"
                else:
                    raise ValueError(f"{what}: {type(iv).__name__} needs a source; pass sources=[...] (one per "
                                     f"group), source_representations=..., or a source_representation in the config")
            else:
                source = "run" if sources[slot.group] is not None else "skip"
            base_sel = make_selection(base_loc, unit, batch, what)
            src_batch = batch if source != "run" else _batch_size(sources[slot.group])
            src_sel = make_selection(src_loc, unit, src_batch, what) if src_loc is not None else base_sel
            plans.append(Plan(base_sel, src_sel, sub, source, rep))
        return plans

    # -- running ---------------------------------------------------------------------------------------------------

    @contextmanager
    def _attached(self, fns: list[tuple[Site, str, Callable]]) -> Iterator[None]:
        """Attach (site, hook name, fn) triples for one pass; everything is removed on exit, even on error."""
        with ExitStack() as stack:
            hooked = [(name, fn) for site, name, fn in fns if site.module_hook is None]
            if hooked:
                stack.enter_context(self.model.hooks(fwd_hooks=hooked))
            for site, name, fn in fns:
                if site.module_hook is not None:
                    stack.callback(self._module_hook(site, name, fn).remove)
            yield

    def _module_hook(self, site: Site, path: str, fn: Callable) -> Any:
        """pyvene-style hook on a foreign model's module (its output, or its first input for pre-hooks)."""
        module = module_at(self.model, path)
        if site.module_hook == "register_forward_pre_hook":
            def pre(mod: nn.Module, args: tuple) -> Any:
                new = fn(args[0], None)
                return None if new is None else (new, *args[1:])
            return module.register_forward_pre_hook(pre)

        def post(mod: nn.Module, args: tuple, output: Any) -> Any:
            x = output[0] if isinstance(output, tuple) else output
            new = fn(x, None)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return module.register_forward_hook(post)

    def _getter(self, slot: Slot, plan: Plan, counter: list[int]) -> tuple[Site, str, Callable]:
        site = slot.site
        name = site.skip_from if slot.intervention.uses_module_input else site.hook
        if slot.intervention.uses_module_input and name is None:
            raise ValueError(f"SkipIntervention needs a component whose module input has the same shape "
                             f"(block_output, attention_output, mlp_output, cell_output); got {slot.rep.component!r}")
        is_step = site.view in ("step", "step_slice")
        what = f"source of intervention {slot.key} ({site.hook})"

        def get(x: Tensor, hook: Any) -> None:
            view = to_view(site, x)
            if is_step:
                plan.store[hook.step] = view
                return
            plan.store[None] = self._gather(view, plan.src_sel, slot, what)
            counter[0] -= 1
            if counter[0] == 0:
                raise StopForward
        return site, name, get

    def _gather(self, view: Tensor, sel: Selection | None, slot: Slot, what: str) -> Tensor:
        if sel is None:
            return view
        unit = slot.rep.unit
        sel.check(tuple(view.shape), slot.site.units[unit], what, UNIT_NAMES.get(unit, (unit, unit)))
        return view[sel.index(view.device)]

    def _setter(self, slot: Slot, plan: Plan, collected: dict[str, list[Tensor]]) -> tuple[Site, str, Callable]:
        site, iv = slot.site, slot.intervention
        what = f"intervention {slot.key} ({site.hook})"
        if site.view in ("step", "step_slice"):
            return site, site.hook, self._step_setter(slot, plan, collected)

        def set_(x: Tensor, hook: Any) -> Tensor | None:
            view = to_view(site, x)
            base = self._gather(view, plan.base_sel, slot, what)
            source = plan.given if plan.source == "given" else plan.store.get(None)
            new = self._apply(slot, base, source, plan.subspaces, plan.base_sel is not None)
            if isinstance(iv, CollectIntervention):
                collected[slot.key].append(new)
                return None
            if plan.base_sel is None:
                return from_view(site, new.to(view.dtype).expand_as(view), x)
            return from_view(site, view.index_put(plan.base_sel.index(view.device), new.to(view.dtype)), x)
        return site, site.hook, set_

    def _step_setter(self, slot: Slot, plan: Plan, collected: dict[str, list[Tensor]]) -> Callable:
        """Unit `t`: act at the named time steps only, row by row; other steps and rows are untouched."""
        site, iv = slot.site, slot.intervention

        def set_(x: Tensor, hook: Any) -> Tensor | None:
            t = hook.step
            view = to_view(site, x)
            pairs = None if plan.base_sel is None else plan.base_sel.step_rows(t)
            if pairs is not None and not pairs:
                return None
            source = plan.given if plan.source == "given" else None
            if plan.source == "run":
                source = view.clone()
                for row, j in pairs if pairs is not None else [(r, None) for r in range(view.shape[0])]:
                    src_t = t if j is None else plan.src_sel.levels[0][row][j]
                    if src_t not in plan.store:
                        raise ValueError(f"intervention {slot.key}: source time step {src_t} never happened on the "
                                         f"source run ({len(plan.store)} steps)")
                    source[row] = plan.store[src_t][row]
            new = self._apply(slot, view, source, plan.subspaces)
            if isinstance(iv, CollectIntervention):
                collected[slot.key].append(new if pairs is None else new[[r for r, _ in pairs]])
                return None
            if pairs is not None:
                rows = torch.zeros(view.shape[0], 1, dtype=torch.bool, device=view.device)
                rows[[r for r, _ in pairs]] = True
                new = torch.where(rows, new.to(view.dtype), view)
            return from_view(site, new.to(view.dtype), x)
        return set_

    def _apply(self, slot: Slot, base: Tensor, source: Tensor | None, subspaces: Any,
               selected: bool = True) -> Tensor:
        """Call the intervention, flattening the selected units into one vector first where pyvene does (see
        `Intervention.flattens_units`). A whole tensor (no unit_locations) is not flattened: the intervention
        then acts on every position's vector."""
        iv = slot.intervention
        if not (selected and iv.flattens_units and base.dim() > 2):
            return iv(base, source, subspaces)
        shape = base.shape
        if base.dim() == 4:  # (b, h, s, d) -> (b, s, h * d)
            fl = lambda t: t.permute(0, 2, 1, 3).reshape(shape[0], shape[2], -1)
            unfl = lambda t: t.reshape(shape[0], shape[2], shape[1], shape[3]).permute(0, 2, 1, 3)
        else:  # (b, n, d) -> (b, n * d)
            fl = lambda t: t.reshape(shape[0], -1)
            unfl = lambda t: t.reshape(shape)
        flat = fl(base)
        if iv.embed_dim is not None and flat.shape[-1] != iv.embed_dim:
            raise ValueError(f"intervention {slot.key} was built for {iv.embed_dim} dims (max_number_of_units="
                             f"{slot.rep.max_number_of_units}) but got {flat.shape[-1]}: set max_number_of_units to "
                             f"the number of units you select")
        if source is not None and source.shape == base.shape:
            source = fl(source)
        return unfl(iv(flat, source, subspaces))

    def _run_sources(self, sources: list[Any], plans: list[Plan], groups: list[int],
                     prev: list[tuple[Site, str, Callable]] | None = None) -> None:
        for g in groups:
            members = [(s, p) for s, p in zip(self.slots, plans) if s.group == g and p.source == "run"]
            if not members and not prev:
                continue
            counter = [len(members)]
            getters = [self._getter(s, p, counter) for s, p in members]
            if any(s.site.view in ("step", "step_slice") for s, _ in members) or not members:
                counter[0] = -1  # recurrent sites fire once per step: run to the end
            with self._attached((prev or []) + getters):
                try:
                    self.model(**sources[g])
                except StopForward:
                    pass

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
        srcs = self._sources(sources)
        given = self._given(source_representations if source_representations is not None else activations_sources)
        plans = self._plan(base, srcs, unit_locations, subspaces, given)
        extra = {k: v for k, v in (("labels", labels), ("use_cache", use_cache)) if v is not None}
        original = self.model(**base, **extra) if output_original_output else None
        collected: dict[str, list[Tensor]] = {s.key: [] for s in self.slots}
        setters = lambda g: [self._setter(s, p, collected) for s, p in zip(self.slots, plans)
                             if (g is None or s.group == g) and p.source != "skip"]
        if self.mode == "parallel":
            if srcs is not None:
                self._run_sources(srcs, plans, list(range(self.n_groups)))
            active = setters(None)
        else:
            if srcs is None:
                raise ValueError("serial mode needs sources: one per group")
            for g in range(self.n_groups):
                self._run_sources(srcs, plans, [g], prev=setters(g - 1) if g > 0 else None)
            active = setters(self.n_groups - 1)
        with self._attached(active):
            out = self.model(**base, **extra)
        return self._pack(original, out, collected, return_dict)

    def _pack(self, original: Any, out: Any, collected: dict[str, list[Tensor]], return_dict: bool | None) -> Any:
        has_collect = any(isinstance(s.intervention, CollectIntervention) for s in self.slots)
        acts = flatten_collected(self.slots, collected)
        if return_dict:
            return IntervenableModelOutput(original, out, acts if has_collect else None)
        if has_collect:
            return (original, acts), out
        return original, out

    def generate(self, base: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Generate with interventions; see `hookvene.generate.intervened_generate`."""
        from hookvene.generate import intervened_generate

        return intervened_generate(self, base, **kwargs)

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

    # -- save / load (hookvene/serialization.py) ---------------------------------------------------------------

    def save(self, save_directory: str, include_model: bool = False, **_: Any) -> None:
        """Write `config.json` and `interventions.safetensors` (trainable weights and constant sources)."""
        from hookvene.serialization import save_intervenable

        save_intervenable(self, save_directory, include_model)

    @staticmethod
    def load(load_directory: str, model: nn.Module, include_model: bool = False, **_: Any) -> "IntervenableModel":
        """Rebuild a saved IntervenableModel on `model` (weights and constant sources restored)."""
        from hookvene.serialization import load_intervenable

        return load_intervenable(load_directory, model, include_model)
