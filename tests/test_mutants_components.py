"""hookvene.components' lookups, with every expectation spelled out: layer ranges per architecture and stack (T5's
decoder has its own count), pyvene-style registrations on foreign models (their config's layer count, their
dimension expressions), module paths, units, `eval_dim` and `module_at`. Written for the mutants of
hookvene/components.py that survived the rest of the suite (mutation/REPORT.md)."""

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hookvene as pv
from hookvene.components import (
    VIEW_UNITS,
    Site,
    eval_dim,
    module_at,
    module_path_site,
    resolve,
    table_for,
    type_to_dimension_mapping,
    type_to_module_mapping,
)


def _models():
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=16))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                             num_decoder_layers=3, num_heads=3, decoder_start_token_id=0))
    _, _, gru = pv.create_gru_classifier(pv.GRUConfig(h_dim=6, d_in=5, n_layer=2))
    return pv.from_pretrained(gpt2), pv.from_pretrained(t5), gru


GPT2, T5, GRU = _models()  # d_model 32, 16 positions; T5: d_model 16, 2 encoder and 3 decoder layers; GRU: width 6


# -- layer ranges --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, component, unit, n_layers", [
    (GPT2, "block_output", "pos", 2),
    (GPT2, "head_attention_value_output", "h", 2),
    (T5, "block_output", "pos", 2),  # a bare T5 name is the encoder's
    (T5, "encoder.attention_output", "pos", 2),
    (T5, "decoder.cross_attention_output", "pos", 3),
    (GRU, "cell_output", "t", 2),
])
def test_layers_out_of_range_are_refused_with_the_stack_s_count(model, component, unit, n_layers):
    last = resolve(model, n_layers - 1, component, unit)
    assert f".{n_layers - 1}." in last.hook
    for layer in (n_layers, n_layers + 5, -1):
        with pytest.raises(ValueError, match=rf"^layer {layer} is out of range for '{component}': the model has "
                                             rf"{n_layers} layers \(0\.\.{n_layers - 1}\)$"):
            resolve(model, layer, component, unit)


def test_t5_decoder_layer_beyond_the_encoder_count_resolves():
    site = resolve(T5, 2, "decoder.block_output", "pos")
    assert site.hook == "decoder.blocks.2.hook_resid_post" and site.dim == 16


# -- foreign models registered pyvene-style ------------------------------------------------------------------------

class Stack(nn.Module):
    """Three linear layers; `config` says how many under one of the names HF configs use."""

    def __init__(self, **config):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        if config:
            self.config = SimpleNamespace(**config)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture
def registered():
    type_to_module_mapping[Stack] = {"block_output": ("layers[%s]", "register_forward_hook"),
                                     "block_input": ("layers[%s]", "register_forward_pre_hook")}
    type_to_dimension_mapping[Stack] = {"block_output": ("missing", "hidden*2"), "block_input": ("width/2",)}
    try:
        yield
    finally:
        del type_to_module_mapping[Stack], type_to_dimension_mapping[Stack]


@pytest.mark.parametrize("attr", ["n_layer", "num_layers", "num_hidden_layers", "n_layers"])
def test_foreign_model_layer_count_from_its_config(registered, attr):
    model = Stack(**{attr: 2}, hidden=3, width=10)  # says 2 layers (it has 3): the config is what counts
    site = resolve(model, 1, "block_output", "pos")
    assert site == Site("layers[1]", "flat", 6, module_hook="register_forward_hook")  # dim: the first that evaluates
    assert resolve(model, 0, "block_input", "pos") == Site("layers[0]", "flat", 5,
                                                          module_hook="register_forward_pre_hook")
    with pytest.raises(ValueError, match=r"^layer 2 is out of range for 'block_output': the model has 2 layers "
                                         r"\(0\.\.1\)$"):
        resolve(model, 2, "block_output", "pos")


def test_foreign_model_without_a_layer_count(registered):
    model = Stack()  # no config: no range check, but the module path must exist
    assert resolve(model, 2, "block_output", "pos") == Site("layers[2]", "flat", None,
                                                           module_hook="register_forward_hook")
    with pytest.raises(ValueError, match=r"^module path 'layers\[3\]' does not exist in Stack$"):
        resolve(model, 3, "block_output", "pos")


