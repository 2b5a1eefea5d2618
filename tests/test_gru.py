"""hookvene's GRU (hookvene/models/gru.py, hookvene/loading/gru.py): parity with torch.nn.GRU, hooks once per
step with the step number, edits that propagate forward in time only, checkpoints, pyvene-style construction.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hookvene.loading.common import CheckpointError
from hookvene.loading.gru import create_gru_classifier, from_torch_gru, load_gru, save_pretrained
from hookvene.models.gru import GRU, GRULM, GRUClassifier, GRUConfig

B, T, D_IN, H = 3, 7, 5, 8
GATES = ["reset_pre", "reset", "update_pre", "update", "candidate_pre", "candidate", "hidden"]


def torch_gru(n_layers: int, bias: bool = True) -> nn.GRU:
    torch.manual_seed(1)
    return nn.GRU(D_IN, H, num_layers=n_layers, bias=bias, batch_first=True).eval()


@pytest.fixture
def x():
    return torch.randn(B, T, D_IN)


# --- parity with torch.nn.GRU -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers,bias", [(1, True), (3, True), (2, False)])
def test_parity_with_torch_gru(x, n_layers, bias):
    ref = torch_gru(n_layers, bias)
    model = from_torch_gru(ref)
    want, want_h = ref(x)
    out, cache = model.run_with_cache(inputs_embeds=x, names_filter=lambda n: n.endswith("hook_hidden"))
    torch.testing.assert_close(out.last_hidden_state, want, atol=1e-5, rtol=1e-4)
    # per-step hooks are cached stacked over time: (batch, time, h); step T-1 is nn.GRU's final state h_n
    assert cache["layers.0.hook_hidden"].shape == (B, T, H)
    got_h = torch.stack([cache[f"layers.{l}.hook_hidden"][:, -1] for l in range(n_layers)])
    torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-4)
    assert model.layers[0].x2h.weight is ref.weight_ih_l0  # shared, not copied


def test_parity_time_first_and_state_dict(x):
    ref = nn.GRU(D_IN, H, num_layers=2).eval()  # batch_first=False: same weights, (time, batch, d_in) inputs
    model = from_torch_gru({k: v.clone() for k, v in ref.state_dict().items()})
    want = ref(x.transpose(0, 1))[0].transpose(0, 1)
    torch.testing.assert_close(model(inputs_embeds=x).last_hidden_state, want, atol=1e-5, rtol=1e-4)


def test_from_torch_gru_refuses():
    with pytest.raises(ValueError, match="bidirectional"):
        from_torch_gru(nn.GRU(D_IN, H, bidirectional=True))
    with pytest.raises(ValueError, match="bidirectional"):
        from_torch_gru(nn.GRU(D_IN, H, bidirectional=True).state_dict())
    with pytest.raises(CheckpointError, match="weight_ih_l0"):
        from_torch_gru({"foo": torch.zeros(1)})
    sd = nn.GRU(D_IN, H, num_layers=2).state_dict()
    sd["weight_hh_l1"] = torch.zeros(3 * H, H + 1)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        from_torch_gru(sd)


# --- hooks --------------------------------------------------------------------------------------------------


def test_every_hook_fires_once_per_step_with_shapes(x):
    model = GRU(GRUConfig(n_layer=2, h_dim=H, d_in=D_IN))
    calls: dict[str, list] = {}

    def record(t, hook):
        calls.setdefault(hook.name, []).append((hook.step, tuple(t.shape)))

    model.run_with_hooks(inputs_embeds=x, fwd_hooks=[(None, record)])
    assert calls.pop("hook_input") == [(None, (B, T, D_IN))]
    for l in range(2):
        width = {"in": D_IN if l == 0 else H, "x2h": 3 * H, "h2h": 3 * H} | {g: H for g in GATES}
        for name, w in width.items():
            assert calls.pop(f"layers.{l}.hook_{name}") == [(t, (B, w)) for t in range(T)], name
    assert not calls
    assert len(model.hook_dict) == 1 + 2 * 10


def test_hooks_see_the_tensors_they_name(x):
    model = GRU(GRUConfig(n_layer=1, h_dim=H, d_in=D_IN))
    seen = {}
    model.run_with_hooks(inputs_embeds=x, fwd_hooks=[(lambda n: True, lambda t, h: seen.__setitem__(
        (h.name.rsplit("hook_", 1)[1], h.step), t))])
    s = {k[0]: v for k, v in seen.items() if k[1] == 2}  # step 2 of layer 0
    r = torch.sigmoid(s["reset_pre"])
    torch.testing.assert_close(s["reset"], r)
    x_n, h_n = s["x2h"].chunk(3, -1)[2], s["h2h"].chunk(3, -1)[2]
    torch.testing.assert_close(s["candidate_pre"], x_n + r * h_n)
    z, prev = s["update"], seen[("hidden", 1)]
    torch.testing.assert_close(s["hidden"], (1 - z) * s["candidate"] + z * prev)


def test_edit_of_hidden_propagates_forward_only(x):
    model = GRUClassifier(GRUConfig(n_layer=2, h_dim=H, d_in=D_IN))
    clean = model(inputs_embeds=x).last_hidden_state

    def edit(t, hook):
        if hook.step == 3:
            t = t.clone()
            t[1] += 1.0  # batch row 1 only
            return t

    out = model.run_with_hooks(inputs_embeds=x, fwd_hooks=[("layers.0.hook_hidden", edit)])
    diff = (out.last_hidden_state - clean).abs().amax(-1)  # batch time
    assert torch.all(diff[:, :3] == 0) and torch.all(diff[[0, 2]] == 0)
    assert torch.all(diff[1, 3:] > 0)  # layer 1 reads the edited state at step 3, and layer 0 at step 4 on
    assert not model.has_hooks()


# --- checkpoints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,include_emb", [(GRU, False), (GRUClassifier, True), (GRULM, True)])
def test_save_load_round_trip(tmp_path, cls, include_emb):
    cfg = GRUConfig(include_emb=include_emb, vocab_size=11, max_position_embeddings=9, n_layer=2, h_dim=H,
                    d_in=D_IN, n_labels=3)
    model = cls(cfg).eval()
    save_pretrained(model, str(tmp_path))
    loaded = load_gru(str(tmp_path))
    assert type(loaded) is cls and loaded.cfg == cfg
    ids, embeds = torch.randint(0, 11, (B, T)), torch.randn(B, T, D_IN)
    inputs = {"input_ids": ids} if include_emb else {"inputs_embeds": embeds}
    a, b = model(**inputs), loaded(**inputs)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert (a.logits is None and b.logits is None) or torch.equal(a.logits, b.logits)


def test_load_errors(tmp_path):
    model = GRU(GRUConfig(n_layer=2, h_dim=H, d_in=D_IN))
    save_pretrained(model, str(tmp_path))
    weights, cfg_path = os.path.join(tmp_path, "model.safetensors"), os.path.join(tmp_path, "config.json")
    good = json.load(open(cfg_path))

    def with_config(**change):
        json.dump({**good, **change}, open(cfg_path, "w"))

    with_config(h_dim="8")
    with pytest.raises(CheckpointError, match="h_dim"):
        load_gru(str(tmp_path))
    with_config(n_heads=4)
    with pytest.raises(CheckpointError, match="unknown GRUConfig fields"):
        load_gru(str(tmp_path))
    with_config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match="not a hookvene GRU config"):
        load_gru(str(tmp_path))
    with_config(h_dim=9)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_gru(str(tmp_path))
    with_config(n_layer=3)
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_gru(str(tmp_path))
    with_config()
    state = load_file(weights)
    del state["layers.1.h2h.bias"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"missing tensors: \['layers.1.h2h.bias'\]"):
        load_gru(str(tmp_path))
    os.remove(cfg_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_gru(str(tmp_path))


# --- inputs, classifier, construction -----------------------------------------------------------------------


def test_bad_inputs_raise(x):
    model = GRU(GRUConfig(n_layer=1, h_dim=H, d_in=D_IN))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="no embedding"):
        model(input_ids=torch.zeros(B, T, dtype=torch.long))
    with pytest.raises(ValueError, match="d_in=5"):
        model(inputs_embeds=torch.randn(B, T, D_IN + 1))
    with pytest.raises(ValueError, match="d_in=5"):
        model(inputs_embeds=torch.randn(B, D_IN))
    emb = GRU(GRUConfig(include_emb=True, vocab_size=10, max_position_embeddings=T, h_dim=H))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        emb(input_ids=torch.full((B, T), 10))
    with pytest.raises(ValueError, match="longer than"):
        emb(input_ids=torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="positive"):
        GRUConfig(h_dim=0)
    with pytest.raises(ValueError, match="problem_type"):
        GRUConfig(problem_type="ranking")


def test_classifier_pools_last_real_step(x):
    model = GRUClassifier(GRUConfig(n_layer=2, h_dim=H, d_in=D_IN, n_labels=3))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0  # right padding: row 0 has 4 real steps
    mask[2, 6:] = 0
    out = model(inputs_embeds=x, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    states = out.last_hidden_state
    pooled = torch.stack([states[0, 3], states[1, T - 1], states[2, 5]])
    torch.testing.assert_close(out.logits, model.score(pooled))
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, torch.tensor([0, 2, 1])))
    # a row's padded steps do not change its logits
    torch.testing.assert_close(out.logits[0], model(inputs_embeds=x[:1, :4]).logits[0])
    torch.testing.assert_close(model(inputs_embeds=x).logits, model.score(states[:, -1]))
    with pytest.raises(ValueError, match="no real step"):
        model(inputs_embeds=x, attention_mask=torch.zeros(B, T))


def test_lm_logits_and_loss():
    model = GRULM(GRUConfig(include_emb=True, vocab_size=13, max_position_embeddings=T, n_layer=1, h_dim=H))
    ids = torch.randint(0, 13, (B, T))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (B, T, 13) and out.loss.ndim == 0


def test_create_gru_classifier_pyvene_style():
    config, tokenizer, model = create_gru_classifier(GRUConfig(h_dim=32))
    assert tokenizer is None and isinstance(model, GRUClassifier) and model.config is config
    assert model.config.h_dim == 32 and config.d_in == 32
    assert config.hidden_size == 32 and config.num_labels == 2  # HF names
    out = model(inputs_embeds=torch.randn(2, 4, 32), labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and out.loss.ndim == 0
    assert GRUConfig.from_dict(config.to_dict()) == config
