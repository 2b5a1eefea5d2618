"""What pyvene's component names *mean*, checked against the models' own modules, and where writes land.

`tests/test_component_aliases.py` pins each component to a hook name written by hand; this file checks the meaning
independently of hook names: the tensor a component collects equals what pyvene's definition names, recorded with
plain torch hooks on the modules (mlp_input = the input of the MLP module, i.e. the LayerNorm output that feeds it,
ln3's for the T5 decoder, not ln2's, which feeds cross-attention; attention_value_output = the input of the
attention output projection; mlp_activation = the input of the MLP's down projection; block_output = the block's
output; GRU gates recomputed from the cell's x2h / h2h projections). A VanillaIntervention write must land there
too: interchanging mlp_input gives the MLP the source's output at that position and leaves the attention output
alone. A table entry pointing at the wrong hook fails these tests (checked by planting one in a copy of the package).
"""

from contextlib import ExitStack, contextmanager

import pytest
import torch

import hookvene as pv
from tests.helpers import GATED_HOOKS, close, differs, ungated_hooks
from tests.test_component_aliases import BLOCK, DECODER, GRU_CELL, MODELS, H


@contextmanager
def recorded(model, path, side):
    """Record what the submodule at `path` receives (side "in": its first input) or returns ("out"), per call."""
    module = model.get_submodule(path)
    seen = []
    if side == "in":
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args or tuple(kwargs.values()))[0].detach().clone()),
            with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def run_recording(model, inputs, where, intervenable=None, **kwargs):
    """Run `model` (or `intervenable`) on inputs; for each (path, side) in `where`, the last call's tensor (the base
    run's, for an IntervenableModel) and, for per-step modules, every call."""
    with ExitStack() as stack:
        records = [stack.enter_context(recorded(model, p, s)) for p, s in where]
        out = intervenable(inputs, **kwargs) if intervenable is not None else model(**inputs)
    return out, records


def collect(model, inputs, layer, component, unit, unit_locations=None):
    iv = pv.IntervenableModel({"layer": layer, "component": component, "unit": unit,
                               "intervention_type": pv.CollectIntervention}, model)
    (_, collected), _ = iv(inputs, unit_locations=unit_locations)
    return torch.stack(collected)


def heads(x, n_heads):
    """(batch, pos, head * d_head) -> (batch, head, pos, d_head)."""
    return x.view(*x.shape[:2], n_heads, -1).transpose(1, 2)


# -- meanings: component -> (submodule of the block, "in"/"out", how to turn the recorded tensor into pyvene's view)

THIRD = {"q": slice(0, 32), "k": slice(32, 64), "v": slice(64, 96)}  # GPT-2's fused qkv projection (d_model 32)
GPT2 = {
    "block_input": ("", "in", None), "block_output": ("", "out", None),
    "attention_input": ("attn", "in", None), "attention_output": ("attn", "out", None),
    "residual_mid": ("ln2", "in", None),
    "mlp_input": ("mlp", "in", None), "mlp_output": ("mlp", "out", None),
    "mlp_pre_activation": ("mlp.fc", "out", None), "mlp_activation": ("mlp.proj", "in", None),
    "attention_value_output": ("attn.out", "in", None), "head_attention_value_output": ("attn.out", "in", "heads"),
    "query_output": ("attn.qkv", "out", "q"), "key_output": ("attn.qkv", "out", "k"),
    "value_output": ("attn.qkv", "out", "v"), "head_value_output": ("attn.qkv", "out", "v heads"),
}
NEO = GPT2 | {"query_output": ("attn.q", "out", None), "key_output": ("attn.k", "out", None),
              "value_output": ("attn.v", "out", None), "head_value_output": ("attn.v", "out", "heads")}
