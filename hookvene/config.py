"""Intervention configs with pyvene's fields and coercion rules: `RepresentationConfig` and `IntervenableConfig`.

`RepresentationConfig` keeps pyvene's positional field order, so `RepresentationConfig(0, "block_output", "pos", 1)`
reads as it does there. Departures from pyvene (documented in README "Semantics"): `add_intervention` works whatever
form `intervention_types` has, and each representation's type is simply its own `intervention_type` /
`intervention` if set, else the config-level one.
"""

import json
from collections.abc import Iterable
from typing import Any, NamedTuple

MODES = ("parallel", "serial")


class RepresentationConfig(NamedTuple):
    layer: int = 0
    component: str = "block_output"
    unit: str = "pos"
    max_number_of_units: int = 1
    low_rank_dimension: int | None = None
    intervention_type: type | None = None
    intervention: Any = None  # an intervention object or a plain function f(base, source[, subspaces])
    subspace_partition: list | None = None
    group_key: int | None = None
    intervention_link_key: int | None = None
    moe_key: int | None = None
    source_representation: Any = None  # a constant source tensor
    hidden_source_representation: bool | None = None
    latent_dim: int | None = None


def as_representation(item: Any) -> RepresentationConfig:
    if isinstance(item, RepresentationConfig):
        return item
    if isinstance(item, dict):
        unknown = set(item) - set(RepresentationConfig._fields)
        if unknown:
            raise ValueError(f"unknown RepresentationConfig field(s) {sorted(unknown)}; valid fields: "
                             f"{', '.join(RepresentationConfig._fields)}")
        return RepresentationConfig(**item)
    if isinstance(item, list | tuple):
        return RepresentationConfig(*item)
    raise ValueError(f"a representation must be a dict, a list or a RepresentationConfig, not {type(item).__name__}")


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class IntervenableConfig:
    """A list of representations (where to intervene) and intervention types (what to do there)."""

    def __init__(self, representations: Any = None, intervention_types: Any = None, mode: str = "parallel",
                 sorted_keys: list[str] | None = None, model_type: str | None = None,
                 intervention_dimensions: list | None = None, intervention_constant_sources: list | None = None,
                 intervention_settings: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        from hookvene.interventions import VanillaIntervention

        if representations is None:
            representations = [RepresentationConfig()]
        if isinstance(representations, dict | RepresentationConfig):
            representations = [representations]
        self.representations = [as_representation(r) for r in representations]
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        default = VanillaIntervention if intervention_types is None else intervention_types
        if isinstance(default, list | tuple) and len(default) != len(self.representations):
            raise ValueError(f"{len(default)} intervention_types for {len(self.representations)} representations")
        self.intervention_types: Any = list(default) if isinstance(default, list | tuple) else default
        for r in self.representations:
            if r.intervention_type is not None and r.intervention is not None:
                raise ValueError("a representation sets both intervention_type and intervention; set one")
        self.sorted_keys = sorted_keys
        self.model_type = model_type
        self.intervention_dimensions = intervention_dimensions
        self.intervention_constant_sources = intervention_constant_sources
        self.intervention_settings = intervention_settings  # by key: Intervention.settings(), as saved
        self.extra = kwargs

    def type_of(self, i: int) -> Any:
        """The intervention class (or object / function) for representation i."""
        r = self.representations[i]
        if r.intervention is not None:
            return r.intervention
        if r.intervention_type is not None:
            return r.intervention_type
        t = self.intervention_types
        return t[i] if isinstance(t, list) else t

    def add_intervention(self, representations: Any) -> None:
        """Append representations (a dict, a RepresentationConfig, or a list of them)."""
        if isinstance(representations, dict | RepresentationConfig):
            representations = [representations]
        new = [as_representation(r) for r in representations]
        if isinstance(self.intervention_types, list):  # keep the per-representation list aligned
            from hookvene.interventions import VanillaIntervention

            self.intervention_types += [r.intervention_type or r.intervention or VanillaIntervention for r in new]
        self.representations += new

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: classes become import paths, tensors and functions become placeholders."""
        reps = []
        for i, r in enumerate(self.representations):
            d = r._asdict()
            t = self.type_of(i)
            d["intervention_type"] = class_path(t) if isinstance(t, type) else None
            d["intervention"] = None if isinstance(t, type) else "PLACEHOLDER"  # an object or a function
            if r.source_representation is not None:
                d["source_representation"] = None
                d["hidden_source_representation"] = True
            reps.append(d)
        return {"representations": reps, "mode": self.mode, "sorted_keys": self.sorted_keys,
                "model_type": self.model_type, "intervention_dimensions": self.intervention_dimensions}

    @classmethod
    def from_dict(cls, d: dict[str, Any], intervention_types: Iterable[type] = ()) -> "IntervenableConfig":
        """Inverse of `to_dict`. Type names resolve only to hookvene's intervention classes, classes registered
        with `register_intervention`, and `intervention_types`: nothing named by the dict is imported."""
        from hookvene.interventions import intervention_class

        reps = []
        for r in d["representations"]:
            r = dict(r)
            name = r.get("intervention_type")
            if name is not None:
                if not isinstance(name, str):
                    raise ValueError(f"intervention_type must be a class name (a string), got {name!r}")
                r["intervention_type"] = intervention_class(name, intervention_types)
            if r.get("intervention") is not None:
                raise ValueError("this config was saved with an intervention object or function, which no file can "
                                 "hold; build the IntervenableModel again with it, or use an intervention_type")
            reps.append(as_representation(r))
        return cls(reps, mode=d.get("mode", "parallel"), sorted_keys=d.get("sorted_keys"),
                   model_type=d.get("model_type"), intervention_dimensions=d.get("intervention_dimensions"),
                   intervention_settings=d.get("intervention_settings"))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __repr__(self) -> str:  # plain JSON, as pyvene prints it
        return self.to_json_string()

    __str__ = __repr__
