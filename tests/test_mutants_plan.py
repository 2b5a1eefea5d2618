"""Tests written for mutants of hookvene/plan.py that survived the plan, intervenable, GRU and pyvene-compat tests
(mutation/REPORT.md): the GRU time-step setter with each feed (given, a source run, none) with and without
unit_locations, the time-step range checks and their messages, gate thirds of the fused GRU projections, pyvene-style
module hooks on a foreign model, representation keys, and the vectorised sweep patches."""

import threading

import pytest
import torch
from torch import nn

import hookvene as pv
from hookvene.components import Site
from hookvene.config import IntervenableConfig
from hookvene.locations import Selection
from hookvene.plan import (
    Attachment,
    Patch,
    Plan,
    _check_steps,
    attach,
    batch_size_of,
    build_slots,
    from_view,
    make_plan,
    patch_rows,
    representation_key,
    to_view,
)
from tests.helpers import close, differs, tiny_gpt2

H = 8  # GRU width (more than the batch of 2, so that a width and a batch size cannot be confused)


@pytest.fixture(scope="module")
def gru():
    torch.manual_seed(0)
    return pv.GRUClassifier(pv.GRUConfig(h_dim=H, n_layer=2, include_emb=True, vocab_size=101))


@pytest.fixture(scope="module")
def gpt():
    return pv.from_pretrained(tiny_gpt2(n_layer=2))


def ids(seed, batch=2, seq=5):
    return torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(seed))


HID = "layers.1.hook_hidden"
Z = "blocks.0.attn.hook_z"
R = "blocks.0.hook_resid_post"


def gru_oracle(model, base, edit):
    """Logits of `model` on `base` with `edit(x, step)` (returning a new tensor or None) on layer 1's hidden."""
    def fn(x, hook):
        return edit(x, hook.step)
    return model.run_with_hooks(input_ids=base, fwd_hooks=[(HID, fn)]).logits


def hidden_cache(model, inputs):
    return model.run_with_cache(input_ids=inputs, names_filter=HID)[1][HID]  # (batch, time, h)


def cell(kind, **extra):
    return {"layer": 1, "component": "cell_output", "unit": "t", "intervention_type": kind, **extra}


# -- views: the gate thirds of the fused GRU projections ---------------------------------------------------------------

@pytest.mark.parametrize("gate", [0, 1, 2])
def test_gate_views_take_and_put_back_one_third(gate):
    x = torch.arange(2 * 12.0).view(2, 12)
    site = Site("h", "step", 4, gate=gate)
    v = to_view(site, x)
    assert torch.equal(v, x[:, 4 * gate:4 * gate + 4])
    expected = x.clone()
    expected[:, 4 * gate:4 * gate + 4] += 100
    back = from_view(site, v + 100, x)
    assert back.shape == x.shape and torch.equal(back, expected)


def test_gate_site_intervention_changes_only_its_third(gru):
    """update_x2h_output at step 2: Zero writes zeros into the middle third of layers.0.hook_x2h there."""
    base = ids(1)
    iv = pv.IntervenableModel({"layer": 0, "component": "update_x2h_output", "unit": "t",
                               "intervention_type": pv.ZeroIntervention}, gru)
    _, out = iv({"input_ids": base}, unit_locations={"base": 2})

    def zero_mid(x, hook):
        if hook.step == 2:
            x = x.clone()
            x[:, H:2 * H] = 0
            return x
    oracle = gru.run_with_hooks(input_ids=base, fwd_hooks=[("layers.0.hook_x2h", zero_mid)]).logits
    close(out.logits, oracle)
    differs(out.logits, gru(input_ids=base).logits)


# -- the time-step setter ----------------------------------------------------------------------------------------------

