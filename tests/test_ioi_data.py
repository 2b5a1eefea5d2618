"""IOI dataset generator: determinism, labels, splits, corruptions, token positions and the metric."""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
import torch

from hookvene.experiments.ioi import (
    BASE_TEMPLATES,
    CORRUPTIONS,
    HELDOUT_NAME_PAIRS,
    HELDOUT_TEMPLATE_IDS,
    NAMES,
    TEMPLATES,
    TRAIN_NAME_PAIRS,
    TRAIN_TEMPLATE_IDS,
    corrupt,
    logit_diff,
    make_ioi_dataset,
    name_token,
    tokenize_ioi,
)

ZOO = Path(__file__).resolve().parents[1] / "hookvene" / "zoo" / "ioi-gpt2"
NAME_SET = set(NAMES)


def mentioned_names(prompt: str) -> list[str]:
    return [w for w in re.findall(r"[A-Za-z]+", prompt) if w in NAME_SET]


@pytest.fixture(scope="module")
def tokenizer():
    # The word-level tokenizer shipped with the zoo model: built locally, so no hub access is needed.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ZOO, local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer_no_bos_left():
    """The same vocabulary, but no BOS added and left padding, to exercise the other code paths."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(ZOO / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(single="$A")
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def test_same_seed_same_dataset_and_different_seed_differs():
    a = make_ioi_dataset(50, seed=7)
    b = make_ioi_dataset(50, seed=7)
    c = make_ioi_dataset(50, seed=8)
    assert a.examples == b.examples
    assert a.prompts != c.prompts


@pytest.mark.parametrize("order", ["ABBA", "BABA", "both"])
def test_io_and_s_match_the_order(order):
    ds = make_ioi_dataset(200, seed=1, order=order)
    orders = Counter(e.order for e in ds)
    if order == "both":
        assert orders == {"ABBA": 100, "BABA": 100}
    else:
        assert orders == {order: 200}
    for e in ds:
        first, second, third = mentioned_names(e.prompt)
        assert {first, second} == {e.io, e.s} and e.io != e.s
        assert third == e.s, "the repeated (last-mentioned) name must be the subject"
        assert first == (e.io if e.order == "ABBA" else e.s)
        assert e.prompt == TEMPLATES[e.order][e.template].replace("[PLACE]", e.place).replace(
            "[OBJECT]", e.obj
        ).replace("[A]", e.io).replace("[B]", e.s)
        assert e.prompt.endswith(" to")


def test_template_split_is_disjoint_complete_and_uses_only_trained_words():
    assert set(TRAIN_TEMPLATE_IDS).isdisjoint(HELDOUT_TEMPLATE_IDS)
    assert sorted(TRAIN_TEMPLATE_IDS + HELDOUT_TEMPLATE_IDS) == list(range(len(BASE_TEMPLATES)))
    assert len(TEMPLATES["ABBA"]) == len(TEMPLATES["BABA"]) >= 8

    # With the word's leading space (GPT-2 tokens): "Afterwards," and " afterwards" are different tokens.
    def words(ids):
        return {w for i in ids for o in ("ABBA", "BABA") for w in re.findall(r" ?\w+|[^\s\w]", TEMPLATES[o][i])}

    assert words(HELDOUT_TEMPLATE_IDS) <= words(TRAIN_TEMPLATE_IDS)
    assert {e.template for e in make_ioi_dataset(300, seed=0, templates="heldout")} == set(HELDOUT_TEMPLATE_IDS)
    assert {e.template for e in make_ioi_dataset(300, seed=0, templates="train")} <= set(TRAIN_TEMPLATE_IDS)


def test_name_pair_split_is_disjoint_and_every_name_is_trained():
    all_pairs = {frozenset(p) for p in combinations(NAMES, 2)}
    assert TRAIN_NAME_PAIRS.isdisjoint(HELDOUT_NAME_PAIRS)
    assert TRAIN_NAME_PAIRS | HELDOUT_NAME_PAIRS == all_pairs
    assert len(HELDOUT_NAME_PAIRS) == len(all_pairs) // 5
    assert set().union(*TRAIN_NAME_PAIRS) == NAME_SET
    assert len(NAMES) == len(NAME_SET) >= 30
    for split, allowed in (("train", TRAIN_NAME_PAIRS), ("heldout", HELDOUT_NAME_PAIRS)):
        for e in make_ioi_dataset(300, seed=3, names=split):
            assert frozenset((e.io, e.s)) in allowed


def test_corruptions_are_aligned_and_change_only_names(tokenizer):
    clean = make_ioi_dataset(64, seed=5)
    clean_batch = tokenize_ioi(clean, tokenizer)
    for kind in CORRUPTIONS:
        bad = corrupt(clean, kind)
        assert bad.corruption == kind and len(bad) == len(clean)
        assert corrupt(clean, kind).examples == bad.examples, "corruption must be deterministic"
        for c, e in zip(clean, bad):
            assert (e.template, e.order, e.place, e.obj, e.io, e.s) == (
                c.template,
                c.order,
                c.place,
                c.obj,
                c.io,
                c.s,
            )
            io_slot, s1_slot, s2_slot = e.slot_names
            first_two = [io_slot, s1_slot] if e.order == "ABBA" else [s1_slot, io_slot]
            assert mentioned_names(e.prompt) == [*first_two, s2_slot]
            if kind == "abc":
                assert len({io_slot, s1_slot, s2_slot, c.io, c.s}) == 5
            elif kind == "swap_io_s":
                assert (io_slot, s1_slot, s2_slot) == (c.io, c.s, c.io)
            else:
                assert s1_slot == s2_slot and len({io_slot, s1_slot, c.io, c.s}) == 4
        batch = tokenize_ioi(bad, tokenizer)
        assert batch["input_ids"].shape == clean_batch["input_ids"].shape
        for key in ("attention_mask", "end_pos", "io_pos", "s1_pos", "s2_pos", "io_ids", "s_ids"):
            assert torch.equal(batch[key], clean_batch[key]), key
        # Outside the three name slots the token sequences are identical.
        differs = batch["input_ids"] != clean_batch["input_ids"]
        slots = torch.zeros_like(differs)
        rows = torch.arange(len(clean))
        for key in ("io_pos", "s1_pos", "s2_pos"):
            slots[rows, batch[key]] = True
        assert not (differs & ~slots).any()
        assert differs.any()


def test_corrupt_rejects_bad_input():
    clean = make_ioi_dataset(4, seed=0)
    with pytest.raises(ValueError, match="unknown corruption 'shuffle'"):
        corrupt(clean, "shuffle")
    with pytest.raises(ValueError, match="already corrupted"):
        corrupt(corrupt(clean, "abc"), "abc")
    small = make_ioi_dataset(4, seed=0, names=["Mary", "John", "Tom", "Anna"])
    with pytest.raises(ValueError, match="needs 3 names"):
        corrupt(small, "abc")


@pytest.mark.parametrize("which", ["default", "no_bos_left"])
def test_positions_point_at_the_right_tokens(which, tokenizer, tokenizer_no_bos_left):
    tok = tokenizer if which == "default" else tokenizer_no_bos_left
    ds = make_ioi_dataset(40, seed=11)  # mixed templates, so prompts have different lengths
    batch = tokenize_ioi(ds, tok)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "want padding to be exercised"
    for i, e in enumerate(ds):
        toks = tok.convert_ids_to_tokens(batch["input_ids"][i].tolist())
        assert toks[batch["io_pos"][i]] == "Ġ" + e.io
        assert toks[batch["s1_pos"][i]] == "Ġ" + e.s
        assert toks[batch["s2_pos"][i]] == "Ġ" + e.s
        assert batch["s1_pos"][i] < batch["s2_pos"][i] < batch["end_pos"][i]
        assert (batch["io_pos"][i] < batch["s1_pos"][i]) == (e.order == "ABBA")
        assert toks[batch["end_pos"][i]] == "Ġto"
        real = batch["attention_mask"][i].nonzero().flatten()
        assert batch["end_pos"][i] == real.max()
        assert real.tolist() == list(range(real.min(), real.max() + 1)), "real tokens must be contiguous"
        if which == "default":
            assert real.min() == 0 and toks[0] == "<|endoftext|>"  # right padding, BOS from the tokenizer
        else:
            assert real.max() == batch["input_ids"].shape[1] - 1  # left padding
            assert toks[real.min()] == e.prompt.split()[0].rstrip(",")  # no BOS added by this tokenizer
        assert batch["io_ids"][i] == name_token(tok, e.io) == tok.convert_tokens_to_ids("Ġ" + e.io)
        assert batch["s_ids"][i] == name_token(tok, e.s)


def test_prepend_bos_shifts_positions_by_one(tokenizer_no_bos_left):
    ds = make_ioi_dataset(10, seed=2)
    plain = tokenize_ioi(ds, tokenizer_no_bos_left)
    bos = tokenize_ioi(ds, tokenizer_no_bos_left, prepend_bos=True)
    bos_id = tokenizer_no_bos_left.bos_token_id
    rows = torch.arange(len(ds))
    first_real = bos["attention_mask"].argmax(1)
    assert (bos["input_ids"][rows, first_real] == bos_id).all()
    # Left padding: everything right-aligned, so positions stay put while the width grows by one.
    assert bos["input_ids"].shape[1] == plain["input_ids"].shape[1] + 1
    for key in ("io_pos", "s1_pos", "s2_pos", "end_pos"):
        assert torch.equal(bos[key], plain[key] + 1), key


def test_names_that_are_not_single_tokens_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="'Zyxwvut'"):
        name_token(tokenizer, "Zyxwvut")
    ds = make_ioi_dataset(6, seed=0, names=["Mary", "Zyxwvut"])
    with pytest.raises(ValueError, match="'Zyxwvut'"):
        tokenize_ioi(ds, tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be a positive int"),
        ({"n": -3}, "n must be a positive int"),
        ({"n": 5, "order": "AABB"}, "order must be"),
        ({"n": 5, "templates": "test"}, "templates must be"),
        ({"n": 5, "templates": [99]}, "template id 99"),
        ({"n": 5, "names": ["Mary"]}, "at least 2 names"),
        ({"n": 5, "names": ["Mary Ann", "John"]}, "without whitespace"),
        ({"n": 5, "names": "everyone"}, "names must be"),
    ],
)
def test_make_ioi_dataset_rejects_bad_arguments(kwargs, message):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=message):
        make_ioi_dataset(n, seed=0, **kwargs)


def test_logit_diff_on_hand_made_logits():
    batch = {
        "io_ids": torch.tensor([3, 1]),
        "s_ids": torch.tensor([2, 4]),
        "end_pos": torch.tensor([2, 1]),
    }
    logits = torch.randn(2, 4, 5) * 100  # noise everywhere else must not matter
    logits[0, 2, 3], logits[0, 2, 2] = 5.0, 1.0  # example 0: +4
    logits[1, 1, 1], logits[1, 1, 4] = -2.0, 1.0  # example 1: -3
    logits.requires_grad_(True)
    per = logit_diff(logits, batch, per_example=True)
    assert torch.allclose(per, torch.tensor([4.0, -3.0]))
    mean = logit_diff(logits, batch)
    assert isinstance(mean, torch.Tensor) and mean.ndim == 0
    assert torch.allclose(mean, torch.tensor(0.5))
    mean.backward()  # usable as a differentiable metric
    assert logits.grad[0, 2, 3] == 0.5 and logits.grad[0, 2, 2] == -0.5 and logits.grad.abs().sum() == 2.0
    with pytest.raises(ValueError, match="batch, pos, d_vocab"):
        logit_diff(logits[:, 0], batch)
    with pytest.raises(ValueError, match="batch dict has 2"):
        logit_diff(logits[:1], batch)
