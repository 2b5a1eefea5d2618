"""pyvene drop-in behaviours (issue 13): transformers configs in create_*, HF submodule names, transformers' output
order and switches, config flags, module-path components, pyvene's exception types, the per-unit reading of direct
intervention calls, skipped interventions without sources, and pyvene's saved layout."""

import json

import pytest
import torch
import transformers

import hookvene as pv
from hookvene.components import resolve
from tests.helpers import close, differs

torch.manual_seed(0)
HF_CFG = dict(n_embd=24, n_layer=2, n_head=4, vocab_size=10, n_positions=32, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def hf_lm():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CFG)).eval()


@pytest.fixture()
def lm():
    torch.manual_seed(0)
    return pv.create_gpt2_lm(config=transformers.GPT2Config(**HF_CFG))[2]


def ids(seed=0, batch=2, n=6):
    return torch.randint(0, 10, (batch, n), generator=torch.Generator().manual_seed(seed))


# -- create_* with configs -------------------------------------------------------------------------------------------

def test_create_accepts_transformers_and_hookvene_configs():
    cfg, tok, lm = pv.create_gpt2_lm(config=transformers.GPT2Config(**HF_CFG))
    assert type(lm) is pv.GPT2LM and tok is None and cfg.n_embd == 24 and cfg.n_layer == 2
    _, _, base = pv.create_gpt2(config=transformers.GPT2Config(**HF_CFG))
    assert type(base) is pv.GPT2
    _, _, neo = pv.create_gpt_neo(config=transformers.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2,
                                                                   vocab_size=10, max_position_embeddings=32,
                                                                   attention_types=[[["global", "local"], 1]]))
    assert type(neo) is pv.models.GPTNeoLM and neo.config.num_layers == 2
    _, _, t5 = pv.create_t5(config=transformers.T5Config(d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=1,
                                                         vocab_size=20))
    assert type(t5) is pv.T5LM
    own = pv.GPT2Config(d_vocab=10, d_model=8, n_layers=1, n_heads=2, n_ctx=16)
    assert pv.create_gpt2_lm(config=own)[2].cfg is own


def test_create_refuses_another_architectures_config():
    with pytest.raises(ValueError, match="transformers config with model_type='gpt2'"):
        pv.create_gpt2_lm(config=transformers.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2,
                                                           attention_types=[[["global", "local"], 1]]))


def test_transformers_config_model_computes_what_transformers_computes(hf_lm):
    model = pv.from_pretrained(hf_lm)
    x = ids()
    with torch.no_grad():
        close(model(x).logits, hf_lm(x).logits, atol=1e-4)


# -- HuggingFace names, output order, switches --------------------------------------------------------------------

def test_hf_submodule_names_are_aliases_that_compute_the_same(lm):
    block = lm.transformer.h[1]
    assert block.ln_1 is lm.blocks[1].ln1 and block.attn.c_attn is lm.blocks[1].attn.qkv
    assert block.attn.c_proj is lm.blocks[1].attn.out and block.mlp.c_fc is lm.blocks[1].mlp.fc
    assert block.attn.split_size == 24 and block.attn.num_heads == 4 and block.attn.head_dim == 6
    x = torch.randn(2, 3, 24)
    assert torch.equal(block.attn.resid_dropout(x), x) and torch.equal(block.mlp.dropout(x), x)
    assert "blocks.1.attn.hook_pattern" in lm.hook_dict and not any("c_attn" in n for n in lm.hook_dict)
    assert lm.device == torch.device("cpu")
    # rebuild the MLP of block 1 from HF names, as pyvene's test oracle does, and compare with the hooks
    _, cache = lm.run_with_cache(ids())
    mid = cache["blocks.1.ln2.hook_normalized"]
    close(block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(mid))), cache["blocks.1.hook_mlp_out"])
    neo = pv.create_gpt_neo(config=transformers.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2,
                                                             vocab_size=10, max_position_embeddings=32,
                                                             attention_types=[[["global", "local"], 1]]))[2]
    assert neo.transformer.h[0].attn.attention.q_proj is neo.blocks[0].attn.q and neo.h[0].mlp.c_proj is \
        neo.blocks[0].mlp.proj