def test_step_given_source_at_named_steps_and_everywhere(gru):
    base = ids(1)
    given = torch.randn(2, H, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    iv = pv.IntervenableModel(cell(pv.AdditionIntervention), gru)
    _, out = iv({"input_ids": base}, unit_locations={"base": 2}, source_representations=given)
    oracle = gru_oracle(gru, base, lambda x, t: x + given.float() if t == 2 else None)
    assert out.logits.dtype == torch.float32
    close(out.logits, oracle)
    differs(out.logits, gru(input_ids=base).logits)
    _, out = iv({"input_ids": base}, source_representations=given)  # no unit_locations: every step
    close(out.logits, gru_oracle(gru, base, lambda x, t: x + given.float()))
    assert out.logits.dtype == torch.float32


def test_step_given_source_for_one_row_only(gru):
    base = ids(1)
    given = torch.full((2, H), 3.0)
    iv = pv.IntervenableModel(cell(pv.VanillaIntervention), gru)
    _, out = iv({"input_ids": base}, unit_locations={"base": [[[1], [3]]]}, source_representations=given)

    def edit(x, t):
        x = x.clone()
        if t == 1:
            x[0] = 3.0
        if t == 3:
            x[1] = 3.0
        return x
    close(out.logits, gru_oracle(gru, base, edit))


def test_step_source_run_without_unit_locations_swaps_every_step(gru):
    base, src = ids(1), ids(2)
    cache = hidden_cache(gru, src)
    iv = pv.IntervenableModel(cell(pv.VanillaIntervention), gru)
    _, out = iv({"input_ids": base}, [{"input_ids": src}])
    close(out.logits, gru_oracle(gru, base, lambda x, t: cache[:, t]))
    close(out.logits, gru(input_ids=src).logits)


def test_step_source_run_at_other_steps_with_subspaces(gru):
    base, src = ids(1), ids(2)
    cache = hidden_cache(gru, src)
    iv = pv.IntervenableModel(cell(pv.VanillaIntervention), gru)
    _, out = iv({"input_ids": base}, [{"input_ids": src}], {"sources->base": ([[[0], [4]]], [[[3], [1]]])},
                subspaces=[[[0, 1]] * 2])

    def edit(x, t):
        x = x.clone()
        if t == 3:
            x[0, :2] = cache[0, 0, :2]
        if t == 1:
            x[1, :2] = cache[1, 4, :2]
        return x
    close(out.logits, gru_oracle(gru, base, edit))
    differs(out.logits, gru(input_ids=base).logits)


def test_step_source_shorter_than_base_names_the_missing_step(gru):
    iv = pv.IntervenableModel(cell(pv.VanillaIntervention), gru)
    with pytest.raises(ValueError, match=r"^intervention layer_1_comp_cell_output_unit_t_nunit_1#0: source time step "
                                         r"3 never happened on the source run \(3 steps\)$"):
        iv({"input_ids": ids(1)}, [{"input_ids": ids(2, seq=3)}])


def test_step_constant_everywhere_and_collect_order(gru):
    base = ids(1)
    iv = pv.IntervenableModel(cell(pv.ZeroIntervention), gru)
    _, out = iv({"input_ids": base})
    close(out.logits, gru_oracle(gru, base, lambda x, t: torch.zeros_like(x)))
    cache = hidden_cache(gru, base)
    collect = pv.IntervenableModel([cell(pv.CollectIntervention), {**cell(pv.CollectIntervention), "layer": 0}], gru)
    (_, got), _ = collect({"input_ids": base})
    cache0 = gru.run_with_cache(input_ids=base, names_filter="layers.0.hook_hidden")[1]["layers.0.hook_hidden"]
    expected = [cache[r, t] for r in range(2) for t in range(5)] + [cache0[r, t] for r in range(2) for t in range(5)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        close(g.reshape(-1), e)
    (_, got), _ = collect({"input_ids": base}, unit_locations={"base": [[[3, 1], [0, 2]], [[4], [4]]]})
    expected = [cache[0, 3], cache[0, 1], cache[1, 0], cache[1, 2], cache0[0, 4], cache0[1, 4]]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        close(g.reshape(-1), e)


# -- time-step ranges --------------------------------------------------------------------------------------------------

def test_check_steps_directly():
    ids4 = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    assert _check_steps(Selection([[[0, 3]]]), ids4, "w") is None
    assert _check_steps(None, ids4, "w") is None
    assert _check_steps(Selection([[[9]]]), {"attention_mask": torch.ones(1, 4)}, "w") is None
    assert _check_steps(Selection([[[0, 2]]]), {"inputs_embeds": torch.zeros(1, 3, 5)}, "w") is None
    with pytest.raises(ValueError, match=r"^w: time step 4 is out of range; this input has 4 time steps \(0\.\.3\)$"):
        _check_steps(Selection([[[0, 4]]]), ids4, "w")
    with pytest.raises(ValueError, match=r"^w: time step 3 is out of range; this input has 3 time steps \(0\.\.2\)$"):
        _check_steps(Selection([[[1, 3]]]), {"inputs_embeds": torch.zeros(1, 3, 5)}, "w")


def test_step_range_errors_name_the_intervention_and_side(gru):
    iv = pv.IntervenableModel(cell(pv.VanillaIntervention), gru)
    key = r"intervention layer_1_comp_cell_output_unit_t_nunit_1#0 \(layers\.1\.hook_hidden\)"
    with pytest.raises(ValueError, match=rf"^{key}: time step 5 is out of range; this input has 5 time steps"):
        iv({"input_ids": ids(1)}, source_representations=torch.zeros(2, H), unit_locations={"base": 5})
    with pytest.raises(ValueError, match=rf"^{key}, source: time step 3 is out of range; this input has 3 time "
                                         rf"steps \(0\.\.2\)$"):
        iv({"input_ids": ids(1)}, [{"input_ids": ids(2, seq=3)}], {"sources->base": (3, 1)})


# -- make_plan -------------------------------------------------------------------------------------------------------

def test_make_plan_without_slots():
    plan = make_plan([], ids(1))
    assert plan.n_groups == 0 and plan.writes() == [] and plan.slot_plans == []
    assert Plan([], [], None, "parallel").n_groups == 0
    with pytest.raises(ValueError, match=r"^1 sources for 0 intervention groups"):
        make_plan([], ids(1), sources=[ids(2)])


def test_make_plan_feeds_and_shared_collected(gpt):
    slots = build_slots(IntervenableConfig([{"layer": 0, "component": "block_output"}]), gpt)
    assert make_plan(slots, ids(1)).writes() == []  # no sources, no locations: a plain run
    _, out = pv.IntervenableModel({"layer": 0, "component": "block_output"}, gpt)(ids(1))
    close(out.logits, gpt(ids(1)).logits)
    shared = {slots[0].key: []}
    plan = make_plan(slots, ids(1), sources=[ids(2)], collected=shared)
    assert plan.collected_by_key is shared
    assert Plan(slots, plan.slot_plans, None, "parallel", shared).collected_by_key is shared
    key = r"intervention layer_0_comp_block_output_unit_pos_nunit_1#0 \(blocks\.0\.hook_resid_post\)"
    with pytest.raises(ValueError, match=rf"^{key}: VanillaIntervention needs a source; pass sources"):
        make_plan(slots, ids(1), unit_locations={"base": 1})
    with pytest.raises(ValueError, match=rf"^{key}: unit_locations have 1 rows but the batch has 2 examples$"):
        make_plan(slots, ids(1), sources=[ids(2)], unit_locations={"base": [[[1]]]})
    with pytest.raises(ValueError, match=rf"^{key}: unit_locations have 2 rows but the batch has 1 examples$"):
        make_plan(slots, ids(1), sources=[ids(2, batch=1)], unit_locations={"sources->base": ([[[1], [1]]],
                                                                                             [[[1], [1]]])})


def test_source_batch_differs_from_base_batch(gpt):
    """One source example for a batch of two: the source's locations are checked against its own batch."""
    base, src = ids(1), ids(2, batch=1)
    cache = gpt.run_with_cache(src, names_filter="blocks.0.hook_resid_post")[1]["blocks.0.hook_resid_post"]
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output"}, gpt)
    _, out = iv(base, [src], {"sources->base": ([[[2]]], [[[3], [1]]])})

    def put(x, hook):
        x = x.clone()
        x[0, 3] = cache[0, 2]
        x[1, 1] = cache[0, 2]
        return x
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[("blocks.0.hook_resid_post", put)]).logits)


