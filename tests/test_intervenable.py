"""IntervenableModel against hand-written hook oracles on a tiny 3-layer GPT-2 (d_model 32, 4 heads, d_mlp 128).

Each oracle computes source activations with `run_with_cache` and patches the base run with its own hook function
via `run_with_hooks`; the IntervenableModel output must match it to 1e-5."""

import pytest
import torch

import hookvene
import hookvene as pv
from tests.helpers import close, differs, tiny_gpt2

D, H, DH, DMLP, L, SEQ = 32, 4, 8, 128, 3, 6


def ids(seed, batch=2, seq=SEQ):
    return torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(seed))


BASE, SRC, SRC2 = ids(1), ids(2), ids(3)


def make_model():
    return hookvene.from_pretrained(tiny_gpt2(n_layer=L))


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def fresh():
    return make_model()


def cache(model, x):
    return model.run_with_cache(x)[1]


def run(model, x, hooks=()):
    return model.run_with_hooks(x, fwd_hooks=list(hooks)).logits


def plain(model, x=BASE):
    return model(x).logits


def patch_hook(positions, values, fn=lambda b, s: s):
    """Oracle hook on a flat (batch, pos, d) site: x[:, positions] = fn(x[:, positions], values)."""
    def hook(x, _):
        x = x.clone()
        x[:, positions] = fn(x[:, positions], values)
        return x
    return hook


def B(x=BASE):
    return {"input_ids": x}


def stacked(acts, batch=2):
    """pyvene's collected activations: a flat list with one tensor per example (per Collect key, per call)."""
    assert len(acts) == batch, len(acts)
    return torch.stack(acts)


# -- each intervention type against an oracle -----------------------------------------------------------------------

RESID1 = "blocks.1.hook_resid_post"
POS = [1, 3]


def _noise(b, _):
    return b + torch.randn(b.shape, generator=torch.Generator().manual_seed(0)) * 0.13462981581687927


LOCALIST = {  # name -> (config extras, needs sources, oracle fn(base units, source units))
    "vanilla": ({}, True, lambda b, s: s),
    "addition": ({"intervention_type": pv.AdditionIntervention}, True, lambda b, s: b + s),
    "subtraction": ({"intervention_type": pv.SubtractionIntervention}, True, lambda b, s: b - s),
    "zero": ({"intervention_type": pv.ZeroIntervention}, False, lambda b, s: torch.zeros_like(b)),
    "noise": ({"intervention_type": pv.NoiseIntervention}, False, _noise),
    "lambda": ({"intervention": lambda b, s: b * 0.5 + s}, True, lambda b, s: b * 0.5 + s),
}


@pytest.mark.parametrize("name", list(LOCALIST))
def test_localist_interventions_match_oracle(model, name):
    extra, needs_source, fn = LOCALIST[name]
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output", **extra}, model)
    src = cache(model, SRC)[RESID1][:, POS]
    expect = run(model, BASE, [(RESID1, patch_hook(POS, src, fn))])
    if needs_source:
        _, out = pvm(B(), [B(SRC)], {"sources->base": POS})
    else:
        _, out = pvm(B(), unit_locations={"base": POS})
    close(out.logits, expect)
    differs(out.logits, plain(model))


def test_collect_matches_cache_and_leaves_output(model):
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output",
                                "intervention_type": pv.CollectIntervention}, model)
    (orig, acts), out = pvm(B(), unit_locations={"base": POS})
    assert orig is None
    close(stacked(acts), cache(model, BASE)[RESID1][:, POS])
    close(out.logits, plain(model))


def test_collect_two_keys_order(model):
    """pyvene's order: for each Collect key in sorted order, its examples in batch order."""
    pvm = pv.IntervenableModel([{"layer": 0, "intervention_type": pv.CollectIntervention},
                                {"layer": 2, "component": "mlp_output", "intervention_type": pv.CollectIntervention}],
                               model)
    (_, acts), _ = pvm(B(), unit_locations={"base": 2})
    c = cache(model, BASE)
    expect = [c["blocks.0.hook_resid_post"][0, [2]], c["blocks.0.hook_resid_post"][1, [2]],
              c["blocks.2.hook_mlp_out"][0, [2]], c["blocks.2.hook_mlp_out"][1, [2]]]
    assert len(acts) == 4
    for a, e in zip(acts, expect):
        close(a, e)


def test_skip_matches_oracle(model):
    """Skip: block_output at the positions := the block's input on the source run."""
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output",
                                "intervention_type": pv.SkipIntervention}, model)
    src = cache(model, SRC)["blocks.1.hook_resid_pre"][:, [2]]
    expect = run(model, BASE, [(RESID1, patch_hook([2], src))])
    _, out = pvm(B(), [B(SRC)], {"sources->base": 2})
    close(out.logits, expect)
    # with source = base it skips the block at that position
    own = cache(model, BASE)["blocks.1.hook_resid_pre"][:, [2]]
    _, out2 = pvm(B(), [B()], {"sources->base": 2})
    close(out2.logits, run(model, BASE, [(RESID1, patch_hook([2], own))]))


def rotation_weight(pvm):
    return next(iter(pvm.interventions.values()))[0].rotate_layer.weight.detach()


def test_rotated_space_one_unit_matches_oracle(model):
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output",
                                "intervention_type": pv.RotatedSpaceIntervention}, model)
    w = rotation_weight(pvm)
    assert w.shape == (D, D)
    src = cache(model, SRC)[RESID1][:, [3]]

    def fn(b, s):
        rb, rs = b @ w, s @ w
        rb[..., :10] = rs[..., :10]
        return rb @ w.T

    expect = run(model, BASE, [(RESID1, patch_hook([3], src, fn))])
    _, out = pvm(B(), [B(SRC)], {"sources->base": 3}, subspaces=list(range(10)))
    close(out.logits, expect)
    differs(out.logits, plain(model))


def flat_units(fn):
    """Oracle for a distributed intervention over 2 units: flatten (b, 2, d) -> (b, 2d), apply, unflatten."""
    return lambda b, s: fn(b.reshape(b.shape[0], -1), s.reshape(s.shape[0], -1)).reshape(b.shape)


