"""Llama, Mistral and Qwen2 (hookvene/models/llama.py) against `transformers`, on redrawn parameters.

Parity (logits, every residual stream, every attention pattern, left-padded rows; fp32 and fp64; from memory and
from disk) for: Llama with grouped-query attention, llama3 rope scaling and an untied unembedding; Llama with
linear rope scaling, attention/MLP biases and a tied unembedding; Mistral with inputs longer than its sliding
window; Qwen2 with q/k/v biases, a tied unembedding and a sliding window on its upper layers; the bare LlamaModel.
Then the KV cache beyond the window, greedy generation equal to `transformers`' `generate`, the hook vocabulary,
config spellings and refusals, sharded and bfloat16 checkpoints, components, interventions during generation, the
sweeps and `create_llama`.
"""

import json
import os

import pytest
import torch
import transformers

import hookvene as pv
from hookvene.experiments.metrics import logit_diff
from hookvene.experiments.patching import activation_patch
from hookvene.loading.llama import config_from_hf
from hookvene.models.common import KVCache
from tests.helpers import make_tokenizer, save_checkpoint, token_pair
from tests.test_experiments import cell_by_cell
from tests.test_generate import assert_same, manual_greedy, mlp_out_names, steering_config
from tests.test_parity import Comparison, compare_decoder_only, left_padded, load, redraw_

VOCAB, WINDOW = 89, 4  # the 14-token parity inputs are longer than the sliding window
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # with d_head 16: fast, mid and slow pairs
CASES = {  # name: (HF class, config overrides, hookvene lm_head)
    "llama-gqa-llama3-untied": ("LlamaForCausalLM", dict(rope_parameters=LLAMA3, tie_word_embeddings=False), True),
    "llama-linear-biases-tied": ("LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, num_key_value_heads=6,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True), True),
    "mistral-window": ("MistralForCausalLM", dict(sliding_window=WINDOW, tie_word_embeddings=False), True),
    "qwen2-biases-tied-window": ("Qwen2ForCausalLM", dict(
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), True),
    "llama-base": ("LlamaModel", dict(rope_parameters=LLAMA3), False),
}


def tiny(cls_name: str, seed: int = 0, **overrides):
    """A redrawn HF model: 3 layers, d_model 96, 6 query heads of width 16 sharing 2 key/value heads."""
    config_cls = {"Llama": transformers.LlamaConfig, "Mistral": transformers.MistralConfig,
                  "Qwen2": transformers.Qwen2Config}[cls_name.removesuffix("ForCausalLM").removesuffix("Model")]
    kw = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=112, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
              attn_implementation="eager")
    kw.update(overrides)
    torch.manual_seed(seed)
    hf = getattr(transformers, cls_name)(config_cls(**kw)).eval()
    return redraw_(hf, seed=50 + seed)


