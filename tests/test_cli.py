"""The `hookvene` command: `info`, `ioi`, `trace`, `patch` on the bundled model and on a local checkpoint dir, and
clear errors for bad inputs. Most tests call `hookvene.cli.main([...])` in-process; a few run `python -m hookvene`.

Nothing here depends on the bundled model's exact numbers (it may be retrained).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hookvene.cli import main
from hookvene.experiments.results import SweepResult
from tests.helpers import make_tokenizer, save_checkpoint, tiny_gpt2

pytestmark = pytest.mark.e2e  # every test here runs a whole command (`make test-fast` leaves them out)

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
CLEAN = "Then, Mary and John went to the store. John gave a drink to"
CORRUPTED = "Then, Alice and John went to the store. John gave a drink to"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def fails(argv: list[str], capsys) -> str:
    """Run main(argv), expect a non-zero exit, return everything it said (exit message, stderr, stdout)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    assert code not in (0, None), f"expected a failure, got exit code {code!r}"
    out = capsys.readouterr()
    return f"{code if isinstance(code, str) else ''}\n{out.err}\n{out.out}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer GPT-2 saved with a byte-level BPE tokenizer (tests/helpers.py)."""
    tokenizer = make_tokenizer()
    return save_checkpoint(tiny_gpt2(tokenizer), tokenizer, str(tmp_path_factory.mktemp("tiny_gpt2")))


# -- info -------------------------------------------------------------------------------------------------------


def test_info_lists_hooks_and_components(capsys):
    main(["info", "ioi-gpt2"])
    out = capsys.readouterr().out
    assert "GPT2LM" in out and "hook points" in out
    for hook in ("hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.0.hook_mlp_out",
                 "hook_logits"):
        assert hook in out, hook
    assert "blocks.1." not in out  # layer 0 and globals only
    for component, hook in (("block_output", "blocks.0.hook_resid_post"),
                            ("attention_output", "blocks.0.hook_attn_out"),
                            ("mlp_output", "blocks.0.hook_mlp_out"),
                            ("head_attention_value_output", "attn.hook_z")):
        line = next(x for x in out.splitlines() if x.split() and x.split()[0] == component)
        assert hook in line, line


def test_info_defaults_to_the_bundled_model(capsys):
    main(["info"])
    assert "GPT2LM" in capsys.readouterr().out


# -- ioi --------------------------------------------------------------------------------------------------------