def test_rotated_space_two_units_is_flattened(model):
    """pyvene: a RotatedSpace built for max_number_of_units=2 rotates the concatenation of both units (2d dims)."""
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output", "max_number_of_units": 2,
                                "intervention_type": pv.RotatedSpaceIntervention}, model)
    w = rotation_weight(pvm)
    assert w.shape == (2 * D, 2 * D)

    def fn(b, s):
        rb, rs = b @ w, s @ w
        rb[..., :10] = rs[..., :10]
        return rb @ w.T

    src = cache(model, SRC)[RESID1][:, POS]
    expect = run(model, BASE, [(RESID1, patch_hook(POS, src, flat_units(fn)))])
    _, out = pvm(B(), [B(SRC)], {"sources->base": POS}, subspaces=list(range(10)))
    close(out.logits, expect)


def test_low_rank_two_units_is_flattened(model):
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output", "max_number_of_units": 2,
                                "low_rank_dimension": 4,
                                "intervention_type": pv.LowRankRotatedSpaceIntervention}, model)
    w = rotation_weight(pvm)
    assert w.shape == (2 * D, 4)
    src = cache(model, SRC)[RESID1][:, POS]
    fn = flat_units(lambda b, s: b + ((s - b) @ w) @ w.T)
    expect = run(model, BASE, [(RESID1, patch_hook(POS, src, fn))])
    _, out = pvm(B(), [B(SRC)], {"sources->base": POS})
    close(out.logits, expect)


def test_low_rank_heads_flattened(model):
    """pyvene: on a head component (b, h, s, d) is seen as (b, s, h*d) by a distributed intervention."""
    pvm = pv.IntervenableModel({"layer": 1, "component": "head_attention_value_output", "unit": "h.pos",
                                "max_number_of_units": 2, "low_rank_dimension": 3,
                                "intervention_type": pv.LowRankRotatedSpaceIntervention}, model)
    w = rotation_weight(pvm)
    assert w.shape == (2 * DH, 3)
    hook = "blocks.1.attn.hook_z"
    z = cache(model, SRC)[hook]  # batch pos head d_head

    def oracle(x, _):
        x = x.clone()
        b = x[:, 3][:, [1, 2]].reshape(2, -1)
        s = z[:, 3][:, [1, 2]].reshape(2, -1)
        x[:, 3, [1, 2]] = (b + ((s - b) @ w) @ w.T).reshape(2, 2, DH)
        return x

    loc = [[[1, 2]] * 2, [[3]] * 2]
    _, out = pvm(B(), [B(SRC)], {"sources->base": ([loc], [loc])})
    close(out.logits, run(model, BASE, [(hook, oracle)]))


def test_boundless_per_unit_with_temperature(model):
    pvm = pv.IntervenableModel({"layer": 1, "intervention_type": pv.BoundlessRotatedSpaceIntervention}, model)
    pvm.set_temperature(0.5)
    iv = pvm.interventions[pvm.sorted_keys[0]][0]
    assert float(iv.get_temperature()) == 0.5
    assert pvm.count_parameters() == D * D + 1  # rotation + boundary; the temperature is not trainable
    w = iv.rotate_layer.weight.detach()
    i = torch.arange(float(D))
    m = torch.sigmoid(i / 0.5) * torch.sigmoid((0.5 * D - i) / 0.5)
    src = cache(model, SRC)[RESID1][:, [2, 4]]
    fn = lambda b, s: ((1 - m) * (b @ w) + m * (s @ w)) @ w.T  # noqa: E731
    _, out = pvm(B(), [B(SRC)], {"sources->base": [2, 4]})
    close(out.logits, run(model, BASE, [(RESID1, patch_hook([2, 4], src, fn))]))


def test_low_rank_one_unit_matches_oracle(model):
    pvm = pv.IntervenableModel({"layer": 2, "component": "mlp_output", "low_rank_dimension": 3,
                                "intervention_type": pv.LowRankRotatedSpaceIntervention}, model)
    w = rotation_weight(pvm)
    hook = "blocks.2.hook_mlp_out"
    src = cache(model, SRC)[hook][:, [4]]
    expect = run(model, BASE, [(hook, patch_hook([4], src, lambda b, s: b + ((s - b) @ w) @ w.T))])
    _, out = pvm(B(), [B(SRC)], {"sources->base": 4})
    close(out.logits, expect)
    differs(out.logits, plain(model))


def test_distributed_unit_count_mismatch_is_a_clear_error(model):
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output", "max_number_of_units": 2,
                                "low_rank_dimension": 4,
                                "intervention_type": pv.LowRankRotatedSpaceIntervention}, model)
    with pytest.raises(ValueError, match="max_number_of_units"):
        pvm(B(), [B(SRC)], {"sources->base": [1, 2, 3]})


# -- unit forms -----------------------------------------------------------------------------------------------------


def test_single_position_int(model):
    pvm = pv.IntervenableModel({"layer": 0, "component": "mlp_output"}, model)
    hook = "blocks.0.hook_mlp_out"
    src = cache(model, SRC)[hook][:, [3]]
    _, out = pvm(B(), [B(SRC)], {"sources->base": 3})
    close(out.logits, run(model, BASE, [(hook, patch_hook([3], src))]))
    # logits before position 3 are untouched (causal model)
    close(out.logits[:, :3], plain(model)[:, :3])
    differs(out.logits[:, 3:], plain(model)[:, 3:])


def test_source_to_base_pair(model):
    """(a, b) as a tuple: source position 1 -> base position 4."""
    pvm = pv.IntervenableModel({"layer": 0, "component": "block_output"}, model)
    hook = "blocks.0.hook_resid_post"
    src = cache(model, SRC)[hook][:, [1]]
    _, out = pvm(B(), [B(SRC)], {"sources->base": (1, 4)})
    close(out.logits, run(model, BASE, [(hook, patch_hook([4], src))]))


