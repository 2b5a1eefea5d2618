"""One call's interventions compiled into hook functions, attached to a model for one forward.

Everything in hookvene that intervenes goes through this module, and every hook function it makes is attached
the same way (`attach`), for one forward, and removed on exit, even on error:

    slots = build_slots(config, model)                    # once per IntervenableModel: sites and interventions
    plan = make_plan(slots, base, sources=[...], unit_locations=..., subspaces=..., source_representations=...)
    plan.read_sources(model)                              # source runs, each stopped after its last read
    with plan.attached(model):                            # the base run, interventions written in
        out = model(**base)
    plan.collected()                                      # what CollectInterventions gathered

`IntervenableModel.forward` and `.generate` do exactly that; the sweeps compile their cells with `patch_rows`
(many per-row patches in one vectorised write per hook) and attach them with `attach`.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
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

HookFn = Callable[[Tensor, Any], Tensor | None]


# -- attaching ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attachment:
    """One function on one hook point or, for a registered foreign model, on one module's output or input."""

    name: str  # hook name (or the foreign model's module path)
    fn: HookFn
    module_hook: str | None = None  # "register_forward_hook" / "register_forward_pre_hook" for foreign models


# The attach block whose forward passes are running in this thread (a ContextVar: each thread has its own).
_ACTIVE: ContextVar[object | None] = ContextVar("hookvene_active_attach", default=None)


@contextmanager
def attach(model: nn.Module, attachments: Iterable[Attachment]) -> Iterator[None]:
    """Attach functions for the forward passes run inside this `with` block; exactly these are removed on exit,
    even on error.

    The functions act only on forward passes run by the thread that entered the block, and not inside a nested
    `attach` (another call, e.g. an IntervenableModel called from a hook): the hook lists are shared by every
    thread, so a plain forward of the same model in another thread, or another call's, would otherwise pick them
    up. There they pass the activation through untouched. Nest no `attach` inside another for the same pass."""
    token = object()
    scoped = [Attachment(a.name, _only_in(token, a.fn), a.module_hook) for a in attachments]
    with ExitStack() as stack:
        hooked = [(a.name, a.fn) for a in scoped if a.module_hook is None]
        if hooked:
            stack.enter_context(model.hooks(fwd_hooks=hooked))
        for a in scoped:
            if a.module_hook is not None:
                stack.callback(_module_hook(model, a).remove)
        reset = _ACTIVE.set(token)
        stack.callback(_ACTIVE.reset, reset)
        yield


def _only_in(token: object, fn: HookFn) -> HookFn:
    def scoped(x: Tensor, hook: Any) -> Tensor | None:
        return fn(x, hook) if _ACTIVE.get() is token else None
    return scoped


def _module_hook(model: nn.Module, a: Attachment) -> Any:
    """pyvene-style torch hook on a foreign model's module (its output, or its first input for pre-hooks)."""
    module = module_at(model, a.name)
    if a.module_hook == "register_forward_pre_hook":
        def pre(mod: nn.Module, args: tuple) -> Any:
            new = a.fn(args[0], None)
            return None if new is None else (new, *args[1:])
        return module.register_forward_pre_hook(pre)

    def post(mod: nn.Module, args: tuple, output: Any) -> Any:
        x = output[0] if isinstance(output, tuple) else output
        new = a.fn(x, None)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return module.register_forward_hook(post)


# -- slots: a config resolved on a model ----------------------------------------------------------------------------

@dataclass
class Slot:
    """One configured intervention: its key, where it acts, what it does, and which source group feeds it."""

    key: str
    rep: RepresentationConfig
    site: Site
    intervention: Intervention
    group: int


def representation_key(rep: RepresentationConfig, seen: dict[str, int]) -> str:
    unit = rep.unit.replace(".", "_")
    comp = rep.component.replace(".", "_")
    stem = f"layer_{rep.layer}_comp_{comp}_unit_{unit}_nunit_{rep.max_number_of_units}"
    n = seen.get(stem, 0)
    seen[stem] = n + 1
    return f"{stem}#{n}"


