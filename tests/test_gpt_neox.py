"""GPT-NeoX / Pythia (hookvene/models/gpt_neox.py) against `transformers`, on redrawn parameters.

Parity (logits, every residual stream, every attention pattern, left-padded rows; from memory and from disk) for
Pythia's layout (parallel residual, rotary_pct 0.25, untied unembedding), the sequential variant
(`use_parallel_residual=False`, rotary_pct 0.5) and the bare GPTNeoXModel; a hub-style checkpoint (`embed_out`,
`rotary_pct`, `rotary_emb_base`); greedy generation equal to `transformers`' `generate`; the hook vocabulary of
both block layouts; refusals; the sweeps.
"""

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

import hookvene as pv
from hookvene.experiments.metrics import logit_diff
from hookvene.experiments.patching import activation_patch
from hookvene.loading.gpt_neox import config_from_hf
from tests.helpers import token_pair
from tests.test_experiments import cell_by_cell
from tests.test_generate import assert_same
from tests.test_parity import Comparison, compare_decoder_only, left_padded, load, redraw_

VOCAB = 83
CASES = {  # name: (HF class, config overrides, hookvene lm_head)
    "pythia-parallel-rotary0.25": ("GPTNeoXForCausalLM", dict(rotary_pct=0.25), True),
    "sequential-rotary0.5": ("GPTNeoXForCausalLM", dict(rotary_pct=0.5, use_parallel_residual=False), True),
    "base": ("GPTNeoXModel", dict(rotary_pct=0.25), False),
}


def tiny(cls_name: str, seed: int = 0, **overrides):
    """A redrawn HF model: 3 layers, d_model 64, 4 heads of width 16 (rotary_pct 0.25: 4 rotated dimensions)."""
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
              attn_implementation="eager")
    kw.update(overrides)
    torch.manual_seed(seed)
    hf = getattr(transformers, cls_name)(transformers.GPTNeoXConfig(**kw)).eval()
    return redraw_(hf, seed=70 + seed)


# No float64 setup: `transformers`' eager attention takes the softmax in float32, where a float64 padding mask
# becomes -inf and left-padded rows turn NaN.
@pytest.mark.parametrize("setup", ["memory", "disk"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, setup, tmp_path):
    cls_name, overrides, lm_head = CASES[case]
    hf, model = load(tiny(cls_name, **overrides), setup, tmp_path, lm_head)
    assert isinstance(model, pv.GPTNeoXLM if lm_head else pv.GPTNeoX)
    assert model.cfg.rotary_pct == overrides["rotary_pct"] and model.cfg.d_rotary == 16 * overrides["rotary_pct"]
    assert model.cfg.parallel_residual == overrides.get("use_parallel_residual", True)
    if lm_head:
        assert model.unembed.weight is not model.embed.weight
    compare_decoder_only(hf, model, VOCAB, f"gpt-neox {case} {setup}")


def test_hub_checkpoint_spelling(tmp_path):
    """A config.json in the hub's spelling (rotary_pct, rotary_emb_base, no rope_parameters) and the unembedding
    stored as `embed_out.weight`, as Pythia checkpoints are, load to the same model."""
    hf = tiny("GPTNeoXForCausalLM", rotary_pct=0.25, rope_parameters={"rope_theta": 5000.0,
                                                                      "partial_rotary_factor": 0.25})
    cfg = {k: v for k, v in hf.config.to_dict().items() if k != "rope_parameters"}
    cfg.update(rotary_pct=0.25, rotary_emb_base=5000.0, architectures=["GPTNeoXForCausalLM"])
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v.contiguous() for k, v in hf.state_dict().items()}
    path = tmp_path / "hub"
    os.makedirs(path)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    model = pv.from_pretrained(str(path))
    assert model.cfg == config_from_hf(hf.config.to_dict()) and model.cfg.rope_theta == 5000.0
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-5)
    assert model.embed_out is model.unembed and model.gpt_neox.embed_in is model.embed  # HF names


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]])
def test_greedy_generation_equals_transformers(case):
    cls_name, overrides, _ = CASES[case]
    hf = tiny(cls_name, **overrides)
    model = pv.from_pretrained(hf)
    ids, mask, _ = left_padded(VOCAB, pos=9)  # rows of 9, 5 and 1 real tokens
    theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    ours, scores = model.generate(ids, mask, max_new_tokens=10, eos_token_id=0, pad_token_id=0, output_scores=True)
    assert_same(ours, theirs.sequences)
    cmp = Comparison(f"gpt-neox {case} generate", torch.float32)  # every step's logits too, not only the argmax
    cmp("scores", scores, torch.stack(theirs.scores, dim=1), logits=True)
    cmp.check()