T5_SELF = {
    "block_input": ("", "in", None), "block_output": ("", "out", None),
    "attention_input": ("attn", "in", None), "attention_output": ("attn", "out", None),
    "residual_mid": ("ln2", "in", None),
    "mlp_input": ("mlp", "in", None), "mlp_output": ("mlp", "out", None),
    "mlp_pre_activation": ("mlp.wi", "out", None), "mlp_activation": ("mlp.wo", "in", None),
    "attention_value_output": ("attn.o", "in", None), "head_attention_value_output": ("attn.o", "in", "heads"),
    "query_output": ("attn.q", "out", None), "key_output": ("attn.k", "out", None),
    "value_output": ("attn.v", "out", None), "head_value_output": ("attn.v", "out", "heads"),
}
T5_DECODER = T5_SELF | {
    "residual_mid_cross": ("ln3", "in", None),
    "cross_attention_input": ("cross_attn", "in", None), "cross_attention_output": ("cross_attn", "out", None),
    "cross_attention_value_output": ("cross_attn.o", "in", None),
    "head_cross_attention_value_output": ("cross_attn.o", "in", "heads"),
    "cross_query_output": ("cross_attn.q", "out", None), "cross_key_output": ("cross_attn.k", "out", None),
    "cross_value_output": ("cross_attn.v", "out", None),
}
N_HEADS = {"gpt2": 4, "gpt_neo": 2, "t5": 3}
MEANINGS = ([("gpt2", c, "blocks.1", 1, *m) for c, m in GPT2.items()]
            + [("gpt_neo", c, "blocks.1", 1, *m) for c, m in NEO.items()]
            + [("t5", f"encoder.{c}", "encoder.blocks.1", 1, *m) for c, m in T5_SELF.items()]
            + [("t5", f"decoder.{c}", "decoder.blocks.2", 2, *m) for c, m in T5_DECODER.items()])


@pytest.mark.parametrize("arch,component,block,layer,sub,side,view", MEANINGS,
                         ids=[f"{m[0]}-{m[1]}" for m in MEANINGS])
def test_component_is_what_pyvene_defines(arch, component, block, layer, sub, side, view):
    """The collected tensor is the named module's input or output (in pyvene's view), recorded by a torch hook."""
    model, inputs = MODELS[arch]
    _, (seen,) = run_recording(model, inputs, [(f"{block}.{sub}".rstrip("."), side)])
    expected = seen[-1]
    if view in THIRD or view == "v heads":
        expected = expected[..., THIRD[view[0]]]
    if view is not None and view.endswith("heads"):
        expected = heads(expected, N_HEADS[arch])
    close(collect(model, inputs, layer, component, "h" if view and view.endswith("heads") else "pos"), expected)


@pytest.mark.parametrize("arch,block,layer,prefix,pre_mlp_norm", [
    ("gpt2", "blocks.1", 1, "", "ln2"), ("gpt_neo", "blocks.1", 1, "", "ln2"),
    ("t5", "encoder.blocks.1", 1, "encoder.", "ln2"), ("t5", "decoder.blocks.2", 2, "decoder.", "ln3"),
])
def test_mlp_input_is_the_layernorm_before_the_mlp(arch, block, layer, prefix, pre_mlp_norm):
    """mlp_input = LayerNorm(residual stream after every sublayer before the MLP): ln2(resid_pre + attn_out), and in
    the T5 decoder ln3(resid_pre + attn_out + cross_attn_out), not ln2 (which feeds cross-attention)."""
    model, inputs = MODELS[arch]
    where = [(block, "in"), (f"{block}.attn", "out")] + ([(f"{block}.cross_attn", "out")] if "decoder" in block else [])
    _, records = run_recording(model, inputs, where)
    resid = sum(r[-1] for r in records)
    b = model.get_submodule(block)
    with torch.no_grad():
        expected = b.get_submodule(pre_mlp_norm)(resid)
        collected = collect(model, inputs, layer, f"{prefix}mlp_input", "pos")
        close(collected, expected)
        if pre_mlp_norm == "ln3":
            differs(collected, b.ln2(resid))  # the LayerNorm before cross-attention is something else