def test_base_key_flat_list_is_units(model):
    """{"base": [1, 3]} selects positions 1 and 3 (pyvene read it as the pair 1 -> 3)."""
    pvm = pv.IntervenableModel({"layer": 0, "component": "block_output",
                                "intervention_type": pv.ZeroIntervention}, model)
    hook = "blocks.0.hook_resid_post"
    _, out = pvm(B(), unit_locations={"base": [1, 3]})
    close(out.logits, run(model, BASE, [(hook, patch_hook([1, 3], None, lambda b, s: torch.zeros_like(b)))]))


def check_per_example_positions(model, pvm):
    """Example 0 takes source position 1 into base position 3, example 1 source 2 into base 4."""
    src = cache(model, SRC)[RESID1]

    def hook(x, _):
        x = x.clone()
        x[0, 3] = src[0, 1]
        x[1, 4] = src[1, 2]
        return x

    _, out = pvm(B(), [B(SRC)], {"sources->base": ([[[1], [2]]], [[[3], [4]]])})
    close(out.logits, run(model, BASE, [(RESID1, hook)]))


def test_per_example_positions(model):
    check_per_example_positions(model, pv.IntervenableModel({"layer": 1, "component": "block_output"}, model))


def test_per_example_positions_not_collapsed_after_a_shortcut(model):
    """pyvene's sticky use_fast made later per-example locations use example 0's; hookvene has no such state."""
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output"}, model)
    pvm(B(), [B(SRC)], {"sources->base": 3})
    check_per_example_positions(model, pvm)


def test_per_example_subspaces(model):
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output"}, model)
    src = cache(model, SRC)[RESID1]

    def hook(x, _):
        x = x.clone()
        x[0, 3, [1, 2]] = src[0, 3, [1, 2]]
        x[1, 3, [5, 6]] = src[1, 3, [5, 6]]
        return x

    _, out = pvm(B(), [B(SRC)], {"sources->base": 3}, subspaces=[[[1, 2], [5, 6]]])
    close(out.logits, run(model, BASE, [(RESID1, hook)]))


def test_heads_unit_h(model):
    pvm = pv.IntervenableModel({"layer": 1, "component": "head_attention_value_output", "unit": "h"}, model)
    hook = "blocks.1.attn.hook_z"
    src = cache(model, SRC)[hook]

    def oracle(x, _):
        x = x.clone()
        x[:, :, [1, 2]] = src[:, :, [1, 2]]
        return x

    _, out = pvm(B(), [B(SRC)], {"sources->base": [1, 2]})
    close(out.logits, run(model, BASE, [(hook, oracle)]))
    differs(out.logits, plain(model))


def test_heads_unit_h_pos_per_example(model):
    pvm = pv.IntervenableModel({"layer": 0, "component": "head_attention_value_output", "unit": "h.pos"}, model)
    hook = "blocks.0.attn.hook_z"
    src = cache(model, SRC)[hook]  # batch pos head d_head

    def oracle(x, _):
        x = x.clone()
        x[0, 2, 1] = src[0, 2, 1]
        x[1, 4, 3] = src[1, 4, 3]
        return x

    locs = [[[1], [3]], [[2], [4]]]  # [heads per example, positions per example]
    _, out = pvm(B(), [B(SRC)], {"sources->base": ([locs], [locs])})
    close(out.logits, run(model, BASE, [(hook, oracle)]))
    differs(out.logits, plain(model))


def test_head_query_output_h_pos_several(model):
    pvm = pv.IntervenableModel({"layer": 2, "component": "head_query_output", "unit": "h.pos",
                                "intervention_type": pv.ZeroIntervention}, model)
    hook = "blocks.2.attn.hook_q"

    def oracle(x, _):
        x = x.clone()
        for p in (1, 3):
            for h in (0, 2):
                x[:, p, h] = 0
        return x

    loc = [[[0, 2]] * 2, [[1, 3]] * 2]
    _, out = pvm(B(), unit_locations={"base": [loc]})
    close(out.logits, run(model, BASE, [(hook, oracle)]))
    differs(out.logits, plain(model))


def test_get_loc(model):
    assert pv.GET_LOC((3, 2)) == [[[[3]], [[2]]]]
    loc = pv.GET_LOC((1, 4), batch_size=2)
    assert loc == [[[[1]] * 2, [[4]] * 2]]
    pvm = pv.IntervenableModel({"layer": 0, "component": "head_value_output", "unit": "h.pos",
                                "intervention_type": pv.CollectIntervention}, model)
    (_, acts), _ = pvm(B(), unit_locations={"base": loc})
    close(stacked(acts), cache(model, BASE)["blocks.0.attn.hook_v"][:, 4, 1].reshape(2, 1, 1, DH))


def test_attention_weight_h(model):
    pvm = pv.IntervenableModel({"layer": 1, "component": "attention_weight", "unit": "h"}, model)
    hook = "blocks.1.attn.hook_pattern"
    src = cache(model, SRC)[hook]

    def oracle(x, _):
        x = x.clone()
        x[:, [1, 3]] = src[:, [1, 3]]
        return x

    _, out = pvm(B(), [B(SRC)], {"sources->base": [1, 3]})
    close(out.logits, run(model, BASE, [(hook, oracle)]))
    differs(out.logits, plain(model))


def test_attention_weight_h_pos(model):
    """h.pos on attention_weight: heads, then query positions (one row of the pattern)."""
    pvm = pv.IntervenableModel({"layer": 0, "component": "attention_weight", "unit": "h.pos",
                                "intervention_type": pv.ZeroIntervention}, model)
    hook = "blocks.0.attn.hook_pattern"

    def oracle(x, _):
        x = x.clone()
        x[:, 2, 4] = 0
        return x

    _, out = pvm(B(), unit_locations={"base": pv.GET_LOC((2, 4), batch_size=2)})
    close(out.logits, run(model, BASE, [(hook, oracle)]))
    close(out.logits[:, :4], plain(model)[:, :4])
    differs(out.logits[:, 4], plain(model)[:, 4])


