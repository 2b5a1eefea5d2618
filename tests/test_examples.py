"""The tutorial scripts in examples/ run end to end on the bundled model (offline) and write their outputs.

Each script checks its own results (pyvene-style loop == experiments toolkit, etc.) with asserts, so exit code 0
means those checks passed; here we also look for a key line of output and the figure. No numbers from the bundled
model are checked: its weights may be retrained.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> (lines that must be printed, files that must be written under --out)
CASES = {
    "01_activation_patching.py": (["patched L1 block_output @ pos", "pyvene-style loop and activation_patch agree"],
                                  ["activation_patching.png"]),
    "02_causal_tracing.py": (["Clean P(Mary)", "Most critical layers", "pyvene-style loop and causal_trace agree"],
                             ["causal_tracing.png"]),
    "03_das_training.py": (["IIA after training", "Learned rotation shape: (", "matches b + ((s - b) . w) w"],
                           ["das_training.png", "das_intervention/config.json",
                            "das_intervention/interventions.safetensors"]),
    "04_position_patching.py": (["patched L1 at pos [", "pyvene-style loop and activation_patch agree"],
                                ["position_patching.png"]),
    "05_collect_activations.py": (["block output shape: (", "equal to run_with_cache; outputs unchanged"],
                                  ["activations.pt"]),
    "06_steering_generation.py": (["steered:", "same as a hand-written hook", "P(women's names)"],
                                  ["steering.png"]),
    "07_ioi_walkthrough.py": (["Average logit difference:", "final_post=", "Per-component attribution: embed=",
                               "Top heads by direct logit attribution: L", "Patching resid_pre restores most"],
                              ["ioi_head_attribution.png", "ioi_top_heads.html", "ioi_patching.png"]),
}


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")  # tiny model: one thread is fastest
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_example_is_tested_and_listed_in_the_readme():
    scripts = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert scripts == sorted(CASES)
    readme = (EXAMPLES / "README.md").read_text()
    for script in scripts:
        assert f"python examples/{script}" in readme, script


@pytest.mark.subprocess
@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_on_the_bundled_model(script, tmp_path):
    proc = run_example(script, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines, files = CASES[script]
    for line in lines:
        assert line in proc.stdout, (line, proc.stdout)
    for name in files:
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.subprocess
def test_collected_activations_file(tmp_path):
    import torch

    proc = run_example("05_collect_activations.py", "--n", "4", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(tmp_path / "activations.pt", weights_only=True)
    assert len(saved["prompts"]) == 4
    block = next(v for k, v in saved.items() if k.endswith("block_output"))
    at_io = next(v for k, v in saved.items() if k.endswith("block_output@io"))
    assert block.shape[:2] == saved["attention_mask"].shape
    assert at_io.shape == (4, 1, block.shape[-1])


@pytest.fixture(scope="module")
def random_ioi_checkpoint(tmp_path_factory):
    """A random GPT-2 saved with the bundled model's word-level tokenizer: `--model DIR` with other weights."""
    from transformers import AutoTokenizer

    from tests.helpers import save_checkpoint, tiny_gpt2

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "hookvene" / "zoo" / "ioi-gpt2")
    # larger initial weights than GPT-2's 0.02: patching effects big enough for the agreement checks to bite
    model = tiny_gpt2(tokenizer, n_positions=32, n_embd=64, n_layer=3, n_head=4, initializer_range=0.1)
    return save_checkpoint(model, tokenizer, str(tmp_path_factory.mktemp("random_ioi")))


@pytest.mark.subprocess
@pytest.mark.parametrize("script, extra", [("01_activation_patching.py", []),
                                           ("02_causal_tracing.py", ["--samples", "3"]),
                                           ("04_position_patching.py", ["--layer", "2"])])
def test_example_with_a_local_checkpoint_dir(script, extra, random_ioi_checkpoint, tmp_path):
    proc = run_example(script, "--model", random_ioi_checkpoint, "--out", str(tmp_path), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "agree" in proc.stdout
    assert list(tmp_path.glob("*.png"))


@pytest.mark.subprocess
def test_example_rejects_an_unknown_model_offline(tmp_path):
    proc = run_example("05_collect_activations.py", "--model", str(tmp_path / "missing-model"), "--out", str(tmp_path))
    assert proc.returncode != 0
    assert "local checkpoint directory" in proc.stderr
