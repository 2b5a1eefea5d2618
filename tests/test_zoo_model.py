"""The bundled teaching model hookvene/zoo/ioi-gpt2: loads offline with transformers and solves held-out IOI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hookvene.experiments.ioi import corrupt, logit_diff, make_ioi_dataset, tokenize_ioi

ZOO = Path(__file__).resolve().parents[1] / "hookvene" / "zoo" / "ioi-gpt2"


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((ZOO / "training_report.json").read_text())


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # local_files_only: a directory load must never reach for the hub.
    model = AutoModelForCausalLM.from_pretrained(ZOO, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(ZOO, local_files_only=True)
    model.eval()
    return model, tokenizer


def test_checkpoint_is_small_and_self_contained(report):
    files = {p.name: p.stat().st_size for p in ZOO.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert name in files, name
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in files), "weights must be safetensors only"
    assert sum(files.values()) < 8 * 2**20
    assert report["n_layer"] >= 2 and report["vocab_size"] < 200


def test_loads_with_transformers_and_matches_the_report(model_and_tokenizer, report):
    model, tokenizer = model_and_tokenizer
    assert model.config.model_type == "gpt2"
    assert model.config.n_layer == report["n_layer"] and model.config.n_embd == report["d_model"]
    assert len(tokenizer) == report["vocab_size"] == model.config.vocab_size
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied
    ids = tokenizer("Then, Mary and John went to the store.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids[3]) == "ĠMary"


def test_heldout_ioi_accuracy_and_logit_diff(model_and_tokenizer, report):
    model, tokenizer = model_and_tokenizer
    # A fresh sample (not the report's eval seed) of prompts whose template AND name pair were never trained.
    ds = make_ioi_dataset(600, seed=report["eval_seed"] + 1, templates="heldout", names="heldout")
    batch = tokenize_ioi(ds, tokenizer)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    diff = logit_diff(logits, batch, per_example=True)
    accuracy = (diff > 0).float().mean().item()
    assert accuracy >= report["heldout_accuracy"] - 0.05
    assert diff.mean().item() > 2.0
    assert torch.isclose(logit_diff(logits, batch), diff.mean())

    # The answer comes from the context: with all names replaced (ABC) the clean IO is no longer preferred,
    # and repeating IO instead of S flips the prediction.
    for kind, check in (("abc", lambda d: abs(d) < 1.0), ("swap_io_s", lambda d: d < -2.0)):
        bad = tokenize_ioi(corrupt(ds, kind), tokenizer)
        with torch.no_grad():
            bad_logits = model(input_ids=bad["input_ids"], attention_mask=bad["attention_mask"]).logits
        value = logit_diff(bad_logits, bad).item()
        assert check(value), (kind, value)
