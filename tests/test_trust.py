"""Experiments a researcher can trust (issue 15): rankings by the size of an effect with its sign, one figure
convention, warnings instead of claims the numbers do not support, the library's pieces composing, tokenizer traps
caught, and package hygiene. The examples' findings are asserted in tests/test_examples.py, the README's blocks in
tests/test_readme.py and the CLI's help and exit codes in tests/test_cli.py."""

import re
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

import hookvene as pv
from hookvene.experiments import activation_patch, causal_trace, ioi_analysis, metrics, path_patch
from hookvene.experiments.ioi import corrupt, make_ioi_dataset, tokenize_ioi
from hookvene.experiments.results import SweepResult, UnreliableGapWarning
from hookvene.viz import attention_html, heatmap, text_colour

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Then, Mary and John went to the store. John gave a drink to"


@pytest.fixture(scope="module")
def model():
    return pv.from_pretrained("ioi-gpt2")


@pytest.fixture(scope="module")
def report(model, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreliableGapWarning)  # the bundled model does the task: no warning
        return ioi_analysis(model, model.tokenizer, n=64, seed=0, out_dir=str(tmp_path_factory.mktemp("ioi")),
                            progress=False)


@pytest.fixture(scope="module")
def ioi_batches(model):
    ds = make_ioi_dataset(16, seed=0, templates=[5])
    return tokenize_ioi(ds, model.tokenizer), tokenize_ioi(corrupt(ds, "abc"), model.tokenizer)


def result(values, clean=3.0, corrupted=1.0, metric="logit_diff", **kw) -> SweepResult:
    values = torch.as_tensor(values, dtype=torch.float32)
    return SweepResult(values, "heads", metric, "layer", "head", [str(i) for i in range(values.shape[0])],
                       [str(j) for j in range(values.shape[1])], clean, corrupted, **kw)


# -- 1. rankings by magnitude, sign shown --------------------------------------------------------------------------

def test_ioi_summary_ranks_heads_by_the_size_of_their_effect(report):
    effects = report.heads.normalized_effect.flatten().abs()
    listed = [f.effect for f in report.top_heads]
    assert [abs(e) for e in listed] == sorted((abs(e) for e in listed), reverse=True)
    # every listed head has at least the effect of every head left out
    assert min(abs(e) for e in listed) >= float(effects.sort(descending=True).values[len(listed)]) - 1e-6
    # on the bundled model a head that pushes the logit diff the wrong way is among the biggest, and is listed
    # with its minus sign (it was left out when heads were ranked by signed effect)
    negative = [f for f in report.top_heads if f.effect < -0.1]
    assert negative, report.summary()
    assert f"L{negative[0].layer}H{negative[0].head}" in report.summary()
    assert f"{negative[0].effect:+7.2f}" in report.summary()


def test_attention_page_shows_the_summarys_heads(report):
    page = Path(report.files["attention of the top heads"]).read_text()
    for f in report.top_heads:
        assert f"L{f.layer}H{f.head}: effect {f.effect:+.2f}" in page
    assert "query" in page and "key" in page and "class='legend'" in page  # labelled axes and a legend
    assert page.count("<option") == 8  # the reader picks one of 8 prompts
    assert page.count("<div class='ex'") == 8


def test_table_ranks_by_magnitude_and_shows_the_sign():
    r = result([[1.1, 0.0], [2.5, 1.0]])  # effects vs corrupted 1.0: +0.1, -1.0, +1.5, 0.0
    lines = r.table(3).splitlines()
    assert "gap +2.000" in lines[0]
    cells = [line for line in lines if "  value " in line]
    assert "effect +1.500" in cells[0] and "effect -1.000" in cells[1] and "effect +0.100" in cells[2]
    assert "normalized +0.75" in cells[0] and "normalized -0.50" in cells[1]


def test_path_patch_ranks_paths_that_carry_the_behaviour_first(model, ioi_batches):
    clean, corrupted = ioi_batches
    metric = metrics.logit_diff(clean["io_ids"], clean["s_ids"], pos=clean["end_pos"])
    paths = path_patch(model, clean, corrupted, metric)
    assert paths.unpatched == "clean" and paths.baseline == paths.clean
    # "toward" the corrupted run is lower than clean for logit_diff: the path that removes the most comes first
    (row, col, value), = paths.top(1, by="toward")
    assert value == pytest.approx(float(paths.values.min()))
    assert 0 < paths.normalized_effect[int(row), int(col)] < 0.1  # on this model no head's direct path carries much
    lines = [line for line in paths.table(4).splitlines() if "  value " in line]
    assert f"value {value:+.3f}" in lines[0]  # magnitude ranking: the same head leads
    # ... and its figure says so: the normalized scale stays at +-1, so a few percent is not drawn as full colour
    assert paths.plot().axes[0].images[0].get_clim() == (-1.0, 1.0)