def test_base_key_reads_the_same_units_and_takes_a_tuple_as_units(gpt):
    base, src = ids(1), ids(2)
    hook = "blocks.0.hook_resid_post"
    cache = gpt.run_with_cache(src, names_filter=hook)[1][hook]
    _, out = pv.IntervenableModel({"layer": 0, "component": "block_output", "max_number_of_units": 2}, gpt)(
        base, [src], {"base": (1, 3)})

    def put(x, hook):
        x = x.clone()
        x[:, [1, 3]] = cache[:, [1, 3]]
        return x
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[(hook, put)]).logits)


def test_serial_mode_keys_and_positions(gpt):
    base, s0, s1 = ids(1), ids(2), ids(3)
    config = IntervenableConfig([{"layer": 0, "component": "block_output", "group_key": 0},
                                 {"layer": 1, "component": "block_output", "group_key": 1}], mode="serial")
    iv = pv.IntervenableModel(config, gpt)
    with pytest.raises(ValueError, match=r"^serial mode keys are \['source_0->source_1', 'source_1->base'\]; got "
                                         r"unknown \['source_1->source_2'\]$"):
        iv(base, [s0, s1], {"source_0->source_1": 1, "source_1->base": 2, "source_1->source_2": 3})
    _, out = iv(base, [s0, s1], {"source_0->source_1": (1, 2), "source_1->base": (2, 4)})
    h0, h1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    c0 = gpt.run_with_cache(s0, names_filter=h0)[1][h0]

    def put0(x, hook):
        x = x.clone()
        x[:, 2] = c0[:, 1]
        return x
    got = {}
    with gpt.hooks(fwd_hooks=[(h0, put0), (h1, lambda x, hook: got.setdefault("h1", x))]):
        gpt(s1)
    c1 = got["h1"]

    def put1(x, hook):
        x = x.clone()
        x[:, 4] = c1[:, 2]
        return x
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[(h1, put1)]).logits)
    one = pv.IntervenableModel(IntervenableConfig([{"layer": 0, "component": "block_output"}], mode="serial"), gpt)
    with pytest.raises(ValueError, match=r"^serial mode keys are \['source_0->base'\]; got unknown "
                                         r"\['source_0->source_1'\]$"):
        one(base, [s0], {"source_0->base": 1, "source_0->source_1": 1})
    plan = make_plan(build_slots(config, gpt), base, unit_locations={"source_0->source_1": 1, "source_1->base": 1},
                     mode="serial", source_representations=[torch.zeros(2, 1, 32)] * 2)
    with pytest.raises(ValueError, match=r"^serial mode needs sources: one per group$"):
        plan.read_sources(gpt)