# No float64 setup: `transformers`' eager attention takes the softmax in float32, where a float64 padding mask
# (finfo(float64).min) becomes -inf, so its left-padded rows turn NaN from the second layer on.
@pytest.mark.parametrize("setup", ["memory", "disk"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, setup, tmp_path):
    cls_name, overrides, lm_head = CASES[case]
    hf = tiny(cls_name, **overrides)
    if lm_head:
        assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == overrides["tie_word_embeddings"]
    hf, model = load(hf, setup, tmp_path, lm_head)
    assert isinstance(model, pv.LlamaLM if lm_head else pv.Llama)
    if lm_head:
        assert (model.unembed.weight is model.embed.weight) == overrides["tie_word_embeddings"]
    if case.startswith("mistral"):
        assert model.cfg.windows == (WINDOW,) * 3
    if case.startswith("qwen2"):
        assert model.cfg.windows == (128, WINDOW, WINDOW) and model.cfg.qkv_bias and not model.cfg.out_bias
    compare_decoder_only(hf, model, VOCAB, f"{case} {setup}")


@pytest.fixture(scope="module")
def mistral():
    hf = tiny("MistralForCausalLM", sliding_window=WINDOW)
    return hf, pv.from_pretrained(hf)


def test_kv_cache_beyond_the_window_equals_transformers(mistral):
    """Prompt of 3 tokens, then 11 one-token passes through the KV cache: each step's logits equal HF's full
    forward at that position, also when the cache holds more keys than the window (left-padded rows too)."""
    hf, model = mistral
    ids, mask, pos = left_padded(VOCAB)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        cache = KVCache()
        steps = [model(ids[:, :3], attention_mask=mask[:, :3], position_ids=pos[:, :3], past_key_values=cache).logits]
        for t in range(3, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                               past_key_values=cache).logits)
    assert len(cache) == ids.shape[1] > 3 * WINDOW
    cmp = Comparison("mistral kv cache", torch.float32)
    cmp("logits (cached steps)", torch.cat(steps, dim=1), ref, mask.bool(), logits=True)
    cmp.check()


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]])
def test_greedy_generation_equals_transformers(case):
    cls_name, overrides, _ = CASES[case]
    hf = tiny(cls_name, **overrides)
    model = pv.from_pretrained(hf)
    ids, mask, _ = left_padded(VOCAB, pos=9)  # rows of 9, 5 and 1 real tokens
    new = 10  # past the window of 4
    theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    ours, scores = model.generate(ids, mask, max_new_tokens=new, eos_token_id=0, pad_token_id=0, output_scores=True)
    assert_same(ours, theirs.sequences)
    cmp = Comparison(f"{case} generate", torch.float32)  # every step's logits too, not only their argmax
    cmp("scores", scores, torch.stack(theirs.scores, dim=1), logits=True)
    cmp.check()


def test_hook_vocabulary_and_grouped_query_shapes(mistral):
    """Every hook fires in a plain forward; q has n_heads, k and v n_kv_heads; the rotation keeps shapes; the
    gated MLP's three hooks are d_mlp wide. Hook names carry no `model.` prefix."""
    _, model = mistral
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    assert set(cache.keys()) == set(model.hook_dict)
    a = "blocks.1.attn."
    assert cache[a + "hook_q"].shape == cache[a + "hook_rot_q"].shape == cache[a + "hook_z"].shape == (2, 7, 6, 16)
    assert cache[a + "hook_k"].shape == cache[a + "hook_rot_k"].shape == cache[a + "hook_v"].shape == (2, 7, 2, 16)
    assert cache[a + "hook_pattern"].shape == (2, 6, 7, 7)
    assert not torch.allclose(cache[a + "hook_rot_k"], cache[a + "hook_k"])  # the rotation happened
    assert torch.allclose(cache[a + "hook_rot_k"][:, 0], cache[a + "hook_k"][:, 0])  # position 0: angle 0
    for h in ("hook_pre", "hook_pre_linear", "hook_post"):
        assert cache[f"blocks.2.mlp.{h}"].shape == (2, 7, 112)
    post = torch.nn.functional.silu(cache["blocks.2.mlp.hook_pre"]) * cache["blocks.2.mlp.hook_pre_linear"]
    assert torch.allclose(cache["blocks.2.mlp.hook_post"], post)
    assert {"hook_embed", "ln_final.hook_normalized", "hook_logits", "blocks.0.hook_resid_mid"} <= set(cache.keys())
    assert model.model.layers[0] is model.blocks[0] and model.config.num_key_value_heads == 2  # HF names
    assert not model.has_hooks()


# -- configs -----------------------------------------------------------------------------------------------------


def test_hub_and_transformers5_config_spellings_agree():
    """The hub's `rope_scaling` + `rope_theta` and transformers 5's `rope_parameters` give the same config."""
    v5 = tiny("LlamaForCausalLM", rope_parameters=LLAMA3).config.to_dict()
    hub = {k: v for k, v in v5.items() if k != "rope_parameters"}
    hub["rope_theta"] = LLAMA3["rope_theta"]
    hub["rope_scaling"] = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    assert config_from_hf(hub) == config_from_hf(v5)
    assert config_from_hf(v5).rope_type == "llama3" and config_from_hf(v5).rope_original_n_ctx == 64
    old = dict(hub, rope_scaling={"type": "linear", "factor": 2.0})  # transformers 4's `type` key
    assert config_from_hf(old).rope_type == "linear" and config_from_hf(old).rope_factor == 2.0