# -- the GRU: gates recomputed by hand from the cell's two projections ----------------------------------------------

def gru_gates(x2h, h2h, h_prev):
    """nn.GRU's equations (gate order r | z | n) -> every GRU component's value at one step."""
    x_r, x_z, x_n = x2h.split(H, dim=-1)
    h_r, h_z, h_n = h2h.split(H, dim=-1)
    r_pre, z_pre = x_r + h_r, x_z + h_z
    r, z = torch.sigmoid(r_pre), torch.sigmoid(z_pre)
    n_pre = x_n + r * h_n
    n = torch.tanh(n_pre)
    return {"reset_gate_input": r_pre, "reset_gate_output": r, "update_gate_input": z_pre, "update_gate_output": z,
            "new_gate_input": n_pre, "new_gate_output": n, "cell_output": (1 - z) * n + z * h_prev,
            "x2h_output": x2h, "h2h_output": h2h, "reset_x2h_output": x_r, "update_x2h_output": x_z,
            "new_x2h_output": x_n, "reset_h2h_output": h_r, "update_h2h_output": h_z, "new_h2h_output": h_n}


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("step", [0, 3])
def test_gru_components_are_the_gates_of_the_equations(layer, step):
    """Every GRU component at (layer, step) equals the GRU equations applied to the cell's recorded x2h(x_t) and
    h2h(h_{t-1}); cell_input is the cell's input x_t and cell_output its h_t (the model's output for the top layer)."""
    model, inputs = MODELS["gru"]
    cell = f"layers.{layer}"
    out, (x, x2h, h2h, h) = run_recording(model, inputs, [(cell, "in"), (f"{cell}.x2h", "out"),
                                                          (f"{cell}.h2h", "out"), (cell, "out")])
    h_prev = h[step - 1] if step > 0 else torch.zeros_like(h[0])
    expected = gru_gates(x2h[step], h2h[step], h_prev) | {"cell_input": x[step]}
    assert set(expected) == set(GRU_CELL)
    for component, value in expected.items():
        close(collect(model, inputs, layer, component, "t", {"base": step}), value)
    close(h[step], expected["cell_output"])  # the equations above are the cell's
    if layer == 1:
        close(out.last_hidden_state[:, step], h[step])


# -- writes: a VanillaIntervention lands where the component says ----------------------------------------------------

def source_for(arch, component):
    """Source inputs differing from the base; for T5 decoder components only the decoder ids differ, so that
    cross-attention reads the same encoder output in both runs."""
    inputs = MODELS[arch][1]
    g = torch.Generator().manual_seed(7)
    other = {k: torch.randint(0, 40, v.shape, generator=g) if v.dtype == torch.long
             else torch.randn(v.shape, generator=g) for k, v in inputs.items()}
    if component.startswith("decoder."):
        other["input_ids"] = inputs["input_ids"]
    return other


# (arch, component, layer, position or None for the whole tensor, module whose output takes the source's value
# there, module whose output must keep the base's everywhere)
WRITES = [
    ("gpt2", "mlp_input", 1, 2, "blocks.1.mlp", "blocks.1.attn"),
    ("gpt_neo", "mlp_input", 1, 2, "blocks.1.mlp", "blocks.1.attn"),
    ("t5", "encoder.mlp_input", 1, 2, "encoder.blocks.1.mlp", "encoder.blocks.1.attn"),
    ("t5", "decoder.mlp_input", 2, 2, "decoder.blocks.2.mlp", "decoder.blocks.2.cross_attn"),
    ("t5", "decoder.cross_attention_input", 2, 2, "decoder.blocks.2.cross_attn", "decoder.blocks.2.attn"),
    ("t5", "decoder.cross_attention_value_output", 2, 2, "decoder.blocks.2.cross_attn", "decoder.blocks.2.attn"),
    ("gpt2", "attention_value_output", 1, 2, "blocks.1.attn", "blocks.1.ln1"),
    ("gpt2", "block_output", 0, 2, "blocks.0", "blocks.0.mlp"),
    ("gpt2", "attention_input", 1, None, "blocks.1.attn", "blocks.0.mlp"),
    ("gpt_neo", "attention_input", 1, None, "blocks.1.attn", "blocks.0.mlp"),
    ("t5", "decoder.attention_input", 2, None, "decoder.blocks.2.attn", "decoder.blocks.1.mlp"),
]