def group_index(config: IntervenableConfig) -> list[int]:
    """Group id per representation: sources[g] feeds group g; groups are ordered by group_key."""
    keys = [r.group_key for r in config.representations]
    if all(k is None for k in keys):
        return list(range(len(keys)))
    if any(k is None for k in keys):
        raise ValueError("group_key is set on some representations but not all; set it on every one")
    order = sorted(set(keys))
    return [order.index(k) for k in keys]


def build_slots(config: IntervenableConfig, model: nn.Module) -> list[Slot]:
    """Resolve every representation's site on `model` and build its intervention (linked ones share one)."""
    slots, seen, linked = [], {}, {}
    for i, (rep, group) in enumerate(zip(config.representations, group_index(config))):
        if not isinstance(rep.layer, int) or isinstance(rep.layer, bool):  # "0" or 1.0 would build a wrong name
            raise TypeError(f"representation {i} ({rep.component!r}): layer must be an int (a block index), got "
                            f"{type(rep.layer).__name__} {rep.layer!r}")
        site = resolve(model, rep.layer, rep.component, rep.unit)
        link = rep.intervention_link_key
        if link is not None and link in linked:
            intervention = linked[link]  # linked representations share one object (and its weights)
        else:
            args = {k: v for k, v in rep._asdict().items() if k not in ("intervention_type", "intervention")}
            dim = site.dim * rep.max_number_of_units if site.dim is not None else None
            intervention = build_intervention(config.type_of(i), **args, embed_dim=dim)
            if link is not None:
                linked[link] = intervention
        slots.append(Slot(representation_key(rep, seen), rep, site, intervention, group))
    return slots


# -- views: how pyvene saw each hook tensor (see components.py) ------------------------------------------------------

def to_view(site: Site, x: Tensor) -> Tensor:
    if site.view == "merge_heads":
        return x.reshape(*x.shape[:2], -1)
    if site.view == "heads":
        return x.permute(0, 2, 1, 3)
    if site.gate is not None:  # one third of a fused (r | z | n) projection
        width = x.shape[-1] // 3
        return x[..., site.gate * width:(site.gate + 1) * width]
    return x


def from_view(site: Site, v: Tensor, x: Tensor) -> Tensor:
    if site.view == "merge_heads":
        return v.reshape(x.shape)
    if site.view == "heads":
        return v.permute(0, 2, 1, 3)
    if site.gate is not None:
        width = x.shape[-1] // 3
        return torch.cat([x[..., :site.gate * width], v, x[..., (site.gate + 1) * width:]], dim=-1)
    return v


UNIT_NAMES = {"pos": ("position",), "h": ("head",), "h.pos": ("head", "position"), "t": ("time step",)}


# -- one call ---------------------------------------------------------------------------------------------------

@dataclass
class SlotPlan:
    """One slot's instructions for one call: where it reads and writes, and what feeds it."""

    base_sel: Selection | None  # None: the whole tensor
    src_sel: Selection | None
    subspaces: Any
    feed: str  # "constant" (needs no source), "given" (source_representations), "run" (a source run), "skip"
    given: Tensor | None = None
    store: dict[Any, Tensor] = field(default_factory=dict)  # activations read on the source run (by time step)


def batch_size_of(inputs: Mapping[str, Any]) -> int:
    for v in inputs.values():
        if isinstance(v, Tensor):
            return v.shape[0]
    raise ValueError("inputs hold no tensor: pass the tokenizer's output (a dict with input_ids) or inputs_embeds")


