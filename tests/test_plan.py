"""The public plan-and-attach core (hookvene/plan.py), the capability attributes every part reads, and the component
registry. IntervenableModel, its generate and the sweeps are tested elsewhere; these pin the pieces they share."""

import subprocess
import sys

import pytest
import torch

import hookvene as pv
from hookvene.components import Site, resolve
from hookvene.config import IntervenableConfig
from hookvene.experiments.sweep import check_model
from hookvene.models.common import generate
from hookvene.plan import Attachment, Patch, attach, build_slots, make_plan, patch_rows
from tests.helpers import close, differs, tiny_gpt2


@pytest.fixture(scope="module")
def model():
    return pv.from_pretrained(tiny_gpt2(n_layer=3))


def ids(seed, batch=2, seq=6):
    return torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_plan_attached_by_hand_equals_intervenable_model(model):
    """The documented sequence (build_slots, make_plan, read_sources, attached) is what IntervenableModel.forward
    runs: same output, and the result is the hand-written interchange at that position."""
    config = IntervenableConfig([{"layer": 1, "component": "block_output"}])
    base, source = ids(1), ids(2)
    plan = make_plan(build_slots(config, model), base, sources=[source], unit_locations={"sources->base": 3})
    plan.read_sources(model)
    with plan.attached(model):
        by_plan = model(base).logits
    _, via_model = pv.IntervenableModel(config, model)(base, [source], {"sources->base": 3})
    src = model.run_with_cache(source, names_filter="blocks.1.hook_resid_post")[1]["blocks.1.hook_resid_post"]

    def put(x, hook):
        x = x.clone()
        x[:, 3] = src[:, 3]
        return x
    oracle = model.run_with_hooks(base, fwd_hooks=[("blocks.1.hook_resid_post", put)]).logits
    close(by_plan, via_model.logits)
    close(by_plan, oracle)
    differs(by_plan, model(base).logits)
    assert not model.has_hooks()


def test_plan_checks_locations_before_anything_runs(model):
    slots = build_slots(IntervenableConfig([{"layer": 0, "component": "block_output"}]), model)
    plan = make_plan(slots, ids(1), sources=[ids(2)], unit_locations={"sources->base": 99})
    with pytest.raises(ValueError, match="position index 99 is out of range"):
        plan.read_sources(model)
    with pytest.raises(ValueError, match="needs a source"):
        make_plan(slots, ids(1), unit_locations={"base": 1})
    assert not model.has_hooks()


def test_attach_removes_exactly_its_functions_even_on_error(model):
    mine = []
    user = ("blocks.0.hook_resid_pre", lambda x, hook: mine.append(1))
    with model.hooks(fwd_hooks=[user]):
        with pytest.raises(RuntimeError, match="boom"), attach(model, [Attachment("blocks.1.hook_resid_pre",
                                                                                    lambda x, h: None)]):
            raise RuntimeError("boom")
        assert [len(p.fwd_fns) for n, p in model.hook_dict.items() if p.fwd_fns] == [1]  # the user's stays
        model(ids(1))
    assert mine == [1] and not model.has_hooks()


def test_patch_rows_writes_each_row_its_own_cell(model):
    """Rows 0-1 patch position 2 from store row 0/1 (cell 0); rows 2-3 patch head 1 of hook_z everywhere (cell 1)."""
    x = ids(3, batch=2)
    cache = model.run_with_cache(ids(4, batch=2))[1]
    stored = {"blocks.0.hook_resid_post": cache["blocks.0.hook_resid_post"], "blocks.1.attn.hook_z":
              cache["blocks.1.attn.hook_z"]}
    cells = [[Patch("blocks.0.hook_resid_post", (2, None))], [Patch("blocks.1.attn.hook_z", (None, 1, None))]]
    rows = patch_rows(cells, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), stored)
    with attach(model, rows):
        _, got = model.run_with_cache(x.repeat(2, 1), names_filter=lambda n: n in stored)
    plain = model.run_with_cache(x)[1]
    close(got["blocks.0.hook_resid_post"][:2, 2], stored["blocks.0.hook_resid_post"][:, 2])
    close(got["blocks.0.hook_resid_post"][:2, 3], plain["blocks.0.hook_resid_post"][:, 3])  # only position 2
    close(got["blocks.0.hook_resid_post"][2:], plain["blocks.0.hook_resid_post"])  # cell 1 leaves layer 0 alone
    close(got["blocks.1.attn.hook_z"][2:, :, 1], stored["blocks.1.attn.hook_z"][:, :, 1])
    close(got["blocks.1.attn.hook_z"][2:, :, 0], plain["blocks.1.attn.hook_z"][:, :, 0])