def test_ioi_writes_figures_and_results(tmp_path, capsys):
    main(["ioi", "--n", "16", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "IOI on 16 prompts" in out
    assert "clean logit diff" in out and "corrupted (ABC) logit diff" in out
    head_rows = [line for line in out.splitlines() if line.strip().startswith("L") and "H" in line.split()[0]]
    assert len(head_rows) == 5  # --top-k default
    assert is_png(tmp_path / "ioi_heads.png") and is_png(tmp_path / "ioi_resid.png")
    html = (tmp_path / "ioi_attention.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html
    heads = SweepResult.load(str(tmp_path / "ioi_heads.pt"))
    assert heads.kind == "heads" and heads.values.shape == (4, 4)  # ioi-gpt2: 4 layers x 4 heads
    assert torch.isfinite(heads.values).all()
    for name in ("ioi_heads.png", "ioi_resid.png", "ioi_attention.html", "ioi_heads.pt"):
        assert str(tmp_path / name) in out  # the summary says where each file went


def test_ioi_top_k(tmp_path, capsys):
    main(["ioi", "--n", "4", "--top-k", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "IOI on 4 prompts" in out
    assert len([line for line in out.splitlines() if line.strip().startswith("L") and "H" in line.split()[0]]) == 2


# -- trace and patch on the bundled model ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["resid_post", "mlp_out", "attn_out"])
def test_trace_on_an_ioi_prompt(kind, tmp_path, capsys):
    main(["trace", "--prompt", CLEAN, "--subject", "Mary", "--target", " Mary", "--kind", kind, "--samples", "2",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"causal_trace:{kind} (prob)" in out
    assert is_png(tmp_path / f"trace_{kind}.png")
    assert f"figure: {tmp_path / f'trace_{kind}.png'}" in out


@pytest.mark.parametrize("kind", ["heads", "resid_pre", "mlp_layer", "heads_v"])
def test_patch_on_ioi_prompts(kind, tmp_path, capsys):
    main(["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong", " Alice",
          "--kind", kind, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"{kind} (logit_diff)" in out and "clean" in out and "corrupted" in out
    assert is_png(tmp_path / f"patch_{kind}.png")


def test_patch_labels_positions_with_tokens(tmp_path, capsys):
    main(["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong", " Alice",
          "--kind", "resid_pre", "--out", str(tmp_path)])
    table = capsys.readouterr().out.split("figure:")[0]
    assert "position" in table and any(f"{i}:" in table for i in range(16))


# -- a local checkpoint directory --------------------------------------------------------------------------------


def test_local_checkpoint_dir(tiny_dir, tmp_path, capsys):
    main(["info", tiny_dir])
    assert "GPT2LM" in capsys.readouterr().out
    main(["trace", "--model", tiny_dir, "--prompt", "The Colosseum is in the city of", "--subject", "The Colosseum",
          "--target", " Rome", "--samples", "2", "--out", str(tmp_path)])
    assert "causal_trace:resid_post" in capsys.readouterr().out
    assert is_png(tmp_path / "trace_resid_post.png")
    main(["patch", "--model", tiny_dir, "--clean", "The capital of Spain is", "--corrupted",
          "The capital of Italy is", "--answer", " Madrid", "--wrong", " Rome", "--kind", "resid_pre",
          "--out", str(tmp_path)])
    assert "resid_pre (logit_diff)" in capsys.readouterr().out
    assert is_png(tmp_path / "patch_resid_pre.png")


def test_ioi_on_a_checkpoint_whose_tokenizer_splits_names(tiny_dir, tmp_path, capsys):
    said = fails(["ioi", "--model", tiny_dir, "--n", "4", "--out", str(tmp_path)], capsys)
    assert "not a single known token" in said


def test_checkpoint_without_a_tokenizer(tmp_path, capsys):
    path = save_checkpoint(tiny_gpt2(None), None, str(tmp_path / "no_tokenizer"))
    said = fails(["trace", "--model", path, "--prompt", "a b", "--subject", "a", "--target", " b",
                  "--out", str(tmp_path)], capsys)
    assert "no tokenizer" in said


# -- bad inputs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "trace", "patch", "ioi"])
def test_unknown_model_offline_points_to_a_local_directory(command, tmp_path, capsys):
    name = str(tmp_path / "no-such-model")  # not a directory, not bundled, not a valid hub name
    args = {"info": [name],
            "trace": ["--model", name, "--prompt", CLEAN, "--subject", "Mary", "--target", " Mary"],
            "patch": ["--model", name, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary",
                      "--wrong", " Alice"],
            "ioi": ["--model", name]}[command]
    said = fails([command, *args, *([] if command == "info" else ["--out", str(tmp_path)])], capsys)
    assert "local checkpoint directory" in said
    assert "ioi-gpt2" in said  # and names the bundled models


def test_subject_not_in_prompt(tmp_path, capsys):
    said = fails(["trace", "--prompt", CLEAN, "--subject", "Alice", "--target", " Mary", "--out", str(tmp_path)],
                 capsys)
    assert "'Alice' does not occur in the prompt" in said
    assert not (tmp_path / "trace_resid_post.png").exists()


@pytest.mark.parametrize("command", ["trace", "patch"])
def test_multi_token_answer(command, tmp_path, capsys):
    if command == "trace":
        argv = ["trace", "--prompt", CLEAN, "--subject", "Mary", "--target", " Mary Mary"]
    else:
        argv = ["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong", " Alice Mary"]
    said = fails([*argv, "--out", str(tmp_path)], capsys)
    assert "is 2 tokens" in said and "single-token" in said


def test_multi_token_answer_with_a_bpe_tokenizer(tiny_dir, tmp_path, capsys):
    said = fails(["trace", "--model", tiny_dir, "--prompt", "The Colosseum is in the city of", "--subject",
                  "Colosseum", "--target", " Aaron", "--out", str(tmp_path)], capsys)
    assert "' Aaron' is" in said and "tokens" in said


def test_answer_outside_the_vocabulary(tmp_path, capsys):
    said = fails(["trace", "--prompt", CLEAN, "--subject", "Mary", "--target", " Colosseum", "--samples", "2",
                  "--out", str(tmp_path)], capsys)
    assert "' Colosseum' is not in this tokenizer's vocabulary" in said


def test_patch_prompts_of_different_lengths(tmp_path, capsys):
    said = fails(["patch", "--clean", CLEAN, "--corrupted", "Then, Alice and John went to the store.", "--answer",
                  " Mary", "--wrong", " Alice", "--out", str(tmp_path)], capsys)
    assert "same shape" in said


def test_argument_errors(capsys):
    assert "required" in fails(["trace", "--prompt", CLEAN], capsys)
    assert "invalid choice" in fails(["patch", "--clean", CLEAN, "--corrupted", CLEAN, "--answer", " Mary",
                                      "--wrong", " John", "--kind", "nope"], capsys)
    assert "invalid choice" in fails(["frobnicate"], capsys)


# -- real subprocesses: `python -m hookvene` ---------------------------------------------------------------------


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "hookvene", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.subprocess
def test_python_m_hookvene_patch(tmp_path):
    proc = run_module("patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong",
                      " Alice", "--out", str(tmp_path / "figs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heads (logit_diff)" in proc.stdout
    assert is_png(tmp_path / "figs" / "patch_heads.png")


@pytest.mark.subprocess
def test_python_m_hookvene_reports_bad_input_on_stderr(tmp_path):
    proc = run_module("trace", "--prompt", CLEAN, "--subject", "Rome", "--target", " Mary", cwd=tmp_path)
    assert proc.returncode != 0
    assert "does not occur in the prompt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a bad call


# -- help, version, exit codes, --tokenizer, threads (issue 15) ------------------------------------------------------

SUBCOMMANDS = ["ioi", "trace", "patch", "info", "induction"]


def help_of(argv: list[str], capsys) -> str:
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as e:
        mp.setenv("COLUMNS", "400")  # no line wrapping (argparse also breaks words at hyphens)
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """{invocation: help} for each argument in an argparse help text (an entry may continue on indented lines)."""
    entries: list[str] = []
    for line in text.split("\n\n", 1)[1].splitlines():  # after the usage
        if re.match(r"  \S", line):
            entries.append(line)
        elif line.startswith("    ") and entries:
            entries[-1] += "\n" + line
    parsed = [re.match(r"  (.+?)(?: {2,}|\n\s+|$)(.*)", e, flags=re.S) for e in entries]
    return {m.group(1): " ".join(m.group(2).split()) for m in parsed}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_has_a_line_and_the_default_for_every_option(command, capsys):
    text = help_of([command], capsys)
    usage = " ".join(text.split("\n\n")[0].split())
    entries = {k: v for k, v in help_entries(text).items() if not k.startswith("-h")}
    assert entries
    for invocation, help_text in entries.items():
        assert help_text, f"{command} {invocation} has no help line"
        if f"[{invocation}]" in usage:  # optional: the help says what it defaults to
            assert "default" in help_text, (command, invocation, help_text)
    assert "(default: None)" not in text  # where nothing is the default, the help says what happens then


def test_help_shows_the_main_options(capsys):
    text = help_of([], capsys)
    assert "--version" in text and "--threads" in text and "by default 1 for models under 20M parameters" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert re.fullmatch(r"hookvene \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_usage_errors_exit_2_and_runtime_errors_exit_1_with_one_prefix(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["trace", "--prompt", CLEAN])  # missing --subject and --target: a usage error
    assert e.value.code == 2
    assert "hookvene trace: error: the following arguments are required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a runtime error: the subject is not in the prompt
        main(["trace", "--prompt", CLEAN, "--subject", "Alice", "--target", " Mary", "--out", str(tmp_path)])
    assert e.value.code == 1
    assert capsys.readouterr().err.startswith("hookvene trace: error: subject 'Alice' does not occur")
    with pytest.raises(SystemExit) as e:
        main(["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong", " Zorblax",
              "--out", str(tmp_path)])
    assert e.value.code == 1
    assert capsys.readouterr().err.startswith("hookvene patch: error: ' Zorblax' is not in this tokenizer's vocabulary")


def test_tokenizer_option_for_a_directory_without_tokenizer_files(tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "hookvene" / "zoo" / "ioi-gpt2")
    weights = save_checkpoint(tiny_gpt2(tokenizer, n_positions=32), None, str(tmp_path / "weights_only"))
    said = fails(["trace", "--model", weights, "--prompt", CLEAN, "--subject", "Mary", "--target", " Mary",
                  "--out", str(tmp_path)], capsys)
    assert "pass --tokenizer" in said
    main(["trace", "--model", weights, "--tokenizer", "ioi-gpt2", "--prompt", CLEAN, "--subject", "Mary",
          "--target", " Mary", "--samples", "2", "--out", str(tmp_path)])
    assert "causal_trace:resid_post (prob)" in capsys.readouterr().out


def test_small_models_run_on_one_thread_by_default(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        main(["ioi", "--n", "4", "--out", str(tmp_path)])
        assert "(1 thread)" in capsys.readouterr().out
        main(["--threads", "2", "ioi", "--n", "4", "--out", str(tmp_path)])
        assert "(2 threads)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_warnings_carry_the_command_prefix(tmp_path, capsys):
    main(["patch", "--clean", "Then, Mary and Zorblax went to the store. Zorblax gave a drink to", "--corrupted",
          "Then, Alice and Zorblax went to the store. Zorblax gave a drink to", "--answer", " Mary", "--wrong",
          " Alice", "--kind", "attn_layer", "--out", str(tmp_path)])
    assert "hookvene patch: warning: the clean input contains '<unk>'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["trace", "patch"])
def test_figure_titles_name_the_prompt_and_the_metric(command, tmp_path, capsys, monkeypatch):
    titles = []
    plot = SweepResult.plot

    def keep(self, path=None, title=None, **kwargs):
        titles.append(title)
        return plot(self, path, title, **kwargs)
    monkeypatch.setattr(SweepResult, "plot", keep)
    if command == "trace":
        main(["trace", "--prompt", CLEAN, "--subject", "Mary", "--target", " Mary", "--samples", "2",
              "--out", str(tmp_path)])
        assert titles[0].startswith(f"P(' Mary') after {CLEAN!r}") and "clean 0.99" in titles[0]
    else:
        main(["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary", "--wrong", " Alice",
              "--out", str(tmp_path)])
        assert titles[0].startswith(f"logit(' Mary') - logit(' Alice') after {CLEAN!r}")
        assert repr(CORRUPTED) in titles[0]