class Plan:
    """One call's interventions on a model: source runs to read, hook functions to write, activations collected.

    Build with `make_plan`. Parallel mode: every group's source run reads its sites, then the base run writes
    them all. Serial mode: group g's writes act on the source run of group g + 1, the last group's on the base.
    """

    def __init__(self, slots: Sequence[Slot], slot_plans: list[SlotPlan], sources: list[Any] | None, mode: str,
                 collected: dict[str, list[Any]] | None = None) -> None:
        self.slots, self.slot_plans, self.sources, self.mode = list(slots), slot_plans, sources, mode
        self.n_groups = max((s.group for s in self.slots), default=-1) + 1
        # a dict shared with other plans of the same call (generation: the prompt's and the decode steps')
        self.collected_by_key = collected if collected is not None else {s.key: [] for s in self.slots}

    def writes(self, group: int | None = None) -> list[Attachment]:
        """The hook functions that write the interventions (of one group, or all)."""
        return [self._setter(s, p) for s, p in zip(self.slots, self.slot_plans)
                if (group is None or s.group == group) and p.feed != "skip"]

    def attached(self, model: nn.Module) -> Any:
        """Context manager: the base run's writes attached to `model`."""
        return attach(model, self.writes(None if self.mode == "parallel" else self.n_groups - 1))

    def read_sources(self, model: nn.Module) -> None:
        """Run the sources, reading each slot's activations; a run stops once everything it feeds is read."""
        if self.mode == "parallel":
            if self.sources is not None:
                for g in range(self.n_groups):
                    self._run_source(model, g, [])
            return
        if self.sources is None:
            raise ValueError("serial mode needs sources: one per group")
        for g in range(self.n_groups):
            self._run_source(model, g, self.writes(g - 1) if g > 0 else [])

    def has_collect(self) -> bool:
        return any(isinstance(s.intervention, CollectIntervention) for s in self.slots)

    def collected(self) -> list[Tensor]:
        """pyvene's layout: one tensor per example (batch dim dropped) per hook call, slots in order. A time-step
        site fires once per step: its (d,) tensors come in batch order, each example's steps in the order
        unit_locations names them (time order without unit_locations)."""
        out: list[Tensor] = []
        for s in self.slots:
            got = self.collected_by_key[s.key]
            if s.site.view == "step":
                out += [v for _, _, v in sorted(got, key=lambda g: (g[0], g[1]))]
            else:
                out += [row for t in got for row in t]
        return out

    # -- reading ---------------------------------------------------------------------------------------------

    def _run_source(self, model: nn.Module, group: int, prev: list[Attachment]) -> None:
        members = [(s, p) for s, p in zip(self.slots, self.slot_plans) if s.group == group and p.feed == "run"]
        if not members and not prev:
            return
        counter = [len(members)]
        reads = [self._getter(s, p, counter) for s, p in members]
        if any(s.site.view == "step" for s, _ in members) or not members:
            counter[0] = -1  # recurrent sites fire once per step: run to the end
        with attach(model, prev + reads):
            try:
                model(**self.sources[group])
            except StopForward:
                pass

    def _getter(self, slot: Slot, plan: SlotPlan, counter: list[int]) -> Attachment:
        site = slot.site
        name = site.skip_from if slot.intervention.uses_module_input else site.hook
        if slot.intervention.uses_module_input and name is None:
            raise ValueError(f"SkipIntervention needs a component whose module input has the same shape "
                             f"(block_output, attention_output, mlp_output, cell_output); got {slot.rep.component!r}")
        what = f"source of intervention {slot.key} ({site.hook})"

        def get(x: Tensor, hook: Any) -> None:
            view = to_view(site, x)
            if site.view == "step":
                plan.store[hook.step] = view
                return
            plan.store[None] = _gather(view, plan.src_sel, slot, what)
            counter[0] -= 1
            if counter[0] == 0:
                raise StopForward
        return Attachment(name, get, site.module_hook)

    # -- writing ---------------------------------------------------------------------------------------------

    def _setter(self, slot: Slot, plan: SlotPlan) -> Attachment:
        site, iv = slot.site, slot.intervention
        what = f"intervention {slot.key} ({site.hook})"
        collected = self.collected_by_key[slot.key]
        if site.view == "step":
            return Attachment(site.hook, _step_setter(slot, plan, collected), site.module_hook)

        def set_(x: Tensor, hook: Any) -> Tensor | None:
            view = to_view(site, x)
            base = _gather(view, plan.base_sel, slot, what)
            source = plan.given if plan.feed == "given" else plan.store.get(None)
            if isinstance(source, Tensor):  # read on another device (a model across GPUs, or given on the CPU)
                source = source.to(view.device)
            new = _apply(slot, base, source, plan.subspaces, plan.base_sel is not None)
            if isinstance(iv, CollectIntervention):
                collected.append(new)
                return None
            if plan.base_sel is None:
                return from_view(site, new.to(view.dtype).expand_as(view), x)
            return from_view(site, view.index_put(plan.base_sel.index(view.device), new.to(view.dtype)), x)
        return Attachment(site.hook, set_, site.module_hook)