def test_foreign_registrations_without_sizes_a_layer_or_a_layer_count():
    """A component with no dimension expressions (or a class with none at all) gets dim None; a module path without
    %s is that module at every layer; a decoder component is range-checked by n_decoder_layers only; and a config
    naming its encoder layers (n_encoder_layers) is read for those before any other name."""
    type_to_module_mapping[Stack] = {"fixed": ("layers[0]", "register_forward_hook"),
                                     "decoder.block_output": ("layers[%s]", "register_forward_hook")}
    try:
        model = Stack(n_layer=2)
        assert resolve(model, 1, "fixed", "pos") == Site("layers[0]", "flat", None, module_hook="register_forward_hook")
        assert resolve(model, 2, "decoder.block_output", "pos").hook == "layers[2]"  # no n_decoder_layers: no check
        type_to_dimension_mapping[Stack] = {"other": ("n_layer",)}
        assert resolve(model, 1, "fixed", "pos").dim is None
        with pytest.raises(ValueError, match=r"^layer 2 is out of range for 'fixed': the model has 2 layers"):
            resolve(Stack(n_encoder_layers=2, n_layers=3), 2, "fixed", "pos")
        with pytest.raises(ValueError, match=r"^layer 1 is out of range for 'decoder\.block_output': the model has 1 "
                                             r"layers"):
            resolve(Stack(n_layers=3, n_decoder_layers=1), 1, "decoder.block_output", "pos")
    finally:
        del type_to_module_mapping[Stack]
        type_to_dimension_mapping.pop(Stack, None)


def test_an_unregistered_foreign_model_is_refused():
    with pytest.raises(ValueError, match=r"^no component table for Stack: register one in "
                                         r"hookvene\.type_to_module_mapping\[Stack\], or pass a hookvene model$"):
        resolve(Stack(), 0, "block_output", "pos")
    assert table_for(Stack()) is None and table_for(GPT2) is type_to_module_mapping[type(GPT2)]


# -- tables, sites, units ------------------------------------------------------------------------------------------

def test_site_at_fills_in_a_layer_and_a_config():
    cfg = SimpleNamespace(d_model=8, n_heads=2, d_head=3)
    site = Site("blocks.{layer}.hook_mlp_out", "flat", "d_model", skip_from="blocks.{layer}.ln2.hook_normalized")
    assert site.at(3, cfg) == Site("blocks.3.hook_mlp_out", "flat", 8, skip_from="blocks.3.ln2.hook_normalized")
    assert Site("blocks.{layer}.attn.hook_z", "heads", "n_heads*d_head").at(0, cfg).dim == 6
    assert Site("x.{layer}", "flat", 7).at(1, cfg) == Site("x.1", "flat", 7)  # an int dim is kept
    assert Site("hook_logits").at(1, cfg) == Site("hook_logits")
    assert Site("hook_logits").units == {"pos": (1,)} and Site("a", "heads").units == {"h": (1,), "h.pos": (1, 2)}
    assert {v: Site("a", v).units for v in VIEW_UNITS} == VIEW_UNITS


@pytest.mark.parametrize("expr, value", [
    ("d_model", 16), ("n_heads*d_head", 12), ("d_model/n_heads", 5), ("3*d_model", 48), ("d_model/2", 8),
    ("2*d_model/n_heads", 10), ("missing", None), ("d_model*missing", None), ("", 1),
])
def test_eval_dim(expr, value):
    assert eval_dim(SimpleNamespace(d_model=16, n_heads=3, d_head=4), expr) == value


def test_eval_dim_of_a_non_expression_is_none():
    assert eval_dim(SimpleNamespace(d_model=16), None) is None


def test_module_at():
    model = Stack()
    assert module_at(model, "layers[2]") is model.layers[2] and module_at(model, "layers.0") is model.layers[0]
    for path in ("layers[3]", "layers[0].nothing", "lyers"):
        with pytest.raises(ValueError, match=rf"^module path '{re.escape(path)}' does not exist in Stack$"):
            module_at(model, path)