def test_messages_for_bad_inputs(gpt):
    slots = build_slots(IntervenableConfig([{"layer": 0, "component": "block_output"}]), gpt)
    with pytest.raises(ValueError, match=r"^unit_locations must be a dict such as \{'sources->base': 3\} or "
                                         r"\{'base': \[0, 1\]\}$"):
        make_plan(slots, ids(1), sources=[ids(2)], unit_locations=3)
    with pytest.raises(ValueError, match=r"^2 source_representations for 1 interventions$"):
        make_plan(slots, ids(1), source_representations=[torch.zeros(1), torch.zeros(1)])
    with pytest.raises(ValueError, match=r"^inputs hold no tensor: pass the tokenizer's output \(a dict with "
                                         r"input_ids\) or inputs_embeds$"):
        batch_size_of({"x": [1, 2]})
    with pytest.raises(ValueError, match=r"^group_key is set on some representations but not all; set it on every "
                                         r"one$"):
        build_slots(IntervenableConfig([{"layer": 0, "group_key": 0}, {"layer": 1}]), gpt)
    for layer, shown in [("1", "str '1'"), (True, "bool True"), (1.0, "float 1.0")]:
        with pytest.raises(TypeError, match=rf"^representation 0 \('block_output'\): layer must be an int \(a block "
                                            rf"index\), got {shown}$"):
            build_slots(IntervenableConfig([{"layer": layer, "component": "block_output"}]), gpt)


