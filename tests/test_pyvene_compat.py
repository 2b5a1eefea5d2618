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


# -- HuggingFace names inside Llama, GPT-NeoX and T5 ----------------------------------------------------------------
# Code written for `transformers` (pyvene's test oracles among it) rebuilds a forward pass from HF's attribute names.
# Each test below walks a hookvene model by those names only, with arithmetic written out here, and must land on the
# model's own logits: a misdirected alias (ln1 for ln2, k for v, the wrong rotary width) shows as a logit error. The
# aliases must be the model's own objects and leave the state_dict and the hook names as they were.

def attention_by_hand(q, k, v, scale, bias=None, causal=True):
    """softmax(q k^T * scale + bias [+ causal mask]) v on (batch, head, pos, d) tensors."""
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        n_q, n_k = scores.shape[-2:]
        future = torch.ones(n_q, n_k, dtype=torch.bool).triu(n_k - n_q + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v


def rotate_by_hand(x, cos, sin):
    """Rotary embedding on (batch, head, pos, d): the first d_rot dims, pair (i, i + d_rot/2) turned by its angle."""
    d_rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # batch 1 pos d_rot
    x_rot, x_rest = x[..., :d_rot], x[..., d_rot:]
    lo, hi = x_rot[..., : d_rot // 2], x_rot[..., d_rot // 2:]
    turned = torch.cat([lo * cos[..., : d_rot // 2] - hi * sin[..., : d_rot // 2],
                        hi * cos[..., d_rot // 2:] + lo * sin[..., d_rot // 2:]], dim=-1)
    return torch.cat([turned, x_rest], dim=-1)


def heads(x, n_heads):
    """(batch, pos, n_heads * d) -> (batch, head, pos, d)."""
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def unheads(x):
    return x.transpose(1, 2).flatten(2)


def names_snapshot(model):
    return list(model.state_dict()), list(model.hook_dict), [n for n, _ in model.named_modules()]


def assert_no_hf_names(model, hf_names):
    """Keys, hooks and registered modules carry hookvene's names only: no alias became a submodule or a buffer."""
    for name in [*model.state_dict(), *model.hook_dict, *(n for n, _ in model.named_modules())]:
        assert not set(name.split(".")) & set(hf_names), name


def llama_logits_by_hf_names(lm, ids):
    m = lm.model
    cfg = m.config
    h = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(h, torch.arange(ids.shape[1]).expand(ids.shape[0], -1))
    for layer in m.layers:
        att, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(h)
        q = rotate_by_hand(heads(att.q_proj(x), cfg.num_attention_heads), cos, sin)
        k = rotate_by_hand(heads(att.k_proj(x), cfg.num_key_value_heads), cos, sin)
        v = heads(att.v_proj(x), cfg.num_key_value_heads)
        k, v = (t.repeat_interleave(att.num_key_value_groups, dim=1) for t in (k, v))
        assert q.shape[-1] == att.head_dim
        h = h + att.o_proj(unheads(attention_by_hand(q, k, v, att.head_dim**-0.5)))
        x = layer.post_attention_layernorm(h)
        h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    return lm.lm_head(m.norm(h))


@pytest.fixture(scope="module")
def llama_pair():
    from tests.test_parity import redraw_

    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16},
                                   tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    hf = redraw_(transformers.LlamaForCausalLM(cfg).eval(), seed=3)
    return hf, pv.from_pretrained(hf)


def test_llama_forward_by_hf_names_reproduces_the_logits(llama_pair):
    hf, lm = llama_pair
    before = names_snapshot(lm)
    x = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(llama_logits_by_hf_names(lm, x), lm(x).logits)
        # rotary_emb answers as transformers' LlamaRotaryEmbedding does (llama3 frequency scaling included)
        pos, probe = torch.arange(30).expand(2, -1), torch.zeros(2, 6, 30, 8)
        for ours, theirs in zip(lm.model.rotary_emb(probe, pos), hf.model.rotary_emb(probe, pos)):
            assert ours.shape == theirs.shape == (2, 30, 8)
            close(ours, theirs)
    assert names_snapshot(lm) == before
    assert_no_hf_names(lm, ["model", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj",
                            "gate_proj", "up_proj", "down_proj", "input_layernorm", "post_attention_layernorm",
                            "rotary_emb", "inv_freq", "embed_tokens", "norm", "lm_head"])
    assert "blocks.1.attn.q.weight" in lm.state_dict() and "blocks.1.attn.hook_rot_q" in lm.hook_dict


def test_llama_hf_names_are_the_models_own_objects(llama_pair):
    _, lm = llama_pair
    layer, block = lm.model.layers[1], lm.blocks[1]
    assert lm.model is lm and lm.model.embed_tokens is lm.embed and lm.model.norm is lm.ln_final
    assert lm.lm_head is lm.unembed and lm.model.layers is lm.blocks
    assert layer.input_layernorm is block.ln1 and layer.post_attention_layernorm is block.ln2
    assert layer.self_attn is block.attn and layer.mlp is block.mlp
    for hf_name, ours in [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "out")]:
        assert getattr(layer.self_attn, hf_name).weight is getattr(block.attn, ours).weight
    for hf_name, ours in [("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")]:
        assert getattr(layer.mlp, hf_name).weight is getattr(block.mlp, ours).weight
    assert layer.input_layernorm.weight is block.ln1.weight
    assert (layer.self_attn.head_dim, layer.self_attn.num_key_value_groups) == (8, 3)
    assert lm.model.config.num_key_value_heads == 2 and lm.model.rotary_emb.attention_scaling == 1.0


def neox_logits_by_hf_names(lm, ids):
    m = lm.gpt_neox
    h = m.embed_in(ids)
    cos, sin = m.rotary_emb(h, torch.arange(ids.shape[1]).expand(ids.shape[0], -1))
    for layer in m.layers:
        att, mlp = layer.attention, layer.mlp
        qkv = heads(att.query_key_value(layer.input_layernorm(h)), att.num_attention_heads)  # [q_h, k_h, v_h]
        q, k, v = qkv.split(att.head_size, dim=-1)
        q, k = rotate_by_hand(q, cos, sin), rotate_by_hand(k, cos, sin)
        attn = att.dense(unheads(attention_by_hand(q, k, v, att.head_size**-0.5)))
        mlp_in = h if layer.use_parallel_residual else h + attn
        mlp_out = mlp.dense_4h_to_h(mlp.act(mlp.dense_h_to_4h(layer.post_attention_layernorm(mlp_in))))
        h = h + attn + mlp_out
    return lm.embed_out(m.final_layer_norm(h))


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_forward_by_hf_names_reproduces_the_logits(parallel):
    from tests.test_parity import redraw_

    cfg = transformers.GPTNeoXConfig(vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                                     use_parallel_residual=parallel, tie_word_embeddings=False,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    hf = redraw_(transformers.GPTNeoXForCausalLM(cfg).eval(), seed=4)
    lm = pv.from_pretrained(hf)
    before = names_snapshot(lm)
    x = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(neox_logits_by_hf_names(lm, x), lm(x).logits)
        pos, probe = torch.arange(20).expand(2, -1), torch.zeros(2, 4, 20, 8)
        for ours, theirs in zip(lm.gpt_neox.rotary_emb(probe, pos), hf.gpt_neox.rotary_emb(probe, pos)):
            assert ours.shape == theirs.shape == (2, 20, 4)  # partial rotary: 4 of 8 dimensions
            close(ours, theirs)
    assert names_snapshot(lm) == before
    assert_no_hf_names(lm, ["gpt_neox", "layers", "attention", "query_key_value", "dense", "dense_h_to_4h",
                            "dense_4h_to_h", "input_layernorm", "post_attention_layernorm", "embed_in",
                            "final_layer_norm", "embed_out", "lm_head", "rotary_emb", "inv_freq"])
    layer, block = lm.gpt_neox.layers[1], lm.blocks[1]
    assert lm.gpt_neox is lm and lm.gpt_neox.layers is lm.blocks and lm.gpt_neox.embed_in is lm.embed
    assert lm.gpt_neox.final_layer_norm is lm.ln_final and lm.embed_out is lm.lm_head is lm.unembed
    assert layer.input_layernorm is block.ln1 and layer.post_attention_layernorm is block.ln2
    assert layer.attention is block.attn and layer.attention.query_key_value.weight is block.attn.qkv.weight
    assert layer.attention.dense.bias is block.attn.out.bias and layer.mlp.dense_h_to_4h.weight is block.mlp.fc.weight
    assert layer.mlp.dense_4h_to_h is block.mlp.proj and layer.use_parallel_residual is parallel
    y = torch.randn(2, 3, 32)
    assert torch.equal(layer.post_attention_dropout(y), y) and torch.equal(lm.gpt_neox.emb_dropout(y), y)


def t5_logits_by_hf_names(lm, enc_ids, dec_ids):
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = lm.config

    def position_bias(table, n_q, n_k, bidirectional):  # transformers' own bucketing, over our stack's table
        rel = torch.arange(n_k)[None, :] - torch.arange(n_q)[:, None]
        bucket = T5Attention._relative_position_bucket(rel, bidirectional, cfg.relative_attention_num_buckets,
                                                       cfg.relative_attention_max_distance)
        return table.weight[bucket].permute(2, 0, 1)[None]  # 1 head q k

    def attend(att, x, kv, bias, causal):
        q, k, v = (heads(proj(src), att.n_heads) for proj, src in ((att.q, x), (att.k, kv), (att.v, kv)))
        assert q.shape[-1] == att.key_value_proj_dim and att.inner_dim == att.n_heads * att.key_value_proj_dim
        return att.o(unheads(attention_by_hand(q, k, v, 1.0, bias, causal)))  # T5 does not scale the scores

    def feed_forward(sub, h):
        ff, x = sub.DenseReluDense, sub.layer_norm(h)
        inner = ff.act(ff.wi_0(x)) * ff.wi_1(x) if hasattr(ff, "wi_0") else ff.act(ff.wi(x))
        return h + sub.dropout(ff.wo(ff.dropout(inner)))

    h = lm.shared(enc_ids)
    bias = position_bias(lm.encoder.relative_attention_bias, enc_ids.shape[1], enc_ids.shape[1], True)
    for block in lm.encoder.block:
        attn, ff = block.layer
        x = attn.layer_norm(h)
        h = h + attn.dropout(attend(attn.SelfAttention, x, x, bias, causal=False))
        h = feed_forward(ff, h)
    enc = lm.encoder.final_layer_norm(h)
    h = lm.shared(dec_ids)
    bias = position_bias(lm.decoder.relative_attention_bias, dec_ids.shape[1], dec_ids.shape[1], False)
    for block in lm.decoder.block:
        attn, cross, ff = block.layer
        x = attn.layer_norm(h)
        h = h + attend(attn.SelfAttention, x, x, bias, causal=True)
        h = h + attend(cross.EncDecAttention, cross.layer_norm(h), enc, None, causal=False)
        h = feed_forward(ff, h)
    out = lm.decoder.final_layer_norm(h)
    if cfg.scale_decoder_outputs:
        out = out * lm.model_dim**-0.5
    return lm.lm_head(out)


@pytest.mark.parametrize("variant", ["relu", "gated"])
def test_t5_forward_by_hf_names_reproduces_the_logits(variant):
    from tests.test_parity import redraw_

    ff = dict(relu=dict(feed_forward_proj="relu"), gated=dict(feed_forward_proj="gated-gelu"))[variant]
    cfg = transformers.T5Config(vocab_size=37, d_model=24, d_kv=5, d_ff=40, num_layers=2, num_decoder_layers=2,
                                num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, **ff)
    torch.manual_seed(0)
    hf = redraw_(transformers.T5ForConditionalGeneration(cfg).eval(), seed=5)
    lm = pv.from_pretrained(hf)
    before = names_snapshot(lm)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 37, (2, 14), generator=g), torch.randint(0, 37, (2, 7), generator=g)
    with torch.no_grad():
        close(t5_logits_by_hf_names(lm, x, y), lm(x, decoder_input_ids=y).logits)
    assert names_snapshot(lm) == before
    assert_no_hf_names(lm, ["block", "layer", "SelfAttention", "EncDecAttention", "DenseReluDense", "layer_norm",
                            "final_layer_norm", "lm_head", "dropout", "0.layer", "1.layer"])
    enc_block, dec_block = lm.encoder.block[1], lm.decoder.block[0]
    assert lm.encoder.block is lm.encoder.blocks and lm.decoder.final_layer_norm is lm.decoder.ln_final
    assert enc_block.layer[0].SelfAttention is lm.encoder.blocks[1].attn
    assert enc_block.layer[0].layer_norm.weight is lm.encoder.blocks[1].ln1.weight
    assert enc_block.layer[1].layer_norm is lm.encoder.blocks[1].ln2
    assert enc_block.layer[1].DenseReluDense is lm.encoder.blocks[1].mlp
    assert dec_block.layer[1].EncDecAttention.q.weight is lm.decoder.blocks[0].cross_attn.q.weight
    assert dec_block.layer[1].layer_norm is lm.decoder.blocks[0].ln2 and dec_block.layer[2].layer_norm is \
        lm.decoder.blocks[0].ln3
    assert dec_block.layer[2].DenseReluDense.wo.weight is lm.decoder.blocks[0].mlp.wo.weight
    assert lm.lm_head is lm.unembed and lm.model_dim == 24