@pytest.mark.parametrize("arch,component,layer,pos,lands,keeps", WRITES, ids=[f"{w[0]}-{w[1]}" for w in WRITES])
def test_interchange_lands_where_the_component_says(arch, component, layer, pos, lands, keeps):
    """Interchanging at `pos` gives `lands` the source's output there (those modules act position by position) and
    the base's elsewhere; `keeps`, computed before the site, is untouched."""
    model, base = MODELS[arch]
    source = source_for(arch, component)
    where = [(lands, "out"), (keeps, "out")]
    _, (base_lands, base_keeps) = run_recording(model, base, where)
    _, (src_lands, _) = run_recording(model, source, where)
    iv = pv.IntervenableModel({"layer": layer, "component": component, "intervention_type": pv.VanillaIntervention},
                              model)
    locations = None if pos is None else {"sources->base": pos}
    _, (got_lands, got_keeps) = run_recording(model, base, where, iv, sources=[source], unit_locations=locations)
    got, src, ref = got_lands[-1], src_lands[-1], base_lands[-1]
    at = slice(None) if pos is None else [pos]
    differs(src[:, at], ref[:, at])
    close(got[:, at], src[:, at])
    if pos is not None:
        others = [p for p in range(ref.shape[1]) if p != pos]
        close(got[:, others], ref[:, others])
    close(got_keeps[-1], base_keeps[-1])


@pytest.mark.parametrize("arch,component,layer,projection", [
    ("gpt2", "head_attention_value_output", 1, "blocks.1.attn.out"),
    ("t5", "decoder.head_cross_attention_value_output", 2, "decoder.blocks.2.cross_attn.o"),
])
def test_head_interchange_lands_on_that_head_at_that_position(arch, component, layer, projection):
    """h.pos (head 1, position 2) replaces exactly that head's slice of the output projection's input there."""
    model, base = MODELS[arch]
    source = source_for(arch, component)
    _, (ref,) = run_recording(model, base, [(projection, "in")])
    _, (src,) = run_recording(model, source, [(projection, "in")])
    iv = pv.IntervenableModel({"layer": layer, "component": component, "unit": "h.pos",
                               "intervention_type": pv.VanillaIntervention}, model)
    loc = pv.GET_LOC((1, 2), batch_size=2)
    _, (got,) = run_recording(model, base, [(projection, "in")], iv, sources=[source],
                              unit_locations={"sources->base": (loc, loc)})
    got, src, ref = (heads(t[-1], N_HEADS[arch]) for t in (got, src, ref))  # (batch, head, pos, d_head)
    differs(src[:, 1, 2], ref[:, 1, 2])
    close(got[:, 1, 2], src[:, 1, 2])
    mask = torch.ones(got.shape[1:3], dtype=torch.bool)
    mask[1, 2] = False
    close(got[:, mask], ref[:, mask])


@pytest.mark.parametrize("component,part", [("cell_output", None), ("reset_x2h_output", 0),
                                            ("update_h2h_output", 1), ("new_x2h_output", 2)])
