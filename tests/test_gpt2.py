"""hookvene GPT-2 against `transformers` on random-initialised configs: logits, every layer's residual stream,
attention patterns (max abs error <= 1e-4 in fp32), loading from memory / safetensors / .bin, padding, the KV
cache, labels, hook shapes and bad input."""

import os

import pytest
import torch

import hookvene
from hookvene import GPT2, GPT2LM
from tests.helpers import tiny_gpt2, ungated_hooks

ATOL = 1e-4
VOCAB = 101  # tiny_gpt2's vocabulary without a tokenizer (odd on purpose)

CONFIGS = {  # odd widths, n_inner set and unset, 1-4 layers, each activation, tied and untied unembedding
    "e36h3-l1-gelu_new": dict(n_embd=36, n_head=3, n_layer=1, activation_function="gelu_new"),
    "e36h6-l3-inner50-relu": dict(n_embd=36, n_head=6, n_layer=3, n_inner=50, activation_function="relu"),
    "e24h2-l4-gelu": dict(n_embd=24, n_head=2, n_layer=4, activation_function="gelu"),
    "e20h4-l2-inner17-untied": dict(n_embd=20, n_head=4, n_layer=2, n_inner=17, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf(request):
    return tiny_gpt2(seed=len(request.param), **CONFIGS[request.param])


def save_bin(hf_model, path: str) -> str:
    """A pre-safetensors checkpoint: config.json + pytorch_model.bin (transformers 5 only writes safetensors)."""
    os.makedirs(path, exist_ok=True)
    hf_model.config.save_pretrained(path)
    torch.save(hf_model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    return path


@pytest.fixture(scope="module")
def loaded(hf, tmp_path_factory):
    """The same HF weights loaded three ways."""
    d = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(d / "st")
    assert os.path.isfile(d / "st" / "model.safetensors")
    return {"memory": hookvene.from_pretrained(hf), "safetensors": hookvene.from_pretrained(str(d / "st")),
            "bin": hookvene.from_pretrained(save_bin(hf, str(d / "bin")), allow_pickle=True)}


def make_batch(padding: str, batch: int = 3, pos: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, pos), generator=g)
    mask = torch.ones_like(ids)
    lengths = [pos, pos - 3, pos - 5][:batch]
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, n:] = 0
        elif padding == "left":
            mask[b, : pos - n] = 0
    if padding == "none":
        return ids, None, None
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) if padding == "left" else None
    return ids, mask, position_ids


def max_err(a, b, real):
    """Max abs difference over real (non-pad) query positions; `real` is (batch, pos) bool."""
    diff = (a - b).abs()
    while real.dim() < diff.dim():
        real = real.unsqueeze(-1)
    return diff.masked_select(real.expand_as(diff)).max().item() if real.any() else 0.0


@pytest.mark.parametrize("source", ["memory", "safetensors", "bin"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_parity_with_transformers(hf, loaded, source, padding):
    model = loaded[source]
    ids, mask, pos_ids = make_batch(padding)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos_ids, output_hidden_states=True, output_attentions=True)
        out, cache = model.run_with_cache(ids, attention_mask=mask, position_ids=pos_ids)
    n_layers = hf.config.n_layer
    assert len(ref.hidden_states) == n_layers + 1 and len(ref.attentions) == n_layers
    assert max_err(out.logits, ref.logits, real) <= ATOL
    assert torch.isfinite(out.logits).all()
    for i in range(n_layers):
        assert max_err(cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i], real) <= ATOL, i
        # patterns: (batch, head, q, k); compare real query rows, every key (padding keys must get 0 in both)
        assert max_err(cache["pattern", i].transpose(1, 2), ref.attentions[i].transpose(1, 2), real) <= ATOL, i
    assert max_err(cache["ln_final.hook_normalized"], ref.hidden_states[-1], real) <= ATOL
    assert max_err(out.last_hidden_state, ref.hidden_states[-1], real) <= ATOL


def test_weights_are_shared_with_an_in_memory_model(hf, loaded):
    model = loaded["memory"]
    hf_params = list(hf.parameters())
    for name, p in model.named_parameters(remove_duplicate=False):
        assert any(p is q for q in hf_params), f"{name} is a copy, not the HF Parameter"
    assert model.embed.weight is hf.transformer.wte.weight
    assert model.blocks[0].attn.qkv.weight is hf.transformer.h[0].attn.c_attn.weight
    assert model.unembed.weight is hf.lm_head.weight
    bias = hf.transformer.h[0].mlp.c_fc.bias
    saved = bias.detach().clone()
    with torch.no_grad():  # an edit through either model is seen by the other
        bias[0] = 123.0
        assert model.blocks[0].mlp.fc.bias[0] == 123.0
        bias.copy_(saved)


def test_checkpoint_loads_are_copies_with_a_tied_unembedding(hf, loaded):
    for source in ("safetensors", "bin"):
        model = loaded[source]
        assert model.embed.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
        assert isinstance(model, GPT2LM) and not any(p.is_meta for p in model.parameters())
        if hf.config.tie_word_embeddings:
            # one Parameter, as in HF: otherwise gradients on the embedding miss the unembedding's share
            tied = model.unembed.weight is model.embed.weight
            assert tied, f"{source}: unembed.weight and embed.weight are separate Parameters (tie lost in load_into)"
        else:
            assert model.unembed.weight.data_ptr() != model.embed.weight.data_ptr()
        assert len(list(model.parameters())) == len(list(hf.parameters())), source