def test_whole_tensor(model):
    pvm = pv.IntervenableModel({"layer": 0, "component": "mlp_output"}, model)
    hook = "blocks.0.hook_mlp_out"
    src = cache(model, SRC)[hook]
    _, out = pvm(B(), [B(SRC)])
    close(out.logits, run(model, BASE, [(hook, lambda x, _: src.clone())]))
    zero = pv.IntervenableModel({"layer": 2, "component": "attention_output",
                                 "intervention_type": pv.ZeroIntervention}, model)
    _, out = zero(B(), unit_locations=None)
    close(out.logits, run(model, BASE, [("blocks.2.hook_attn_out", lambda x, _: torch.zeros_like(x))]))


def test_whole_tensor_source_length_mismatch(model):
    pvm = pv.IntervenableModel({"layer": 0, "component": "block_output"}, model)
    with pytest.raises(ValueError, match="cannot be broadcast"):
        pvm(B(), [B(ids(2, seq=SEQ + 1))])
    assert not model.has_hooks()


# -- component aliases -------------------------------------------------------------------------------------------------

# component -> (hook at layer 1, unit, locations for the base, expected shape, how to get it from the cached hook)
ALIASES = {
    "block_input": ("blocks.1.hook_resid_pre", "pos"),
    "block_output": ("blocks.1.hook_resid_post", "pos"),
    "attention_input": ("blocks.1.ln1.hook_normalized", "pos"),
    "attention_output": ("blocks.1.hook_attn_out", "pos"),
    "attention_value_output": ("blocks.1.attn.hook_z", "merge"),
    "query_output": ("blocks.1.attn.hook_q", "merge"),
    "key_output": ("blocks.1.attn.hook_k", "merge"),
    "value_output": ("blocks.1.attn.hook_v", "merge"),
    "head_attention_value_output": ("blocks.1.attn.hook_z", "heads"),
    "head_query_output": ("blocks.1.attn.hook_q", "heads"),
    "head_key_output": ("blocks.1.attn.hook_k", "heads"),
    "head_value_output": ("blocks.1.attn.hook_v", "heads"),
    "attention_weight": ("blocks.1.attn.hook_pattern", "pattern"),
    "mlp_input": ("blocks.1.ln2.hook_normalized", "pos"),
    "mlp_activation": ("blocks.1.mlp.hook_post", "pos"),
    "mlp_output": ("blocks.1.hook_mlp_out", "pos"),
}


@pytest.mark.parametrize("component", list(ALIASES))
def test_component_alias_resolves_to_documented_hook(model, component):
    """The tensor an intervention receives (recorded by a function intervention) has pyvene's shape and equals the
    documented hook's activation in pyvene's view; the output is unchanged when the function returns it as is."""
    hook, kind = ALIASES[component]
    unit = {"pos": "pos", "merge": "pos", "heads": "h.pos", "pattern": "h"}[kind]
    seen = []

    def recorder(b, s):
        seen.append(b.detach().clone())
        return b

    pvm = pv.IntervenableModel({"layer": 1, "component": component, "unit": unit, "intervention": recorder}, model)
    key = pvm.sorted_keys[0]
    assert pvm.interventions[key][1] == hook
    act = cache(model, BASE)[hook]
    if kind == "pos":
        loc, shape, expect = [1, 2], (2, 2, DMLP if component == "mlp_activation" else D), act[:, [1, 2]]
    elif kind == "merge":
        loc, shape, expect = [1, 2], (2, 2, D), act[:, [1, 2]].reshape(2, 2, D)
    elif kind == "heads":
        loc = [[[1]] * 2, [[1, 2]] * 2]
        shape, expect = (2, 1, 2, DH), act.permute(0, 2, 1, 3)[:, [1]][:, :, [1, 2]]
    else:
        loc, shape, expect = [0, 3], (2, 2, SEQ, SEQ), act[:, [0, 3]]
    _, out = pvm(B(), unit_locations={"base": [loc] if kind == "heads" else loc})
    assert len(seen) == 1
    assert seen[0].shape == shape
    close(seen[0], expect)
    close(out.logits, plain(model))
    assert not model.has_hooks()


def test_component_dims_are_pyvenes(model):
    dims = {"block_output": D, "mlp_activation": DMLP, "head_attention_value_output": DH, "query_output": D,
            "attention_value_output": D, "attention_weight": 64}  # n_positions for the pattern, as pyvene
    for comp, d in dims.items():
        pvm = pv.IntervenableModel({"layer": 0, "component": comp, "unit": "h" if comp == "attention_weight"
                                    else "h.pos" if comp.startswith("head_") else "pos"}, model)
        assert pvm.interventions[pvm.sorted_keys[0]][0].embed_dim == d, comp


def test_raw_hook_name_as_component(model):
    pvm = pv.IntervenableModel({"component": "blocks.2.hook_resid_mid"}, model)
    hook = "blocks.2.hook_resid_mid"
    src = cache(model, SRC)[hook][:, [2, 5]]
    _, out = pvm(B(), [B(SRC)], {"sources->base": [2, 5]})
    close(out.logits, run(model, BASE, [(hook, patch_hook([2, 5], src))]))
    differs(out.logits, plain(model))


# -- modes, grouping, skipping, linking -----------------------------------------------------------------------------


def test_parallel_two_sources(model):
    pvm = pv.IntervenableModel([{"layer": 0, "component": "block_output"},
                                {"layer": 2, "component": "mlp_output"}], model)
    s0 = cache(model, SRC)["blocks.0.hook_resid_post"][:, [1]]
    s1 = cache(model, SRC2)["blocks.2.hook_mlp_out"][:, [3]]
    expect = run(model, BASE, [("blocks.0.hook_resid_post", patch_hook([1], s0)),
                               ("blocks.2.hook_mlp_out", patch_hook([3], s1))])
    _, out = pvm(B(), [B(SRC), B(SRC2)], {"sources->base": ([[[1]] * 2, [[3]] * 2], [[[1]] * 2, [[3]] * 2])})
    close(out.logits, expect)


