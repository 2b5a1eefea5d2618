"""pyvene component names -> hookvene hook names, per architecture.

A component resolves to a `Site`: the hook it reads and writes, and how pyvene *viewed* that tensor, so the shapes
an intervention sees match pyvene's (e.g. `head_attention_value_output` is `attn.hook_z`, stored as
(batch, pos, head, d_head), seen as (batch, head, pos, d_head)). Views:

    flat         the hook tensor as is: (batch, pos, d) for streams, (batch, d) per step for the GRU
    merge_heads  (batch, pos, head, d_head) seen as (batch, pos, head * d_head)     e.g. query_output
    heads        (batch, pos, head, d_head) seen as (batch, head, pos, d_head)      e.g. head_query_output
    pattern      the attention pattern (batch, head, q_pos, k_pos) as is          attention_weight
    slice        a slice of the last dimension (the GRU's fused gate projections)

Units name view dimensions: `pos` -> 1 on flat/merge_heads views; `h` -> 1 and `h.pos` -> (1, 2) on heads and
pattern views (for attention_weight `h.pos` selects heads, then query positions); `t` -> the GRU time step.
Unlike pyvene, `pos` on a head component is an error instead of silently indexing heads.

The tables are plain dicts in `type_to_module_mapping` / `type_to_dimension_mapping`, keyed by model class, so users
can add aliases, or register module paths for a model hookvene does not implement (pyvene's extension point).
"""

from dataclasses import dataclass
from typing import Any

from torch import nn

from hookvene.hooks import unknown_name_error

VIEW_UNITS: dict[str, dict[str, tuple[int, ...]]] = {
    "flat": {"pos": (1,)},
    "merge_heads": {"pos": (1,)},
    "heads": {"h": (1,), "h.pos": (1, 2)},
    "pattern": {"h": (1,), "h.pos": (1, 2)},
    "step": {"t": ()},
    "step_slice": {"t": ()},
}


@dataclass(frozen=True)
class Site:
    """Where an intervention acts: one hook (or, for registered foreign models, one module's input/output)."""

    hook: str
    view: str = "flat"
    dim: int | None = None  # width of one unit: pyvene's component dimension
    last_slice: tuple[int, int] | None = None  # step_slice: columns [a, b) of the hook tensor
    skip_from: str | None = None  # the hook holding this module's input (for SkipIntervention)
    module_hook: str | None = None  # "register_forward_hook" / "register_forward_pre_hook" for foreign models

    @property
    def units(self) -> dict[str, tuple[int, ...]]:
        return VIEW_UNITS[self.view]


# A table entry: component -> (hook template with {layer}, view, dim attribute on the config, skip-from component)
Entry = tuple[str, str, str, str | None]


def _transformer_table(prefix: str = "", mlp_in: str = "ln2", cross: bool = False) -> dict[str, Entry]:
    b = prefix + "blocks.{layer}."
    table: dict[str, Entry] = {
        "block_input": (b + "hook_resid_pre", "flat", "d_model", None),
        "block_output": (b + "hook_resid_post", "flat", "d_model", "block_input"),
        "attention_input": (b + "ln1.hook_normalized", "flat", "d_model", None),
        "attention_output": (b + "hook_attn_out", "flat", "d_model", "attention_input"),
        "attention_value_output": (b + "attn.hook_z", "merge_heads", "inner", None),
        "head_attention_value_output": (b + "attn.hook_z", "heads", "d_head", None),
        "attention_weight": (b + "attn.hook_pattern", "pattern", "n_ctx", None),
        "attention_scores": (b + "attn.hook_attn_scores", "pattern", "n_ctx", None),
        "query_output": (b + "attn.hook_q", "merge_heads", "inner", None),
        "key_output": (b + "attn.hook_k", "merge_heads", "inner", None),
        "value_output": (b + "attn.hook_v", "merge_heads", "inner", None),
        "head_query_output": (b + "attn.hook_q", "heads", "d_head", None),
        "head_key_output": (b + "attn.hook_k", "heads", "d_head", None),
        "head_value_output": (b + "attn.hook_v", "heads", "d_head", None),
        "mlp_input": (b + f"{mlp_in}.hook_normalized", "flat", "d_model", None),
        "mlp_pre_activation": (b + "mlp.hook_pre", "flat", "d_mlp", None),  # not in pyvene: the MLP's input to act
        "mlp_activation": (b + "mlp.hook_post", "flat", "d_mlp", None),
        "mlp_output": (b + "hook_mlp_out", "flat", "d_model", "mlp_input"),
        "residual_mid": (b + "hook_resid_mid", "flat", "d_model", None),
    }
    if cross:
        table |= {
            "cross_attention_input": (b + "ln2.hook_normalized", "flat", "d_model", None),
            "cross_attention_output": (b + "hook_cross_attn_out", "flat", "d_model", "cross_attention_input"),
            "cross_attention_value_output": (b + "cross_attn.hook_z", "merge_heads", "inner", None),
            "head_cross_attention_value_output": (b + "cross_attn.hook_z", "heads", "d_head", None),
            "cross_attention_weight": (b + "cross_attn.hook_pattern", "pattern", "n_ctx", None),
            "cross_query_output": (b + "cross_attn.hook_q", "merge_heads", "inner", None),
            "cross_key_output": (b + "cross_attn.hook_k", "merge_heads", "inner", None),
            "cross_value_output": (b + "cross_attn.hook_v", "merge_heads", "inner", None),
            "head_cross_query_output": (b + "cross_attn.hook_q", "heads", "d_head", None),
            "head_cross_key_output": (b + "cross_attn.hook_k", "heads", "d_head", None),
            "head_cross_value_output": (b + "cross_attn.hook_v", "heads", "d_head", None),
            "residual_mid_cross": (b + "hook_resid_mid_cross", "flat", "d_model", None),
        }
    return table