def test_fused_attention_equals_explicit_path(hf, loaded):
    model = loaded["memory"]
    for padding in ("none", "left"):
        ids, mask, pos_ids = make_batch(padding)
        with torch.no_grad():
            fused = model(ids, attention_mask=mask, position_ids=pos_ids).logits
            explicit = model.run_with_hooks(ids, attention_mask=mask, position_ids=pos_ids,
                                            fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, h: None)]
                                            ).logits
        torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_left_padding_gives_the_unpadded_result(hf, loaded):
    model = loaded["memory"]
    ids, mask, pos_ids = make_batch("left")
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=pos_ids).logits
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            alone = model(ids[b : b + 1, -n:]).logits
            torch.testing.assert_close(padded[b : b + 1, -n:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_kv_cache_matches_full_forward(hf, loaded, explicit):
    model = loaded["memory"]
    hooks = [(lambda n: n.endswith("hook_attn_scores"), lambda t, h: None)] if explicit else []
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad(), model.hooks(hooks):
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 9):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
        assert len(out.past_key_values) == 9
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)

        # left-padded batch: mask covers prefix + new token, positions passed explicitly
        ids, mask, pos_ids = make_batch("left")
        full = model(ids, attention_mask=mask, position_ids=pos_ids).logits
        out = model(ids[:, :6], attention_mask=mask[:, :6], position_ids=pos_ids[:, :6], use_cache=True)
        steps = [out.logits]
        for t in range(6, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos_ids[:, t : t + 1],
                        past_key_values=out.past_key_values)
            steps.append(out.logits)
    real = mask.bool()
    assert max_err(torch.cat(steps, dim=1), full, real) <= 1e-5


def test_loss_matches_transformers(hf, loaded):
    model = loaded["memory"]
    ids = torch.randint(0, VOCAB, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels).loss
        ours = model(ids, labels=labels).loss
    assert ours.shape == () and abs(ours.item() - ref.item()) <= ATOL


def test_inputs_embeds(hf, loaded):
    model = loaded["memory"]
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        ref = hf(inputs_embeds=hf.transformer.wte(ids)).logits
        ours = model(inputs_embeds=model.embed(ids)).logits
    assert (ours - ref).abs().max() <= ATOL


# --- one config is enough below ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    hf_model = tiny_gpt2(n_embd=36, n_head=6, n_layer=2, n_inner=50)
    return hf_model, hookvene.from_pretrained(hf_model)


def test_base_model_checkpoint(tmp_path):
    from transformers import GPT2Model

    hf_lm = tiny_gpt2(n_embd=36, n_head=3, n_layer=2)
    base = GPT2Model(hf_lm.config).eval()
    base.load_state_dict(hf_lm.transformer.state_dict())
    base.save_pretrained(tmp_path)
    model = hookvene.from_pretrained(str(tmp_path))
    assert type(model) is GPT2 and not hasattr(model, "unembed") and "hook_logits" not in model.hook_dict
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        ref = base(ids).last_hidden_state
        out = model(ids)
    assert out.logits is None and out.loss is None
    assert (out.last_hidden_state - ref).abs().max() <= ATOL
    assert (out[0] - ref).abs().max() <= ATOL  # tuple-style access, as in transformers
    # the LM checkpoint without its head is the same base model; a base checkpoint can get a (tied) head
    headless = hookvene.from_pretrained(hf_lm, lm_head=False)
    assert type(headless) is GPT2
    with torch.no_grad():
        assert (headless(ids).last_hidden_state - ref).abs().max() <= ATOL
        lm = hookvene.from_pretrained(str(tmp_path), lm_head=True)
        assert (lm(ids).logits - hf_lm(ids).logits).abs().max() <= ATOL


def test_hf_attribute_aliases(small):
    hf_model, model = small
    cfg = model.config
    assert cfg.n_embd == cfg.hidden_size == 36 and cfg.n_head == 6 and cfg.n_layer == cfg.num_hidden_layers == 2
    assert cfg.vocab_size == VOCAB and cfg.n_positions == 64 and cfg.n_inner == 50
    assert cfg.layer_norm_epsilon == hf_model.config.layer_norm_epsilon and cfg.activation_function == "gelu_new"
    assert model.wte.weight is model.embed.weight is hf_model.transformer.wte.weight
    assert model.wpe is model.pos_embed and model.ln_f is model.ln_final
    assert model.transformer.h[0] is model.blocks[0] and model.transformer is model
    assert model.lm_head is model.unembed
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    with pytest.raises(AttributeError, match="GPT2Config has no attribute 'no_such_option'"):
        cfg.no_such_option  # noqa: B018