def test_tuple_order_is_transformers(lm, hf_lm):
    x = ids()
    out = lm(x, labels=x)
    assert out[0] is out.loss and out[1] is out.logits
    assert lm(x)[0] is not None and lm(x)[0].shape == (2, 6, 10)  # logits first, as in transformers
    tup = lm(x, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == (2, 6, 10)
    base = pv.create_gpt2(config=transformers.GPT2Config(**HF_CFG))[2]
    assert base(x)[0].shape == (2, 6, 24)
    ref = pv.from_pretrained(hf_lm)
    with torch.no_grad():
        theirs = hf_lm(x, labels=x, return_dict=False)
        ours = ref(x, labels=x, return_dict=False)
    close(ours[0], theirs[0], atol=1e-4)
    close(ours[1], theirs[1], atol=1e-4)


def test_hidden_states_and_attentions_match_transformers(hf_lm):
    model = pv.from_pretrained(hf_lm)
    x = ids()
    with torch.no_grad():
        theirs = hf_lm(x, output_hidden_states=True, output_attentions=True)
        ours = model(x, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states + ours.attentions, theirs.hidden_states + theirs.attentions):
        close(a, b, atol=1e-4)
    assert model(x).hidden_states is None and not model.has_hooks()
    t5 = pv.create_t5(config=transformers.T5Config(d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=1,
                                                   vocab_size=20))[2]
    with pytest.raises(ValueError, match="T5LM does not return attentions"):
        t5(ids(), decoder_input_ids=ids(), output_attentions=True)


def test_config_flags_can_be_set_and_take_effect_architecture_fields_cannot(lm):
    assert lm.config.output_attentions is False
    lm.config.output_attentions = True
    assert len(lm(ids()).attentions) == 2
    lm.config.output_attentions = False
    assert lm(ids()).attentions is None
    lm.config.return_dict = False
    assert isinstance(lm(ids()), tuple)
    lm.config.return_dict = True
    for name in ("n_embd", "d_model", "n_layer"):
        with pytest.raises(AttributeError, match=f"{name} is an architecture field"):
            setattr(lm.config, name, 3)
    assert lm.config.n_embd == 24
    gru_cfg = pv.GRUConfig(h_dim=8)
    with pytest.raises(AttributeError, match="h_dim is an architecture field"):
        gru_cfg.h_dim = 4


# -- module-path components ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,hook", [
    ("h[0].mlp.output", "blocks.0.hook_mlp_out"),
    ("transformer.h[1].output", "blocks.1.hook_resid_post"),
    ("h[1].attn.attn_dropout.input", "blocks.1.attn.hook_pattern"),
    ("transformer.h[0].attn.c_proj.input", "blocks.0.attn.hook_z"),
    ("h[0].mlp.act.output", "blocks.0.mlp.hook_post"),
])
def test_module_paths_map_to_the_hook_holding_that_tensor(lm, path, hook):
    assert resolve(lm, 0, path, "pos").hook == hook


def test_module_path_intervention_equals_the_hook_name(lm):
    x = ids()
    zero = lambda b, s: b * 0  # noqa: E731
    by_path = pv.IntervenableModel({"component": "h[0].mlp.output", "intervention": zero}, lm)(x)[1].logits
    by_hook = pv.IntervenableModel({"component": "blocks.0.hook_mlp_out", "intervention": zero}, lm)(x)[1].logits
    close(by_path, by_hook)
    differs(by_path, lm(x).logits)
    # pyvene's runtime registration of a module path for a component name works on hooked models too
    table = pv.type_to_module_mapping[type(lm)]
    table["my_mlp_out"] = ("h[%s].mlp", "register_forward_hook")
    try:
        assert resolve(lm, 1, "my_mlp_out", "pos").hook == "blocks.1.hook_mlp_out"
    finally:
        del table["my_mlp_out"]


def test_module_path_without_hook_is_a_clear_error(lm):
    with pytest.raises(ValueError, match=r"module path 'h\[0\].attn.c_attn.output' has no hook point"):
        resolve(lm, 0, "h[0].attn.c_attn.output", "pos")
    with pytest.raises(ValueError, match="layer 7 in 'h\\[7\\].output' is out of range"):
        resolve(lm, 0, "h[7].output", "pos")


# -- exception types and direct calls ------------------------------------------------------------------------------

def test_out_of_range_subspace_is_value_and_index_error():
    base, src = torch.zeros(2, 3, 6), torch.ones(2, 3, 6)
    for iv, sub in ((pv.VanillaIntervention(), [[1, 6]]),
                    (pv.VanillaIntervention(subspace_partition=[[0, 3], [3, 6]]), [[2]])):
        with pytest.raises(IndexError, match="out of range"):
            iv(base, src, subspaces=sub)
        with pytest.raises(ValueError, match="out of range"):
            iv(base, src, subspaces=sub)


def test_wrong_number_of_location_entries_is_value_and_index_error(lm):
    pvm = pv.IntervenableModel([{"layer": 0}, {"layer": 1}], lm)
    x = ids()
    with pytest.raises(IndexError, match="1 entries for 2 interventions"):
        pvm(x, [x], {"sources->base": ([[[0]] * 2], [[[0]] * 2])})
    assert not lm.has_hooks()


def test_collect_with_uneven_subspace_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="same number of dims"):
        pv.CollectIntervention()(torch.zeros(2, 3, 6), None, subspaces=[[0, 1], [2]])