def test_parallel_sources_are_not_intervened(model):
    """In parallel mode, the source run of the layer-2 intervention must not see the layer-0 intervention."""
    cfg = pv.IntervenableConfig([{"layer": 0, "component": "block_output"},
                                 {"layer": 2, "component": "block_output"}], mode="parallel")
    pvm = pv.IntervenableModel(cfg, model)
    s0 = cache(model, SRC)["blocks.0.hook_resid_post"][:, [2]]
    s1 = cache(model, SRC2)["blocks.2.hook_resid_post"][:, [2]]
    expect = run(model, BASE, [("blocks.0.hook_resid_post", patch_hook([2], s0)),
                               ("blocks.2.hook_resid_post", patch_hook([2], s1))])
    _, out = pvm(B(), [B(SRC), B(SRC2)], {"sources->base": 2})
    close(out.logits, expect)


def test_serial_chain_matches_manual(model):
    cfg = pv.IntervenableConfig([{"layer": 0, "component": "block_output"},
                                 {"layer": 2, "component": "block_output"}], mode="serial")
    pvm = pv.IntervenableModel(cfg, model)
    h0, h2 = "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"
    a = cache(model, SRC)[h0][:, [1]]
    with model.hooks([(h0, patch_hook([1], a))]):
        _, c1 = model.run_with_cache(SRC2)
    b = c1[h2][:, [4]]
    expect = run(model, BASE, [(h2, patch_hook([4], b))])
    _, out = pvm(B(), [B(SRC), B(SRC2)], {"source_0->source_1": 1, "source_1->base": 4})
    close(out.logits, expect)
    # and it differs from the parallel reading of the same call
    par = pv.IntervenableModel(pv.IntervenableConfig(cfg.representations, mode="parallel"), model)
    _, out_par = par(B(), [B(SRC), B(SRC2)], {"sources->base": ([[[1]] * 2, [[4]] * 2], [[[1]] * 2, [[4]] * 2])})
    differs(out.logits, out_par.logits)


def test_serial_errors(model):
    cfg = pv.IntervenableConfig([{"layer": 0}, {"layer": 2}], mode="serial")
    pvm = pv.IntervenableModel(cfg, model)
    with pytest.raises(ValueError, match="serial mode keys"):
        pvm(B(), [B(SRC), B(SRC2)], {"sources->base": 1})
    with pytest.raises(ValueError, match="source_1->base"):
        pvm(B(), [B(SRC), B(SRC2)], {"source_0->source_1": 1})


def test_grouping_one_source_two_layers(model):
    cfg = pv.IntervenableConfig([{"layer": 0, "component": "block_output", "group_key": 0},
                                 {"layer": 2, "component": "block_output", "group_key": 0}])
    pvm = pv.IntervenableModel(cfg, model)
    c = cache(model, SRC)
    expect = run(model, BASE, [("blocks.0.hook_resid_post", patch_hook([3], c["blocks.0.hook_resid_post"][:, [3]])),
                               ("blocks.2.hook_resid_post", patch_hook([4], c["blocks.2.hook_resid_post"][:, [4]]))])
    _, out = pvm(B(), [B(SRC)], {"sources->base": ([[[3]] * 2, [[4]] * 2], [[[3]] * 2, [[4]] * 2])})
    close(out.logits, expect)


def test_group_key_on_some_only(model):
    with pytest.raises(ValueError, match="group_key"):
        pv.IntervenableModel([{"layer": 0, "group_key": 0}, {"layer": 1}], model)


def test_skipping_equals_single_intervention(model):
    cfg = pv.IntervenableConfig([{"layer": 0, "component": "block_output"}] * 3)
    pvm = pv.IntervenableModel(cfg, model)
    hook = "blocks.0.hook_resid_post"
    expect = run(model, BASE, [(hook, patch_hook([4], cache(model, SRC)[hook][:, [4]]))])
    loc = [[4]] * 2
    outs = []
    for i in range(3):
        srcs = [None] * 3
        srcs[i] = B(SRC)
        locs = [None] * 3
        locs[i] = loc
        outs.append(pvm(B(), srcs, {"sources->base": (locs, locs)})[1].logits)
    for o in outs:
        close(o, expect)


def test_none_location_is_whole_tensor_and_none_source_skips(model):
    """Per intervention, a None location means the whole tensor (locations.py); a None source skips it."""
    pvm = pv.IntervenableModel([{"layer": 0}, {"layer": 1}], model)
    h0, h1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    whole = cache(model, SRC)[h0]
    at2 = patch_hook([2], cache(model, SRC2)[h1][:, [2]])
    locs = ([None, [[2]] * 2], [None, [[2]] * 2])
    _, out = pvm(B(), [B(SRC), B(SRC2)], {"sources->base": locs})
    close(out.logits, run(model, BASE, [(h0, lambda x, _: whole.clone()), (h1, at2)]))
    _, out = pvm(B(), [None, B(SRC2)], {"sources->base": locs})
    close(out.logits, run(model, BASE, [(h1, at2)]))


def test_linking_shares_object_and_writes_both_subspaces(model):
    part = [[0, 16], [16, 32]]
    cfg = pv.IntervenableConfig([
        {"layer": 0, "component": "block_output", "subspace_partition": part, "intervention_link_key": 0},
        {"layer": 0, "component": "block_output", "subspace_partition": part, "intervention_link_key": 0}])
    pvm = pv.IntervenableModel(cfg, model)
    k0, k1 = pvm.sorted_keys
    assert pvm.interventions[k0][0] is pvm.interventions[k1][0]
    hook = "blocks.0.hook_resid_post"
    c1, c2 = cache(model, SRC)[hook], cache(model, SRC2)[hook]

    def oracle(x, _):
        x = x.clone()
        x[:, 4, :16] = c1[:, 4, :16]
        x[:, 4, 16:] = c2[:, 4, 16:]
        return x

    loc = [[[4]] * 2, [[4]] * 2]
    _, out = pvm(B(), [B(SRC), B(SRC2)], {"sources->base": (loc, loc)}, subspaces=[[[0]] * 2, [[1]] * 2])
    close(out.logits, run(model, BASE, [(hook, oracle)]))


