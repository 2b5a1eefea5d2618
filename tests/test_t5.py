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