@pytest.mark.parametrize("change, match", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'.*implemented: default, linear, "
                                                               "llama3"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "rope type 'dynamic'"),
    (dict(num_local_experts=8), "num_local_experts=8"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
    (dict(hidden_act="swish_beta"), "hidden_act='swish_beta'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(model_type="gemma"), "model_type 'gemma' is not a Llama-family model"),
    (dict(num_key_value_heads=4), "n_heads=6 is not a multiple of n_kv_heads=4"),
])
def test_unimplemented_config_options_are_refused(change, match):
    hf = {**tiny("LlamaForCausalLM").config.to_dict(), **change}
    if "rope_scaling" in change:
        hf.pop("rope_parameters")
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


def test_unknown_rope_type_in_our_config_is_refused():
    with pytest.raises(ValueError, match=r"rope_type='ntk' is not implemented; choose one of \('default', "):
        pv.LlamaConfig(d_model=32, n_heads=4, n_layers=1, rope_type="ntk")


# -- checkpoints -------------------------------------------------------------------------------------------------


def test_sharded_safetensors_bfloat16_kept_unless_dtype_asks(tmp_path):
    hf = tiny("Qwen2ForCausalLM", tie_word_embeddings=False).to(torch.bfloat16)
    path = str(tmp_path / "sharded")
    hf.save_pretrained(path, max_shard_size="100KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 3  # really sharded
    model = pv.from_pretrained(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.dtype == torch.bfloat16 and (ours.float() - theirs.float()).abs().max() < 0.1 * theirs.float().std()
    as_float = pv.from_pretrained(path, dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    torch.testing.assert_close(as_float.blocks[1].attn.k.bias, hf.model.layers[1].self_attn.k_proj.bias.float())


def test_create_llama_returns_config_tokenizer_model(tmp_path):
    tokenizer = make_tokenizer()
    hf = tiny("LlamaForCausalLM", vocab_size=len(tokenizer))
    path = save_checkpoint(hf, tokenizer, str(tmp_path / "ckpt"))
    config, tokenizer, model = pv.create_llama(path)
    assert isinstance(model, pv.LlamaLM) and config is model.cfg and config.n_kv_heads == 2
    assert tokenizer is not None and len(tokenizer) == config.d_vocab
    config, tokenizer, model = pv.create_llama(config=hf.config)  # a transformers config: random weights
    assert isinstance(model, pv.LlamaLM) and tokenizer is None and config.d_model == 96
    assert config == config_from_hf(hf.config.to_dict())


# -- components, interventions, generation, sweeps ------------------------------------------------------------------


def test_head_key_output_is_a_key_value_head_shared_by_its_query_group(mistral):
    """head_key_output unit h = key/value head h (n_kv_heads of them): zeroing it equals a hand-written hook on
    hook_k[:, :, h], and changes the pattern of exactly the query heads of group h."""
    _, model = mistral
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    iv = pv.IntervenableModel([{"layer": 1, "component": "head_key_output", "unit": "h",
                                "intervention_type": pv.ZeroIntervention}], model)
    _, out = iv({"input_ids": ids}, unit_locations={"base": 1})

    def zero_kv_head_1(k, hook):
        k = k.clone()
        k[:, :, 1] = 0
        return k

    pattern = "blocks.1.attn.hook_pattern"
    with torch.no_grad():
        _, plain = model.run_with_cache(ids, names_filter=pattern)
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_k", zero_kv_head_1)]):
            ref, zeroed = model.run_with_cache(ids, names_filter=pattern)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    assert (out.logits - model(ids).logits).abs().max() > 1e-3
    changed = (zeroed[pattern] - plain[pattern]).abs().amax(dim=(0, 2, 3)) > 1e-4  # per query head
    assert changed.tolist() == [False] * 3 + [True] * 3  # group 1 = query heads 3, 4, 5
    with pytest.raises(ValueError, match="head_key_output"):
        iv = pv.IntervenableModel([{"layer": 1, "component": "head_key_output", "unit": "pos",
                                    "intervention_type": pv.ZeroIntervention}], model)
        iv({"input_ids": ids}, unit_locations={"base": 1})


def test_steering_generation_equals_manual_recompute(mistral):
    """IntervenableModel.generate with an AdditionIntervention on every layer's mlp_output, every step, equals a
    hand-written no-cache greedy loop with the same additions (positions past the window included)."""
    _, model = mistral
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    v = torch.randn(96, generator=torch.Generator().manual_seed(7))
    iv = pv.IntervenableModel(steering_config(model.cfg.n_layers), model)
    _, (out, scores) = iv.generate({"input_ids": ids, "attention_mask": mask}, source_representations=v,
                                   max_new_tokens=8, output_scores=True)
    ref, ref_scores = manual_greedy(model, ids, mask, 8, mlp_out_names(model), v)
    assert_same(out, ref, scores, ref_scores)
    assert not torch.equal(out, model.generate(ids, mask, max_new_tokens=8))
    assert not model.has_hooks()


@pytest.mark.parametrize("kind", ["resid_pre", "heads", "mlp_out"])
def test_activation_patch_equals_cell_by_cell(mistral, kind):
    """The sweep engine resumes Llama-family models mid-stack (rotary positions and the sliding window included)."""
    _, model = mistral
    clean, corrupted = token_pair(VOCAB, 2, 7, changed=2, seed=8)
    metric = logit_diff(torch.tensor([3, 4]), torch.tensor([5, 6]))
    res = activation_patch(model, clean, corrupted, metric, kind=kind, batch_size=16)
    ref = cell_by_cell(model, kind, clean, corrupted, metric)
    assert res.values.shape == ref.shape
    assert (res.values - ref).abs().max() <= 1e-5
    assert (ref - res.corrupted).abs().max() > 1e-3, "the sweep is trivial"


# -- TransformerLens's weight views and the q/k/v patching kinds under grouped-query attention ---------------------

@pytest.mark.parametrize("biases", [False, True])
def test_weight_views_reproduce_the_forward(biases):
    """W_Q ... W_out, W_gate as TL 3.x: `_W_K` / `_W_V` per key/value head, `W_K` / `W_V` repeated per query head."""
    from tests.test_lens import check_weight_views

    extra = dict(attention_bias=True, mlp_bias=True) if biases else {}
    model = pv.from_pretrained(tiny("LlamaForCausalLM", **extra))
    assert model.cfg.n_kv_heads == 2 and model.cfg.n_heads == 6
    check_weight_views(model, torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4)), True)
    attn = model.blocks[0].attn
    assert attn._W_K.shape == (2, 96, 16) and attn._W_K.data_ptr() == attn.k.weight.data_ptr()
    assert bool(model.b_Q.any()) == biases and bool(model.b_O.any()) == biases and bool(model.b_in.any()) == biases


@pytest.mark.parametrize("kind", ["heads_q", "heads_k", "heads_v", "heads_q_pos", "heads_k_pos", "heads_v_pos"])
def test_qkv_patch_kinds_under_grouped_query_attention(mistral, kind):
    """k and v cells are key/value heads (2 per layer), q cells query heads (6), against hand-written hooks."""
    from tests.test_experiments import mean_of, qkv_by_hand

    _, model = mistral
    clean, corrupted = token_pair(VOCAB, 2, 6, changed=2, seed=8)
    metric = logit_diff(torch.tensor([3, 4]), torch.tensor([5, 6]))
    res = activation_patch(model, clean, corrupted, metric, kind=kind, batch_size=16)
    ref = qkv_by_hand(model, kind, clean, corrupted, mean_of(metric))
    n = 6 if kind.startswith("heads_q") else 2
    assert ref.shape == ((3, n) if not kind.endswith("_pos") else (3 * n, 6))
    assert res.values.shape == ref.shape
    assert (res.values - ref).abs().max() <= 1e-5
    assert (ref - res.corrupted).abs().max() > 1e-3, "the sweep is trivial"
    if n == 2 and kind.endswith("_pos"):
        assert res.rows[:3] == ["L0KV0", "L0KV1", "L1KV0"]