def test_single_source_as_a_dict_or_a_tensor(gpt):
    slots = build_slots(IntervenableConfig([{"layer": 0, "component": "block_output"}]), gpt)
    for src in (ids(2), {"input_ids": ids(2)}):
        plan = make_plan(slots, ids(1), sources=src, unit_locations={"sources->base": 3})
        assert len(plan.sources) == 1 and torch.equal(plan.sources[0]["input_ids"], ids(2))


def test_out_of_range_errors_name_the_side(gpt):
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output"}, gpt)
    key = r"layer_0_comp_block_output_unit_pos_nunit_1#0 \(blocks\.0\.hook_resid_post\)"
    with pytest.raises(ValueError, match=rf"^source of intervention {key}: position index 9 is out of range"):
        iv(ids(1), [ids(2)], {"sources->base": (9, 1)})
    with pytest.raises(ValueError, match=rf"^intervention {key}: position index 9 is out of range"):
        iv(ids(1), [ids(2)], {"sources->base": (1, 9)})


# -- representation keys ---------------------------------------------------------------------------------------------

def test_representation_keys_count_repeats():
    config = IntervenableConfig([{"layer": 0, "component": "h[0].mlp.output", "unit": "h.pos"}] * 3
                                + [{"layer": 0, "component": "block_output"}])
    seen = {}
    keys = [representation_key(r, seen) for r in config.representations]
    stem = "layer_0_comp_h[0]_mlp_output_unit_h_pos_nunit_1"
    assert keys == [stem + "#0", stem + "#1", stem + "#2", "layer_0_comp_block_output_unit_pos_nunit_1#0"]
    assert seen == {stem: 3, "layer_0_comp_block_output_unit_pos_nunit_1": 1}


# -- merge_heads view without unit_locations -------------------------------------------------------------------------

def test_merge_heads_site_whole_tensor(gpt):
    base = ids(1)
    iv = pv.IntervenableModel({"layer": 0, "component": "attention_value_output",
                               "intervention_type": pv.ZeroIntervention}, gpt)
    _, out = iv(base)
    oracle = gpt.run_with_hooks(base, fwd_hooks=[(Z, lambda x, hook: torch.zeros_like(x))]).logits
    close(out.logits, oracle)
    differs(out.logits, gpt(base).logits)


# -- foreign models: pyvene-style module hooks -------------------------------------------------------------------------

class Mul(nn.Module):
    def forward(self, x, y):
        return x * y


class Pair(nn.Module):
    def forward(self, x):
        return x + 1, x - 1


class Foreign(nn.Module):
    def __init__(self):
        super().__init__()
        self.mul, self.pair = Mul(), Pair()
        self.layers = nn.ModuleList([nn.Linear(3, 3) for _ in range(2)])

    def forward(self, x, y):
        a, b = self.pair(self.mul(x, y))
        return a * 10 + b


def test_module_hooks_on_inputs_and_tuple_outputs():
    model = Foreign()
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    assert torch.equal(model(x, y), (x * y + 1) * 10 + x * y - 1)
    with attach(model, [Attachment("mul", lambda t, h: t + 1, "register_forward_pre_hook")]):  # on x, not x * y
        assert torch.equal(model(x, y), ((x + 1) * y + 1) * 10 + (x + 1) * y - 1)
    with attach(model, [Attachment("mul", lambda t, h: None, "register_forward_pre_hook"),
                        Attachment("pair", lambda t, h: t + 100, "register_forward_hook")]):
        assert torch.equal(model(x, y), (x * y + 101) * 10 + x * y - 1)
    with attach(model, [Attachment("mul", lambda t, h: t - 1, "register_forward_hook")]):
        assert torch.equal(model(x, y), (x * y) * 10 + x * y - 2)
    assert torch.equal(model(x, y), (x * y + 1) * 10 + x * y - 1)  # removed on exit


