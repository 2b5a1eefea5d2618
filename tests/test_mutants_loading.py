"""Tests written for mutants of hookvene/loading/{gpt2,gpt_neo,t5,gru}.py that survived the suite (mutation/REPORT.md).

Config translation: a checkpoint's config.json written by `save_pretrained` omits every value equal to transformers'
default, so hookvene's defaults are read for real and must be transformers' own; and every key must be read under
its HF name (checked with a config in which every value differs from the default). GRU loading: dtype, device,
dropout and each refusal, with the message it names.
"""

import json
import os

import pytest
import torch
import transformers
from torch import nn

from hookvene.loading import gpt2, gpt_neo, t5
from hookvene.loading.common import CheckpointError
from hookvene.loading.gru import (
    create_gru,
    create_gru_classifier,
    create_gru_lm,
    from_torch_gru,
    load_gru,
    save_pretrained,
)
from hookvene.models.gpt2 import GPT2Config
from hookvene.models.gpt_neo import GPTNeoConfig
from hookvene.models.gru import GRU, GRULM, GRUClassifier, GRUConfig
from hookvene.models.t5 import T5Config


@pytest.mark.parametrize("hf_cls,module", [(transformers.GPT2Config, gpt2), (transformers.GPTNeoConfig, gpt_neo),
                                           (transformers.T5Config, t5)], ids=["gpt2", "gpt_neo", "t5"])
def test_every_default_is_transformers_default(hf_cls, module):
    full = hf_cls().to_dict()
    assert module.config_from_hf({}) == module.config_from_hf(full)
    for key in full:  # a config.json that leaves out this one key (its value is the default)
        assert module.config_from_hf({k: v for k, v in full.items() if k != key}) == module.config_from_hf(full), key


def test_gpt_neo_defaults_by_hand():
    cfg = gpt_neo.config_from_hf({})
    assert cfg == GPTNeoConfig(d_vocab=50257, n_ctx=2048, d_model=2048, n_layers=24, n_heads=16, d_mlp=8192,
                               act_fn="gelu_new", ln_eps=1e-5, window_size=256,
                               attention_types=("global", "local") * 12, tie_word_embeddings=True)


def test_gpt_neo_every_key_is_read():
    hf = transformers.GPTNeoConfig(vocab_size=77, max_position_embeddings=33, hidden_size=24, num_layers=3,
                                   num_heads=2, intermediate_size=40, activation_function="relu",
                                   layer_norm_epsilon=1e-3, window_size=5,
                                   attention_types=[[["local", "global"], 1], [["local"], 1]],
                                   tie_word_embeddings=False).to_dict()
    assert gpt_neo.config_from_hf(hf) == GPTNeoConfig(
        d_vocab=77, n_ctx=33, d_model=24, n_layers=3, n_heads=2, d_mlp=40, act_fn="relu", ln_eps=1e-3,
        window_size=5, attention_types=("local", "global", "local"), tie_word_embeddings=False)
    # no intermediate_size: 4 * hidden_size
    assert gpt_neo.config_from_hf({**hf, "intermediate_size": None}).d_mlp == 96


def test_gpt2_every_key_is_read():
    hf = transformers.GPT2Config(vocab_size=77, n_positions=33, n_embd=24, n_layer=3, n_head=2, n_inner=40,
                                 activation_function="relu", layer_norm_epsilon=1e-3,
                                 tie_word_embeddings=False).to_dict()
    assert gpt2.config_from_hf(hf) == GPT2Config(d_vocab=77, n_ctx=33, d_model=24, n_layers=3, n_heads=2, d_mlp=40,
                                                 act_fn="relu", ln_eps=1e-3, tie_word_embeddings=False)
    assert gpt2.config_from_hf({**hf, "n_inner": None}).d_mlp == 96


