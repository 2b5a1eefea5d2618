"""Sweeps under torch.distributed: 2 gloo processes started by torchrun give every rank the single-process result.

The worker (tests/distributed_worker.py) runs every sweep kind; the test runs the same sweeps in this process
and compares. The plan's passes are dealt out whole, so activation / path patching and causal tracing do the
very same arithmetic split over two processes; attribution patching adds per-rank sums (<= 1e-6).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hookvene as pv
from hookvene import distributed
from tests.distributed_worker import COLLECT_HOOKS, collect, sweeps
from tests.helpers import save_checkpoint, tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]
CLEAN = "Then, Mary and John went to the store. John gave a drink to"
CORRUPTED = "Then, Alice and John went to the store. John gave a drink to"


def torchrun(*args: str, cwd: Path, n: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free local port) with one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# -- without a process group: the helpers ---------------------------------------------------------------------


def test_no_process_group_means_one_process():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert not distributed.init_from_env()  # WORLD_SIZE unset: nothing to join


def test_assign_balances_cost_and_is_deterministic():
    costs = [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    owner = distributed.assign(costs, world=2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in (0, 1)]
    assert loads == [39, 39]
    assert owner == distributed.assign(costs, world=2)
    assert distributed.assign([5.0], world=3) == [0]  # more ranks than work: the others get none
    assert distributed.assign([], world=2) == []


# -- two gloo processes under torchrun ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = tiny_gpt2(None, n_embd=32, n_layer=3, n_head=4)
    return save_checkpoint(hf, None, str(tmp_path_factory.mktemp("dist_ckpt")))


@pytest.mark.subprocess
def test_two_gloo_ranks_return_the_single_process_result(checkpoint, tmp_path):
    proc = torchrun(str(ROOT / "tests" / "distributed_worker.py"), checkpoint, str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = sweeps(pv.from_pretrained(checkpoint))
    for name, want in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # identical on every rank
        assert (ranks[0][name] - want).abs().max() <= 1e-6, name
        if not name.startswith("attribution"):  # whole passes per rank: the same arithmetic as one process
            assert torch.equal(ranks[0][name], want), name
    # activation collection: both ranks wrote shards into one folder; together they hold each row of the
    # single-process collection once (the same batches, so the same values)
    model = pv.from_pretrained(checkpoint)
    collect(model, str(tmp_path / "single"))
    two, one = (pv.load_activations(str(tmp_path / d)) for d in ("acts", "single"))
    assert {p.split("-")[0][-5:] for p in map(os.path.basename, two.shards)} == {"00000", "00001"}
    rows_two, rows_one = (
        {k: torch.cat([s[k] for s in store]) for k in ["example", "position", *COLLECT_HOOKS]} for store in (two, one))
    order = torch.argsort(rows_two["example"] * 1000 + rows_two["position"])
    for k, v in rows_one.items():
        assert torch.equal(rows_two[k][order], v), k
    for r in (0, 1):
        assert torch.equal(ranks[r]["local:patch:heads"], single["patch:heads"])
        assert "needs the same arguments on every rank" in ranks[r]["mismatch"]
        assert "hookvene.distributed.local()" in ranks[r]["mismatch"]


@pytest.mark.subprocess
def test_cli_patch_under_torchrun_prints_the_single_process_table(gpt2_dir, tmp_path):
    args = ["patch", "--model", gpt2_dir, "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary",
            "--wrong", " John", "--kind", "heads"]
    two = torchrun("-m", "hookvene", *args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-4000:]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    one = subprocess.run([sys.executable, "-m", "hookvene", *args, "--out", str(tmp_path / "one")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    assert "heads (logit_diff)" in two.stdout
    assert two.stdout.replace(str(tmp_path / "two"), "OUT") == one.stdout.replace(str(tmp_path / "one"), "OUT")
    assert two.stdout.count("heads (logit_diff)") == 1  # rank 0 prints, rank 1 does not
    assert (tmp_path / "two" / "patch_heads.png").is_file()