def test_count_parameters_counts_linked_once(model):
    rep = {"layer": 0, "component": "block_output", "low_rank_dimension": 2, "intervention_link_key": 7,
           "intervention_type": pv.LowRankRotatedSpaceIntervention}
    pvm = pv.IntervenableModel([rep, rep, {"layer": 1, "intervention_type": pv.RotatedSpaceIntervention}], model)
    assert pvm.count_parameters() == D * 2 + D * D
    assert len(pvm.get_trainable_parameters()) == 2
    assert pvm.count_parameters(include_model=True) == D * 2 + D * D + sum(p.numel() for p in model.parameters())


# -- sources given as activations ----------------------------------------------------------------------------------


def test_source_representations_equal_running_sources(model):
    cfg = [{"layer": 0, "component": "block_output"}, {"layer": 2, "component": "mlp_output"}]
    pvm = pv.IntervenableModel(cfg, model)
    c = cache(model, SRC)
    a0 = c["blocks.0.hook_resid_post"][:, [3]]
    a1 = c["blocks.2.hook_mlp_out"][:, [3]]
    _, ref = pvm(B(), [B(SRC)], {"sources->base": 3})
    k0, k1 = pvm.sorted_keys
    for kw in ({"source_representations": {k0: a0, k1: a1}}, {"source_representations": [a0, a1]},
               {"activations_sources": {k0: a0, k1: a1}}):
        _, out = pvm(B(), unit_locations={"sources->base": 3}, **kw)
        close(out.logits, ref.logits)
    # the pyvene older dotted key format works as a dict key
    _, out = pvm(B(), unit_locations={"sources->base": 3},
                 source_representations={k0.replace("_", "."): a0, k1: a1})
    close(out.logits, ref.logits)


def test_single_tensor_source_representation(model):
    pvm = pv.IntervenableModel([{"layer": 0, "component": "mlp_output"}, {"layer": 1, "component": "mlp_output"}],
                               model)
    v = torch.randn(D)
    _, out = pvm(B(), unit_locations={"base": 2}, source_representations=v)
    fill = patch_hook([2], v, lambda b, s: s.expand_as(b))
    close(out.logits, run(model, BASE, [("blocks.0.hook_mlp_out", fill), ("blocks.1.hook_mlp_out", fill)]))


def test_source_representations_unknown_key(model):
    pvm = pv.IntervenableModel({"layer": 0}, model)
    with pytest.raises(ValueError, match="unknown keys"):
        pvm(B(), unit_locations={"base": 2}, source_representations={"nope": torch.zeros(D)})


# -- outputs --------------------------------------------------------------------------------------------------------


def test_output_original_output_and_return_dict(model):
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output"}, model)
    orig, out = pvm(B(), [B(SRC)], {"sources->base": 3}, output_original_output=True)
    close(orig.logits, plain(model))
    differs(out.logits, orig.logits)
    res = pvm(B(), [B(SRC)], {"sources->base": 3}, output_original_output=True, return_dict=True)
    assert isinstance(res, pv.IntervenableModelOutput)
    close(res.original_outputs.logits, plain(model))
    close(res.intervened_outputs.logits, out.logits)
    assert res.collected_activations is None
    collect = pv.IntervenableModel({"layer": 1, "intervention_type": pv.CollectIntervention}, model)
    res = collect(B(), unit_locations={"base": 3}, return_dict=True)
    assert res.original_outputs is None
    assert len(res.collected_activations) == 2 and res.collected_activations[0].shape == (1, D)


def test_labels_are_forwarded(model):
    pvm = pv.IntervenableModel({"layer": 1}, model)
    _, out = pvm(B(), [B(SRC)], {"sources->base": 3}, labels=BASE)
    # the language-model loss of the intervened logits (next-token targets), not of the plain model's
    expect = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), BASE[:, 1:].flatten())
    close(out.loss, expect)
    plain_loss = model(BASE, labels=BASE).loss
    close(plain_loss, torch.nn.functional.cross_entropy(plain(model)[:, :-1].flatten(0, 1), BASE[:, 1:].flatten()))
    assert (out.loss - plain_loss).abs() > 1e-4


# -- hooks, state and side effects ---------------------------------------------------------------------------------


def test_source_run_stops_early(model):
    counts: dict[str, int] = {}

    def counter(x, hook):
        counts[hook.name] = counts.get(hook.name, 0) + 1

    handles = model.add_hook(lambda n: n.endswith("hook_resid_pre") or n == "hook_logits", counter)
    try:
        pvm = pv.IntervenableModel({"layer": 0, "component": "block_output"}, model)
        pvm(B(), [B(SRC)], {"sources->base": 3})
    finally:
        for h in handles:
            h.remove()
    # layer 0 ran on the source and the base; later layers and the LM head only on the base
    assert counts == {"blocks.0.hook_resid_pre": 2, "blocks.1.hook_resid_pre": 1, "blocks.2.hook_resid_pre": 1,
                      "hook_logits": 1}
    assert not model.has_hooks()


def test_user_hook_survives_and_fires(model):
    seen = []
    handles = model.add_hook("blocks.2.hook_resid_post", lambda x, h: seen.append(x.shape[0]))
    try:
        pvm = pv.IntervenableModel({"layer": 1, "component": "block_output"}, model)
        pvm(B(), [B(SRC)], {"sources->base": 3})
        assert seen == [2]  # fired once: the base run (the source run stopped at layer 1)
        assert model.has_hooks()
        model(BASE)
        assert seen == [2, 2]
    finally:
        for h in handles:
            h.remove()
    assert not model.has_hooks()


def test_no_hook_leak_after_success_and_errors(model):
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output"}, model)
    pvm(B(), [B(SRC)], {"sources->base": 3})
    assert not model.has_hooks()

    def boom(b, s):
        raise RuntimeError("boom inside an intervention")

    bad = pv.IntervenableModel({"layer": 1, "intervention": boom}, model)
    with pytest.raises(RuntimeError, match="boom"):
        bad(B(), [B(SRC)], {"sources->base": 3})
    assert not model.has_hooks()
    with pytest.raises(ValueError, match="out of range"):  # fails inside the source run
        pvm(B(), [B(SRC)], {"sources->base": (9, 3)})
    assert not model.has_hooks()
    with pytest.raises(ValueError, match="out of range"):  # fails inside the base run
        pvm(B(), [B(SRC)], {"sources->base": (3, 9)})
    assert not model.has_hooks()
    # and the model still works normally afterwards
    close(model(BASE).logits, plain(model))


