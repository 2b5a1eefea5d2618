"""Tests written for mutants of hookvene/generate.py that survived tests/test_generate.py (mutation/REPORT.md):
subspaces on the prompt pass, and `intervened_generate` called directly with its defaults. Both are checked against
tests/test_generate.py's hand-written recomputing loop (`manual_greedy`).
"""

import pytest
import torch

import hookvene as pv
from hookvene.generate import intervened_generate
from hookvene.models.common import new_token_count, pick_next
from tests.test_generate import (  # noqa: F401  (fixtures)
    NEW,
    arch,
    assert_same,
    left_padded,
    manual_greedy,
    mlp_out_names,
    model,
    pair,
    pairs,
    steering_config,
    vec,
)


@pytest.mark.parametrize("on_prompt", [True, False], ids=["prompt pass", "decode passes"])
def test_subspaces_apply_where_the_intervention_does(model, on_prompt):  # noqa: F811
    """Steering restricted to dims [0, 1], on the prompt pass or on the decode passes only: the same as adding v
    with the other dims zeroed at those positions."""
    ids, mask = left_padded()
    v = vec(scale=3.0)
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    _, (out, scores) = iv.generate({"input_ids": ids, "attention_mask": mask}, source_representations=v,
                                   subspaces=[[[0, 1]] * 3] * model.cfg.n_layers, intervene_on_prompt=on_prompt,
                                   intervene_on_generated=not on_prompt, max_new_tokens=NEW, output_scores=True)
    masked = torch.zeros_like(v)
    masked[:2] = v[:2]
    positions = set(range(7)) if on_prompt else set(range(7, 7 + NEW))  # 7-token prompts
    ref, ref_scores = manual_greedy(model, ids, mask, NEW, mlp_out_names(model), masked, positions)
    assert_same(out, ref, scores, ref_scores)
    everything = manual_greedy(model, ids, mask, NEW, mlp_out_names(model), v, positions)[1]
    assert (scores - everything).abs().max() > 1e-3  # the other dims really were left alone


def test_intervened_generate_defaults(model):  # noqa: F811
    """Called directly (as IntervenableModel.generate does, minus its keywords): parallel mode, prompt and every
    generated position steered."""
    ids, mask = left_padded()
    v = vec()
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    original, out = intervened_generate(model, iv.slots, {"input_ids": ids, "attention_mask": mask},
                                        source_representations=v, max_new_tokens=NEW)
    assert original is None
    assert_same(out, manual_greedy(model, ids, mask, NEW, mlp_out_names(model), v)[0])


def test_generate_bounds(model):  # noqa: F811
    ids, mask = left_padded()  # 7-token prompts
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    base = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(ValueError, match=r"position 7 is past the 7-token prompt"):
        iv.generate(base, unit_locations={"base": 7}, source_representations=vec(), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"generated_steps \[0\] never happen"):  # one new token: no decode pass
        iv.generate(base, source_representations=vec(), generated_steps=[0], max_new_tokens=1)


def test_h_pos_locations_past_the_prompt(model):  # noqa: F811
    ids, mask = left_padded()
    iv = pv.IntervenableModel([{"layer": 0, "component": "head_attention_value_output", "unit": "h.pos",
                                "intervention_type": pv.ZeroIntervention}], model)
    with pytest.raises(ValueError, match=r"position 9 is past the 7-token prompt"):
        iv.generate({"input_ids": ids, "attention_mask": mask}, unit_locations={"base": [[[[0]] * 3, [[9]] * 3]]},
                    max_new_tokens=2)


def test_pick_next_filters():
    g = torch.Generator().manual_seed(0)
    tie = torch.tensor([[0.0, 0.0, -100.0]]).repeat(64, 1)  # p = (0.5, 0.5, 0): top_p=0.5 keeps both
    assert set(pick_next(tie, True, 1.0, None, 0.5, g).tolist()) == {0, 1}
    flat = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])  # batch 1 < top_k: k is counted over the vocabulary
    assert {pick_next(flat, True, 100.0, 3, None, g).item() for _ in range(60)} == {0, 1, 2}
    with pytest.raises(ValueError, match=r"^pass max_new_tokens or max_length$"):
        new_token_count(5, None, None)


def test_empty_position_lists_intervene_nowhere(model):  # noqa: F811
    """unit_locations with no position in any row: accepted, and the decode equals the plain one."""
    ids, mask = left_padded()
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    nowhere = {"base": [[[]] * 3] * model.cfg.n_layers}
    original, out = iv.generate({"input_ids": ids, "attention_mask": mask}, unit_locations=nowhere,
                                source_representations=vec(scale=3.0), max_new_tokens=NEW,
                                output_original_output=True)
    assert_same(out, manual_greedy(model, ids, mask, NEW)[0])
    assert torch.equal(out, original)


def test_serial_mode_reaches_the_prompt_pass(model):  # noqa: F811
    """mode="serial" (source_0 -> source_1 -> base): the first new token's scores are the serial forward's
    last-position logits, which differ from the parallel forward's."""
    ids, mask = left_padded()
    g = torch.Generator().manual_seed(11)
    sources = [{"input_ids": torch.randint(1, 50, ids.shape, generator=g), "attention_mask": mask} for _ in range(2)]
    locations = {"serial": {"source_0->source_1": 5, "source_1->base": 6}, "parallel": {"sources->base": 6}}
    layers = [{"layer": 0, "component": "block_output"}, {"layer": 1, "component": "block_output"}]
    base = {"input_ids": ids, "attention_mask": mask}
    logits = {}
    for mode in ("serial", "parallel"):
        iv = pv.IntervenableModel(pv.IntervenableConfig(layers, mode=mode), model)
        logits[mode] = iv(base, sources, locations[mode])[1].logits[:, -1]
    assert (logits["serial"] - logits["parallel"]).abs().max() > 1e-3  # the modes really differ here
    iv = pv.IntervenableModel(pv.IntervenableConfig(layers, mode="serial"), model)
    _, (out, scores) = iv.generate(base, sources, locations["serial"], intervene_on_prompt=True,
                                   intervene_on_generated=False, max_new_tokens=2, output_scores=True)
    torch.testing.assert_close(scores[:, 0], logits["serial"], rtol=0, atol=1e-5)