def test_gru_interchange_lands_at_its_step_and_gate(component, part):
    """Interchanging at layer 0, step 2: the cell's h_2 is the source's (cell_output), or is the GRU equations with
    only that third of x2h / h2h taken from the source; steps 0 and 1 are the base's."""
    model, base = MODELS["gru"]
    source = source_for("gru", component)
    where = [("layers.0.x2h", "out"), ("layers.0.h2h", "out"), ("layers.0", "out")]
    _, (x2h, h2h, h) = run_recording(model, base, where)
    _, (sx2h, sh2h, sh) = run_recording(model, source, where)
    iv = pv.IntervenableModel({"layer": 0, "component": component, "unit": "t",
                               "intervention_type": pv.VanillaIntervention}, model)
    _, (_, _, got) = run_recording(model, base, where, iv, sources=[source], unit_locations={"sources->base": 2})
    got = got[-len(h):]  # the base run's steps (the source run came first)
    if part is None:
        expected = sh[2]
    else:
        proj, src_proj = (x2h, sx2h) if "x2h" in component else (h2h, sh2h)
        mixed = proj[2].clone()
        mixed[:, part * H:(part + 1) * H] = src_proj[2][:, part * H:(part + 1) * H]
        ins = (mixed, h2h[2]) if "x2h" in component else (x2h[2], mixed)
        expected = gru_gates(*ins, h[1])["cell_output"]
    differs(expected, h[2])
    close(got[2], expected)
    close(torch.stack(got[:2]), torch.stack(h[:2]))


# -- coverage -----------------------------------------------------------------------------------------------------

# per-layer hooks that no pyvene component names (a raw hook name reaches them)
RAW_ONLY = {"decoder.blocks.2.cross_attn.hook_attn_scores"}
# TransformerLens's hooks with no pyvene counterpart: each LayerNorm's scale, and the opt-in ones (set_use_*)
TL_ONLY = ("ln1.hook_scale", "ln2.hook_scale") + GATED_HOOKS


@pytest.mark.parametrize("arch,layer_prefixes,names", [
    ("gpt2", ["blocks.1."], [f"blocks.1.{h}" for h, _ in BLOCK.values()]),
    ("gpt_neo", ["blocks.1."], [f"blocks.1.{h}" for h, _ in BLOCK.values()]),
    ("t5", ["encoder.blocks.1.", "decoder.blocks.2."],
     [f"encoder.blocks.1.{h}" for h, _ in BLOCK.values()] + [f"decoder.blocks.2.{h}" for h, _ in DECODER.values()]),
    ("gru", ["layers.1."], [f"layers.1.{h}" for h, _ in GRU_CELL.values()]),
])
def test_every_layer_hook_has_a_pyvene_name(arch, layer_prefixes, names):
    """Each per-layer hook is the target of some component in the hand-written lists (which
    test_component_aliases checks), except the few listed in RAW_ONLY."""
    model, _ = MODELS[arch]
    layer_hooks = {h for h in model.hook_dict if h.startswith(tuple(layer_prefixes)) and not h.endswith(TL_ONLY)}
    assert layer_hooks - set(names) == {h for h in RAW_ONLY if h in layer_hooks}


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "t5", "gru"])
def test_every_hook_works_as_a_raw_component_name(arch):
    """A raw hook name is a component too: it collects exactly that hook's tensor (GRU per-step hooks at step 3)."""
    model, inputs = MODELS[arch]
    _, cache = model.run_with_cache(**inputs)
    for hook in ungated_hooks(model):  # the opt-in hooks (set_use_*) do not fire in a plain forward
        if hook.startswith("layers."):  # GRU per-step hooks: unit t
            close(collect(model, inputs, 0, hook, "t", {"base": 3}), cache[hook][:, 3])
        else:
            iv = pv.IntervenableModel({"layer": 0, "component": hook, "intervention_type": pv.CollectIntervention},
                                      model)
            (_, collected), _ = iv(inputs)
            # the cache read every hook, so its LayerNorms ran spelled out (for hook_scale), ~1 ulp from the fused
            # kernel the collecting run used: up to ~1.5e-5 a few layers later
            close(torch.cat([c[None] for c in collected]), cache[hook], atol=4e-5)