# -- one way to ask what a model can do -----------------------------------------------------------------------------

CAPABILITIES = {  # class: (is_encoder_decoder, has_lm_head, can_generate, can_resume), spelled out by hand
    pv.GPT2: (False, False, False, True), pv.GPT2LM: (False, True, True, True),
    pv.GPTNeo: (False, False, False, True), pv.GPTNeoLM: (False, True, True, True),
    pv.T5: (True, False, False, False), pv.T5LM: (True, True, True, False),
    pv.GRU: (False, False, False, False), pv.GRUClassifier: (False, False, False, False),
    pv.GRULM: (False, True, False, False),
}


@pytest.mark.parametrize("cls", list(CAPABILITIES), ids=lambda c: c.__name__)
def test_capabilities_are_class_attributes(cls):
    got = (cls.is_encoder_decoder, cls.has_lm_head, cls.can_generate, cls.can_resume)
    assert got == CAPABILITIES[cls]


def test_what_a_model_cannot_do_is_a_clear_error():
    gru = pv.GRULM(pv.GRUConfig(include_emb=True, vocab_size=11, h_dim=8, n_layer=1))
    with pytest.raises(ValueError, match="GRULM cannot generate"):
        gru.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="GRULM cannot generate"):
        generate(gru, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="decoder-only language models"):
        check_model(gru, "activation_patch")
    with pytest.raises(ValueError, match="GRULM cannot unembed residual vectors"):
        gru.unembed_resid(torch.zeros(1, 8))


def test_unembed_resid_is_the_model_head(model):
    x = ids(5)
    resid = model(x, stop_at_layer=model.cfg.n_layers).last_hidden_state
    close(model.unembed_resid(resid), model(x).logits)
    tokens = torch.tensor([[4, 7], [9, 4]])
    close(model.unembed_resid(resid[:, -1], tokens), model(x).logits[:, -1].gather(1, tokens))


# -- the component registry ------------------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_hookvene_models_resolve_after_a_user_registers_a_foreign_model():
    """In a fresh process, a user's registration before any hookvene model is used must not hide hookvene's own
    tables (they used to be filled lazily, only while the registry was empty)."""
    script = """
import torch.nn as nn
import hookvene as pv
from hookvene.components import resolve

class Foreign(nn.Module):
    pass

pv.type_to_module_mapping[Foreign] = {"block_output": ("layers[%s]", "register_forward_hook")}
model = pv.GPT2LM(pv.GPT2Config(d_vocab=11, n_ctx=8, d_model=8, n_layers=2, n_heads=2))
print(resolve(model, 1, "block_output", "pos").hook)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "blocks.1.hook_resid_post"


def test_component_tables_are_sites_with_hook_templates():
    for cls in (pv.GPT2LM, pv.GPTNeoLM, pv.T5LM, pv.GRULM):
        table = pv.type_to_module_mapping[cls]
        assert table and all(isinstance(site, Site) for site in table.values()), cls
    gru = pv.type_to_module_mapping[pv.GRU]
    assert gru["update_h2h_output"] == Site("layers.{layer}.hook_h2h", "step", "d_model", gate=1)


def test_a_user_alias_for_a_hookvene_model(model):
    table = pv.type_to_module_mapping[type(model)]
    table["my_resid"] = Site("blocks.{layer}.hook_resid_mid", "flat", "d_model")
    try:
        site = resolve(model, 2, "my_resid", "pos")
        assert (site.hook, site.dim) == ("blocks.2.hook_resid_mid", model.cfg.d_model)
    finally:
        del table["my_resid"]
