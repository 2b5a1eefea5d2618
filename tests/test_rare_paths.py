"""Little-used paths where a planted bug once went unnoticed: each test asserts exact values, so it fails if the
behaviour is broken in the way its docstring names (not merely if it crashes)."""

import pytest
import torch
import torch.nn.functional as F

import hookvene as pv
from tests.helpers import close, differs, tiny_gpt2

VOCAB = 101  # tiny_gpt2's vocabulary


@pytest.fixture(scope="module")
def gpt2():
    return pv.from_pretrained(tiny_gpt2())


@pytest.fixture(scope="module")
def gru():
    _, _, model = pv.create_gru_classifier(pv.GRUConfig(h_dim=6, n_layer=2))
    return model.eval()


def ids(batch=2, pos=5, seed=0):
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


# -- set_interchange_dim ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [pv.RotatedSpaceIntervention, pv.VanillaIntervention])
@pytest.mark.parametrize("k", [1, 4])
def test_set_interchange_dim_interchanges_exactly_the_first_k_dims(cls, k):
    """After set_interchange_dim(k), the first k dims (rotated dims for the rotating types) are the source's and the
    rest keep the base's; a mask inverted (k.. taken from the source) or ignored fails."""
    iv = cls(embed_dim=6)
    iv.set_interchange_dim(k)
    g = torch.Generator().manual_seed(0)
    base, source = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    with torch.no_grad():
        out = iv(base, source)
        basis = iv.rotate_layer.weight if hasattr(iv, "rotate_layer") else torch.eye(6)  # orthogonal: x -> x @ R
        rb, rs, ro = base @ basis, source @ basis, out @ basis
    close(ro[:, :k], rs[:, :k])
    close(ro[:, k:], rb[:, k:])


@pytest.mark.parametrize("cls", [pv.BoundlessRotatedSpaceIntervention, pv.SigmoidMaskIntervention])
def test_learned_mask_types_keep_their_mask_whatever_the_interchange_dim(cls):
    """Boundless DAS and the sigmoid mask learn which dims to interchange; as in pyvene, interchange_dim does not
    override what they learned (it is recorded, e.g. for saving, but the output is the learned mask's)."""
    iv = cls(embed_dim=6)
    g = torch.Generator().manual_seed(0)
    base, source = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    with torch.no_grad():
        before = iv(base, source)
        iv.set_interchange_dim(2)
        close(iv(base, source), before)
    assert iv.interchange_dim == 2
    differs(before, base)


# -- negative and out-of-range unit indices -----------------------------------------------------------------------

@pytest.mark.parametrize("component,unit,locations", [
    ("block_output", "pos", {"base": -1}),
    ("head_attention_value_output", "h", {"base": -1}),
    ("head_attention_value_output", "h.pos", {"base": pv.GET_LOC((0, -1), batch_size=2)}),
])
def test_negative_unit_index_is_rejected(gpt2, component, unit, locations):
    """hookvene does not read -1 as "the last one" (nor wrap silently): it names the bad index."""
    iv = pv.IntervenableModel({"layer": 1, "component": component, "unit": unit,
                               "intervention_type": pv.CollectIntervention}, gpt2)
    with pytest.raises(ValueError, match="index -1 is out of range"):
        iv({"input_ids": ids()}, unit_locations=locations)


@pytest.mark.parametrize("pair", [(-1, 2), (2, -1)], ids=["source", "base"])
def test_negative_position_is_rejected_on_either_side_of_an_interchange(gpt2, pair):
    iv = pv.IntervenableModel({"layer": 1, "intervention_type": pv.VanillaIntervention}, gpt2)
    with pytest.raises(ValueError, match="index -1 is out of range"):
        iv({"input_ids": ids()}, sources=[{"input_ids": ids(seed=1)}], unit_locations={"sources->base": pair})


@pytest.mark.parametrize("step", [-1, 7])
@pytest.mark.parametrize("kind", [pv.CollectIntervention, pv.ZeroIntervention])
def test_gru_time_step_out_of_range_is_rejected(gru, step, kind):
    """Unit t on a 5-step sequence: step -1 or 7 names no step; like every other unit, it must be an error, not a
    silent no-op (a Collect returning nothing, a Zero changing nothing)."""
    iv = pv.IntervenableModel({"layer": 1, "component": "cell_output", "unit": "t", "intervention_type": kind}, gru)
    with pytest.raises(ValueError, match=f"{step} is out of range"):
        iv({"inputs_embeds": torch.randn(2, 5, 6)}, unit_locations={"base": step})


