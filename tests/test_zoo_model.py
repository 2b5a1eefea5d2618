"""The bundled teaching models: hookvene/zoo/ioi-gpt2 loads offline with transformers and solves held-out IOI;
hookvene/zoo/induction-gpt2 loads the same way and predicts the repeated half of fresh random sequences."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from hookvene.experiments.induction import half_losses, random_tokens
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


INDUCTION = ZOO.parent / "induction-gpt2"


def test_induction_gpt2_loads_with_transformers_and_matches_its_report():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((INDUCTION / "training_report.json").read_text())
    files = {p.name: p.stat().st_size for p in INDUCTION.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in files) and sum(files.values()) < 2 * 2**20
    model = AutoModelForCausalLM.from_pretrained(INDUCTION, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(INDUCTION, local_files_only=True)
    assert model.config.model_type == "gpt2" and (model.config.n_layer, model.config.n_head) == (2, 2)
    assert sum(p.numel() for p in model.parameters()) == report["n_params"]
    assert len(tokenizer) == report["vocab_size"] == model.config.vocab_size
    ids = tokenizer("ka lo mi ka lo")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.convert_ids_to_tokens(ids[1:]) == ["Ġka", "Ġlo", "Ġmi",
                                                                                            "Ġka", "Ġlo"]
    # A fresh sample (not the report's eval seed) of <bos> A A with |A| = 20 distinct syllables.
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    tokens = random_tokens(vocab, 300, report["eval_half"], tokenizer.bos_token_id,
                           torch.Generator().manual_seed(report["eval_seed"] + 1))
    with torch.no_grad():
        first, repeated = half_losses(model(input_ids=tokens).logits, tokens)
    assert abs(float(first) - report["chance_loss"]) < 0.05  # nothing to predict in the first half
    assert float(repeated) < report["eval"]["repeated_half_loss"] + 0.1  # the repeat, as well as in the report


def test_induction_gpt2_repeat_lengths_table_in_the_zoo_readme():
    """The zoo README's table of repeated-half loss by |A| (300 sequences per length, one generator seeded 12347,
    lengths in the table's order) is what the model gives."""
    from transformers import AutoModelForCausalLM

    text = (ZOO.parent / "README.md").read_text()
    header, _, values = text.split("| \\|A\\| |")[1].splitlines()[:3]
    lengths = [int(v) for v in re.findall(r"\d+", header)]
    stated = [float(v) for v in re.findall(r"[\d.]+", values)]
    model = AutoModelForCausalLM.from_pretrained(INDUCTION, local_files_only=True).eval()
    g = torch.Generator().manual_seed(12347)
    for length, loss in zip(lengths, stated, strict=True):
        tokens = random_tokens(range(3, 103), 300, length, 0, g)
        with torch.no_grad():
            repeated = float(half_losses(model(input_ids=tokens).logits, tokens)[1])
        assert repeated == pytest.approx(loss, abs=0.006), length

