"""T5: parity with `transformers` (both variants, in memory and from disk), hooks, KV cache, causality,
errors.

Sizes are odd on purpose: n_heads * d_kv (36) != d_model (40), 2 encoder vs 3 decoder layers, and sequences
longer than both the exact-bucket range and max_distance (TransformerLens's T5 bug hid below 9 tokens).
"""

import pytest
import torch
from torch import nn

import hookvene.loading as loading
from hookvene.loading.t5 import config_from_hf
from hookvene.models.common import KVCache
from hookvene.models.t5 import T5, T5LM, T5Config, relative_position_bucket

V, D, DKV, H, DFF, L_ENC, L_DEC = 61, 40, 12, 3, 56, 2, 3
ENC_LEN, DEC_LEN, TOL = 23, 19, 1e-4
VARIANTS = {"relu": dict(feed_forward_proj="relu", tie_word_embeddings=True),
            "gated": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def hf_t5(variant: str, cls_name: str = "T5ForConditionalGeneration", seed: int = 0):
    import transformers

    config = transformers.T5Config(
        vocab_size=V, d_model=D, d_kv=DKV, d_ff=DFF, num_layers=L_ENC, num_decoder_layers=L_DEC, num_heads=H,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, attn_implementation="eager", **VARIANTS[variant])
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    if variant == "gated" and hasattr(model, "lm_head"):
        # transformers 5 ties lm_head to `shared` whatever the config says; FLAN-T5 checkpoints do not
        model.lm_head.weight = nn.Parameter(torch.randn(V, D) * 0.5)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    hf = hf_t5(request.param)
    return request.param, hf, loading.from_pretrained(hf)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, V, (3, ENC_LEN), generator=g)
    y = torch.randint(2, V, (3, DEC_LEN), generator=g)
    am, dm = torch.ones_like(x), torch.ones_like(y)
    am[1, 15:] = 0  # right padding
    am[2, :6] = 0  # left padding
    dm[1, 12:] = 0
    dm[2, :3] = 0  # left-padded decoder: rows with every key masked must not turn into NaN
    return dict(input_ids=x, attention_mask=am, decoder_input_ids=y, decoder_attention_mask=dm)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def compare_with_hf(hf, model, batch, label):
    with torch.no_grad():
        ref = hf(**batch, output_hidden_states=True, output_attentions=True)
        out, cache = model.run_with_cache(**batch)
    errors = {"logits": err(out.logits, ref.logits),
              "encoder_last_hidden_state": err(out.encoder_last_hidden_state, ref.encoder_last_hidden_state)}
    # HF hidden states: the embedding, each block's output, and (instead of the last block's) the final norm
    for stack, hs in (("encoder", ref.encoder_hidden_states), ("decoder", ref.decoder_hidden_states)):
        ours = [cache[f"{stack}.hook_embed"]]
        ours += [cache[f"{stack}.blocks.{i}.hook_resid_post"] for i in range(len(hs) - 2)]
        ours += [cache[f"{stack}.ln_final.hook_normalized"]]
        errors[f"{stack}_hidden_states"] = max(err(a, b) for a, b in zip(ours, hs, strict=True))
    for name, atts in (("encoder.blocks.{}.attn", ref.encoder_attentions),
                       ("decoder.blocks.{}.attn", ref.decoder_attentions),
                       ("decoder.blocks.{}.cross_attn", ref.cross_attentions)):
        errors[name] = max(err(cache[name.format(i) + ".hook_pattern"], a) for i, a in enumerate(atts))
    print(f"\n{label}: max abs error {max(errors.values()):.2e}", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOL, errors
    return out


def test_parity_in_memory_shares_weights(pair, batch):
    variant, hf, model = pair
    assert isinstance(model, T5LM)
    assert model.shared.weight.data_ptr() == hf.shared.weight.data_ptr()
    hf_q = hf.encoder.block[1].layer[0].SelfAttention.q.weight
    assert model.encoder.blocks[1].attn.q.weight.data_ptr() == hf_q.data_ptr()
    assert model.lm_head.weight.data_ptr() == hf.lm_head.weight.data_ptr()
    assert model.cfg.tie_word_embeddings == (variant == "relu")
    assert (model.lm_head.weight is model.shared.weight) == (variant == "relu")
    assert model.cfg.gated == (variant == "gated") and model.cfg.scale_decoder_outputs == (variant == "relu")
    compare_with_hf(hf, model, batch, f"{variant} in-memory")


def test_parity_from_saved_directory(pair, batch, tmp_path):
    variant, hf, _ = pair
    hf.save_pretrained(tmp_path)
    model = loading.from_pretrained(str(tmp_path))
    assert model.cfg.tie_word_embeddings == (variant == "relu")
    compare_with_hf(hf, model, batch, f"{variant} saved-dir")


def test_no_head_model_matches_hf_t5model(batch):
    hf = hf_t5("gated", "T5Model")
    model = loading.from_pretrained(hf)
    assert type(model) is T5 and not hasattr(model, "unembed")
    with torch.no_grad():
        ref = hf(**batch)
        out = model(**batch)
    assert err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert err(out.encoder_last_hidden_state, ref.encoder_last_hidden_state) <= TOL
    headless = loading.from_pretrained(hf_t5("relu"), lm_head=False)
    assert type(headless) is T5


def expected_shapes(cfg: T5Config, b: int, n_enc: int, n_dec: int, gated: bool) -> dict[str, tuple[int, ...]]:
    h, d, dm, dff = cfg.n_heads, cfg.d_kv, cfg.d_model, cfg.d_ff
    shapes: dict[str, tuple[int, ...]] = {"hook_logits": (b, n_dec, cfg.d_vocab)}
    for stack, n_layers, n in (("encoder", cfg.n_encoder_layers, n_enc), ("decoder", cfg.n_decoder_layers, n_dec)):
        shapes[f"{stack}.hook_embed"] = (b, n, dm)
        shapes[f"{stack}.hook_position_bias"] = (1, h, n, n)
        shapes[f"{stack}.ln_final.hook_normalized"] = (b, n, dm)
        for i in range(n_layers):
            p = f"{stack}.blocks.{i}."
            mlp_ln = "ln3" if stack == "decoder" else "ln2"
            for name in ("hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out",
                         "hook_resid_post", "ln1.hook_normalized", f"{mlp_ln}.hook_normalized"):
                shapes[p + name] = (b, n, dm)
            for name in ("hook_q", "hook_k", "hook_v", "hook_z"):
                shapes[p + "attn." + name] = (b, n, h, d)
            shapes[p + "attn.hook_attn_scores"] = shapes[p + "attn.hook_pattern"] = (b, h, n, n)
            mlp_names = ("hook_pre", "hook_pre_linear", "hook_post") if gated else ("hook_pre", "hook_post")
            for name in mlp_names:
                shapes[p + "mlp." + name] = (b, n, dff)
            if stack == "decoder":
                for name in ("hook_cross_attn_out", "hook_resid_mid_cross", "ln2.hook_normalized"):
                    shapes[p + name] = (b, n, dm)
                c = p + "cross_attn."
                shapes[c + "hook_q"] = shapes[c + "hook_z"] = (b, n, h, d)
                shapes[c + "hook_k"] = shapes[c + "hook_v"] = (b, n_enc, h, d)
                shapes[c + "hook_attn_scores"] = shapes[c + "hook_pattern"] = (b, h, n, n_enc)
    return shapes


def test_every_hook_fires_once_with_documented_shape(pair, batch):
    variant, _, model = pair
    fired: dict[str, list[tuple[int, ...]]] = {}
    model.add_hook(lambda name: True, lambda t, hook: fired.setdefault(hook.name, []).append(tuple(t.shape)))
    try:
        model(**batch)
    finally:
        model.reset_hooks()
    want = expected_shapes(model.cfg, 3, ENC_LEN, DEC_LEN, variant == "gated")
    assert set(model.hook_dict) == set(want)
    assert fired == {k: [v] for k, v in want.items()}


def test_sdpa_path_equals_explicit_path(pair, batch):
    _, _, model = pair
    with torch.no_grad():
        fused = model(**batch).logits
        hooks = [(lambda n: n.endswith("hook_pattern"), lambda t, h: t)]  # forces the explicit softmax path
        explicit = model.run_with_hooks(**batch, fwd_hooks=hooks).logits
    assert err(fused, explicit) <= 1e-5


def test_kv_cache_stepping_equals_full_decoder(pair, batch):
    _, _, model = pair
    am, y, dm = batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"]
    with torch.no_grad():
        full = model(**batch).logits
        enc = model.encode(batch["input_ids"], am)
        prefix = model(attention_mask=am, decoder_input_ids=y[:, :5], decoder_attention_mask=dm[:, :5],
                       encoder_outputs=enc, use_cache=True)
        cache = prefix.past_key_values
        assert isinstance(cache, KVCache) and len(cache) == 5
        steps = [prefix.logits]
        for t in range(5, DEC_LEN):
            assert len(cache) == t
            out = model(attention_mask=am, decoder_input_ids=y[:, t:t + 1],
                        decoder_attention_mask=dm[:, :t + 1], encoder_outputs=enc, past_key_values=cache)
            steps.append(out.logits)
    assert len(cache) == DEC_LEN
    # a fully masked query (left padding) attends uniformly to every key it is shown, as in `transformers`,
    # so only real positions are comparable between the two ways of running
    real = dm.bool()
    assert err(torch.cat(steps, dim=1)[real], full[real]) <= 1e-5


def test_decoder_is_causal(pair, batch):
    _, _, model = pair
    y2 = batch["decoder_input_ids"].clone()
    j = 13
    y2[:, j] = (y2[:, j] + 7) % V
    real = batch["decoder_attention_mask"].bool()  # see the KV-cache test on fully masked queries
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**{**batch, "decoder_input_ids": y2}).logits
    assert err(a[:, :j][real[:, :j]], b[:, :j][real[:, :j]]) == 0.0  # earlier positions cannot see it
    assert err(a[:, j:], b[:, j:]) > 1e-3
    _, cache = model.run_with_cache(**batch, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    future = torch.ones(DEC_LEN, DEC_LEN, dtype=torch.bool).triu(1) & real[:, None, :, None]
    for i in range(L_DEC):
        pattern = cache[f"decoder.blocks.{i}.attn.hook_pattern"]  # batch head q_pos k_pos
        assert pattern.masked_select(future).abs().max() == 0
    enc_upper = torch.ones(ENC_LEN, ENC_LEN, dtype=torch.bool).triu(1)
    assert cache["encoder.blocks.0.attn.hook_pattern"][0][..., enc_upper].min() > 0  # looks both ways


def test_buckets_match_hf_both_directions():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)[None]
    for bidirectional in (True, False):
        for n, dist in ((8, 16), (32, 128)):
            ours = relative_position_bucket(rel, bidirectional, n, dist)
            assert torch.equal(ours, T5Attention._relative_position_bucket(rel, bidirectional, n, dist))
    dec = relative_position_bucket(rel, False, 8, 16)[0]
    assert (dec[300:] == 0).all() and dec[296:301].tolist() == [4, 3, 2, 1, 0]  # keys ahead share bucket 0
    enc = relative_position_bucket(rel, True, 8, 16)[0]
    assert enc[296:305].tolist() == [2, 2, 2, 1, 0, 5, 6, 6, 6]  # keys ahead get their own half