def test_direct_call_subspace_rows_follow_the_units_when_they_are_not_the_batch():
    base, src = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    out = pv.VanillaIntervention()(base, src, subspaces=[[0], [1], [2]])  # 3 rows = 3 units, batch 2
    want = torch.zeros(2, 3, 4)
    for unit in range(3):
        want[:, unit, unit] = 1
    assert torch.equal(out, want)
    per_example = pv.VanillaIntervention()(base, src, subspaces=[[0], [3]])  # 2 rows = the batch
    assert per_example[0, :, 0].eq(1).all() and per_example[1, :, 3].eq(1).all() and per_example.sum() == 6
    fast = pv.VanillaIntervention(use_fast=True)(base, src, subspaces=[[0], [1], [2]])
    assert fast[..., 0].eq(1).all() and fast.sum() == 6  # the first row for all
    collected = pv.CollectIntervention()(torch.arange(24.).view(2, 3, 4), None, subspaces=[[0], [1], [2]])
    assert collected.shape == (2, 3, 1) and collected[0, :, 0].tolist() == [0.0, 5.0, 10.0]
    with pytest.raises(ValueError, match="subspaces have 4 rows"):
        pv.VanillaIntervention()(base, src, subspaces=[[0]] * 4)


# -- sources left out ------------------------------------------------------------------------------------------------

def test_no_sources_and_no_locations_skip_source_interventions(lm):
    pvm = pv.IntervenableModel({"layer": 0, "component": "block_output"}, lm)
    x = ids()
    original, out = pvm(x, output_original_output=True)
    close(original[0], lm(x).logits)
    close(out.logits, lm(x).logits)
    with pytest.raises(ValueError, match="needs a source"):  # asking for positions without a source is a mistake
        pvm(x, unit_locations={"base": 1})


def test_intervention_entries_are_callable(lm):
    pvm = pv.IntervenableModel({"layer": 0}, lm)
    entry = list(pvm.interventions.values())[0]
    base, src = torch.zeros(1, 2, 24), torch.ones(1, 2, 24)
    assert torch.equal(entry(base, src), entry[0](base, src))


def test_print_intervention_info(lm, capsys):
    pv.IntervenableModel([{"layer": 0, "intervention_type": pv.RotatedSpaceIntervention}], lm).print_intervention_info()
    text = capsys.readouterr().out
    assert "layer_0_comp_block_output_unit_pos_nunit_1#0: RotatedSpaceIntervention on blocks.0.hook_resid_post" in text
    assert "576 trainable parameters" in text


# -- pyvene's saved layout -------------------------------------------------------------------------------------------

def write_pyvene_dir(path, key="layer_1_comp_block_output_unit_pos_nunit_1#0"):
    """A directory as pyvene's `save` writes it (config.json with list representations + intkey_*.bin holding the
    intervention's state_dict: torch's orthogonal parametrization, as pyvene uses it, plus pyvene's size buffers).
    Returns the rotation it holds."""
    reps = [[1, "block_output", "pos", 1, None, None, None, None, None, None, None, None, None, None]]
    cfg = {"representations": reps,
           "intervention_types": ["<class 'pyvene.models.interventions.RotatedSpaceIntervention'>"],
           "mode": "parallel", "sorted_keys": [key], "model_type": "<class 'GPT2LMHeadModel'>",
           "intervention_dimensions": [24], "intervention_constant_sources": [False],
           "transformers_version": "4.57.6"}
    (path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(1)
    trained = pv.RotatedSpaceIntervention(embed_dim=24)
    state = {"embed_dim": torch.tensor(24), "interchange_dim": torch.tensor(12), **trained.state_dict()}
    torch.save(state, path / f"intkey_{key}.bin")
    return trained.rotate_layer.weight.detach()


def test_loads_pyvene_saved_interventions(lm, tmp_path):
    rotation = write_pyvene_dir(tmp_path)
    loaded = pv.IntervenableModel.load(str(tmp_path), lm)
    iv = loaded.interventions["layer_1_comp_block_output_unit_pos_nunit_1#0"][0]
    assert isinstance(iv, pv.RotatedSpaceIntervention) and iv.interchange_dim == 12
    close(iv.rotate_layer.weight, rotation, atol=1e-5)
    # the rebuilt intervention computes what the rotation says: interchange the first 12 rotated dims
    x, s = torch.randn(1, 1, 24), torch.randn(1, 1, 24)
    want = ((x @ rotation).clone().index_copy_(-1, torch.arange(12), (s @ rotation)[..., :12])) @ rotation.T
    close(iv(x.reshape(1, 24), s.reshape(1, 24)), want.reshape(1, 24), atol=1e-5)
    # saving keeps hookvene's format
    loaded.save(str(tmp_path / "again"))
    assert (tmp_path / "again" / "interventions.safetensors").is_file()


def test_pyvene_bin_with_a_pickled_object_is_refused(lm, tmp_path):
    write_pyvene_dir(tmp_path)
    key = "layer_1_comp_block_output_unit_pos_nunit_1#0"
    torch.save({"rotate_layer.parametrizations.weight.original": torch.eye(24), "evil": print},
               tmp_path / f"intkey_{key}.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        pv.IntervenableModel.load(str(tmp_path), lm)