@pytest.mark.parametrize("parallel", [True, False])
def test_hook_vocabulary(parallel):
    """Every hook fires in a plain forward. The parallel block has no residual stream between attention and MLP,
    so no hook_resid_mid (as in TransformerLens); both branches read resid_pre. Rotation touches only the first
    d_rotary dimensions of q and k."""
    model = pv.from_pretrained(tiny("GPTNeoXForCausalLM", rotary_pct=0.25, use_parallel_residual=parallel))
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    assert set(cache.keys()) == set(model.hook_dict)
    assert ("blocks.1.hook_resid_mid" in cache.keys()) == (not parallel)
    q, rot_q = cache["blocks.1.attn.hook_q"], cache["blocks.1.attn.hook_rot_q"]
    assert q.shape == rot_q.shape == (2, 7, 4, 16)
    assert torch.equal(q[..., 4:], rot_q[..., 4:]) and not torch.allclose(q[:, 1:, :, :4], rot_q[:, 1:, :, :4])
    resid = cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"] + cache["blocks.1.hook_mlp_out"]
    if parallel:
        torch.testing.assert_close(cache["blocks.1.hook_resid_post"], resid)
        torch.testing.assert_close(cache["blocks.1.ln2.hook_normalized"],
                                   model.blocks[1].ln2(cache["blocks.1.hook_resid_pre"]))
    config = [{"layer": 1, "component": "residual_mid", "intervention_type": pv.ZeroIntervention}]
    if parallel:
        with pytest.raises(ValueError, match="'residual_mid' maps to hook 'blocks.1.hook_resid_mid', which this"):
            pv.IntervenableModel(config, model)({"input_ids": ids}, unit_locations={"base": 0})
    else:
        _, out = pv.IntervenableModel(config, model)({"input_ids": ids}, unit_locations={"base": 0})
        assert (out.logits - model(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("change, match", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "rope type 'llama3'"),
    (dict(hidden_act="quick_gelu"), "hidden_act='quick_gelu'"),
])
def test_unimplemented_config_options_are_refused(change, match):
    hf = {**tiny("GPTNeoXForCausalLM").config.to_dict(), **change}
    hf.pop("rope_parameters")
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


@pytest.mark.parametrize("kind", ["resid_pre", "heads_pos"])
def test_activation_patch_equals_cell_by_cell(kind):
    """The sweep engine resumes GPT-NeoX mid-stack (partial rotary, parallel blocks)."""
    model = pv.from_pretrained(tiny("GPTNeoXForCausalLM"))
    clean, corrupted = token_pair(VOCAB, 2, 6, changed=1, seed=3)
    metric = logit_diff(torch.tensor([3, 4]), torch.tensor([5, 6]))
    res = activation_patch(model, clean, corrupted, metric, kind=kind, batch_size=16)
    ref = cell_by_cell(model, kind, clean, corrupted, metric)
    assert res.values.shape == ref.shape
    assert (res.values - ref).abs().max() <= 1e-5
    assert (ref - res.corrupted).abs().max() > 1e-3, "the sweep is trivial"


@pytest.mark.parametrize("parallel", [True, False])
def test_weight_views_reproduce_the_forward(parallel):
    """W_Q ... b_out as views of the fused head-major qkv projection and the Linear weights (TransformerLens's)."""
    from tests.test_lens import check_weight_views

    model = pv.from_pretrained(tiny("GPTNeoXForCausalLM", use_parallel_residual=parallel))
    check_weight_views(model, torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5)), False)
    assert model.b_Q.abs().sum() > 0 and model.blocks[1].mlp.W_out.data_ptr() == \
        model.blocks[1].mlp.proj.weight.data_ptr()