@pytest.mark.parametrize("pad,start", [(3, 5), (None, None)])
def test_t5_every_key_is_read(pad, start):
    hf = transformers.T5Config(vocab_size=77, d_model=24, d_kv=5, d_ff=40, num_layers=3, num_decoder_layers=2,
                               num_heads=2, relative_attention_num_buckets=9, relative_attention_max_distance=17,
                               layer_norm_epsilon=1e-3, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                               ).to_dict()
    # (transformers 5 writes tie_word_embeddings=True whatever it is given)
    hf.update(pad_token_id=pad, decoder_start_token_id=start, scale_decoder_outputs=True, tie_word_embeddings=False)
    assert t5.config_from_hf(hf) == T5Config(
        d_vocab=77, d_model=24, d_kv=5, d_ff=40, n_encoder_layers=3, n_decoder_layers=2, n_heads=2, num_buckets=9,
        max_distance=17, ln_eps=1e-3, gated=True, act_fn="gelu_new", tie_word_embeddings=False,
        scale_decoder_outputs=True, pad_token_id=pad or 0, decoder_start_token_id=start or 0)
    del hf["scale_decoder_outputs"]  # transformers < 5: scaled iff tied
    assert t5.config_from_hf(hf).scale_decoder_outputs is False
    assert t5.config_from_hf({**hf, "num_decoder_layers": None}).n_decoder_layers == 3


@pytest.mark.parametrize("module,arch,option", [(gpt2, "GPT-2", "scale_attn_weights=False"),
                                                (gpt_neo, "GPT-Neo", "activation_function='swish_beta'"),
                                                (t5, "T5", "is_decoder=True")])
def test_refusal_names_the_architecture(module, arch, option):
    key, value = option.split("=")
    with pytest.raises(ValueError, match=rf"^hookvene's {arch} does not implement these config options: {option}$"):
        module.config_from_hf({key: eval(value)})


TINY = {gpt2: dict(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8),
        gpt_neo: dict(num_layers=1, hidden_size=8, num_heads=2, vocab_size=11, max_position_embeddings=8,
                      attention_types=[[["global"], 1]]),
        t5: dict(num_layers=1, d_model=8, d_kv=2, d_ff=8, num_heads=2, vocab_size=11)}


@pytest.mark.parametrize("module", [gpt2, gpt_neo, t5], ids=["gpt2", "gpt_neo", "t5"])
def test_convert_names_the_checkpoint_in_errors(module):
    with pytest.raises(CheckpointError, match=r"^my checkpoint does not match the model"):
        module.convert(TINY[module], {"x": torch.zeros(1)}, True, "my checkpoint")


def _t5_state(lm_head):
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=11, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=2, decoder_start_token_id=0))
    state = dict(hf.state_dict())
    state["lm_head.weight"] = lm_head(state["shared.weight"])
    return hf.config.to_dict(), state


@pytest.mark.parametrize("how,tied", [("same tensor", True), ("equal copy", True), ("different", False),
                                      ("head on meta", False), ("shared on meta", False)])
def test_t5_head_is_tied_iff_it_equals_shared(how, tied):
    make = {"same tensor": lambda s: s, "equal copy": lambda s: s.clone(), "different": lambda s: s + 1,
            "head on meta": lambda s: torch.empty_like(s, device="meta"), "shared on meta": lambda s: s.clone()}[how]
    cfg, state = _t5_state(make)
    if how == "shared on meta":
        state["shared.weight"] = torch.empty_like(state["shared.weight"], device="meta")
    if "meta" in how:  # values on the meta device cannot be compared: the head is kept as the checkpoint's own
        model, _ = t5.convert(cfg, state, True, "t")
        assert model.cfg.tie_word_embeddings is False
        return
    model, out = t5.convert(cfg, state, True, "t")
    assert model.cfg.tie_word_embeddings is tied
    assert (out["unembed.weight"] is out["shared.weight"]) is tied


# --- GRU --------------------------------------------------------------------------------------------------------