# -- 2. one figure convention ----------------------------------------------------------------------------------------

def test_effect_maps_are_centred_on_no_effect_with_a_symmetric_range():
    r = result([[1.1, 0.9], [1.2, 1.0]])  # small effects of a reliable gap: the scale stays at +-1
    fig = r.plot()
    image = fig.axes[0].images[0]
    assert image.get_clim() == (-1.0, 1.0)
    assert image.get_cmap().name == "RdBu_r"
    assert "normalized effect on logit_diff" in fig.axes[1].get_ylabel()  # the colour bar names what it shows
    assert torch.allclose(torch.as_tensor(image.get_array().data), r.normalized_effect)  # plots what the table reports


def test_probability_maps_are_sequential_on_0_to_1(model):
    trace = causal_trace(model, PROMPT, subject=" Mary", target=" Mary", n_samples=2)
    fig = trace.plot()
    image = fig.axes[0].images[0]
    assert image.get_clim() == (0.0, 1.0) and image.get_cmap().name == "Purples"
    assert fig.axes[1].get_ylabel() == "P(' Mary')"
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[3] == "3:Mary*" and labels[-1].endswith(":to")  # token labels, the noised subject marked


def test_cell_text_contrasts_with_its_cell():
    assert text_colour((0.05, 0.1, 0.4, 1.0)) == "white" and text_colour((0.95, 0.95, 0.9, 1.0)) == "black"
    fig = heatmap(torch.tensor([[-1.0, 0.0, 1.0]]), ["0"], ["a", "b", "c"], center=0.0, cbar_label="x")
    colours = [t.get_color() for t in fig.axes[0].texts]
    assert colours == ["white", "black", "white"]  # dark ends of RdBu_r, light middle


def test_attention_html_rejects_mismatched_tokens():
    with pytest.raises(ValueError, match=r"one list per example; got patterns \(2, 1, 3, 3\) and 1 token lists"):
        attention_html([["a", "b", "c"]], torch.ones(2, 1, 3, 3) / 3, "unused.html")


def test_position_axes_carry_tokens(model):
    clean, corrupted = model.to_tokens(PROMPT), model.to_tokens(PROMPT.replace("Mary", "Alice"))
    res = activation_patch(model, clean, corrupted, metrics.logit_diff(" Mary", " Alice", tokenizer=model))
    assert res.cols[3] == "3:Mary/Alice" and res.cols[5] == "5:John" and res.cols[-1] == "15:to"
    labels = [t.get_text() for t in res.plot().axes[0].get_xticklabels()]
    assert labels == res.cols


# -- 3. claims the numbers do not support --------------------------------------------------------------------------

def test_a_small_gap_warns_and_reports_raw_changes():
    with pytest.warns(UnreliableGapWarning, match=r"differ by only \+0\.022.*divide by noise"):
        r = result([[0.4, 0.0]], clean=0.015, corrupted=-0.007)
    assert not r.reliable
    values, label = r.reported()
    assert torch.equal(values, r.effect) and "(not normalized)" in label
    assert "normalized" not in "".join(line for line in r.table().splitlines() if "  value " in line)
    assert "below 0.5" in r.table()


def test_the_unpatched_run_must_be_named():
    with pytest.raises(ValueError, match=r"unpatched must be 'clean' or 'corrupted' \(the run the cells patch\), "
                                         r"got 'base'"):
        result([[1.0]], unpatched="base")