def test_nested_attach_acts_only_in_the_inner_block():
    model = Foreign()
    x, y = torch.tensor([1.0]), torch.tensor([2.0])
    with attach(model, [Attachment("mul", lambda t, h: t * 3, "register_forward_hook")]):
        with attach(model, [Attachment("mul", lambda t, h: t + 1, "register_forward_hook")]):
            inner = model(x, y)
        outer = model(x, y)
        seen = []
        th = threading.Thread(target=lambda: seen.append(model(x, y)))
        th.start()
        th.join()
    assert inner.item() == (3 + 1) * 10 + 3 - 1  # the inner block's +1 only
    assert outer.item() == (6 + 1) * 10 + 6 - 1
    assert seen[0].item() == (2 + 1) * 10 + 2 - 1  # another thread: untouched


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, inputs_embeds):
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x)
        return x


def test_foreign_model_interchange_reads_and_writes_module_outputs():
    pv.type_to_module_mapping[Stack] = {"block_output": ("layers[%s]", "register_forward_hook"),
                                        "block_input": ("layers[%s]", "register_forward_pre_hook")}
    try:
        model = Stack().eval()
        base = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
        src = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
        for component, at in [("block_output", lambda m, x: m.layers[0](x)), ("block_input", lambda m, x: x)]:
            iv = pv.IntervenableModel({"layer": 0, "component": component}, model)
            # two dims only: a whole vector at one position would hide an input/output mix-up (Linear is per position)
            _, out = iv({"inputs_embeds": base}, [{"inputs_embeds": src}], {"sources->base": 1},
                        subspaces=[[[0, 1]] * 2])
            with torch.no_grad():
                h = at(model, base).clone()
                h[:, 1, :2] = at(model, src)[:, 1, :2]
                expected = model.layers[1](h if component == "block_output" else model.layers[0](h))
            out = out if isinstance(out, torch.Tensor) else out[0]
            close(out, expected)
    finally:
        del pv.type_to_module_mapping[Stack]


# -- sweeps: vectorised patches ---------------------------------------------------------------------------------------

def test_patch_rows_with_three_int_dims_and_whole_dims():
    x = torch.zeros(3, 2, 3, 4)
    stored = {"a": torch.arange(2 * 2 * 3 * 4, dtype=torch.float64).view(2, 2, 3, 4)}
    cells = [[Patch("a", (1, 2, 3))], [Patch("a", (None, 1, None))], []]
    store_row = torch.tensor([1, 0, 1])
    fns = patch_rows(cells, torch.tensor([0, 1, 2]), store_row, stored)
    out = x
    for a in fns:
        out = a.fn(out, None)
    expected = torch.zeros(3, 2, 3, 4)
    expected[0, 1, 2, 3] = stored["a"][1, 1, 2, 3].float()
    expected[1, :, 1, :] = stored["a"][0, :, 1, :].float()
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    fns = patch_rows([[Patch("a", (None, None, None))]], torch.tensor([0, 0]), torch.tensor([1, 0]), stored)
    out = fns[0].fn(torch.zeros(2, 2, 3, 4), None)
    assert torch.equal(out, stored["a"][[1, 0]].float())


# -- flattening the selected units (interventions that span all units) -----------------------------------------------



