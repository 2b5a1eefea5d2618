"""Induction heads: the scores, data and composition maths of hookvene.experiments.induction on hand-made inputs;
the circuit of the bundled `induction-gpt2` (which heads, how strongly, which feeds which, what ablating them does);
and the bundled `ioi-gpt2`, which has no induction circuit and must not be said to have one.
"""

import math
import re
from pathlib import Path

import pytest
import torch

import hookvene as pv
from hookvene.cli import main
from hookvene.experiments.induction import (
    current_token_scores,
    half_losses,
    induction_analysis,
    induction_scores,
    mean_ablation_hooks,
    prev_token_scores,
    random_composition_baseline,
    random_tokens,
)
from hookvene.factored_matrix import FactoredMatrix, composition_score

# -- the building blocks, on inputs whose answers are known -----------------------------------------------------


def test_scores_of_hand_made_patterns():
    half, n_pos = 5, 11
    prev = torch.zeros(n_pos, n_pos)
    ind = torch.zeros(n_pos, n_pos)
    prev[0, 0] = ind[0, 0] = 1
    for q in range(1, n_pos):
        prev[q, q - 1] = 1
        if q > half:
            ind[q, q - half + 1] = 1  # the token after the earlier copy of token q
        else:
            ind[q, 0] = 1  # nothing to copy yet: rest on BOS
    patterns = torch.stack([prev, ind, torch.eye(n_pos)])[None, None]  # layer batch head q k
    assert prev_token_scores(patterns).tolist() == [[1.0, pytest.approx(0.1), 0.0]]  # ind: only q=1 looks at q-1=0
    assert induction_scores(patterns, half).tolist() == [[0.0, 1.0, 0.0]]
    assert current_token_scores(patterns).tolist() == [[0.0, 0.0, 1.0]]  # q = 0 (always itself) left out


def test_random_tokens_repeat_distinct_tokens():
    g = torch.Generator().manual_seed(0)
    vocab = torch.arange(3, 103)
    rep = random_tokens(vocab, 8, 20, 0, g)
    plain = random_tokens(vocab, 8, 20, 0, g, repeat=False)
    for t in (rep, plain):
        assert t.shape == (8, 41) and (t[:, 0] == 0).all() and bool(((t[:, 1:] >= 3) & (t[:, 1:] < 103)).all())
    assert torch.equal(rep[:, 1:21], rep[:, 21:])
    assert all(len(set(row[1:21].tolist())) == 20 for row in rep)
    assert not torch.equal(plain[:, 1:21], plain[:, 21:])
    with pytest.raises(ValueError, match="at least 30 tokens in the vocabulary"):
        random_tokens(torch.arange(10), 1, 30, 0, g)


def test_half_losses_leave_out_the_first_repeated_token():
    tokens = torch.tensor([[0, 1, 2, 1, 2]])  # <bos> A A with A = (1, 2)
    logits = torch.full((1, 5, 3), -1e4)
    logits[0, torch.arange(4), tokens[0, 1:]] = 0  # certain of every next token ...
    logits[0, 2] = 0  # ... but uniform where the repeat starts
    first, repeated = half_losses(logits, tokens)
    assert float(first) == pytest.approx(0.0) and float(repeated) == pytest.approx(0.0)
    logits[0, 0] = 0  # now uniform predicting A's first token: first half = ln 3 / 2
    assert float(half_losses(logits, tokens)[0]) == pytest.approx(math.log(3) / 2)


def test_composition_score_is_one_for_aligned_and_zero_for_orthogonal_circuits():
    e = torch.eye(6)
    writes_e0 = FactoredMatrix(e[:, :1], e[:1])  # reads and writes direction 0
    reads_e0, reads_e1 = FactoredMatrix(e[:, :1], e[:1]), FactoredMatrix(e[:, 1:2], e[1:2])
    assert float(composition_score(writes_e0, reads_e0)) == pytest.approx(1.0)
    assert float(composition_score(writes_e0, reads_e1)) == pytest.approx(0.0)
    baseline = random_composition_baseline(128, 32, n=50)
    assert 0.0 < float(baseline.mean()) < 0.5


