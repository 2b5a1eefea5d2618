"""The README's tour runs as written (on the bundled model, offline)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
pytestmark = pytest.mark.e2e  # the README's code runs as a reader would run it (`make test-fast` leaves it out)


def test_readme_tour_runs():
    text = open(README).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - the README is ours
    assert scope["logits"].shape[-1] == scope["model"].cfg.d_vocab
    assert scope["patched"].logits.shape == scope["logits"].shape
    assert not scope["model"].has_hooks()


def test_readme_plan_block_runs():
    """The Layout section's plan-and-attach block: the interchange changes the logits, and nothing stays attached."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
                 if "from hookvene.plan import" in b)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README is ours
    model = scope["model"]
    assert not model.has_hooks()
    assert (scope["logits"] - model(scope["base_ids"]).logits).abs().max() > 1e-3


def python_blocks(path: str = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", open(path).read(), flags=re.S)


def test_every_python_block_runs_as_written(tmp_path, monkeypatch):
    """Each block on its own, in a fresh namespace, on the bundled model (files it writes go to a temporary dir)."""
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), {})  # noqa: S102 - the README is ours


def test_experiments_block_finds_what_the_readme_says(tmp_path, monkeypatch):
    """The "Experiments in one call" block: its table ranks by |effect| with the sign shown and the gap stated."""
    monkeypatch.chdir(tmp_path)
    block = next(b for b in python_blocks() if "activation_patch(model, clean, corrupted" in b)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README is ours
    heads = scope["heads"]
    assert heads.reliable and "gap +" in heads.table()
    assert (tmp_path / "heads.png").stat().st_size > 0 and (tmp_path / "heads.pt").stat().st_size > 0
    assert scope["trace"].clean > 0.5  # " Mary" resolved to the name, not the BOS


def test_headline_numbers_are_what_the_command_prints(capsys, tmp_path):
    """The summary the README quotes for `make ioi` is `hookvene ioi`'s output, number for number."""
    from hookvene.cli import main

    quoted = re.search(r"```\n(IOI on 64 prompts.*?)```", open(README).read(), flags=re.S).group(1)
    main(["ioi", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for line in quoted.splitlines():
        if line.strip() != "...":
            assert line in printed, (line, printed)


def test_zoo_readme_block_prints_what_its_comments_say(capsys, monkeypatch):
    """hookvene/zoo/README.md's plain-transformers blocks: ioi-gpt2's logit difference and greedy completion, and
    induction-gpt2's greedy completion of a repeat, as quoted."""
    path = os.path.join(os.path.dirname(README), "hookvene", "zoo", "README.md")
    ioi_block, induction_block = python_blocks(path)
    monkeypatch.chdir(os.path.dirname(README))  # the block names the model directory relative to the repository root
    exec(compile(ioi_block, "hookvene/zoo/README.md", "exec"), {})  # noqa: S102 - the README is ours
    out = capsys.readouterr().out
    quoted = re.search(r"# (tensor\([\d.]+),", ioi_block).group(1)
    assert quoted in out
    assert re.search(r"# (<\|endoftext\|>Then, Mary.*)", ioi_block).group(1) in out
    exec(compile(induction_block, "hookvene/zoo/README.md", "exec"), {})  # noqa: S102
    completion = re.search(r"# (<\|endoftext\|> ka lo.*)", induction_block).group(1)
    assert completion.count("ka lo mi zu") == 2 and completion + "\n" in capsys.readouterr().out


def test_mutation_table_is_the_kept_results():
    """The README's kill-rate table is rendered from mutation/results.json (what `make mutants` measured)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "mutation", "run_mutants.py")
    spec = importlib.util.spec_from_file_location("run_mutants", path)
    run_mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_mutants)
    assert run_mutants.readme_table() in open(README).read()