def test_loss_with_labels_equals_hf(pair, batch):
    _, hf, model = pair
    labels = batch["decoder_input_ids"].clone()
    labels[1, 12:] = -100
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    with torch.no_grad():
        ref, out = hf(**kw), model(**kw)
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert err(out.logits, ref.logits) <= TOL
    assert torch.equal(model.shift_right(labels), hf._shift_right(labels))


def test_inputs_embeds_equals_input_ids(pair, batch):
    _, _, model = pair
    with torch.no_grad():
        a = model(**batch).logits
        kw = {**batch, "inputs_embeds": model.shared(batch["input_ids"])}
        del kw["input_ids"]
        b = model(**kw).logits
    assert err(a, b) == 0.0


def test_bad_inputs_raise(pair, batch):
    _, _, model = pair
    x, y = batch["input_ids"], batch["decoder_input_ids"]
    outside = rf"token id {V} is outside the vocabulary \[0, {V}\)"
    one_of = "pass exactly one of input_ids and inputs_embeds"
    bad = [  # (a regex of the message, the call's arguments)
        (outside, dict(input_ids=x, decoder_input_ids=torch.full_like(y, V))),  # decoder token outside the vocabulary
        (rf"token id -\d+ is outside the vocabulary \[0, {V}\)", dict(input_ids=-x, decoder_input_ids=y)),
        (r"input_ids must have shape \(batch, pos\), got \(23,\)", dict(input_ids=x[0], decoder_input_ids=y)),
        ("decoder_input_ids is required", dict(input_ids=x)),  # no decoder input, no labels
        (one_of, dict(decoder_input_ids=y)),  # nothing to encode
        (one_of, dict(input_ids=x, inputs_embeds=model.shared(x), decoder_input_ids=y)),  # both
        (r"attention_mask must have shape \(3, 23\) \(batch, positions\), got \(3, 5\)",
         dict(input_ids=x, attention_mask=batch["attention_mask"][:, :5], decoder_input_ids=y)),
        (r"decoder_attention_mask \(cached \+ new\) must have shape \(3, 19\) \(batch, positions\), got \(3, 4\)",
         dict(input_ids=x, decoder_input_ids=y, decoder_attention_mask=torch.ones(3, 4, dtype=torch.long))),
        (rf"encoder_outputs must be a \(batch, enc_pos, {D}\) tensor",
         dict(encoder_outputs=torch.zeros(3, 5, D + 1), decoder_input_ids=y)),
        ("encoder batch 2 != decoder batch 3", dict(encoder_outputs=torch.zeros(2, 5, D), decoder_input_ids=y)),
        (outside, dict(input_ids=x, labels=torch.full_like(y, V))),
        (r"labels \(3, 4\) and decoder_input_ids \(3, 19\) must have the same shape",
         dict(input_ids=x, decoder_input_ids=y, labels=y[:, :4])),
    ]
    for message, kw in bad:
        with pytest.raises(ValueError, match=message):
            model(**kw)