def test_raw_hook_names_and_units():
    assert resolve(GPT2, 0, "blocks.1.hook_mlp_out", "pos") == Site("blocks.1.hook_mlp_out", "flat")
    assert resolve(GRU, 0, "layers.1.hook_hidden", "t") == Site("layers.1.hook_hidden", "step")
    with pytest.raises(ValueError, match=r"^raw hook name 'blocks\.1\.hook_mlp_out' takes unit 'pos' \(dimension 1\) "
                                         r"or 't', not 'h'$"):
        resolve(GPT2, 0, "blocks.1.hook_mlp_out", "h")
    with pytest.raises(ValueError, match=r"^unit 'pos' is not valid for component 'head_attention_value_output' "
                                         r"\(pyvene's 'pos' here silently meant heads\); valid units: h, h\.pos$"):
        resolve(GPT2, 0, "head_attention_value_output", "pos")
    with pytest.raises(ValueError, match=r"^unit 't' is not valid for component 'head_attention_value_output'; "
                                         r"valid units: h, h\.pos$"):  # the hint is for 'pos' only
        resolve(GPT2, 0, "head_attention_value_output", "t")
    with pytest.raises(ValueError, match=r"^unit 'h' is not valid for component 'mlp_output'; valid units: pos$"):
        resolve(GPT2, 0, "mlp_output", "h")
    with pytest.raises(ValueError, match=r"^unit 't' is not valid for component 'block_output'; valid units: pos$"):
        resolve(GPT2, 0, "block_output", "t")


def test_table_entries_that_are_not_sites_or_name_missing_hooks():
    table = type_to_module_mapping[type(GPT2)]
    table["bad_entry"] = "blocks.{layer}.hook_resid_pre"
    table["gone"] = Site("blocks.{layer}.hook_nothing")
    table["by_module"] = ("h[%s].mlp", "register_forward_hook")
    table["by_module_input"] = ("h[%s].mlp", "register_forward_pre_hook")
    table["fixed_module"] = ("h[0].mlp", "register_forward_hook")  # no %s: the same module at every layer
    try:
        with pytest.raises(ValueError, match=r"^component 'bad_entry' of GPT2LM is registered as "
                                             r"'blocks\.\{layer\}\.hook_resid_pre'; table entries for hooked models "
                                             r"are Sites, e\.g\. Site\('blocks\.\{layer\}\.hook_resid_pre'\)$"):
            resolve(GPT2, 0, "bad_entry", "pos")
        with pytest.raises(ValueError, match=r"^component 'gone' maps to hook 'blocks\.1\.hook_nothing', which this "
                                             r"model does not have$"):
            resolve(GPT2, 1, "gone", "pos")
        assert resolve(GPT2, 1, "by_module", "pos") == Site("blocks.1.hook_mlp_out", "flat", 32)
        assert resolve(GPT2, 1, "by_module_input", "pos") == Site("blocks.1.ln2.hook_normalized", "flat", 32)
        assert resolve(GPT2, 1, "fixed_module", "pos") == Site("blocks.0.hook_mlp_out", "flat", 32)
        with pytest.raises(ValueError, match=r"^unit 'h' is not valid for component 'h\[1\]\.mlp\.output'; valid "
                                             r"units: pos$"):
            resolve(GPT2, 1, "by_module", "h")  # the unit reaches the module path
    finally:
        for name in ("bad_entry", "gone", "by_module", "by_module_input", "fixed_module"):
            del table[name]