def test_ioi_on_a_model_that_does_not_do_the_task_says_so(tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import tiny_gpt2

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "hookvene" / "zoo" / "ioi-gpt2")
    model = pv.from_pretrained(tiny_gpt2(tokenizer, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    with pytest.warns(UnreliableGapWarning):
        rep = ioi_analysis(model, tokenizer, n=16, seed=0, progress=False)
    text = rep.summary()
    assert "WARNING: the gap is below 0.5" in text and "raw change" in text
    assert "normalized: 1 =" not in text


def test_the_bundled_models_ioi_gap_is_reliable(report):
    assert report.reliable and report.clean_logit_diff - report.corrupted_logit_diff > 3


def test_the_readmes_account_of_the_residual_patching(report):
    """README: the clean stream at S2 entering layer 0 restores 74%, the final position's from layer 1 on all of it."""
    resid = report.resid.normalized_effect
    s2 = next(i for i, label in enumerate(report.resid.cols) if label.endswith(":S2"))
    assert float(resid[0, s2]) == pytest.approx(0.74, abs=0.005)
    assert bool((resid[1:, -1] > 0.99).all())


# -- 6. the library's pieces compose ----------------------------------------------------------------------------------

def test_activation_patch_takes_tokenize_ioi_batches(model, ioi_batches):
    clean, corrupted = ioi_batches
    metric = metrics.logit_diff(clean["io_ids"], clean["s_ids"], pos=clean["end_pos"])
    heads = activation_patch(model, clean, corrupted, metric, kind="heads")  # io_ids & co. are not model inputs
    keep = ("input_ids", "attention_mask")
    plain = activation_patch(model, {k: clean[k] for k in keep}, {k: corrupted[k] for k in keep}, metric,
                             kind="heads")
    assert torch.equal(heads.values, plain.values)


# -- 7. tokenizer traps ---------------------------------------------------------------------------------------------

def test_the_bos_trap_warns(model):
    bos = model.tokenizer(" Mary").input_ids[0]  # the bundled tokenizer prepends <|endoftext|>
    assert bos == model.tokenizer.bos_token_id
    with pytest.warns(UserWarning, match=r"the traced target is token \d+, the tokenizer's bos token .*Pass the answer "
                                         r"string"):
        causal_trace(model, PROMPT, subject=" Mary", target=bos, n_samples=2)


def test_answers_as_strings_resolve_to_the_word(model):
    mary = model.to_single_token(" Mary")
    assert metrics.answer_token(model, " Mary") == metrics.answer_token(model.tokenizer, " Mary") == mary
    trace = causal_trace(model, PROMPT, subject=" Mary", target=" Mary", n_samples=2)
    assert trace.extra["target"] == mary and trace.extra["subject"] == [3]
    assert trace.clean > 0.5  # the model's answer, not the BOS
    ids = model.to_tokens(PROMPT)
    by_id = metrics.logit_diff(mary, model.to_single_token(" John"))
    by_text = metrics.logit_diff(" Mary", " John", tokenizer=model)
    logits = model(ids).logits
    ex = torch.zeros(1, dtype=torch.long)
    assert torch.equal(by_id(logits, ex), by_text(logits, ex))


@pytest.mark.parametrize("text, message", [
    (" Colosseum", r"' Colosseum' is not in this tokenizer's vocabulary"),
    (" Mary John", r"' Mary John' is 2 tokens for this tokenizer \(\['ĠMary', 'ĠJohn'\]\); pass a single-token"),
])
def test_bad_answer_strings_are_errors(model, text, message):
    with pytest.raises(ValueError, match=message):
        metrics.answer_token(model, text)


def test_answers_as_text_need_a_tokenizer():
    with pytest.raises(ValueError, match=r"answers given as text \(' Mary'\) need the tokenizer"):
        metrics.logit_diff(" Mary", " John")


def test_unknown_words_warn(model):
    ids = model.tokenizer("Then, Mary and Zorblax went to the store.", return_tensors="pt")["input_ids"]
    with pytest.warns(UserWarning, match=r"the clean input contains '<unk>'"):
        activation_patch(model, ids, ids, metrics.prob(0), kind="attn_layer")
    known = ids.masked_fill(ids == model.tokenizer.unk_token_id, ids[0, 1].item())
    with pytest.warns(UserWarning) as caught:
        activation_patch(model, known, ids, metrics.prob(0), kind="attn_layer")
    said = [str(w.message) for w in caught if "'<unk>'" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("the corrupted input contains '<unk>'")


def test_to_tokens_warns_on_unknown_words(model):
    with pytest.warns(UserWarning, match=r"the text contains '<unk>' \(id \d+\): words outside this tokenizer's"):
        ids = model.to_tokens("Then, Mary and Zorblax went to the store.")
    assert model.tokenizer.unk_token_id in ids[0].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.to_tokens(PROMPT)  # known words: no warning


def test_a_bos_that_doubles_as_the_unknown_token_is_not_an_unknown_word():
    from types import SimpleNamespace

    from hookvene.utils import warn_unknown_tokens

    gpt2_like = SimpleNamespace(unk_token_id=50256, bos_token_id=50256, eos_token_id=50256, pad_token_id=None,
                                unk_token="<|endoftext|>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unknown_tokens(gpt2_like, torch.tensor([[50256, 464, 3139]]))


# -- 9. package hygiene ------------------------------------------------------------------------------------------------

def test_license_and_project_metadata():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert project["authors"]


def test_readmes_name_no_file_outside_the_repository():
    for readme in [ROOT / "README.md", *ROOT.glob("*/README.md"), *ROOT.glob("hookvene/*/README.md")]:
        text = readme.read_text()
        assert not re.search(r"\.\./shared|/work/", text), readme


def test_make_says_what_the_first_install_does():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(VENV)/.installed: pyproject.toml")[1].split("\n\n")[0]
    assert recipe.index("@echo") < recipe.index("pip install")
    assert "torch 2.13.0" in recipe and "transformers" in recipe