def test_heads_are_flattened_per_position(gpt):
    """h.pos with 3 heads x 2 positions: a rotation sees, per position, the 3 heads' vectors concatenated."""
    base, src = ids(1), ids(2)
    iv = pv.IntervenableModel({"layer": 0, "component": "head_attention_value_output", "unit": "h.pos",
                               "max_number_of_units": 3, "intervention_type": pv.RotatedSpaceIntervention}, gpt)
    heads, pos = [0, 1, 3], [1, 4]
    loc = [[heads] * 2, [pos] * 2]
    _, out = iv(base, [src], {"sources->base": ([loc], [loc])}, subspaces=[[list(range(5))] * 2])
    zb = gpt.run_with_cache(base, names_filter=Z)[1][Z]  # (b, s, h, d)
    zs = gpt.run_with_cache(src, names_filter=Z)[1][Z]
    rot = rotation_of(iv)
    flat = lambda z: z[:, pos][:, :, heads].reshape(2, 2, -1)  # (b, positions, heads * d)
    with torch.no_grad():
        new = rot(flat(zb), flat(zs), [list(range(5))] * 2).reshape(2, 2, 3, -1)
    z = zb.clone()
    for i, p in enumerate(pos):
        for j, h in enumerate(heads):
            z[:, p, h] = new[:, i, j]
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[(Z, lambda x, hook: z)]).logits)
    differs(out.logits, gpt(base).logits)
    small = pv.IntervenableModel({"layer": 0, "component": "head_attention_value_output", "unit": "h.pos",
                                  "intervention_type": pv.RotatedSpaceIntervention}, gpt)
    key = r"layer_0_comp_head_attention_value_output_unit_h_pos_nunit_1#0"
    with pytest.raises(ValueError, match=rf"^intervention {key} was built for 8 dims \(max_number_of_units=1\) but "
                                         rf"got 24: set max_number_of_units to the number of units you select$"):
        small(base, [src], {"sources->base": ([loc], [loc])})


def rotation_of(iv):
    got = iv.interventions[next(iter(iv.interventions))]
    return got[0] if isinstance(got, tuple | list) else got



def test_whole_tensor_rotation_acts_per_position(gpt):
    base, src = ids(1), ids(2)
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output",
                               "intervention_type": pv.RotatedSpaceIntervention}, gpt)
    _, out = iv(base, [src], subspaces=[[list(range(6))] * 2])
    hb = gpt.run_with_cache(base, names_filter=R)[1][R]
    hs = gpt.run_with_cache(src, names_filter=R)[1][R]
    with torch.no_grad():
        new = rotation_of(iv)(hb, hs, [list(range(6))] * 2)
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[(R, lambda x, hook: new)]).logits)


def test_constant_source_rotation_at_a_position(gpt):
    base = ids(1)
    const = torch.randn(32, generator=torch.Generator().manual_seed(4))
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output", "source_representation": const,
                               "intervention_type": pv.RotatedSpaceIntervention}, gpt)
    _, out = iv(base, unit_locations={"base": 2}, subspaces=[[list(range(6))] * 2])
    hb = gpt.run_with_cache(base, names_filter=R)[1][R]
    with torch.no_grad():
        new = rotation_of(iv)(hb[:, 2], None, [list(range(6))] * 2)

    def put(x, hook):
        x = x.clone()
        x[:, 2] = new
        return x
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[(R, put)]).logits)
    differs(out.logits, gpt(base).logits)


def test_given_float64_source_keeps_the_models_dtype(gpt):
    base = ids(1)
    given = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention_type": pv.AdditionIntervention},
                              gpt)
    hb = gpt.run_with_cache(base, names_filter=R)[1][R]
    _, out = iv(base, unit_locations={"base": 3}, source_representations=given)

    def put(x, hook):
        x = x.clone()
        x[:, 3] = hb[:, 3] + given[:, 0].float()
        return x
    assert out.logits.dtype == torch.float32
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[(R, put)]).logits)
    _, out = iv(base, source_representations=given)
    assert out.logits.dtype == torch.float32
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[(R, lambda x, hook: hb + given.float())]).logits)


# -- one source run feeding a time-step site and a whole-forward site -------------------------------------------------

