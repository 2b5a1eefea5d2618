"""Induction heads: the scores, data and composition maths of hookvene.experiments.induction on hand-made inputs,
and `hookvene induction` on the bundled `ioi-gpt2`, which has no induction circuit and must not be said to have one.
"""

import math

import pytest
import torch

import hookvene as pv
from hookvene.cli import main
from hookvene.experiments.induction import (
    composition_score,
    half_losses,
    induction_analysis,
    induction_scores,
    mean_ablation_hooks,
    prev_token_scores,
    random_composition_baseline,
    random_tokens,
)
from hookvene.factored_matrix import FactoredMatrix

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
    patterns = torch.stack([prev, ind])[None, None]  # layer batch head q k
    assert prev_token_scores(patterns).tolist() == [[1.0, pytest.approx(0.1)]]  # ind: only q=1 looks at q-1=0
    assert induction_scores(patterns, half).tolist() == [[0.0, 1.0]]


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


# -- on a real model: ioi-gpt2 has no induction circuit -------------------------------------------------------


def test_ioi_gpt2_has_no_induction_circuit():
    model = pv.from_pretrained("ioi-gpt2", fold_ln=True, center_writing_weights=True)
    vocab = [i for i in range(len(model.tokenizer)) if i not in model.tokenizer.all_special_ids]
    report = induction_analysis(model, vocab, model.tokenizer.bos_token_id, n=60, model_name="ioi-gpt2")
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