def _gather(view: Tensor, sel: Selection | None, slot: Slot, what: str) -> Tensor:
    if sel is None:
        return view
    unit = slot.rep.unit
    sel.check(tuple(view.shape), slot.site.units[unit], what, UNIT_NAMES.get(unit, (unit, unit)))
    return view[sel.index(view.device)]


def _step_setter(slot: Slot, plan: SlotPlan, collected: list[tuple[int, int, Tensor]]) -> HookFn:
    """Unit `t`: act at the named time steps only, row by row; other steps and rows are untouched."""
    site, iv = slot.site, slot.intervention

    def set_(x: Tensor, hook: Any) -> Tensor | None:
        t = hook.step
        view = to_view(site, x)
        pairs = None if plan.base_sel is None else plan.base_sel.step_rows(t)
        if pairs is not None and not pairs:
            return None
        source = plan.given if plan.feed == "given" else None
        if plan.feed == "run":
            source = view.clone()
            for row, j in pairs if pairs is not None else [(r, None) for r in range(view.shape[0])]:
                src_t = t if j is None else plan.src_sel.levels[0][row][j]
                if src_t not in plan.store:
                    raise ValueError(f"intervention {slot.key}: source time step {src_t} never happened on the "
                                     f"source run ({len(plan.store)} steps)")
                source[row] = plan.store[src_t][row]
        new = _apply(slot, view, source, plan.subspaces)
        if isinstance(iv, CollectIntervention):  # (row, unit slot, value): `Plan.collected` orders them by row
            for row, j in pairs if pairs is not None else [(r, t) for r in range(view.shape[0])]:
                collected.append((row, j, new[row]))
            return None
        if pairs is not None:
            rows = torch.zeros(view.shape[0], 1, dtype=torch.bool, device=view.device)
            rows[[r for r, _ in pairs]] = True
            new = torch.where(rows, new.to(view.dtype), view)
        return from_view(site, new.to(view.dtype), x)
    return set_


def _apply(slot: Slot, base: Tensor, source: Tensor | None, subspaces: Any, selected: bool = True) -> Tensor:
    """Call the intervention, flattening the selected units into one vector first where pyvene does (see
    `Intervention.flattens_units`). A whole tensor (no unit_locations) is not flattened: the intervention then
    acts on every position's vector."""
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


# -- compiling one call ------------------------------------------------------------------------------------------

def _locations(slots: Sequence[Slot], mode: str, n_groups: int, unit_locations: Any,
               batch: int) -> list[tuple[Any, Any]]:
    """Per slot: (source location, base location); None = the whole tensor."""
    n = len(slots)
    if unit_locations is None:
        return [(None, None)] * n
    if not isinstance(unit_locations, Mapping):
        raise ValueError("unit_locations must be a dict such as {'sources->base': 3} or {'base': [0, 1]}")
    if mode == "parallel":
        valid = {"sources->base", "base"}
        bad = set(unit_locations) - valid
        if bad or len(unit_locations) != 1:
            raise ValueError(f"parallel mode takes one unit_locations key, 'sources->base' or 'base'; got "
                             f"{list(unit_locations)}")
        key, value = next(iter(unit_locations.items()))
        return list(zip(*parse_pair(value, n, batch, key == "base")))
    last = f"source_{n_groups - 1}->base"
    valid = {f"source_{g}->source_{g + 1}" for g in range(n_groups - 1)} | {last}
    bad = set(unit_locations) - valid
    if bad:
        raise ValueError(f"serial mode keys are {sorted(valid)}; got unknown {sorted(bad)}")
    out: list[tuple[Any, Any]] = [(None, None)] * n
    for g in range(n_groups):
        key = f"source_{g}->base" if g == n_groups - 1 else f"source_{g}->source_{g + 1}"
        members = [i for i, s in enumerate(slots) if s.group == g]
        if key not in unit_locations:
            raise ValueError(f"serial mode needs unit_locations[{key!r}]")
        src, base = parse_pair(unit_locations[key], len(members), batch, False)
        for i, s, b in zip(members, src, base):
            out[i] = (s, b)
    return out