# -- GRU: a different time step per example -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [[1, 3], [3, 1], [2, 2]])
def test_gru_collect_reads_each_examples_own_step(gru, steps):
    """unit_locations with one step list per example: collected[i] is example i's hidden state at its own step
    (pyvene's order: examples in batch order), equal to run_with_cache's tensor there."""
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(3))
    hook = "layers.1.hook_hidden"
    _, cache = gru.run_with_cache(inputs_embeds=x, names_filter=hook)
    iv = pv.IntervenableModel({"layer": 1, "component": "cell_output", "unit": "t",
                               "intervention_type": pv.CollectIntervention}, gru)
    (_, collected), _ = iv({"inputs_embeds": x}, unit_locations={"base": [[[s] for s in steps]]})
    assert len(collected) == 2
    for row, step in enumerate(steps):
        close(collected[row].reshape(-1), cache[hook][row, step])


# -- save / load with the model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("include_model", [True, False])
def test_load_with_include_model_restores_the_saved_weights(tmp_path, include_model):
    """Saved with include_model=True, then loaded onto a differently initialised model: with include_model=True the
    other model computes what the saved one did; with include_model=False it keeps its own weights."""
    saved, other = pv.from_pretrained(tiny_gpt2(seed=0)), pv.from_pretrained(tiny_gpt2(seed=1))
    config = {"layer": 1, "component": "mlp_output", "intervention_type": pv.ZeroIntervention}
    iv = pv.IntervenableModel(config, saved)
    base = {"input_ids": ids()}
    _, want = iv(base, unit_locations={"base": 2})
    own = other(**base).logits
    differs(own, saved(**base).logits)
    iv.save(str(tmp_path), include_model=True)
    loaded = pv.IntervenableModel.load(str(tmp_path), other, include_model=include_model)
    _, got = loaded(base, unit_locations={"base": 2})
    if include_model:
        close(got.logits, want.logits, atol=0)
        close(loaded.model(**base).logits, saved(**base).logits, atol=0)
    else:
        close(loaded.model(**base).logits, own, atol=0)
        differs(got.logits, want.logits)


# -- generate(generated_steps=...) ------------------------------------------------------------------------------

NEW = 4  # new tokens: decode passes 0..NEW-2 (the last token needs no pass of its own)


def steering(model):
    return pv.IntervenableModel({"layer": 1, "component": "mlp_output", "intervention_type": pv.AdditionIntervention},
                                model)


@pytest.mark.parametrize("length", [{"max_new_tokens": NEW}, {"max_length": 5 + NEW}])
@pytest.mark.parametrize("step", [NEW - 1, -1])
def test_generated_steps_outside_the_decode_passes_are_rejected(gpt2, length, step):
    with pytest.raises(ValueError, match=rf"generated_steps \[{step}\] never happen.*0\.\.{NEW - 2}"):
        steering(gpt2).generate({"input_ids": ids()}, source_representations=torch.ones(32),
                                generated_steps=[step], **length)


@pytest.mark.parametrize("length", [{"max_new_tokens": NEW}, {"max_length": 5 + NEW}])
def test_last_decode_pass_is_accepted_and_changes_only_the_last_token(gpt2, length):
    """generated_steps=[NEW - 2] (the boundary) is valid: it intervenes on the pass that predicts the last token, so
    the scores of every earlier token equal plain generation and the last one's do not."""
    vec = 3 * torch.randn(32, generator=torch.Generator().manual_seed(5))
    _, (out, scores) = steering(gpt2).generate({"input_ids": ids()}, source_representations=vec,
                                               intervene_on_prompt=False, generated_steps=[NEW - 2],
                                               output_scores=True, **length)
    ref, ref_scores = gpt2.generate(ids(), output_scores=True, **length)
    assert scores.shape[1] == NEW
    close(scores[:, :-1], ref_scores[:, :-1])
    differs(scores[:, -1], ref_scores[:, -1])
    assert torch.equal(out[:, :-1], ref[:, :-1])


def test_generated_steps_need_intervene_on_generated(gpt2):
    with pytest.raises(ValueError, match="generated_steps needs intervene_on_generated=True"):
        steering(gpt2).generate({"input_ids": ids()}, source_representations=torch.ones(32),
                                intervene_on_generated=False, generated_steps=[0], max_new_tokens=NEW)


# -- the GRU LM's loss --------------------------------------------------------------------------------------------

def test_gru_lm_loss_is_shifted_next_token_cross_entropy():
    """loss = mean over (example, t) with labels[t + 1] != -100 of -log softmax(logits[t])[labels[t + 1]]: logits at
    t predict the token at t + 1, and -100 labels are skipped. An unshifted loss, or one counting -100, fails."""
    _, _, lm = pv.create_gru_lm(pv.GRUConfig(include_emb=True, vocab_size=13, h_dim=8, n_layer=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large weights: peaked logits, so the shifted and unshifted losses are far apart
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    tokens = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = tokens.clone()
    labels[0, 3] = labels[1, 5] = -100
    out = lm(input_ids=tokens, labels=labels)
    logp = out.logits.log_softmax(-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(5) if labels[b, t + 1] != -100]
    assert len(terms) == 8
    expected = torch.stack(terms).mean()
    close(out.loss, expected)
    unshifted = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert (unshifted - expected).abs() > 1e-2  # the check above tells the two apart