def test_model_not_frozen_nor_eval(fresh):
    fresh.train()
    pvm = pv.IntervenableModel({"layer": 1, "intervention_type": pv.LowRankRotatedSpaceIntervention,
                                "low_rank_dimension": 2}, fresh)
    pvm(B(), [B(SRC)], {"sources->base": 3})
    assert fresh.training
    assert all(p.requires_grad for p in fresh.parameters())
    fresh.eval()
    pv.IntervenableModel({"layer": 1}, fresh)
    assert not fresh.training


def test_transformers_model_is_converted_with_shared_weights():
    hf = tiny_gpt2(n_layer=2).train()
    pvm = pv.IntervenableModel({"layer": 1, "intervention_type": pv.ZeroIntervention}, hf)
    assert hf.training and all(p.requires_grad for p in hf.parameters())
    assert pvm.model.embed.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    hf.eval()
    with torch.no_grad():
        expect = hf(BASE).logits
    _, out = pv.IntervenableModel({"layer": 1, "intervention_type": pv.CollectIntervention}, hf)(
        B(), unit_locations={"base": 0})
    close(out.logits, expect, atol=1e-4)


def test_train_eval_return_self_and_toggle_the_interventions(fresh):
    """pyvene's train() returns None and toggles only the model; here train()/eval() return the wrapper and set the
    mode of the wrapper, of every intervention (and its submodules, e.g. the rotation) and of the wrapped model."""
    pvm = pv.IntervenableModel([{"layer": 0, "intervention_type": pv.RotatedSpaceIntervention},
                                {"layer": 1, "intervention_type": pv.VanillaIntervention}], fresh)
    interventions = [s.intervention for s in pvm.slots]

    def modes():
        return {"wrapper": pvm.training, "model": fresh.training,
                **{f"intervention {i}": all(m.training for m in iv.modules()) for i, iv in enumerate(interventions)}}

    fresh.eval()
    for iv in interventions:
        iv.eval()
    assert pvm.train() is pvm
    assert set(modes().values()) == {True}, modes()
    assert pvm.eval() is pvm
    assert set(modes().values()) == {False}, modes()
    pvm.train()
    assert pvm.train(False) is pvm
    assert set(modes().values()) == {False}, modes()


# -- training -------------------------------------------------------------------------------------------------------


def test_das_training_lowers_loss(fresh):
    pvm = pv.IntervenableModel({"layer": 1, "component": "block_output", "low_rank_dimension": 2,
                                "intervention_type": pv.LowRankRotatedSpaceIntervention}, fresh)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    params = pvm.get_trainable_parameters()
    assert len(params) == 1 and params[0].shape == (D, 2)
    opt = torch.optim.Adam(params, lr=0.05)
    target = torch.tensor([7, 11])
    losses = []
    for _ in range(8):
        opt.zero_grad()
        _, out = pvm(B(), [B(SRC)], {"sources->base": 3})
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1], target)
        loss.backward()
        assert params[0].grad is not None and params[0].grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in fresh.named_parameters():
        assert torch.equal(p, before[n]), n  # the model itself was not trained
        # (gradients may reach the model's parameters since it is not frozen; the optimizer only holds the rotation)


def test_iit_enable_model_gradients(fresh):
    pvm = pv.IntervenableModel({"layer": 1}, fresh)
    assert pvm.get_trainable_parameters() == []
    pvm.enable_model_gradients()
    ids_ = {id(p) for p in pvm.get_trainable_parameters()}
    assert ids_ == {id(p) for p in fresh.parameters()}
    assert fresh.training
    _, out = pvm(B(), [B(SRC)], {"sources->base": 3})
    out.logits.sum().backward()
    assert fresh.embed.weight.grad is not None and fresh.embed.weight.grad.abs().sum() > 0
    assert fresh.blocks[2].mlp.fc.weight.grad.abs().sum() > 0
    pvm.disable_model_gradients()
    assert pvm.get_trainable_parameters() == []
    assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())


# -- save / load ------------------------------------------------------------------------------------------------------