GPT_TABLE = _transformer_table()
# T5: components are prefixed with their stack; bare names mean the encoder (pyvene's only T5 precedent).
T5_TABLE: dict[str, Entry] = {}
T5_TABLE |= {f"encoder.{k}": v for k, v in _transformer_table("encoder.").items()}
T5_TABLE |= {f"decoder.{k}": v for k, v in _transformer_table("decoder.", mlp_in="ln3", cross=True).items()}
T5_TABLE |= {k.removeprefix("encoder."): v for k, v in T5_TABLE.items() if k.startswith("encoder.")}
GRU_TABLE: dict[str, Entry] = {
    "cell_input": ("layers.{layer}.hook_in", "step", "d_in", None),
    "cell_output": ("layers.{layer}.hook_hidden", "step", "h_dim", "cell_input"),
    "reset_gate_input": ("layers.{layer}.hook_reset_pre", "step", "h_dim", None),
    "reset_gate_output": ("layers.{layer}.hook_reset", "step", "h_dim", None),
    "update_gate_input": ("layers.{layer}.hook_update_pre", "step", "h_dim", None),
    "update_gate_output": ("layers.{layer}.hook_update", "step", "h_dim", None),
    "new_gate_input": ("layers.{layer}.hook_candidate_pre", "step", "h_dim", None),
    "new_gate_output": ("layers.{layer}.hook_candidate", "step", "h_dim", None),
    "x2h_output": ("layers.{layer}.hook_x2h", "step", "3h", None),
    "h2h_output": ("layers.{layer}.hook_h2h", "step", "3h", None),
}
for _i, _gate in enumerate(("reset", "update", "new")):
    GRU_TABLE[f"{_gate}_x2h_output"] = ("layers.{layer}.hook_x2h", f"step_slice{_i}", "h_dim", None)
    GRU_TABLE[f"{_gate}_h2h_output"] = ("layers.{layer}.hook_h2h", f"step_slice{_i}", "h_dim", None)

# model class -> component table; filled by `register_hookvene_models()` and by users
type_to_module_mapping: dict[type, dict[str, Any]] = {}
# model class -> {component: (config-attribute expressions, ...)} for foreign models registered by users
type_to_dimension_mapping: dict[type, dict[str, tuple[str, ...]]] = {}


def register_hookvene_models() -> None:
    """Put hookvene's own model classes in the registry (done once at import of hookvene)."""
    import hookvene.models as m

    for name, table in (("GPT2", GPT_TABLE), ("GPT2LM", GPT_TABLE), ("GPTNeo", GPT_TABLE),
                        ("GPTNeoLM", GPT_TABLE), ("T5", T5_TABLE), ("T5LM", T5_TABLE), ("GRU", GRU_TABLE),
                        ("GRUClassifier", GRU_TABLE), ("GRULM", GRU_TABLE)):
        cls = getattr(m, name, None)
        if cls is not None:
            type_to_module_mapping.setdefault(cls, dict(table))


def _dim(cfg: Any, what: str) -> int | None:
    if what == "inner":  # all heads side by side (T5's n_heads * d_kv can differ from d_model)
        return cfg.n_heads * cfg.d_head
    if what == "3h":
        return 3 * cfg.h_dim
    return getattr(cfg, what, None)


