"""The sweep engine's helpers, with their expected values spelled out: position labels, the shared prefix a sweep
skips, and the last block run at the last position only (left-padded rows, whose pads it must not attend to).
Written for mutants of hookvene/experiments/sweep.py that survived the rest of the suite in a first, partial
mutation run (see the README's mutation-testing section)."""

import pytest
import torch

from hookvene.experiments.metrics import logit_diff
from hookvene.experiments.patching import activation_patch
from hookvene.experiments.sweep import position_labels, shared_prefix
from tests.test_experiments import ANSWER, ATOL, WRONG, cell_by_cell, ids, make_model


@pytest.fixture(scope="module")
def model():
    return make_model()


class Words:
    """A stand-in tokenizer: token t decodes to " w<t>"."""

    def decode(self, tokens):
        return "".join(f" w{int(t)}" for t in torch.as_tensor(tokens).reshape(-1))


def test_position_labels_with_and_without_a_tokenizer(model):
    clean = {"input_ids": torch.tensor([[1, 2, 3], [1, 4, 3]])}
    corrupted = {"input_ids": torch.tensor([[1, 5, 6], [1, 7, 3]])}
    saved = model.tokenizer
    try:
        model.tokenizer = None
        assert position_labels(model, clean, corrupted) == ["0", "1", "2"]
        model.tokenizer = Words()
        assert position_labels(model, clean, corrupted) == ["0:w1", "1:(varies)", "2:(varies)"]
        one = {"input_ids": clean["input_ids"][:1]}
        assert position_labels(model, one, {"input_ids": corrupted["input_ids"][:1]}) == ["0:w1", "1:w2/w5",
                                                                                         "2:w3/w6"]
    finally:
        model.tokenizer = saved


def test_shared_prefix_counts_the_leading_positions_every_input_agrees_on():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = a.clone()
    b[0, 2] = 9
    assert shared_prefix({"input_ids": a}, {"input_ids": b}) == 2
    assert shared_prefix({"input_ids": a}, {"input_ids": a}) == 4
    mask = torch.ones_like(a)
    mask[1, 1] = 0
    assert shared_prefix({"input_ids": a, "attention_mask": mask}, {"input_ids": a}) == 1  # the masks differ at 1
    assert shared_prefix({"input_ids": a, "attention_mask": torch.ones_like(a)}, {"input_ids": a}) == 4  # all ones
    assert shared_prefix({"input_ids": a, "position_ids": torch.arange(4).expand(2, 4)}, {"input_ids": a}) == 0
    assert shared_prefix({"input_ids": a, "token_type_ids": a}, {"input_ids": a, "token_type_ids": a}) == 0


@pytest.fixture(scope="module")
def llama():
    import hookvene as pv
    from tests.test_llama import tiny

    return pv.from_pretrained(tiny("LlamaForCausalLM", vocab_size=101))


@pytest.mark.parametrize("arch, kind", [("gpt2", "resid_pre"), ("gpt2", "heads_pos"), ("gpt2", "mlp_out"),
                                        ("llama", "resid_pre")])
def test_left_padded_rows_read_at_the_last_position(model, llama, arch, kind):
    """Left padding and a metric at the last position: the sweep runs the last block at that position only, from a
    KV cache, and must mask the pads there as the full forward does; on a rotary model the earlier positions' keys
    are rotated by positions counted from each row's first real token, so the cache needs the mask too."""
    model = llama if arch == "llama" else model
    clean = ids(21, seq=6)
    corrupted = clean.clone()
    corrupted[:, 4] = ids(22, seq=1)[:, 0]
    mask = torch.ones_like(clean)
    mask[0, :2] = 0  # row 0: two pads on the left
    mask[2, :1] = 0
    metric = logit_diff(ANSWER, WRONG)  # reads position -1
    c, x = {"input_ids": clean, "attention_mask": mask}, {"input_ids": corrupted, "attention_mask": mask}
    ref = cell_by_cell(model, kind, c, x, metric)
    res = activation_patch(model, c, x, metric, kind=kind, batch_size=16)
    assert (res.values - ref).abs().max().item() <= ATOL
    unmasked = activation_patch(model, {"input_ids": clean}, {"input_ids": corrupted}, metric, kind=kind)
    assert (unmasked.values - res.values).abs().max() > 1e-3  # the pads matter: a mask dropped would show