def _sources(sources: Any, n_groups: int) -> list[Any] | None:
    if sources is None:
        return None
    sources = [sources] if isinstance(sources, Mapping | Tensor) else list(sources)  # never the caller's list
    if len(sources) == 1 and n_groups > 1:
        sources = sources * n_groups
    if len(sources) != n_groups:
        raise ValueError(f"{len(sources)} sources for {n_groups} intervention groups; pass one source per "
                         f"group (None skips that group) or a single source for all")
    return [None if s is None else as_inputs(s) for s in sources]


def _given(slots: Sequence[Slot], reps: Any) -> list[Tensor | None]:
    n = len(slots)
    if reps is None:
        return [None] * n
    if isinstance(reps, Tensor):
        return [reps] * n
    if isinstance(reps, Mapping):
        keys = {s.key for s in slots}
        bad = [k for k in reps if k not in keys and k.replace(".", "_") not in keys]
        if bad:
            raise ValueError(f"source_representations for unknown keys {bad}; keys: {sorted(keys)}")
        norm = {k.replace(".", "_"): v for k, v in reps.items()}
        return [norm.get(s.key) for s in slots]
    reps = list(reps)
    if len(reps) != n:
        raise ValueError(f"{len(reps)} source_representations for {n} interventions")
    return reps


def make_plan(slots: Sequence[Slot], base: Any, *, sources: Any = None, unit_locations: Any = None,
              subspaces: Any = None, source_representations: Any = None, mode: str = "parallel",
              collected: dict[str, list[Any]] | None = None) -> Plan:
    """Compile one call: `base` is the base run's inputs (a dict or a token tensor), the rest as in
    `IntervenableModel.forward`. Every location is checked here, before any forward runs."""
    base = as_inputs(base)
    batch = batch_size_of(base)
    n_groups = max((s.group for s in slots), default=-1) + 1
    srcs = _sources(sources, n_groups)
    locs = _locations(slots, mode, n_groups, unit_locations, batch)
    subs = parse_subspaces(subspaces, len(slots), batch)
    plans = []
    for slot, (src_loc, base_loc), sub, given in zip(slots, locs, subs, _given(slots, source_representations)):
        what = f"intervention {slot.key} ({slot.site.hook})"
        unit = slot.rep.unit if slot.site.view != "step" else "t"
        iv = slot.intervention
        needs_source = not (iv.is_source_constant or isinstance(iv, CollectIntervention))
        if given is not None:
            feed = "given"
        elif not needs_source:
            feed = "constant"
        elif srcs is None:
            if isinstance(iv, LambdaIntervention):
                feed = "constant"
            elif unit_locations is None:  # nothing asked for at all: a plain run, as in pyvene
                feed = "skip"
            else:
                raise ValueError(f"{what}: {type(iv).__name__} needs a source; pass sources=[...] (one per "
                                 f"group), source_representations=..., or a source_representation in the config")
        else:
            feed = "run" if srcs[slot.group] is not None else "skip"
        base_sel = make_selection(base_loc, unit, batch, what)
        src_batch = batch_size_of(srcs[slot.group]) if feed == "run" else batch
        src_sel = make_selection(src_loc, unit, src_batch, what) if src_loc is not None else base_sel
        if unit == "t":
            _check_steps(base_sel, base, what)
            if feed == "run":
                _check_steps(src_sel, srcs[slot.group], f"{what}, source")
        plans.append(SlotPlan(base_sel, src_sel, sub, feed, given))
    return Plan(slots, plans, srcs, mode, collected)


