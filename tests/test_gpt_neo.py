"""GPT-Neo: parity with `transformers` (logits, residual stream, attention patterns) on tiny random
checkpoints made locally, with local layers whose window is shorter than the sequence; hooks, SDPA vs explicit
attention, KV cache, padding, input checks, config refusal and checkpoint errors."""

import pytest
import torch

import hookvene
from hookvene.loading.common import CheckpointError
from hookvene.loading.gpt_neo import config_from_hf
from hookvene.models.gpt_neo import GPTNeo, GPTNeoConfig, GPTNeoLM
from tests.helpers import ungated_hooks

VOCAB, N_CTX, D_MODEL, N_HEADS, D_MLP, WINDOW = 97, 40, 36, 4, 50, 4
LAYERS = [[["global", "local"], 1], [["local"], 1]]  # global, local, local
TOL = 1e-4


def tiny_neo(seed: int = 0, lm_head: bool = True, **overrides):
    """A random HF GPT-Neo in eval mode with eager attention (so HF returns patterns). Weights are redrawn
    larger than HF's init so that attention is peaked and a wrong window or scale shows up in the logits."""
    from transformers import GPTNeoConfig as HFConfig
    from transformers import GPTNeoForCausalLM, GPTNeoModel

    kw = dict(vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=D_MODEL, num_layers=3,
              num_heads=N_HEADS, intermediate_size=D_MLP, attention_types=LAYERS, window_size=WINDOW,
              resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    cls = GPTNeoForCausalLM if lm_head else GPTNeoModel
    hf = cls(HFConfig(**kw, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.15 if p.dim() == 2 else 0.1)
    return hf


@pytest.fixture(scope="module")
def hf():
    return tiny_neo()


@pytest.fixture(scope="module")
def neo(hf):
    return hookvene.from_pretrained(hf)


def ids(batch: int = 2, pos: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def max_errors(hf, model, input_ids, attention_mask=None, position_ids=None) -> dict[str, float]:
    """Max abs error of logits, every residual stream and every pattern, over non-padding positions only."""
    keep = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()  # batch pos
    with torch.no_grad():
        kw = dict(attention_mask=attention_mask, position_ids=position_ids)
        theirs = hf(input_ids, **kw, output_hidden_states=True, output_attentions=True)
        ours, cache = model.run_with_cache(input_ids, **kw)
    n = model.cfg.n_layers
    ours_hidden = [cache["resid_pre", i] for i in range(n)] + [cache["ln_final.hook_normalized"]]
    err = {"logits": (theirs.logits - ours.logits)[keep].abs().max().item() if hasattr(theirs, "logits")
           else (theirs.last_hidden_state - ours.last_hidden_state)[keep].abs().max().item()}
    err["resid"] = max((a - b)[keep].abs().max().item() for a, b in zip(theirs.hidden_states, ours_hidden))
    err["resid_post"] = max((theirs.hidden_states[i + 1] - cache["resid_post", i])[keep].abs().max().item()
                            for i in range(n - 1))
    # patterns: batch head q_pos k_pos, compared on real query rows (a padding query's row is arbitrary)
    err["pattern"] = max((a - cache["pattern", i]).permute(0, 2, 1, 3)[keep].abs().max().item()
                         for i, a in enumerate(theirs.attentions))
    return err


def assert_parity(hf, model, input_ids, **kw) -> None:
    err = max_errors(hf, model, input_ids, **kw)
    assert max(err.values()) <= TOL, err


# ---------------------------------------------------------------- parity with transformers


def test_in_memory_parity_and_shared_weights(hf, neo):
    assert isinstance(neo, GPTNeoLM) and neo.cfg.attention_types == ("global", "local", "local")
    assert_parity(hf, neo, ids(pos=17))  # 17 > window 4: local layers really drop keys
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    for hf_name, ours in [("transformer.wte.weight", neo.embed.weight),
                          ("lm_head.weight", neo.unembed.weight),
                          ("transformer.h.2.attn.attention.q_proj.weight", neo.blocks[2].attn.q.weight),
                          ("transformer.h.1.mlp.c_proj.bias", neo.blocks[1].mlp.proj.bias)]:
        assert ours is theirs[hf_name] or ours.data_ptr() == theirs[hf_name].data_ptr(), hf_name
    n_shared = {p.data_ptr() for p in hf.parameters()} & {p.data_ptr() for p in neo.parameters()}
    assert len(n_shared) == len({p.data_ptr() for p in neo.parameters()})


def test_local_window_is_where_hf_puts_it(neo):
    """Query i sees keys j with i - window < j <= i in local layers, every key j <= i in global ones."""
    _, cache = neo.run_with_cache(ids(pos=13), names_filter=lambda n: n.endswith("hook_pattern"))
    q, k = torch.arange(13)[:, None], torch.arange(13)[None, :]
    for layer, window in enumerate([N_CTX, WINDOW, WINDOW]):
        allowed = (k <= q) & (k > q - window)
        pattern = cache["pattern", layer]
        assert (pattern[..., ~allowed] == 0).all() and (pattern[..., allowed] > 0).all()


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_dir_parity(tmp_path, tied):
    hf = tiny_neo(seed=2, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    model = hookvene.from_pretrained(str(tmp_path))
    assert model.cfg.tie_word_embeddings is tied
    assert (model.unembed.weight.data_ptr() == model.embed.weight.data_ptr()) is tied
    assert_parity(hf, model, ids(pos=23, seed=3))


def test_base_model_without_lm_head(tmp_path):
    hf = tiny_neo(seed=4, lm_head=False, attention_types=[[["local", "global"], 1]], num_layers=2)
    model = hookvene.from_pretrained(hf)
    assert type(model) is GPTNeo and not hasattr(model, "hook_logits")
    assert_parity(hf, model, ids(pos=15))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_parity(hf, neo, side):
    mask = torch.ones(3, 16, dtype=torch.long)
    for row, n_pad in enumerate([0, 5, 9]):  # row 2 keeps 7 real tokens: more than the window of 4
        if side == "left":
            mask[row, :n_pad] = 0
        else:
            mask[row, 16 - n_pad:] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    assert_parity(hf, neo, ids(batch=3, pos=16, seed=5), attention_mask=mask, position_ids=position_ids)


def test_loss_matches_hf(hf, neo):
    x = ids(pos=12)
    labels = x.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        assert abs(hf(x, labels=labels).loss.item() - neo(x, labels=labels).loss.item()) <= TOL


def test_inputs_embeds_path(neo):
    x = ids(pos=11)
    with torch.no_grad():
        a = neo(x).logits
        b = neo(inputs_embeds=neo.embed(x)).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_start_and_stop_at_layer(neo):
    """One block at a time (stop_at_layer=l+1, start_at_layer=l) equals the full run, also when the tail
    resumes from a KV cache of the prefix past the local window."""
    x = ids(pos=17, seed=3)
    with torch.no_grad():
        full, cache = neo.run_with_cache(x)
        h = neo(x, stop_at_layer=0).last_hidden_state
        for layer in range(neo.cfg.n_layers):
            h = neo(inputs_embeds=h, start_at_layer=layer, stop_at_layer=layer + 1).last_hidden_state
            torch.testing.assert_close(h, cache[f"blocks.{layer}.hook_resid_post"], atol=1e-5, rtol=0)
        torch.testing.assert_close(neo(inputs_embeds=h, start_at_layer=neo.cfg.n_layers).logits, full.logits,
                                   atol=1e-5, rtol=0)
        prefix = neo(x[:, :9], use_cache=True).past_key_values
        tail = neo(inputs_embeds=cache["blocks.1.hook_resid_pre"][:, 9:], start_at_layer=1,
                   past_key_values=prefix).logits
        torch.testing.assert_close(tail, full.logits[:, 9:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="stop_at_layer.*out of range"):
        neo(x, stop_at_layer=neo.cfg.n_layers + 1)


# ---------------------------------------------------------------- hooks, attention paths, KV cache


def test_every_hook_fires_with_documented_shapes(neo):
    batch, pos, d_head = 2, 9, D_MODEL // N_HEADS
    _, cache = neo.run_with_cache(ids(batch, pos))
    assert sorted(cache) == sorted(ungated_hooks(neo))  # every hook point but TL's opt-in ones fired
    shapes = {"hook_embed": (batch, pos, D_MODEL), "hook_pos_embed": (batch, pos, D_MODEL),
              "ln_final.hook_normalized": (batch, pos, D_MODEL), "hook_logits": (batch, pos, VOCAB),
              "ln_final.hook_scale": (batch, pos, 1)}
    for i in range(3):
        b = f"blocks.{i}."
        for name in ["hook_resid_pre", "ln1.hook_normalized", "hook_attn_out", "hook_resid_mid",
                     "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post"]:
            shapes[b + name] = (batch, pos, D_MODEL)
        for name in ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"]:
            shapes[b + name] = (batch, pos, N_HEADS, d_head)
        for name in ["attn.hook_attn_scores", "attn.hook_pattern"]:
            shapes[b + name] = (batch, N_HEADS, pos, pos)
        shapes[b + "mlp.hook_pre"] = shapes[b + "mlp.hook_post"] = (batch, pos, D_MLP)
        shapes[b + "ln1.hook_scale"] = shapes[b + "ln2.hook_scale"] = (batch, pos, 1)
    assert set(shapes) == set(cache)
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name


def test_sdpa_and_explicit_attention_agree(neo):
    x, mask = ids(pos=14), torch.ones(2, 14, dtype=torch.long)
    mask[1, :6] = 0
    noop = [(lambda n: n.endswith("hook_pattern"), lambda t, hook: None)]
    with torch.no_grad():
        for kw in [{}, {"attention_mask": mask}]:
            fused = neo(x, **kw).logits
            explicit = neo.run_with_hooks(x, fwd_hooks=noop, **kw).logits
            assert (fused - explicit)[mask.bool() if kw else ...].abs().max() <= TOL


@pytest.mark.parametrize("explicit", [False, True])
def test_kv_cache_matches_full_forward(neo, explicit):
    x = ids(pos=19, seed=6)
    hooks = [(lambda n: n.endswith("hook_pattern"), lambda t, hook: None)] if explicit else []
    with torch.no_grad(), neo.hooks(hooks):
        full = neo(x).logits
        out = neo(x[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 19):  # well past the window of 4
            out = neo(x[:, t:t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    assert len(out.past_key_values) == 19
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL


def test_kv_cache_with_left_padding(neo):
    x, mask = ids(batch=2, pos=15, seed=7), torch.ones(2, 15, dtype=torch.long)
    mask[0, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = neo(x, attention_mask=mask, position_ids=position_ids).logits
        out = neo(x[:, :6], attention_mask=mask[:, :6], position_ids=position_ids[:, :6], use_cache=True)
        steps = [out.logits]
        for t in range(6, 15):
            out = neo(x[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=position_ids[:, t:t + 1],
                      past_key_values=out.past_key_values)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full)[mask.bool()].abs().max() <= TOL


def test_bfloat16_runs_attention_in_float32(hf, neo):
    model = hookvene.from_pretrained(tiny_neo(), dtype=torch.bfloat16)
    x = ids(pos=17)
    with torch.no_grad():
        names = ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z"]
        out, cache = model.run_with_cache(x, names_filter=names)
        ref = neo(x).logits
    assert out.logits.dtype == torch.bfloat16 and cache["blocks.1.attn.hook_z"].dtype == torch.bfloat16
    assert cache["blocks.1.attn.hook_pattern"].dtype == torch.float32
    assert (out.logits.float() - ref).abs().max() <= 0.1 * ref.abs().max()


# ---------------------------------------------------------------- aliases, errors


def test_hf_style_aliases(neo):
    assert neo.config.num_layers == neo.config.n_layer == 3 and neo.config.hidden_size == D_MODEL
    assert neo.config.attention_layers == ("global", "local", "local") and neo.config.window_size == WINDOW
    assert neo.config.num_heads == neo.config.num_attention_heads == N_HEADS
    assert neo.config.vocab_size == VOCAB
    assert neo.config.max_position_embeddings == N_CTX and neo.config.intermediate_size == D_MLP
    assert neo.transformer is neo and neo.transformer.wte(torch.tensor(14)).shape == (D_MODEL,)
    assert neo.wpe is neo.pos_embed and neo.h is neo.blocks and neo.ln_f is neo.ln_final
    assert neo.lm_head is neo.unembed and neo.device.type == "cpu" and neo.dtype == torch.float32


def test_bad_input_raises(neo):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        neo(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        neo(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="longer than the model's context"):
        neo(torch.zeros(1, N_CTX + 1, dtype=torch.long))
    out = neo(torch.zeros(1, N_CTX - 1, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="longer than the model's context"):
        neo(torch.zeros(1, 2, dtype=torch.long), past_key_values=out.past_key_values)


def test_unsupported_config_is_refused(hf):
    with pytest.raises(ValueError, match="activation_function='quick_gelu'"):
        hookvene.from_pretrained(tiny_neo(activation_function="quick_gelu"))
    cfg = hf.config.to_dict()
    with pytest.raises(ValueError, match="attention_layers="):
        config_from_hf({**cfg, "attention_layers": ["global", "sparse", "local"]})
    compact = {k: v for k, v in cfg.items() if k != "attention_layers"}  # config.json, compact form only
    assert config_from_hf(compact).attention_types == ("global", "local", "local")
    with pytest.raises(ValueError, match="attention_types"):
        GPTNeoConfig(n_layers=2, attention_types=("global",))


def test_bad_checkpoint_lists_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_neo(seed=8).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.attn.attention.k_proj.weight"]
    state["transformer.h.2.mlp.c_fc.weight"] = state["transformer.h.2.mlp.c_fc.weight"][:-1]
    state["transformer.h.0.attn.attention.bias"] = torch.ones(1, 1, N_CTX, N_CTX, dtype=torch.bool)  # dropped
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        hookvene.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "blocks.1.attn.k.weight" in msg and "blocks.2.mlp.fc.weight" in msg and "attention.bias" not in msg


def test_full_size_table_on_meta_device():
    """The rule table covers gpt-neo-125M at real sizes (HF model built on the meta device: no memory)."""
    from transformers import GPTNeoConfig as HFConfig
    from transformers import GPTNeoForCausalLM

    from hookvene.loading.gpt_neo import convert

    hf_cfg = HFConfig(hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=2048,
                      attention_types=[[["global", "local"], 6]])
    with torch.device("meta"):
        hf = GPTNeoForCausalLM(hf_cfg)
    model, state = convert(hf_cfg.to_dict(), hf.state_dict(), lm_head=True, what="meta")
    assert model.cfg == GPTNeoConfig() and set(state) == set(model.state_dict())