def test_every_hook_point_fires_with_its_documented_shape(small):
    _, model = small
    b, p, d, h, dh, m, v = 2, 5, 36, 6, 6, 50, VOCAB
    shapes = {"hook_q": (b, p, h, dh), "hook_k": (b, p, h, dh), "hook_v": (b, p, h, dh), "hook_z": (b, p, h, dh),
              "hook_attn_scores": (b, h, p, p), "hook_pattern": (b, h, p, p), "hook_resid_pre": (b, p, d),
              "hook_resid_mid": (b, p, d), "hook_resid_post": (b, p, d), "hook_attn_out": (b, p, d),
              "hook_mlp_out": (b, p, d), "hook_normalized": (b, p, d), "hook_embed": (b, p, d),
              "hook_pre": (b, p, m), "hook_post": (b, p, m), "hook_logits": (b, p, v), "hook_scale": (b, p, 1)}
    fired = []
    with torch.no_grad(), model.hooks([(lambda n: True, lambda t, hk: fired.append(hk.name))]):
        _, cache = model.run_with_cache(torch.randint(0, VOCAB, (b, p)))
    assert sorted(fired) == sorted(ungated_hooks(model))  # every hook point but TL's opt-in ones fires, once
    assert set(cache) == set(ungated_hooks(model))
    # embed, pos_embed, ln_final (2), logits + 23 per block (as TransformerLens), 6 of them opt-in
    assert len(model.hook_dict) == 5 + 2 * 23 and len(ungated_hooks(model)) == 5 + 2 * 17
    for name, t in cache.items():
        kind = name.rsplit(".", 1)[-1]
        assert t.shape == (shapes[kind] if kind != "hook_pos_embed" else (b, p, d)), name


def test_bad_input_raises(small):
    _, model = small
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[1, -1, 2]]))
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(1, 65, dtype=torch.long))
    model(torch.zeros(1, 64, dtype=torch.long))  # exactly n_ctx is fine
    out = model(torch.zeros(1, 60, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="n_ctx"):  # the cached prefix counts too
        model(torch.zeros(1, 5, dtype=torch.long), past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(5, dtype=torch.long))


def test_too_long_inputs_embeds_raise(small):
    _, model = small
    with pytest.raises(ValueError, match="n_ctx"):
        model(inputs_embeds=torch.zeros(1, 65, 36))


def test_no_input_raises(small):
    _, model = small
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model()


def test_start_and_stop_at_layer_run_the_blocks_in_pieces(hf, loaded):
    """TransformerLens semantics: stop_at_layer=l returns the residual stream entering block l (no ln_final, no
    logits); start_at_layer=l resumes from it; one block at a time, with a KV cache, gives the full run back."""
    model, n = loaded["memory"], hf.config.n_layer
    ids, mask, _ = make_batch("right")
    with torch.no_grad():
        full, cache = model.run_with_cache(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask, output_hidden_states=True)
        embeds = model(ids, attention_mask=mask, stop_at_layer=0)
        assert embeds.logits is None
        assert torch.equal(embeds.last_hidden_state, cache["blocks.0.hook_resid_pre"])
        x = embeds.last_hidden_state
        for layer in range(n):
            x = model(inputs_embeds=x, attention_mask=mask, start_at_layer=layer,
                      stop_at_layer=layer + 1).last_hidden_state
            assert (x - ref.hidden_states[layer + 1]).abs().max() <= ATOL or layer == n - 1  # HF's last is after ln_f
            assert torch.allclose(x, cache[f"blocks.{layer}.hook_resid_post"], atol=1e-6)
        end = model(inputs_embeds=x, attention_mask=mask, start_at_layer=n)  # no blocks: ln_final + unembed
        assert torch.allclose(end.logits, full.logits, atol=1e-5)
        if n > 1:  # negative stop counts from the end
            assert torch.equal(model(ids, attention_mask=mask, stop_at_layer=-1).last_hidden_state,
                               model(ids, attention_mask=mask, stop_at_layer=n - 1).last_hidden_state)
        # resuming with the prefix in a KV cache: positions 4.. of block 0 alone
        prefix = model(ids[:, :4], stop_at_layer=1, use_cache=True).past_key_values
        tail = model(inputs_embeds=cache["blocks.0.hook_resid_pre"][:, 4:], start_at_layer=0, stop_at_layer=1,
                     past_key_values=prefix).last_hidden_state
        unmasked = model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")[1]
        assert torch.allclose(tail, unmasked["blocks.0.hook_resid_post"][:, 4:], atol=1e-6)


@pytest.mark.parametrize("kw", [dict(start_at_layer=-1), dict(start_at_layer=9), dict(stop_at_layer=-9),
                                dict(stop_at_layer=9)])
def test_layer_range_out_of_bounds_raises(small, kw):
    _, model = small
    with pytest.raises(ValueError, match=f"{next(iter(kw))}.*out of range.*2 layers"):
        model(torch.zeros(1, 3, dtype=torch.long), **kw)


def test_non_int_layer_raises(small):
    _, model = small
    # ValueError from the model; under the shape-checked test pass, the annotation's TypeError comes first
    with pytest.raises((ValueError, TypeError), match="stop_at_layer"):
        model(torch.zeros(1, 3, dtype=torch.long), stop_at_layer=1.5)