def test_mean_ablation_replaces_only_the_named_heads():
    z = torch.randn(4, 5, 3, 2)  # batch pos head d_head
    (name, hook), = mean_ablation_hooks([(1, 2)])
    out = hook(z, None)
    assert name == "blocks.1.attn.hook_z"
    assert torch.equal(out[:, :, :2], z[:, :, :2])
    assert torch.allclose(out[:, :, 2], z[:, :, 2].mean(0, keepdim=True).expand(4, 5, 2))


# -- induction-gpt2: the circuit that tutorial 9 and `hookvene induction` report ----------------------------------
# Thresholds from the bundled model's numbers (200 sequences: previous-token score 0.74, induction 0.96 / 0.98,
# K-composition 0.26 against a random 95th percentile of 0.09, repeated half 0.16 -> 4.61 ablated, chance 4.61),
# with margins for another sample of sequences.


@pytest.fixture(scope="module")
def induction_gpt2():
    model = pv.from_pretrained("induction-gpt2", fold_ln=True, center_writing_weights=True)
    vocab = [i for i in range(len(model.tokenizer)) if i not in model.tokenizer.all_special_ids]
    report = induction_analysis(model, vocab, model.tokenizer.bos_token_id, n=40, seed=7, model_name="induction-gpt2")
    return model, report


def test_induction_gpt2_repeats_what_it_cannot_predict(induction_gpt2):
    _, report = induction_gpt2
    assert report.n_vocab == 100 and report.half == 20
    assert abs(report.first_half_loss - report.chance_loss) < 0.05
    assert report.repeated_half_loss < 0.3
    assert float(report.loss_per_position[report.half + 3:].max()) < 0.6  # every repeated token from the 3rd on