class ScaleIntervention(pv.TrainableIntervention):
    """A user-defined trainable intervention (module level so it can be re-imported on load)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = torch.nn.Parameter(torch.ones(kwargs["embed_dim"]))

    def forward(self, base, source=None, subspaces=None):
        return base * self.scale + source


def test_save_load_constant_source(model, tmp_path):
    v = torch.randn(D)
    pvm = pv.IntervenableModel({"layer": 1, "component": "mlp_output", "source_representation": v}, model)
    _, out = pvm(B(), unit_locations={"base": 2})
    differs(out.logits, plain(model))
    pvm.save(str(tmp_path))
    new = pv.IntervenableModel.load(str(tmp_path), model=model)
    _, out2 = new(B(), unit_locations={"base": 2})
    close(out2.logits, out.logits, atol=0)
    assert torch.equal(new.interventions[new.sorted_keys[0]][0].source_representation, v)


def test_save_load_low_rank(model, tmp_path):
    pvm = pv.IntervenableModel({"layer": 1, "low_rank_dimension": 3,
                                "intervention_type": pv.LowRankRotatedSpaceIntervention}, model)
    _, out = pvm(B(), [B(SRC)], {"sources->base": 3})
    pvm.save(str(tmp_path))
    new = pv.IntervenableModel.load(str(tmp_path), model=model)
    assert new.sorted_keys == pvm.sorted_keys
    _, out2 = new(B(), [B(SRC)], {"sources->base": 3})
    close(out2.logits, out.logits, atol=0)
    # a fresh intervention would have a different random rotation
    _, other = pv.IntervenableModel({"layer": 1, "low_rank_dimension": 3,
                                     "intervention_type": pv.LowRankRotatedSpaceIntervention}, model)(
        B(), [B(SRC)], {"sources->base": 3})
    differs(other.logits, out.logits)


def test_save_load_custom_class(model, tmp_path):
    pvm = pv.IntervenableModel({"layer": 2, "component": "mlp_output", "intervention_type": ScaleIntervention},
                               model)
    iv = pvm.interventions[pvm.sorted_keys[0]][0]
    with torch.no_grad():
        iv.scale.copy_(torch.linspace(-2, 2, D))
    _, out = pvm(B(), [B(SRC)], {"sources->base": 1})
    pvm.save(str(tmp_path))
    new = pv.IntervenableModel.load(str(tmp_path), model=model, intervention_types=[ScaleIntervention])
    assert isinstance(new.interventions[new.sorted_keys[0]][0], ScaleIntervention)
    _, out2 = new(B(), [B(SRC)], {"sources->base": 1})
    close(out2.logits, out.logits, atol=0)


def test_save_load_zero_and_modes(model, tmp_path):
    cfg = pv.IntervenableConfig([{"layer": 0}, {"layer": 2}], pv.ZeroIntervention, mode="serial")
    pvm = pv.IntervenableModel(cfg, model)
    pvm.save(str(tmp_path))
    new = pv.IntervenableModel.load(str(tmp_path), model=model)
    assert new.mode == "serial"
    assert [type(s.intervention) for s in new.slots] == [pv.ZeroIntervention] * 2


def test_load_missing_dir(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"was not written by IntervenableModel\.save: missing .*config\.json"):
        pv.IntervenableModel.load(str(tmp_path / "nothing"), model=model)


# -- bad input ----------------------------------------------------------------------------------------------------


def test_unknown_component_suggests(model):
    with pytest.raises(ValueError, match="Did you mean 'mlp_output'"):
        pv.IntervenableModel({"component": "mlp_outptu"}, model)


def test_unit_not_valid_for_component(model):
    with pytest.raises(ValueError, match="unit 'pos' is not valid for component 'head_query_output'"):
        pv.IntervenableModel({"component": "head_query_output", "unit": "pos"}, model)
    with pytest.raises(ValueError, match="unit 'h' is not valid"):
        pv.IntervenableModel({"component": "block_output", "unit": "h"}, model)


def test_layer_out_of_range(model):
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        pv.IntervenableModel({"layer": 3}, model)
    with pytest.raises(ValueError, match="out of range"):
        pv.IntervenableModel({"layer": -1}, model)


def test_position_beyond_sequence(model):
    pvm = pv.IntervenableModel({"layer": 0, "intervention_type": pv.ZeroIntervention}, model)
    with pytest.raises(ValueError, match="position index 6 is out of range"):
        pvm(B(), unit_locations={"base": 6})


def test_head_beyond_n_heads(model):
    pvm = pv.IntervenableModel({"layer": 0, "component": "head_attention_value_output", "unit": "h",
                                "intervention_type": pv.ZeroIntervention}, model)
    with pytest.raises(ValueError, match="head index 4 is out of range"):
        pvm(B(), unit_locations={"base": 4})


def test_rows_not_batch(model):
    pvm = pv.IntervenableModel({"layer": 0}, model)
    with pytest.raises(ValueError, match="1 rows but the batch has 2"):
        pvm(B(), [B(SRC)], {"sources->base": ([[[1]]], [[[1]]])})


def test_wrong_number_of_entries_per_intervention(model):
    pvm = pv.IntervenableModel([{"layer": 0}, {"layer": 1}], model)
    with pytest.raises(ValueError, match="one entry per intervention"):
        pvm(B(), [B(SRC), B(SRC2)], {"sources->base": ([[[1]] * 2], [[[1]] * 2])})
    with pytest.raises(ValueError, match="subspaces has 1 entries for 2 interventions"):
        pvm(B(), [B(SRC), B(SRC2)], {"sources->base": 1}, subspaces=[[[1]] * 2])


def test_subspace_out_of_range(model):
    pvm = pv.IntervenableModel({"layer": 0}, model)
    with pytest.raises(ValueError, match="subspace index 40 out of range"):
        pvm(B(), [B(SRC)], {"sources->base": 1}, subspaces=[40])
    assert not model.has_hooks()


def test_missing_source_for_vanilla(model):
    pvm = pv.IntervenableModel({"layer": 0}, model)
    with pytest.raises(ValueError, match="VanillaIntervention needs a source"):
        pvm(B(), unit_locations={"base": 1})


def test_wrong_number_of_sources(model):
    pvm = pv.IntervenableModel([{"layer": 0}, {"layer": 1}], model)
    with pytest.raises(ValueError, match="3 sources for 2 intervention groups"):
        pvm(B(), [B(SRC)] * 3, {"sources->base": 1})


def test_one_source_is_broadcast_and_callers_list_kept(model):
    pvm = pv.IntervenableModel([{"layer": 0}, {"layer": 1}], model)
    srcs = [B(SRC)]
    _, out = pvm(B(), srcs, {"sources->base": 2})
    assert len(srcs) == 1
    c = cache(model, SRC)
    expect = run(model, BASE, [("blocks.0.hook_resid_post", patch_hook([2], c["blocks.0.hook_resid_post"][:, [2]])),
                               ("blocks.1.hook_resid_post", patch_hook([2], c["blocks.1.hook_resid_post"][:, [2]]))])
    close(out.logits, expect)


def test_unknown_unit_locations_key(model):
    pvm = pv.IntervenableModel({"layer": 0}, model)
    with pytest.raises(ValueError, match="'sources->base' or 'base'"):
        pvm(B(), [B(SRC)], {"source->base": 1})


def test_unknown_representation_field(model):
    with pytest.raises(ValueError, match=r"unknown RepresentationConfig field\(s\) \['layr'\]"):
        pv.IntervenableModel({"layr": 1}, model)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        pv.IntervenableConfig([{"layer": 0}], mode="paralel")


def test_intervention_type_and_intervention_both_set():
    with pytest.raises(ValueError, match="both intervention_type and intervention"):
        pv.IntervenableConfig([{"intervention_type": pv.ZeroIntervention, "intervention": lambda b, s: b}])


def test_hf_component_alias_for_unknown_model():
    with pytest.raises(ValueError, match="no component table|not a transformers model|unsupported"):
        pv.IntervenableModel({"layer": 0}, torch.nn.Linear(3, 3))