def _n_layers(model: nn.Module, component: str) -> int | None:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if component.startswith("decoder."):
        return getattr(cfg, "n_decoder_layers", None)
    for attr in ("n_layers", "n_layer", "num_layers", "num_hidden_layers"):
        if getattr(cfg, attr, None) is not None:
            return getattr(cfg, attr)
    return None


def table_for(model: nn.Module) -> dict[str, Any] | None:
    if not type_to_module_mapping:
        register_hookvene_models()
    return type_to_module_mapping.get(type(model))


def resolve(model: nn.Module, layer: int, component: str, unit: str) -> Site:
    """The Site for (layer, component, unit) on `model`; clear errors for anything unknown or out of range."""
    table = table_for(model)
    hook_dict: dict[str, Any] | None = getattr(model, "hook_dict", None)
    if hook_dict is not None and component in hook_dict:  # a raw hook name: taken as is, flat view
        return _check_unit(Site(component, "flat"), component, unit, raw=True)
    if table is None:
        raise ValueError(f"no component table for {type(model).__name__}: register one in "
                         f"hookvene.type_to_module_mapping[{type(model).__name__}], or pass a hookvene model")
    if component not in table:
        names = list(table) + (list(hook_dict) if hook_dict else [])
        raise unknown_name_error(component, names, f"component for {type(model).__name__}")
    entry = table[component]
    if isinstance(entry, Site):
        return _check_unit(entry, component, unit)
    n_layers = _n_layers(model, component)
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range for {component!r}: the model has {n_layers} layers "
                         f"(0..{n_layers - 1})")
    if hook_dict is None:  # a foreign model registered pyvene-style: (module path with %s, hook type)
        return _foreign_site(model, layer, component, entry)
    template, view, dim_attr, skip = entry
    cfg = model.cfg
    last_slice = None
    if view.startswith("step_slice"):
        i, h = int(view[-1]), cfg.h_dim
        view, last_slice = "step_slice", (i * h, (i + 1) * h)
    prefix = component.rpartition(".")[0] + "." if "." in component else ""  # T5: decoder.* skips within decoder
    skip_from = table.get(prefix + skip, table.get(skip))[0].format(layer=layer) if skip else None
    site = Site(template.format(layer=layer), view, _dim(cfg, dim_attr), last_slice, skip_from)
    if site.hook not in hook_dict:
        raise ValueError(f"component {component!r} maps to hook {site.hook!r}, which this model does not have")
    return _check_unit(site, component, unit)


def _check_unit(site: Site, component: str, unit: str, raw: bool = False) -> Site:
    if raw and unit not in ("pos", "t"):
        raise ValueError(f"raw hook name {component!r} takes unit 'pos' (dimension 1) or 't', not {unit!r}")
    if raw and unit == "t":
        return Site(site.hook, "step", site.dim)
    if unit not in site.units:
        hint = " (pyvene's 'pos' here silently meant heads)" if unit == "pos" and "h" in site.units else ""
        raise ValueError(f"unit {unit!r} is not valid for component {component!r}{hint}; valid units: "
                         f"{', '.join(site.units)}")
    return site


def _foreign_site(model: nn.Module, layer: int, component: str, entry: Any) -> Site:
    path, hook_type = entry[0], entry[1]
    path = path % layer if "%s" in path else path
    module_at(model, path)  # fail now, with a clear message, if the path is wrong
    dims = type_to_dimension_mapping.get(type(model), {}).get(component, ())
    cfg = getattr(model, "config", None)
    dim = next((d for d in (_eval_dim(cfg, e) for e in dims) if d is not None), None)
    return Site(path, "flat", dim, module_hook=hook_type)


def _eval_dim(cfg: Any, expr: str) -> int | None:
    """pyvene's dimension proposals: config attributes combined with * and / (e.g. "d_model/num_heads")."""
    try:
        value: float = 1.0
        for i, part in enumerate(expr.replace("/", "*/").split("*")):
            if not part:
                continue
            div = part.startswith("/")
            v = float(part[1:] if div else part) if part.lstrip("/").isdigit() else getattr(cfg, part.lstrip("/"))
            value = value / v if div else (v if i == 0 else value * v)
        return int(value)
    except (AttributeError, TypeError, ValueError):
        return None


def module_at(model: nn.Module, path: str) -> nn.Module:
    """`encoder.block[3].layer[1]` -> that submodule."""
    m: Any = model
    for part in path.replace("]", "").replace("[", ".").split("."):
        try:
            m = m[int(part)] if part.isdigit() else getattr(m, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ValueError(f"module path {path!r} does not exist in {type(model).__name__}") from None
    return m

