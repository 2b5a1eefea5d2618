"""TransformerLens's analysis toolkit on hookvene models: tokenizer methods, return types, ActivationCache
decompositions, weight views and FactoredMatrix, weight processing, opt-in hooks, permanent hooks, act_name.

Checked against direct computations on the same weights (and, for weight processing, against `transformers`);
scripts/compare_transformer_lens.py runs the same checks against TransformerLens 3.5.1 itself.
"""

import pickle
from copy import deepcopy

import pytest
import torch

import hookvene as pv
from hookvene.factored_matrix import FactoredMatrix, composition_score
from hookvene.hooks import act_name
from hookvene.utils import test_prompt as tl_test_prompt
from tests.helpers import GATED_HOOKS, close, make_tokenizer, save_checkpoint, tiny_gpt2

PROMPT = "When Mary and John went to the store, John gave a drink to"
PROCESS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def randomise_norms(hf):
    """LayerNorm weights and biases away from (1, 0), so that folding them is really tested."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return hf


@pytest.fixture(scope="module")
def ioi():
    return pv.from_pretrained("ioi-gpt2")


@pytest.fixture(scope="module", params=["gpt2", "gpt_neo"])
def tiny(request, tmp_path_factory):
    """(hookvene model, HF model, checkpoint dir) of a tiny random GPT-2 or GPT-Neo with a tokenizer."""
    tok = make_tokenizer()
    if request.param == "gpt2":
        hf = tiny_gpt2(tok, n_layer=3)
    else:
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        torch.manual_seed(0)
        hf = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=len(tok), hidden_size=32, num_layers=3, num_heads=4,
                                            attention_types=[[["global", "local"], 1], [["global"], 1]],
                                            window_size=4, max_position_embeddings=64, bos_token_id=0,
                                            eos_token_id=0)).eval()
    randomise_norms(hf)
    path = save_checkpoint(hf, tok, str(tmp_path_factory.mktemp(request.param)))
    return pv.from_pretrained(path), hf, path


# -- tokenizer ------------------------------------------------------------------------------------------------


def test_tokenizer_methods_on_the_bundled_model(ioi):
    assert ioi.tokenizer is not None
    str_tokens = ioi.to_str_tokens(PROMPT)
    assert str_tokens[:3] == ["<|endoftext|>", "When", " Mary"] and len(str_tokens) == 15
    mary = ioi.to_single_token(" Mary")
    assert mary != ioi.tokenizer.bos_token_id and ioi.to_string([mary]) == " Mary"
    with pytest.raises(ValueError, match=r"' Mary and' is 2 tokens.*\[' Mary', ' and'\]"):
        ioi.to_single_token(" Mary and")
    assert ioi.get_token_position(" John", PROMPT) == 4 and ioi.get_token_position(" John", PROMPT, mode="last") == 10
    with pytest.raises(ValueError, match="not in the input"):
        ioi.get_token_position(" Alice", PROMPT)
    tokens = ioi.to_tokens(PROMPT)
    assert tokens.shape == (1, 15) and tokens[0, 0] == ioi.tokenizer.bos_token_id
    assert ioi.to_tokens(PROMPT, prepend_bos=False).shape == (1, 14)
    assert ioi.to_string(tokens[0, 1:]) == PROMPT


def test_a_model_without_a_tokenizer_says_so():
    model = pv.from_pretrained(tiny_gpt2())
    with pytest.raises(ValueError, match="has no tokenizer.*model.tokenizer"):
        model.to_tokens("hello")


def test_string_and_token_inputs_give_identical_results(ioi):
    tokens = ioi.to_tokens(PROMPT)
    with torch.no_grad():
        close(ioi(PROMPT).logits, ioi(tokens).logits, atol=0)
        _, by_text = ioi.run_with_cache(PROMPT, names_filter="blocks.2.attn.hook_pattern")
        _, by_ids = ioi.run_with_cache(tokens, names_filter="blocks.2.attn.hook_pattern")
        close(by_text["pattern", 2], by_ids["pattern", 2], atol=0)
        zero = [("blocks.1.hook_attn_out", lambda x, hook: torch.zeros_like(x))]
        close(ioi.run_with_hooks(PROMPT, fwd_hooks=zero, return_type="logits"),
              ioi.run_with_hooks(tokens, fwd_hooks=zero).logits, atol=0)
    assert ioi.generate(PROMPT, max_new_tokens=1) == ioi.to_string(ioi.generate(tokens, max_new_tokens=1)[0, 1:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_unpadded_values(ioi, side):
    short = "When Mary and John went"
    with torch.no_grad():
        alone = ioi(short, return_type="logits")[0]
        both, cache = ioi.run_with_cache([PROMPT, short], padding_side=side, return_type="logits")
    n = alone.shape[0]
    rows = slice(both.shape[1] - n, None) if side == "left" else slice(0, n)
    close(both[1, rows], alone, atol=1e-4)
    _, solo = ioi.run_with_cache(short)
    close(cache["resid_post", -1][1, rows], solo["resid_post", -1][0], atol=1e-4)


def test_explicit_attention_mask_keeps_transformers_semantics(ioi):
    """Token ids with an attention_mask: positions come from position_ids only (0, 1, ... by default)."""
    ids, mask = ioi.tokens_and_mask(["When Mary", PROMPT], padding_side="left")
    with torch.no_grad():
        plain = ioi(ids, attention_mask=mask).logits
        by_text = ioi(["When Mary", PROMPT], padding_side="left").logits
    assert (plain[0, -1] - by_text[0, -1]).abs().max() > 1e-3  # different positions for the padded row
    close(plain[1], by_text[1], atol=1e-5)  # the unpadded row is the same


# -- return types -----------------------------------------------------------------------------------------------


def test_return_types_and_loss(ioi):
    tokens = ioi.to_tokens(PROMPT)
    with torch.no_grad():
        out = ioi(tokens, labels=tokens)
        assert isinstance(out, pv.models.common.ModelOutput)
        close(ioi(tokens, return_type="logits"), out.logits, atol=0)
        close(ioi(tokens, return_type="loss"), out.loss, atol=1e-6)
        logits, loss = ioi(tokens, return_type="both")
        close(loss, out.loss, atol=1e-6)
        per_token = ioi(tokens, return_type="loss", loss_per_token=True)
        assert per_token.shape == (1, 14)
        close(per_token.mean(), out.loss, atol=1e-6)
        assert ioi(tokens, return_type=None) is None
    with pytest.raises(ValueError, match="return_type must be one of"):
        ioi(tokens, return_type="probs")


# -- ActivationCache --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(ioi):
    with torch.no_grad():
        logits, cache = ioi.run_with_cache([PROMPT, "When John and Mary went to the shops, Mary gave a book to"],
                                           return_type="logits")
    return logits, cache


def test_decompose_resid_sums_to_the_residual_stream(run):
    _, cache = run
    for layer in (None, 2):
        parts, labels = cache.decompose_resid(layer, return_labels=True)
        target = cache["resid_post", -1] if layer is None else cache["resid_pre", layer]
        close(parts.sum(0), target, atol=1e-4)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    mid = cache.decompose_resid(2, mlp_input=True)
    close(mid.sum(0), cache["resid_mid", 2], atol=1e-4)
    assert cache.decompose_resid(mode="attn").shape[0] == 2 + 4


def test_stack_head_results_plus_bias_is_attn_out_and_equals_hook_result(ioi, run):
    _, cache = run
    with pytest.warns(UserWarning, match="hook_result was not cached"):
        heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape == (16, 2, 15, 128) and labels[:2] == ["L0H0", "L0H1"] and labels[-1] == "L3H3"
    for layer in range(4):
        close(heads[4 * layer:4 * layer + 4].sum(0) + ioi.blocks[layer].attn.b_O, cache["attn_out", layer], 1e-4)
    with_rest = cache.stack_head_results(2, incl_remainder=True)
    close(with_rest.sum(0), cache["resid_post", 1], atol=1e-4)
    ioi.set_use_attn_result(True)
    try:
        with torch.no_grad():
            logits, fresh = ioi.run_with_cache(PROMPT, return_type="logits")
    finally:
        ioi.set_use_attn_result(False)
    close(logits, run[0][:1], atol=1e-4)  # the per-head path computes the same function
    for layer in range(4):  # z @ W_O per head == hook_result
        z = fresh["z", layer]
        close(torch.einsum("bphd,hdm->bphm", z, ioi.blocks[layer].attn.W_O), fresh["result", layer], atol=1e-5)


def test_accumulated_resid_with_ln_unembeds_to_the_logits():
    processed = pv.from_pretrained("ioi-gpt2", **PROCESS)
    with torch.no_grad():
        logits, cache = processed.run_with_cache(PROMPT, return_type="logits")
    acc, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "3_pre", "final_post"]
    close(acc[-1] @ processed.W_U + processed.b_U, logits, atol=1e-4)
    # logit attribution: components through the final LN scale, dotted with residual directions, sum to logits
    answer = processed.to_single_token(" Mary")
    parts = cache.decompose_resid(pos_slice=-1)  # logit_attrs applies the final LayerNorm's cached scale
    attrs = cache.logit_attrs(parts, answer, pos_slice=-1)
    close(attrs.sum(0) + processed.b_U[answer], logits[:, -1, answer], atol=1e-4)
    wrong = processed.to_single_token(" John")
    diff = cache.logit_attrs(parts, " Mary", incorrect_tokens=" John", pos_slice=-1).sum(0)
    close(diff + processed.b_U[answer] - processed.b_U[wrong], logits[:, -1, answer] - logits[:, -1, wrong], 1e-4)


def test_neuron_and_full_decompositions(run, ioi):
    _, cache = run
    neurons = cache.stack_neuron_results(1, pos_slice=-1)
    assert neurons.shape == (512, 2, 128)
    close(neurons.sum(0) + ioi.blocks[0].mlp.b_out, cache["mlp_out", 0][:, -1], atol=1e-4)
    full, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    close(full.sum(0), cache["resid_post", -1], atol=1e-4)
    assert labels[0] == "L0H0" and labels[-1] == "bias"
    assert cache.stack_activation("pattern").shape == (4, 2, 4, 15, 15)


def test_cache_indexing_and_batch_methods(run):
    _, cache = run
    assert cache["resid_pre", -1] is cache["blocks.3.hook_resid_pre"]
    assert cache["scale", 1, "ln2"].shape == (2, 15, 1) and cache["scale"].shape == (2, 15, 1)
    assert cache["pre2"] is cache["blocks.2.mlp.hook_pre"] and cache["embed"] is cache["hook_embed"]
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and one["resid_post", 0].shape == (15, 128) and one.model is cache.model
    first = cache.apply_slice_to_batch_dim(slice(0, 1)).remove_batch_dim()
    assert first["z", 0].shape == (15, 4, 32)
    with pytest.raises(ValueError, match="batch of 1"):
        cache.like(dict(cache)).remove_batch_dim()
    assert cache.like(dict(cache)).to("cpu")["q", 0].device.type == "cpu"
    with pytest.raises(ValueError, match="unknown cached activation"):
        cache["blocks.9.hook_resid_pre"]  # noqa: B018


def test_act_name_shorthands():
    assert act_name("k", 6, "a") == "blocks.6.attn.hook_k"
    assert act_name("scale4ln1") == "blocks.4.ln1.hook_scale"
    assert act_name("normalized") == "ln_final.hook_normalized"
    assert act_name("result", 1) == "blocks.1.attn.hook_result"
    assert act_name("attn_in", 0) == "blocks.0.hook_attn_in"
    assert act_name("resid_post", -1, n_layers=4) == "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match="unknown activation name 'resid_prex'"):
        act_name("resid_prex", 1)
    with pytest.raises(ValueError, match="pass n_layers"):
        act_name("resid_post", -1)


# -- weight views -------------------------------------------------------------------------------------------------


def test_weight_views_reproduce_the_forward(tiny):
    model, _, _ = tiny
    tokens = torch.randint(1, 50, (2, 7))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        for layer in range(model.cfg.n_layers):
            x = cache[f"blocks.{layer}.ln1.hook_normalized"]
            for name, W, b in (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V)):
                close(torch.einsum("bpm,hmd->bphd", x, W[layer]) + b[layer], cache[name, layer], atol=1e-5)
            z = cache["z", layer]
            close(torch.einsum("bphd,hdm->bpm", z, model.W_O[layer]) + model.b_O[layer], cache["attn_out", layer],
                  atol=1e-5)
            pre = cache[f"blocks.{layer}.ln2.hook_normalized"] @ model.W_in[layer] + model.b_in[layer]
            close(pre, cache["pre", layer], atol=1e-5)
            close(cache["post", layer] @ model.W_out[layer] + model.b_out[layer], cache["mlp_out", layer], atol=1e-5)
        close(cache["ln_final.hook_normalized"] @ model.W_U + model.b_U, cache["hook_logits"], atol=1e-5)
    assert model.W_E.shape == (model.cfg.d_vocab, 32) and model.W_pos.shape == (64, 32)
    assert model.W_Q.shape == (3, 4, 32, 8) and model.W_O.shape == (3, 4, 8, 32) and model.b_O.shape == (3, 32)


def test_per_layer_views_share_storage(tiny):
    model, _, _ = tiny
    attn = model.blocks[0].attn
    with torch.no_grad():
        before = attn.W_Q[1, 2, 3].clone()
        attn.W_Q[1, 2, 3] += 1.0
        assert attn.W_Q[1, 2, 3] == before + 1.0  # the edit reached the parameter behind the view
        attn.W_Q[1, 2, 3] -= 1.0
    assert attn.W_O.data_ptr() == attn.out.weight.data_ptr() and model.W_E is model.embed.weight


def test_factored_matrix_agrees_with_dense_products(tiny):
    model, _, _ = tiny
    QK, OV = model.QK, model.OV
    dense = model.W_Q @ model.W_K.transpose(-2, -1)
    close(QK.AB, dense, atol=1e-5)
    close(OV[1, 2].AB, model.W_V[1, 2] @ model.W_O[1, 2], atol=1e-5)
    close(QK.T.AB, dense.transpose(-2, -1), atol=1e-5)
    U, S, V = OV.svd()
    close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), OV.AB, atol=1e-5)
    close(S, torch.linalg.svdvals(OV.AB)[..., :8], atol=1e-4)
    close(OV.norm(), OV.AB.norm(dim=(-2, -1)), atol=1e-4)
    x = torch.randn(32, 5)
    close((OV @ x).AB, OV.AB @ x, atol=1e-5)
    close((x.T @ OV).AB, x.T @ OV.AB, atol=1e-5)
    close((QK @ OV).AB, dense @ OV.AB, atol=1e-4)
    ev = OV[0, 0].eigenvalues
    dense_ev = torch.linalg.eigvals(OV[0, 0].AB)
    big = dense_ev[dense_ev.abs().argsort(descending=True)][:8]
    close(ev.abs().sort().values, big.abs().sort().values, atol=1e-4)
    close(OV.BA, model.W_O @ model.W_V, atol=1e-5)


def test_factored_matrix_bad_input():
    with pytest.raises(ValueError, match="do not chain"):
        FactoredMatrix(torch.randn(3, 4), torch.randn(5, 3))


def test_all_composition_scores_from_dense_products(tiny):
    """Each score by hand from the dense d_model x d_model circuits: ||W_OV1 @ M2|| / (||W_OV1|| ||M2||) with M2
    the later head's QK (Q), QK^T (K) or OV (V); 0 unless the writer's layer is earlier (TransformerLens's
    all_composition_scores, compared with TL itself in scripts/compare_transformer_lens.py)."""
    model, _, _ = tiny
    OV, QK = model.OV.AB.detach(), model.QK.AB.detach()
    L, H = OV.shape[:2]
    right = {"Q": QK, "K": QK.transpose(-2, -1), "V": OV}
    for mode, M in right.items():
        scores = model.all_composition_scores(mode).detach()
        assert scores.shape == (L, H, L, H)
        for l1, h1, l2, h2 in [(0, 0, 1, 3), (0, 2, 2, 1), (1, 3, 2, 0), (1, 1, 1, 2), (2, 0, 0, 0)]:
            want = (OV[l1, h1] @ M[l2, h2]).norm() / (OV[l1, h1].norm() * M[l2, h2].norm()) if l1 < l2 else 0.0
            assert float(scores[l1, h1, l2, h2]) == pytest.approx(float(want), abs=1e-5), (mode, l1, h1, l2, h2)
    assert not torch.allclose(model.all_composition_scores("Q"), model.all_composition_scores("K"))
    with pytest.raises(ValueError, match="mode must be one of 'Q', 'K', 'V'.*got 'k'"):
        model.all_composition_scores("k")
    with pytest.raises(ValueError, match="output dim to equal"):
        composition_score(model.OV[0, 0], FactoredMatrix(torch.randn(5, 2), torch.randn(2, 5)))


def test_tokens_to_residual_directions(ioi):
    mary = ioi.to_single_token(" Mary")
    close(ioi.tokens_to_residual_directions(" Mary"), ioi.W_U[:, mary], atol=0)
    ids = torch.tensor([mary, ioi.to_single_token(" John")])
    assert ioi.tokens_to_residual_directions(ids).shape == (2, 128)


# -- weight processing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("refactor", [False, True])
def test_processed_model_equals_unprocessed_up_to_per_row_constants(tiny, refactor):
    model, hf, path = tiny
    processed = pv.from_pretrained(path, **PROCESS, refactor_factored_attn_matrices=refactor)
    tokens = torch.randint(1, 50, (2, 9))
    with torch.no_grad():
        ref = hf(tokens).logits
        a, b = model(tokens).logits, processed(tokens).logits
        close(a, ref, atol=1e-4)  # default: exact parity with transformers
        close(b - b.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True), atol=1e-4)
        close(b.log_softmax(-1), ref.log_softmax(-1), atol=1e-4)
        _, cache = processed.run_with_cache(tokens)
        _, raw = model.run_with_cache(tokens)
    for name in ("pattern", "attn_scores"):
        close(cache[name, 1], raw[name, 1], atol=1e-4)  # processing leaves attention unchanged
    close(cache["scale", 1, "ln1"], raw["scale", 1, "ln1"], atol=1e-4)
    assert processed.normalization_type == "LNPre" and model.normalization_type == "LN"
    assert (processed.W_E.mean(-1).abs() < 1e-5).all() and (processed.W_U.mean(-1).abs() < 1e-5).all()


def test_processing_does_not_touch_the_callers_model(tiny):
    _, hf, _ = tiny
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    processed = pv.from_pretrained(hf, **PROCESS)
    assert processed.W_E.mean(-1).abs().max() < 1e-5
    for k, v in hf.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- opt-in hooks, permanent hooks, test_prompt -------------------------------------------------------------------


def test_split_qkv_inputs_fire_and_patch_one_head(tiny):
    model, _, _ = tiny
    tokens = torch.randint(1, 50, (1, 6))
    with torch.no_grad():
        ref = model(tokens).logits
        model.set_use_split_qkv_input(True)
        model.set_use_attn_in(True)
        model.set_use_hook_mlp_in(True)
        model.set_use_attn_result(True)
        try:
            out, cache = model.run_with_cache(tokens)
            gated = {n for n in model.hook_dict if n.endswith(GATED_HOOKS)}
            assert gated <= set(cache)
            close(out.logits, ref, atol=1e-4)  # the per-head path computes the same function
            assert cache["q_input", 0].shape == (1, 6, 4, 32) and cache["mlp_in", 0].shape == (1, 6, 32)

            def scramble_head_1(x, hook):
                x[:, :, 1] = torch.randn_like(x[:, :, 1])
            with model.hooks([("blocks.0.hook_k_input", scramble_head_1)]):
                _, patched = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_k",
                                                                        "blocks.0.attn.hook_q"])
            close(patched["k", 0][:, :, 0], cache["k", 0][:, :, 0], atol=1e-5)  # other heads untouched
            close(patched["q", 0], cache["q", 0], atol=1e-5)  # queries untouched
            assert (patched["k", 0][:, :, 1] - cache["k", 0][:, :, 1]).abs().max() > 1e-3
        finally:
            for flag in ("split_qkv_input", "attn_in", "hook_mlp_in", "attn_result"):
                getattr(model, f"set_use_{flag}")(False)
    with pytest.raises(ValueError, match="does not implement use_attn_result"):
        pv.GRUClassifier(pv.GRUConfig()).set_use_attn_result(True)


def test_perma_hooks_survive_reset_hooks(ioi):
    seen = []
    ioi.add_perma_hook("blocks.0.hook_resid_pre", lambda x, hook: seen.append(1))
    ioi.add_hook("blocks.0.hook_resid_pre", lambda x, hook: seen.append(2))
    ioi.reset_hooks()
    with torch.no_grad():
        ioi(PROMPT)
    assert seen == [1]
    ioi.reset_hooks(including_permanent=True)
    assert not ioi.has_hooks()


def test_test_prompt_reports_rank_and_probability(ioi, capsys):
    ranks = tl_test_prompt(PROMPT, " Mary", ioi, top_k=3)
    printed = capsys.readouterr().out
    assert "Tokenized answer: [' Mary']" in printed and "Rank: 0" in printed and "Top 0th token" in printed
    assert ranks == [0]


# -- weight views on the rotary models (shared with tests/test_llama.py and tests/test_gpt_neox.py) -------------------

def check_weight_views(model, tokens, gated: bool):
    """The views reproduce the forward: hook_q/k/v (before the rotation) from ln1's output, each head's z @ W_O
    (the hook_result of `compute_head_results`) summing with b_O to hook_attn_out, the MLP from its views, the
    logits from W_U; QK / OV are per query head; per-layer views are views of the parameters."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_kv_heads", None) or cfg.n_heads
    group = cfg.n_heads // n_kv
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        for layer in range(cfg.n_layers):
            attn, mlp = model.blocks[layer].attn, model.blocks[layer].mlp
            x = cache[f"blocks.{layer}.ln1.hook_normalized"]
            close(torch.einsum("bpm,hmd->bphd", x, model.W_Q[layer]) + model.b_Q[layer], cache["q", layer])
            for name, W, b in (("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V)):
                own_W, own_b = (getattr(attn, f"_W_{name.upper()}"), getattr(attn, f"_b_{name.upper()}")) \
                    if group > 1 else (W[layer], b[layer])
                close(torch.einsum("bpm,hmd->bphd", x, own_W) + own_b, cache[name, layer])  # per kv head
                close(W[layer], own_W.repeat_interleave(group, 0), atol=0)  # TL 3.x: W_K repeats each kv head
                close(b[layer], own_b.repeat_interleave(group, 0), atol=0)
            per_head = torch.einsum("bphd,hdm->bphm", cache["z", layer], model.W_O[layer])
            close(per_head.sum(2) + model.b_O[layer], cache["attn_out", layer])
            x2 = cache[f"blocks.{layer}.ln2.hook_normalized"]
            if gated:
                close(x2 @ model.W_gate[layer] + mlp.b_gate, cache["pre", layer])
                close(x2 @ model.W_in[layer] + model.b_in[layer], cache[f"blocks.{layer}.mlp.hook_pre_linear"])
            else:
                close(x2 @ model.W_in[layer] + model.b_in[layer], cache["pre", layer])
            close(cache["post", layer] @ model.W_out[layer] + model.b_out[layer], cache["mlp_out", layer])
            assert attn.W_Q.data_ptr() == next(p for n, p in attn.named_parameters() if n in ("q.weight",
                                                                                            "qkv.weight")).data_ptr()
        close(cache["ln_final.hook_normalized"] @ model.W_U + model.b_U, cache["hook_logits"])
        cache.compute_head_results()
        for layer in range(cfg.n_layers):
            close(cache["result", layer],
                  torch.einsum("bphd,hdm->bphm", cache["z", layer], model.blocks[layer].attn.W_O))
        close(cache.decompose_resid().sum(0), cache["resid_post", cfg.n_layers - 1])
        for layer, mlp_input, ln in ((None, False, model.ln_final), (1, False, model.blocks[1].ln1),
                                     (1, True, model.blocks[1].ln2)):  # LayerNorm's cached scale, RMSNorm's computed
            if mlp_input and not hasattr(model.blocks[1], "hook_resid_mid"):
                continue  # parallel GPT-NeoX: ln2 reads resid_pre, there is no MLP input to decompose
            stack = cache.decompose_resid(layer, mlp_input=mlp_input, apply_ln=True)
            bias = getattr(ln, "bias", None)
            key = "ln_final" if layer is None else f"blocks.{layer}.ln{2 if mlp_input else 1}"
            close(stack.sum(0) * ln.weight + (0 if bias is None else bias), cache[f"{key}.hook_normalized"])
        heads = cache.stack_head_results(1)
        close(heads.sum(0) + model.b_O[0], cache["attn_out", 0])
    L, H, d, dh = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
    assert model.W_Q.shape == model.W_K.shape == model.W_V.shape == (L, H, d, dh)
    assert model.W_O.shape == (L, H, dh, d) and model.b_O.shape == (L, d) and model.b_K.shape == (L, H, dh)
    assert model.QK.shape == model.OV.shape == (L, H, d, d)
    close(model.QK[1, 2].AB, model.W_Q[1, 2] @ model.W_K[1, 2].T)
    close(model.OV[1, 2].AB, model.W_V[1, 2] @ model.W_O[1, 2])
    with torch.no_grad():  # an edit through a per-layer view reaches the model
        attn = model.blocks[0].attn
        attn.W_Q[1, 2, 3] += 1.0
        changed = model(tokens).logits
        attn.W_Q[1, 2, 3] -= 1.0
        assert not torch.allclose(changed, model(tokens).logits)
    if not gated:
        with pytest.raises(ValueError, match="not gated"):
            _ = model.W_gate
    with pytest.raises(ValueError, match="implemented for GPT-2 and GPT-Neo"):
        model.process_weights()


# -- TransformerLens's cfg fields ---------------------------------------------------------------------------------

def every_architecture():
    from hookvene.models.gpt2 import GPT2LM, GPT2Config
    from hookvene.models.gpt_neo import GPTNeoConfig, GPTNeoLM
    from hookvene.models.gpt_neox import GPTNeoXConfig, GPTNeoXLM
    from hookvene.models.gru import GRUClassifier, GRUConfig
    from hookvene.models.llama import LlamaConfig, LlamaLM
    from hookvene.models.mlp import MLPClassifier, MLPConfig
    from hookvene.models.t5 import T5LM, T5Config

    small = dict(d_vocab=50, n_ctx=16, d_model=16, n_layers=2, n_heads=4)
    return {  # name: (model, eps, normalization_type, positional_embedding_type, d_vocab, n_ctx, act_fn, d_head)
        "gpt2": (GPT2LM(GPT2Config(**small, ln_eps=1e-4)), 1e-4, "LN", "standard", 50, 16, "gelu_new", 4),
        "gpt_neo": (GPTNeoLM(GPTNeoConfig(**small, attention_types=("global", "local"))), 1e-5, "LN", "standard",
                    50, 16, "gelu_new", 4),
        "gpt_neox": (GPTNeoXLM(GPTNeoXConfig(**small)), 1e-5, "LN", "rotary", 50, 16, "gelu", 4),
        "llama": (LlamaLM(LlamaConfig(**small, n_kv_heads=2, d_mlp=24, rms_eps=1e-5)), 1e-5, "RMS", "rotary", 50, 16,
                  "silu", 4),
        "t5": (T5LM(T5Config(d_vocab=50, d_model=16, d_kv=8, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
                             n_heads=2)), 1e-6, "RMS", "relative_positional_bias", 50, None, "relu", 8),
        "gru": (GRUClassifier(GRUConfig(h_dim=8, n_layer=1)), None, None, None, 50257, None, None, None),
        "mlp": (MLPClassifier(MLPConfig(h_dim=8, n_layer=1)), None, None, None, None, None, "gelu", None),
    }


def test_tl_cfg_fields_on_every_architecture():
    for name, (model, eps, norm, pos, d_vocab, n_ctx, act_fn, d_head) in every_architecture().items():
        cfg = model.cfg
        assert (cfg.eps, cfg.normalization_type, cfg.positional_embedding_type) == (eps, norm, pos), name
        assert model.normalization_type == norm, name
        assert getattr(cfg, "d_vocab", None) == d_vocab and getattr(cfg, "n_ctx", None) == n_ctx, name
        assert getattr(cfg, "act_fn", None) == act_fn and getattr(cfg, "d_head", None) == d_head, name
        assert cfg.device == torch.device("cpu") and cfg.dtype == torch.float32, name
        model.to(torch.float64)
        assert cfg.dtype == torch.float64 and model.cfg.dtype == torch.float64, name  # follows the model
        assert pickle.loads(pickle.dumps(cfg)) == cfg, name  # still plain data
        assert "device" not in vars(cfg) and "dtype" not in vars(cfg), name


def test_cfg_dtype_follows_each_model_sharing_a_config():
    from hookvene.models.gpt2 import GPT2LM, GPT2Config

    cfg = GPT2Config(d_vocab=50, n_ctx=16, d_model=16, n_layers=1, n_heads=4)
    assert cfg.dtype is None and cfg.device is None  # not read through a model yet
    a, b = GPT2LM(cfg), GPT2LM(cfg).to(torch.float64)
    assert a.cfg.dtype == torch.float32 and b.cfg.dtype == torch.float64
    copy = deepcopy(b).to(torch.float16)
    assert copy.cfg.dtype == torch.float16 and b.cfg.dtype == torch.float64


def test_processed_model_reports_lnpre(tiny):
    _, _, path = tiny
    processed = pv.from_pretrained(path, fold_ln=True)
    assert processed.cfg.normalization_type == "LNPre" and processed.normalization_type == "LNPre"


# -- models without the views or decompositions say so -------------------------------------------------------------

def test_t5_without_a_stack_gru_and_mlp_say_what_they_do_not_support():
    models = every_architecture()
    t5, gru, mlp = models["t5"][0], models["gru"][0], models["mlp"][0]
    ids = torch.randint(0, 50, (1, 4))
    assert t5.W_E is t5.shared.weight and t5.W_U.shape == (16, 50)
    _, t5_cache = t5.run_with_cache(ids, decoder_input_ids=ids)
    _, gru_cache = gru.run_with_cache(inputs_embeds=torch.randn(1, 3, 8))
    _, mlp_cache = mlp.run_with_cache(inputs_embeds=torch.randn(1, 1, 8))
    for cache, what in ((t5_cache, "encoder-decoder"), (gru_cache, "not a transformer"),
                        (mlp_cache, "not a transformer")):
        for method in ("accumulated_resid", "decompose_resid", "stack_head_results", "stack_neuron_results",
                       "get_full_resid_decomposition", "compute_head_results"):
            with pytest.raises(ValueError, match=f"need the decoder-only transformer.*{what}"):
                getattr(cache, method)()
        with pytest.raises(ValueError, match=what):
            cache.apply_ln_to_stack(torch.zeros(1, 1, 4, 16))
    for model in (t5, gru, mlp):
        for attr in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "W_in", "W_out", "W_gate", "QK", "OV"):
            with pytest.raises(ValueError, match="weight views are implemented for the decoder-only transformers"):
                getattr(model, attr)
        with pytest.raises(ValueError, match=r"has no learned position embedding \(W_pos\)"):
            _ = model.W_pos
        with pytest.raises(ValueError, match=r"no (model-level )?weights to process: TransformerLens's weight views"):
            model.process_weights()
    for model in (gru, mlp):
        for attr, message in (("W_E", "has no token embedding"), ("W_U", r"has no LM head \(W_U\)"),
                              ("b_U", r"has no LM head \(W_U\)")):
            with pytest.raises(ValueError, match=message):
                getattr(model, attr)