def test_from_torch_gru_dtype_and_dropout():
    ref = nn.GRU(3, 4, num_layers=2, dropout=0.25, batch_first=True)
    model = from_torch_gru(ref, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.cfg.pdrop == 0.25
    assert from_torch_gru(ref.state_dict()).cfg.pdrop == 0.0  # a state dict does not say


def test_from_torch_gru_refusals_name_their_cause():
    with pytest.raises(ValueError, match=r"got bidirectional=True, proj_size=0"):
        from_torch_gru(nn.GRU(3, 4, bidirectional=True))
    # (torch's GRU has no proj_size; an LSTM-style `weight_hr_l0` in a state dict is refused)
    with pytest.raises(ValueError, match=r"^hookvene's GRU is unidirectional without projection; this state dict has "
                                         r"`\*_reverse` \(bidirectional\) or `weight_hr_l\*`"):
        from_torch_gru({**nn.GRU(3, 4).state_dict(), "weight_hr_l0": torch.zeros(2, 4)})
    with pytest.raises(TypeError, match=r"^from_torch_gru takes an nn.GRU or its state dict, got list$"):
        from_torch_gru([])
    sd = nn.GRU(3, 4).state_dict()
    with pytest.raises(CheckpointError, match=r"^nn.GRU state dict has no weight_ih_l0 / weight_hh_l0"):
        from_torch_gru({k: v for k, v in sd.items() if k != "weight_hh_l0"})
    with pytest.raises(CheckpointError, match=r"^nn.GRU state dict does not match the model"):
        from_torch_gru({**sd, "extra": torch.zeros(1)})


def test_from_torch_gru_names_the_object_in_errors(monkeypatch):
    ref = nn.GRU(3, 4)
    ref.register_buffer("extra", torch.zeros(1))  # a tensor no rule uses
    with pytest.raises(CheckpointError, match=r"^nn.GRU object does not match the model"):
        from_torch_gru(ref)


def test_save_pretrained_refuses_other_models():
    with pytest.raises(TypeError, match=r"^save_pretrained takes one of \['GRU', 'GRUClassifier', 'GRULM'\], got "
                                        r"Linear$"):
        save_pretrained(nn.Linear(2, 2), "unused")


def _saved(tmp_path, **change):
    save_pretrained(GRU(GRUConfig(n_layer=1, h_dim=4, d_in=3)), str(tmp_path))
    path = os.path.join(tmp_path, "config.json")
    cfg = {**json.load(open(path)), **change}
    json.dump({k: v for k, v in cfg.items() if v is not None}, open(path, "w"))
    return str(tmp_path)


@pytest.mark.parametrize("change", [dict(architectures=None), dict(model_type=None), dict(model_type="gpt2"),
                                    dict(architectures=["GRU", "GRULM"]), dict(architectures="GRU")],
                         ids=["no architectures", "no model_type", "other model_type", "two classes", "a string"])
def test_load_gru_refuses_foreign_configs(tmp_path, change):
    with pytest.raises(CheckpointError, match="is not a hookvene GRU config"):
        load_gru(_saved(tmp_path, **change))


def test_load_gru_refuses_a_config_that_is_not_an_object(tmp_path):
    path = _saved(tmp_path)
    json.dump([1, 2], open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"config.json must hold a JSON object, got list$"):
        load_gru(path)


def test_load_gru_dtype_and_device(tmp_path):
    path = _saved(tmp_path)
    assert {p.dtype for p in load_gru(path, dtype=torch.float64).parameters()} == {torch.float64}
    assert {p.device.type for p in load_gru(path, device="meta").parameters()} == {"meta"}
    assert {p.device.type for p in load_gru(path).parameters()} == {"cpu"}


def test_load_gru_names_the_checkpoint_in_errors(tmp_path):
    path = _saved(tmp_path, n_layer=2)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path!r} does not match the model"):
        load_gru(path)


@pytest.mark.parametrize("create,cls", [(create_gru, GRU), (create_gru_lm, GRULM),
                                        (create_gru_classifier, GRUClassifier)])
def test_create_gru_passes_tokenizer_name_and_cache_dir(monkeypatch, create, cls):
    calls = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, **kw: calls.append((name, kw)) or "tokenizer")
    cfg = GRUConfig(n_layer=1, h_dim=4)
    got_cfg, tok, model = create(cfg, "some/tokenizer", cache_dir="/some/cache")
    assert got_cfg is cfg and tok == "tokenizer" and type(model) is cls and model.cfg == cfg
    assert calls == [("some/tokenizer", {"cache_dir": "/some/cache"})]
    assert create(cfg)[1] is None