def test_unknown_component_names_the_near_misses(registered):
    with pytest.raises(ValueError, match=r"^unknown component for GPT2LM 'mlp_outptu'\. Did you mean 'mlp_output'"):
        resolve(GPT2, 0, "mlp_outptu", "pos")
    with pytest.raises(ValueError, match=r"^unknown component for GPT2LM 'blocks\.0\.hook_resid_pr'\. Did you mean "
                                         r"'blocks\.0\.hook_resid_pre'"):  # hook names are suggested too
        resolve(GPT2, 0, "blocks.0.hook_resid_pr", "pos")
    with pytest.raises(ValueError, match=r"^unknown component for Stack 'block_outptu'\. Did you mean 'block_output'"):
        resolve(Stack(n_layer=2), 0, "block_outptu", "pos")  # a foreign model: no hook names to add
    with pytest.raises(ValueError, match=r"^unit 'h' is not valid for component 'h\[0\]\.mlp\.output'; valid units: "
                                         r"pos$"):
        resolve(GPT2, 0, "h[0].mlp.output", "h")


# -- pyvene module paths -------------------------------------------------------------------------------------------

def test_module_path_tables_hold_views_whose_unit_is_dimension_1_or_a_step():
    """module_path_site takes each table's Site as is: so every view must be one where `pos` is dimension 1."""
    from hookvene.components import type_to_module_paths

    assert {site.view for table in type_to_module_paths.values() for site in table.values()} == {
        "flat", "merge_heads", "step"}


@pytest.mark.parametrize("path, site", [
    ("h[1].mlp.output", Site("blocks.1.hook_mlp_out", "flat", 32)),
    ("transformer.h[0].attn.output", Site("blocks.0.hook_attn_out", "flat", 32)),
    ("h[1].attn.c_proj.input", Site("blocks.1.attn.hook_z", "merge_heads", 32)),  # merge_heads is kept
    ("h[0].attn.attn_dropout.output", Site("blocks.0.attn.hook_pattern", "flat", 16)),
    ("wte.output", Site("hook_embed")),
    ("transformer.ln_f.output", Site("ln_final.hook_normalized")),
])
def test_gpt2_module_paths(path, site):
    assert module_path_site(GPT2, path) == site
    assert resolve(GPT2, 0, path, "pos") == site  # a module path given as the component


def test_module_paths_of_t5_and_the_gru():
    assert module_path_site(T5, "decoder.block[2].output") == Site("decoder.blocks.2.hook_resid_post", "flat", 16)
    assert module_path_site(T5, "encoder.block[1].output") == Site("encoder.blocks.1.hook_resid_post", "flat", 16)
    with pytest.raises(ValueError, match=r"^layer 2 in 'encoder\.block\[2\]\.output' is out of range: the model has "
                                         r"2 layers$"):
        module_path_site(T5, "encoder.block[2].output")
    with pytest.raises(ValueError, match=r"^layer 3 in 'decoder\.block\[3\]\.output' is out of range: the model has "
                                         r"3 layers$"):
        module_path_site(T5, "decoder.block[3].output")
    x2h = module_path_site(GRU, "gru.cells[1].x2h.output", "t")
    assert x2h.hook == "layers.1.hook_x2h" and x2h.view == "step" and x2h.dim == 18  # 3 * d_model, step view kept


def test_module_paths_out_of_range_or_unknown():
    with pytest.raises(ValueError, match=r"^layer 2 in 'h\[2\]\.mlp\.output' is out of range: the model has 2 "
                                         r"layers$"):
        module_path_site(GPT2, "h[2].mlp.output")
    with pytest.raises(ValueError, match=r"^module path 'h\[0\]\.mlp\.nothing\.output' has no hook point in GPT2LM: "
                                         r".* Paths it maps \(\{layer\} = a layer index\): "
                                         r"h\[\{layer\}\]\.attn\.attn_dropout\.input, "
                                         r"h\[\{layer\}\]\.attn\.attn_dropout\.output, "):
        module_path_site(GPT2, "h[0].mlp.nothing.output")
    with pytest.raises(ValueError, match=r"has no hook point in Stack: .*Paths it maps .*: \(none: use component "
                                         r"names or hook names\)"):
        module_path_site(Stack(), "layers[0].output")
    with pytest.raises(ValueError, match=r"^unit 'h' is not valid for component 'h\[0\]\.mlp\.output'; valid units: "
                                         r"pos$"):
        module_path_site(GPT2, "h[0].mlp.output", "h")