def _check_steps(sel: Selection | None, inputs: Mapping[str, Any], what: str) -> None:
    """Unit `t`: every named time step happens on this input. The time loop never reaches a step outside
    0..T-1, so such a step would otherwise be skipped silently (negative steps are not counted from the end)."""
    x = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if sel is None or not isinstance(x, Tensor) or x.dim() < 2:
        return
    n = x.shape[1]
    bad = [t for row in sel.levels[0] for t in row if not 0 <= t < n]
    if bad:
        raise ValueError(f"{what}: time step {bad[0]} is out of range; this input has {n} time steps (0..{n - 1})")


# -- sweeps: many cells of plain patches, one vectorised write per hook -------------------------------------------

@dataclass(frozen=True)
class Patch:
    """Overwrite `hook`'s activation at `index` (over the dims after batch; None = the whole dim) with the stored
    activation `stored[store or hook]` at the same index. `pos_dim` says which entry of `index` is the (query)
    position, so that a sweep can resume a run after position p and shift the index."""

    hook: str
    index: tuple[int | None, ...] = ()
    store: str | None = None
    pos_dim: int = 0


def _row_index(rows: Tensor, ints: Tensor, pattern: tuple[bool, ...], shape: Sequence[int]) -> tuple[Tensor, ...]:
    """Advanced index selecting, per row, the given ints at int dims and everything at None dims."""
    n, n_full = rows.shape[0], sum(1 for is_int in pattern if not is_int)
    lead = (n,) + (1,) * n_full
    idx, col, axis = [rows.view(lead)], 0, 1
    for dim, is_int in enumerate(pattern):
        if is_int:
            idx.append(ints[:, col].view(lead))
            col += 1
        else:
            size = [1] * (1 + n_full)
            size[axis] = shape[dim]
            idx.append(torch.arange(shape[dim], device=rows.device).view(size))
            axis += 1
    return tuple(idx)


def patch_rows(cells: Mapping[int, Sequence[Patch]] | Sequence[Sequence[Patch]], cell_of_row: Tensor,
               store_row: Tensor, stored: Mapping[str, Tensor]) -> list[Attachment]:
    """Hook functions applying every batch row's patches: row r applies the patches `cells[cell_of_row[r]]`,
    reading `stored[...][store_row[r]]`; one vectorised index_put per (hook, store, index pattern)."""
    groups: dict[tuple[str, str, tuple[bool, ...]], tuple[list[int], list[list[int]]]] = {}
    cell_rows: dict[int, list[int]] = {}
    for r, c in enumerate(cell_of_row.tolist()):
        cell_rows.setdefault(c, []).append(r)
    for c, rows in cell_rows.items():
        for p in cells[c]:
            key = (p.hook, p.store or p.hook, tuple(i is not None for i in p.index))
            rs, ints = groups.setdefault(key, ([], []))
            rs += rows
            ints += [[i for i in p.index if i is not None]] * len(rows)
    out = []
    device = store_row.device
    for (hook, store, pattern), (rs, ints) in groups.items():
        rows_t = torch.tensor(rs, device=device)
        ints_t = torch.tensor(ints, dtype=torch.long, device=device).view(len(rs), -1)
        src = stored[store]

        def fn(x: Tensor, _hook: Any, rows_t: Tensor = rows_t, ints_t: Tensor = ints_t, pattern=pattern,
               src: Tensor = src) -> Tensor:
            dst = _row_index(rows_t, ints_t, pattern, x.shape[1:])
            val = src[(store_row[rows_t].view(dst[0].shape),) + dst[1:]]
            return x.index_put(dst, val.to(x.dtype))
        out.append(Attachment(hook, fn))
    return out
