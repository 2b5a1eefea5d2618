"""`hookvene.from_pretrained` on broken, unsupported and unreachable checkpoints: every failure names its cause."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import hookvene
from hookvene.loading import ARCHITECTURES, CheckpointError
from tests.helpers import tiny_gpt2


@pytest.fixture(scope="module")
def hf():
    return tiny_gpt2(n_embd=24, n_head=3, n_layer=2)


@pytest.fixture
def ckpt(hf, tmp_path):
    """A fresh safetensors checkpoint directory per test (tests edit it) and its state dict."""
    hf.save_pretrained(tmp_path)
    return str(tmp_path), load_file(os.path.join(tmp_path, "model.safetensors"))


def rewrite(path, state):
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def test_a_good_checkpoint_loads(ckpt):
    path, _ = ckpt
    assert isinstance(hookvene.from_pretrained(path), hookvene.GPT2LM)


def test_missing_tensor(ckpt):
    path, state = ckpt
    del state["transformer.h.1.ln_2.bias"]
    rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"missing tensors.*blocks\.1\.ln2\.bias"):
        hookvene.from_pretrained(path)


def test_unexpected_tensor(ckpt):
    path, state = ckpt
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*h\.0\.attn\.rotary\.weight"):
        hookvene.from_pretrained(path)


def test_tensor_for_a_layer_the_config_lacks(ckpt):
    path, state = ckpt
    state["transformer.h.7.ln_1.weight"] = torch.ones(24)
    rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"blocks\.7\.ln1\.weight"):
        hookvene.from_pretrained(path)


def test_misshaped_tensor(ckpt):
    path, state = ckpt
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(24, 95)
    rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"mis-shaped.*blocks\.0\.mlp\.fc\.weight.*\(24, 95\).*\(24, 96\)"):
        hookvene.from_pretrained(path)


def test_every_problem_is_listed_at_once(ckpt):
    path, state = ckpt
    del state["transformer.wpe.weight"]
    state["transformer.extra"] = torch.zeros(1)
    state["transformer.ln_f.bias"] = torch.zeros(5)
    rewrite(path, state)
    with pytest.raises(CheckpointError) as e:
        hookvene.from_pretrained(path)
    assert all(s in str(e.value) for s in ("missing", "pos_embed.weight", "unexpected", "extra", "ln_final.bias"))


def test_in_memory_model_with_a_bad_tensor(hf):
    from transformers import GPT2LMHeadModel

    broken = GPT2LMHeadModel(hf.config)
    broken.transformer.h[1].ln_1.weight = torch.nn.Parameter(torch.ones(7))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ln1\.weight.*\(7,\)"):
        hookvene.from_pretrained(broken)


def test_truncated_safetensors(ckpt):
    path, _ = ckpt
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hookvene.from_pretrained(path)


def test_garbage_bin(hf, tmp_path):
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        hookvene.from_pretrained(str(tmp_path))


def test_directory_without_config(ckpt):
    path, _ = ckpt
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match="config.json"):
        hookvene.from_pretrained(path)


def test_invalid_config_json(ckpt):
    path, _ = ckpt
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        hookvene.from_pretrained(path)


def test_directory_without_weights(ckpt):
    path, _ = ckpt
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        hookvene.from_pretrained(path)


def test_sharded_checkpoint(hf, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model = hookvene.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("option, value", [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                                           ("add_cross_attention", True)])
def test_unsupported_config_option(ckpt, option, value):
    path, _ = ckpt
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg[option] = value
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        hookvene.from_pretrained(path)


def test_unsupported_option_in_memory():
    hf = tiny_gpt2(n_embd=8, n_head=2, n_layer=1, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        hookvene.from_pretrained(hf)


def test_unsupported_activation():
    hf = tiny_gpt2(n_embd=8, n_head=2, n_layer=1, activation_function="gelu_fast")
    with pytest.raises(ValueError, match="gelu_fast"):
        hookvene.from_pretrained(hf)


def test_unsupported_architecture_directory(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
               architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="BertForMaskedLM.*GPT2LMHeadModel"):
        hookvene.from_pretrained(str(tmp_path))


def test_unsupported_architecture_objects():
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match=r"Linear.*not a transformers model.*GPT2LMHeadModel"):
        hookvene.from_pretrained(torch.nn.Linear(3, 3))
    bert = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                vocab_size=10, max_position_embeddings=8))
    with pytest.raises(ValueError, match="unsupported architecture 'BertModel'.*" + ".*".join(ARCHITECTURES)):
        hookvene.from_pretrained(bert)


def test_unreachable_hub_name(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError) as e:
        hookvene.from_pretrained("openai-community/gpt2")
    msg = str(e.value)
    assert "openai-community/gpt2" in msg and "local checkpoint directory" in msg and "save_pretrained" in msg


def fake_hub(monkeypatch, repo_dir, snap_dir):
    """`snapshot_download` as the hub does it, from a local 'repository': only files matching allow_patterns."""
    import fnmatch
    import shutil

    import huggingface_hub

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        os.makedirs(snap_dir, exist_ok=True)
        for f in os.listdir(repo_dir):
            if allow_patterns is None or any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                shutil.copy(os.path.join(repo_dir, f), snap_dir)
        return str(snap_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_hub_name_with_safetensors(hf, ckpt, monkeypatch, tmp_path_factory):
    path, _ = ckpt
    fake_hub(monkeypatch, path, tmp_path_factory.mktemp("snap"))
    model = hookvene.from_pretrained("someone/tiny-gpt2")
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_hub_name_with_only_bin_weights(hf, tmp_path, monkeypatch):
    """Many older hub repositories have pytorch_model.bin and no safetensors file."""
    repo = tmp_path / "repo"
    repo.mkdir()
    hf.config.save_pretrained(repo)
    torch.save(hf.state_dict(), repo / "pytorch_model.bin")
    fake_hub(monkeypatch, str(repo), tmp_path / "snap")
    model = hookvene.from_pretrained("someone/old-gpt2", allow_pickle=True)
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.subprocess
def test_unreachable_hub_name_really_offline(tmp_path):
    """One real attempt, in a subprocess with the hub switched off and an empty cache."""
    code = ("import hookvene\ntry:\n    hookvene.from_pretrained('openai-community/gpt2')\n"
            "except OSError as e:\n    print('OSERROR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "OSERROR" in run.stdout, run.stdout + run.stderr
    assert "local checkpoint directory" in run.stdout and "save_pretrained" in run.stdout


@pytest.mark.parametrize("source", ["memory", "directory"])
def test_dtype_conversion(hf, ckpt, source):
    path, _ = ckpt
    model = hookvene.from_pretrained(hf if source == "memory" else path, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.dtype == torch.float64
    if source == "memory":  # converted weights are new tensors; the HF model is left alone
        assert hf.transformer.wte.weight.dtype == torch.float32
    ids = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.float64
        assert (model(ids).logits - hf(ids).logits.double()).abs().max() <= 1e-4
    half = hookvene.from_pretrained(hf if source == "memory" else path, dtype=torch.bfloat16)
    with torch.no_grad():
        assert half(ids).logits.dtype == torch.bfloat16
    tied = model.unembed.weight is model.embed.weight
    assert tied, "dtype= conversion split the tied embedding/unembedding into two Parameters"


def test_device_argument(hf):
    model = hookvene.from_pretrained(hf, device="cpu")
    assert model.device == torch.device("cpu")
    assert model.embed.weight is hf.transformer.wte.weight  # no move needed: still shared