def test_induction_gpt2_heads(induction_gpt2):
    model, report = induction_gpt2
    assert report.found
    assert report.prev_head == (0, 0) and float(report.prev_scores[0, 0]) >= 0.5
    assert float(report.prev_scores[0, 1]) < 0.2  # the other layer-0 head does not look back one
    assert float(report.induction_scores[1].min()) >= 0.8  # both layer-1 heads are induction heads
    assert float(report.induction_scores[0].max()) < 0.05
    tokens = random_tokens(range(3, 103), 40, 20, model.tokenizer.bos_token_id, torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    to_self = current_token_scores(cache["blocks.0.attn.hook_pattern"][None])[0]
    assert float(to_self[1]) >= 0.7 and float(to_self[0]) < 0.25  # L0H1 attends to the current token


def test_induction_gpt2_composition(induction_gpt2):
    """K: the previous-token head L0H0 feeds both induction heads' keys; Q: the current-token head L0H1 their
    queries; V: both layer-0 heads their values. Each well above random matrices (and K and Q above the other
    layer-0 head)."""
    model, report = induction_gpt2
    p95 = report.baseline_p95
    assert report.top_composition[0] == (0, 0) and report.top_composition[1] > 1.5 * p95
    K, Q, V = (model.all_composition_scores(m).detach()[0, :, 1, :] for m in "KQV")
    assert torch.equal(K, report.composition[0, :, 1, :])
    for reader in (0, 1):
        assert K[0, reader] > 1.5 * p95 and K[0, reader] > 1.5 * K[1, reader]
        assert Q[1, reader] > 1.5 * p95 and Q[1, reader] > 1.2 * Q[0, reader]
        assert V[0, reader] > 1.5 * p95 and V[1, reader] > 1.5 * p95


def test_induction_gpt2_ablation_and_path_patching(induction_gpt2):
    model, report = induction_gpt2
    chance, clean = report.chance_loss, report.ablation["none"]
    # Ablating L0H0 + the induction head takes away most of what the repeat taught; not all: ablating the other
    # induction head as well raises the loss further, above chance.
    assert (report.circuit_ablation - clean) / (chance - clean) > 0.75
    vocab = [i for i in range(len(model.tokenizer)) if i not in model.tokenizer.all_special_ids]
    tokens = random_tokens(vocab, 40, 20, model.tokenizer.bos_token_id, torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert float(half_losses(model(tokens).logits, tokens)[1]) == pytest.approx(clean, abs=1e-5)  # same tokens
        three = model.run_with_hooks(tokens, fwd_hooks=mean_ablation_hooks([(0, 0), (1, 0), (1, 1)])).logits
    assert float(half_losses(three, tokens)[1]) > chance
    assert report.ablation["L0H0"] - clean > 2 and report.ablation["L0H1"] - clean > 4  # both layer-0 heads needed
    il, ih = report.induction_head
    other = f"L1H{1 - ih}"
    # One induction head alone does part of the job: ablating the best one costs more than ablating the other.
    assert report.ablation[f"L1H{ih}"] - clean > 0.5 and report.ablation[other] < report.ablation[f"L1H{ih}"]
    lost = report.ablated_loss_per_position - report.loss_per_position  # every predictable token of the repeat
    assert float(lost[report.half + 1:].min()) > 1
    assert float(report.path[0, 0]) - report.path_clean > 1  # the keys need the previous-token head ...
    assert float(report.path[0, 1]) - report.path_clean < 0.05  # ... not the current-token head
    assert report.path_corrupted > chance


@pytest.mark.e2e
def test_cli_default_is_induction_gpt2_with_ioi_gpt2_for_contrast(tmp_path, capsys):
    """`hookvene induction` as the README shows it: every line of the README's (abridged) output is printed."""
    main(["induction", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    ours, contrast = out.split("Induction on ioi-gpt2")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = readme.split("On `induction-gpt2` it prints (abridged):\n\n```\n")[1].split("```")[0].splitlines()
    assert len(shown) == 8
    for line in shown:
        assert line in ours.splitlines(), line
    rows = re.findall(r"induction ([\d. ]+)\n", contrast)  # ioi-gpt2's per-layer induction scores
    assert len(rows) == 4 and max(float(v) for row in rows for v in row.split()) <= 0.05  # as the README says
    assert "induction circuit found: yes" in ours
    assert "previous-token head L0H0" in ours and "highest from L0H0" in ours
    assert "induction circuit found: no" in contrast
    assert (tmp_path / "induction-gpt2_composition.png").is_file() and (tmp_path / "ioi-gpt2_composition.png").is_file()


# -- on a real model: ioi-gpt2 has no induction circuit -------------------------------------------------------


def test_ioi_gpt2_has_no_induction_circuit():
    model = pv.from_pretrained("ioi-gpt2", fold_ln=True, center_writing_weights=True)
    vocab = [i for i in range(len(model.tokenizer)) if i not in model.tokenizer.all_special_ids]
    report = induction_analysis(model, vocab, model.tokenizer.bos_token_id, n=30, model_name="ioi-gpt2")
    assert report.half == 15  # 2 * 15 + 1 tokens fit its 32 positions
    assert not report.found
    assert float(report.prev_scores.max()) < 0.3 and float(report.induction_scores.max()) < 0.3
    assert report.repeated_half_loss > report.first_half_loss - 0.5  # nothing learned from the repeat
    assert report.circuit_ablation == report.ablation[f"L{report.prev_head[0]}H{report.prev_head[1]}+"
                                                      f"L{report.induction_head[0]}H{report.induction_head[1]}"]
    assert report.induction_head[0] > report.prev_head[0]


@pytest.mark.e2e
def test_cli_analyses_a_model_and_writes_the_figures(tmp_path, capsys):
    main(["induction", "--model", "ioi-gpt2", "--contrast", "", "--n", "40", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Induction on ioi-gpt2: 40 sequences" in out and "induction circuit found: no" in out
    for name in ("induction_scores.png", "composition.png", "loss_per_position.png", "induction.pt"):
        path = tmp_path / f"ioi-gpt2_{name}"
        assert path.is_file() and path.stat().st_size > 0, path
    assert (tmp_path / "ioi-gpt2_induction_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