def test_unsupported_config_refused():
    with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
        config_from_hf({"feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match="is_encoder_decoder=False"):
        config_from_hf({"is_encoder_decoder": False})
    with pytest.raises(ValueError, match="act_fn"):
        T5Config(act_fn="swish")


def test_config_translation_and_aliases():
    # transformers < 5 wrote FLAN-T5's own head (and its unscaled output) as tie_word_embeddings=False
    old_flan = config_from_hf({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                               "num_layers": 4})
    assert old_flan.gated and old_flan.act_fn == "gelu_new" and old_flan.n_decoder_layers == 4
    assert not old_flan.tie_word_embeddings and not old_flan.scale_decoder_outputs
    cfg = config_from_hf({"vocab_size": 99, "d_model": 40, "d_kv": 12, "num_heads": 3,
                          "num_decoder_layers": 2, "relative_attention_num_buckets": 8,
                          "relative_attention_max_distance": 16})
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (99, 40, 3, 6)
    assert (cfg.num_decoder_layers, cfg.relative_attention_num_buckets, cfg.d_head) == (2, 8, 12)
    assert cfg.relative_attention_max_distance == 16 and cfg.layer_norm_epsilon == 1e-6
    with pytest.raises(AttributeError, match="T5Config has no attribute 'no_such_option'"):
        cfg.no_such_option  # noqa: B018


def test_full_size_table_on_meta():
    """flan-t5-large-sized tensors converted on the meta device: the table holds at real sizes."""
    import transformers

    from hookvene.loading.t5 import convert

    hf_cfg = transformers.T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24,
                                   num_heads=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(hf_cfg)
        state = dict(hf.state_dict())
        state["lm_head.weight"] = torch.empty(32128, 1024)  # a distinct tensor, as in the checkpoint file
    model, converted = convert(hf_cfg.to_dict(), state, True, "meta")
    assert len(converted) == len(model.state_dict()) and not model.cfg.tie_word_embeddings
    assert model.decoder.blocks[23].cross_attn.o.weight.shape == (1024, 1024)


# -- TransformerLens's cache decompositions and weight views, per stack ------------------------------------------
# Every parameter redrawn away from transformers' init (norm weights far from 1, large matrices), both variants.

STACKS = {"encoder": L_ENC, "decoder": L_DEC}


@pytest.fixture(scope="module", params=list(VARIANTS))
def lens_run(request, batch):
    from tests.test_parity import redraw_

    model = redraw_(loading.from_pretrained(hf_t5(request.param, seed=7)), seed=11)
    with torch.no_grad():
        out, cache = model.run_with_cache(**batch)
    return request.param, model, out, cache


@pytest.mark.filterwarnings("ignore:hook_result was not cached")
def test_decompose_resid_sums_to_each_stacks_residual_stream(lens_run):
    _, _, _, cache = lens_run
    for stack, n in STACKS.items():
        final = cache[f"{stack}.blocks.{n - 1}.hook_resid_post"]
        parts, labels = cache.decompose_resid(stack=stack, return_labels=True)
        writes = ["attn_out", "cross_attn_out", "mlp_out"] if stack == "decoder" else ["attn_out", "mlp_out"]
        assert labels == ["embed"] + [f"{i}_{w}" for i in range(n) for w in writes]
        assert err(parts.sum(0), final) <= 1e-5
        # the MLP's input of block 1: the decoder's after both attentions (ln3 reads resid_mid_cross)
        mlp_in = cache[f"{stack}.blocks.1.hook_resid_mid" + ("_cross" if stack == "decoder" else "")]
        assert err(cache.decompose_resid(1, mlp_input=True, stack=stack).sum(0), mlp_in) <= 1e-5
        attn = cache.decompose_resid(mode="attn", stack=stack, incl_embeds=False)
        assert len(attn) == n * (len(writes) - 1)
        for expand in (True, False):
            full = cache.get_full_resid_decomposition(stack=stack, expand_neurons=expand)
            assert err(full.sum(0), final) <= 1e-5
        acc, acc_labels = cache.accumulated_resid(stack=stack, incl_mid=True, return_labels=True)
        mids = ["mid", "mid_cross"] if stack == "decoder" else ["mid"]
        assert acc_labels == [f"{i}_{m}" for i in range(n) for m in ["pre", *mids]] + ["final_post"]
        assert torch.equal(acc[-1], final)


def test_logit_lens_and_apply_ln_to_stack_per_stack(lens_run):
    _, model, out, cache = lens_run
    # the decoder's last accumulated state through its final norm, unembedded as T5 does it: the model's logits
    acc = cache.accumulated_resid(layer=-1, apply_ln=True, stack="decoder")
    assert err((acc[-1] * model.output_scale) @ model.W_U, out.logits) <= 1e-4
    # apply_ln_to_stack: T5's RMS scale, computed from the cached stream (no mean removed); x its weight, the
    # components sum to what the norm output
    for stack in STACKS:
        norm = getattr(model, stack).ln_final
        scaled = cache.decompose_resid(stack=stack, apply_ln=True)
        assert err(scaled.sum(0) * norm.weight, cache[f"{stack}.ln_final.hook_normalized"]) <= 1e-5
        ln = "ln3" if stack == "decoder" else "ln2"
        scaled = cache.decompose_resid(1, mlp_input=True, apply_ln=True, stack=stack)
        weight = getattr(getattr(model, stack).blocks[1], ln).weight
        assert err(scaled.sum(0) * weight, cache[f"{stack}.blocks.1.{ln}.hook_normalized"]) <= 1e-5
        scaled = cache.accumulated_resid(1, apply_ln=True, stack=stack)
        assert err(scaled[-1] * getattr(model, stack).blocks[1].ln1.weight,
                   cache[f"{stack}.blocks.1.ln1.hook_normalized"]) <= 1e-5


def test_logit_attrs_sum_to_the_decoder_logits(lens_run, batch):
    _, _, out, cache = lens_run
    y = batch["decoder_input_ids"]
    right, wrong = y[:, -1], y[:, 0]
    parts = cache.decompose_resid(stack="decoder")
    pick = lambda t: out.logits.gather(-1, t[:, None, None].expand(-1, y.shape[1], 1))[..., 0]  # noqa: E731
    attrs = cache.logit_attrs(parts, right, stack="decoder")
    assert attrs.shape == (len(parts), *y.shape) and err(attrs.sum(0), pick(right)) <= 1e-4
    parts_last = cache.decompose_resid(stack="decoder", pos_slice=-1)
    diff = cache.logit_attrs(parts_last, right, incorrect_tokens=wrong, stack="decoder", pos_slice=-1)
    assert diff.shape == (len(parts_last), y.shape[0])
    assert err(diff.sum(0), (pick(right) - pick(wrong))[:, -1]) <= 1e-4
    heads = cache.get_full_resid_decomposition(stack="decoder", pos_slice=-1)
    assert err(cache.logit_attrs(heads, 5, stack="decoder", pos_slice=-1).sum(0), out.logits[:, -1, 5]) <= 1e-4
    with pytest.raises(ValueError, match="only the decoder's residual stream reaches"):
        cache.logit_attrs(parts, right, stack="encoder")


def test_stack_head_results_sum_to_each_attention_output(lens_run):
    _, _, _, cache = lens_run
    cache = cache.like({k: v for k, v in cache.items() if not k.endswith("hook_result")})  # as run_with_cache left it
    with pytest.warns(UserWarning, match="hook_result was not cached"):
        heads, labels = cache.stack_head_results(stack="decoder", return_labels=True)
    assert labels[:2 * H] == [f"L0H{h}" for h in range(H)] + [f"L0CH{h}" for h in range(H)]
    assert heads.shape[0] == L_DEC * 2 * H
    for i in range(L_DEC):
        block = heads[2 * H * i:2 * H * (i + 1)]
        assert err(block[:H].sum(0), cache[f"decoder.blocks.{i}.hook_attn_out"]) <= 1e-5
        assert err(block[H:].sum(0), cache[f"decoder.blocks.{i}.hook_cross_attn_out"]) <= 1e-5
    with pytest.warns(UserWarning, match="hook_result was not cached: computing"):
        enc, enc_labels = cache.stack_head_results(stack="encoder", return_labels=True)
    assert enc_labels == [f"L{i}H{h}" for i in range(L_ENC) for h in range(H)]
    for i in range(L_ENC):
        assert err(enc[H * i:H * (i + 1)].sum(0), cache[f"encoder.blocks.{i}.hook_attn_out"]) <= 1e-5
    rest = cache.stack_head_results(1, incl_remainder=True, stack="encoder")
    assert err(rest.sum(0), cache["encoder.blocks.0.hook_resid_post"]) <= 1e-5
    neurons = cache.stack_neuron_results(2, stack="decoder")
    assert neurons.shape[0] == 2 * DFF
    assert err(neurons[DFF:].sum(0), cache["decoder.blocks.1.hook_mlp_out"]) <= 1e-5
    pattern = cache.stack_activation("pattern", stack="encoder")
    assert pattern.shape == (L_ENC, *cache["encoder.blocks.0.attn.hook_pattern"].shape)


def test_weight_views_reproduce_the_hooks_and_share_storage(lens_run):
    variant, model, _, cache = lens_run
    enc_out = cache["encoder.ln_final.hook_normalized"]
    sites = [(f"encoder.blocks.{i}", "attn", "ln1", None) for i in range(L_ENC)]
    sites += [(f"decoder.blocks.{i}", "attn", "ln1", None) for i in range(L_DEC)]
    sites += [(f"decoder.blocks.{i}", "cross_attn", "ln2", enc_out) for i in range(L_DEC)]
    for where, name, ln, kv_in in sites:
        attn = model.get_submodule(f"{where}.{name}")
        x = cache[f"{where}.{ln}.hook_normalized"]
        kv_in = x if kv_in is None else kv_in
        p = f"{where}.{name}."
        assert attn.W_Q.shape == attn.W_K.shape == attn.W_V.shape == (H, D, DKV) and attn.W_O.shape == (H, DKV, D)
        assert err(torch.einsum("bpd,hde->bphe", x, attn.W_Q), cache[p + "hook_q"]) <= 1e-5
        assert err(torch.einsum("bpd,hde->bphe", kv_in, attn.W_K), cache[p + "hook_k"]) <= 1e-5
        assert err(torch.einsum("bpd,hde->bphe", kv_in, attn.W_V), cache[p + "hook_v"]) <= 1e-5
        z = cache[p + "hook_z"]
        for h in range(H):  # z @ W_O of one head = the output projection with the other heads' z zeroed
            alone = torch.zeros_like(z)
            alone[..., h, :] = z[..., h, :]
            with torch.no_grad():
                assert err(z[..., h, :] @ attn.W_O[h], attn.o(alone.flatten(-2))) <= 1e-5
        out_hook = f"{where}.hook_{'cross_attn' if name == 'cross_attn' else 'attn'}_out"
        assert err(torch.einsum("bphe,hem->bpm", z, attn.W_O), cache[out_hook]) <= 1e-5
        for b in (attn.b_Q, attn.b_K, attn.b_V):
            assert b.shape == (H, DKV) and not b.any()
        assert attn.b_O.shape == (D,) and not attn.b_O.any()
    for stack, n in STACKS.items():
        for i in range(n):
            where = f"{stack}.blocks.{i}"
            mlp = model.get_submodule(f"{where}.mlp")
            x = cache[f"{where}.{'ln3' if stack == 'decoder' else 'ln2'}.hook_normalized"]
            assert mlp.W_in.shape == (D, DFF) and mlp.W_out.shape == (DFF, D)
            linear = "mlp.hook_pre_linear" if variant == "gated" else "mlp.hook_pre"
            assert err(x @ mlp.W_in, cache[f"{where}.{linear}"]) <= 1e-5
            if variant == "gated":
                assert err(x @ mlp.W_gate, cache[f"{where}.mlp.hook_pre"]) <= 1e-5
            else:
                assert not hasattr(mlp, "W_gate")
            assert err(cache[f"{where}.mlp.hook_post"] @ mlp.W_out, cache[f"{where}.hook_mlp_out"]) <= 1e-5
            assert not mlp.b_in.any() and not mlp.b_out.any()
    # views, not copies: they share the Linear weights' storage, and an edit through one reaches the model
    attn, mlp = model.decoder.blocks[1].cross_attn, model.encoder.blocks[0].mlp
    assert attn.W_Q.data_ptr() == attn.q.weight.data_ptr() and attn.W_O.data_ptr() == attn.o.weight.data_ptr()
    assert mlp.W_out.data_ptr() == mlp.wo.weight.data_ptr()
    with torch.no_grad():
        before = attn.o.weight[2, DKV + 1].item()
        attn.W_O[1, 1, 2] += 1.0
        assert attn.o.weight[2, DKV + 1].item() == pytest.approx(before + 1.0)
        attn.W_O[1, 1, 2] -= 1.0
        mlp.W_in[3, 4] += 1.0
        assert mlp.get_submodule("wi_1" if variant == "gated" else "wi").weight[4, 3] == mlp.W_in[3, 4]
        mlp.W_in[3, 4] -= 1.0


def test_decompositions_need_a_stack_on_t5_and_refuse_one_elsewhere(lens_run):
    _, model, _, cache = lens_run
    zeros = torch.zeros(1, 3, ENC_LEN, D)
    calls = {"accumulated_resid": {}, "decompose_resid": {}, "stack_head_results": {}, "stack_neuron_results": {},
             "get_full_resid_decomposition": {}, "compute_head_results": {},
             "stack_activation": {"activation_name": "z"},
             "apply_ln_to_stack": {"residual_stack": zeros}, "logit_attrs": {"residual_stack": zeros, "tokens": 3}}
    for method, kw in calls.items():
        with pytest.raises(ValueError, match=r"encoder-decoder model.*pass stack='encoder' or stack='decoder'"):
            getattr(cache, method)(**kw)
        with pytest.raises(ValueError, match="stack must be 'encoder' or 'decoder', got 'middle'"):
            getattr(cache, method)(**kw, stack="middle")
    with pytest.raises(ValueError, match=r"model-level W_Q.*model\.encoder\.blocks\[l\]\.attn\.W_Q"):
        _ = model.W_Q
    from tests.helpers import tiny_gpt2

    gpt2 = loading.from_pretrained(tiny_gpt2())
    _, gpt2_cache = gpt2.run_with_cache(torch.randint(0, 101, (1, 5)))
    for method, kw in calls.items():
        kw = {k: torch.zeros(1, 1, 5, 32) if k == "residual_stack" else v for k, v in kw.items()}
        with pytest.raises(ValueError, match="stack='decoder' is for encoder-decoder models.*call without stack"):
            getattr(gpt2_cache, method)(**kw, stack="decoder")
    assert gpt2_cache.decompose_resid().shape[0] == 6  # unchanged without it