def test_one_group_with_a_step_site_and_a_flat_site(gru):
    base, src = ids(1), ids(2)
    iv = pv.IntervenableModel([{"layer": 0, "component": "hook_input", "unit": "pos", "group_key": 0},
                               {**cell(pv.VanillaIntervention), "group_key": 0}], gru)
    _, out = iv({"input_ids": base}, [{"input_ids": src}], {"sources->base": 3})
    _, cs = gru.run_with_cache(input_ids=src, names_filter=lambda n: n in ("hook_input", HID))
    got = {}
    with gru.hooks(fwd_hooks=[("hook_input", lambda x, hook: got.setdefault("in", x))]):
        gru(input_ids=src)

    def put_in(x, hook):
        x = x.clone()
        x[:, 3] = cs["hook_input"][:, 3]
        return x

    def put_h(x, hook):
        return cs[HID][:, 3] if hook.step == 3 else None
    oracle = gru.run_with_hooks(input_ids=base, fwd_hooks=[("hook_input", put_in), (HID, put_h)]).logits
    close(out.logits, oracle)


# -- build_slots: what an intervention class is built with ------------------------------------------------------------

class Recording(pv.ZeroIntervention):
    seen: list = []

    def __init__(self, **kwargs):
        Recording.seen.append(sorted(kwargs))
        super().__init__(**kwargs)


def test_intervention_classes_get_the_config_fields_and_embed_dim(gpt):
    Recording.seen.clear()
    build_slots(IntervenableConfig([{"layer": 0, "component": "block_output", "intervention_type": Recording}]), gpt)
    from hookvene.config import RepresentationConfig
    expected = sorted(set(RepresentationConfig._fields) - {"intervention_type", "intervention"} | {"embed_dim"})
    assert Recording.seen == [expected]


def test_a_plan_attached_twice_collects_both_runs_in_row_then_step_order(gru):
    base = ids(1)
    slots = build_slots(IntervenableConfig([cell(pv.CollectIntervention)]), gru)
    plan = make_plan(slots, {"input_ids": base}, unit_locations={"base": [[[3, 1], [0, 2]]]})
    for _ in range(2):
        with plan.attached(gru):
            gru(input_ids=base)
    cache = hidden_cache(gru, base)
    expected = [cache[0, 3]] * 2 + [cache[0, 1]] * 2 + [cache[1, 0]] * 2 + [cache[1, 2]] * 2
    got = plan.collected()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        close(g, e)


def test_skip_needs_a_component_with_a_module_input(gpt):
    iv = pv.IntervenableModel({"layer": 0, "component": "attention_value_output",
                               "intervention_type": pv.SkipIntervention}, gpt)
    with pytest.raises(ValueError, match=r"^SkipIntervention needs a component whose module input has the same shape "
                                         r"\(block_output, attention_output, mlp_output, cell_output\); got "
                                         r"'attention_value_output'$"):
        iv(ids(1), [ids(2)], {"sources->base": 1})


def plus_one_in_float64(base, source):
    return (base + 1).double()


def test_an_intervention_returning_float64_is_cast_back(gpt, gru):
    base = ids(1)
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention": plus_one_in_float64}, gpt)

    def put(x, hook):
        x = x.clone()
        x[:, 2] += 1
        return x
    _, out = iv(base, unit_locations={"base": 2})
    assert out.logits.dtype == torch.float32
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[(R, put)]).logits)
    _, out = iv(base)
    assert out.logits.dtype == torch.float32
    close(out.logits, gpt.run_with_hooks(base, fwd_hooks=[(R, lambda x, hook: x + 1)]).logits)
    step = pv.IntervenableModel({"layer": 1, "component": "cell_output", "unit": "t",
                                 "intervention": plus_one_in_float64}, gru)
    _, out = step({"input_ids": base}, unit_locations={"base": 2})
    close(out.logits, gru_oracle(gru, base, lambda x, t: x + 1 if t == 2 else None))
    _, out = step({"input_ids": base})
    close(out.logits, gru_oracle(gru, base, lambda x, t: x + 1))
