"""The all-heads activation-patching sweep on 2 ranks against 1 rank, one thread each, in one run.

    python benchmarks/bench_distributed.py               # 3 rounds: GPT-2 small shape, 12 x 12 heads, 8 x 16 tokens
    python benchmarks/bench_distributed.py --quick       # 1 round on a 4-layer, 256-wide model: a smoke test
    python benchmarks/bench_distributed.py --ranks 4     # N ranks against 1 (needs N free cores)

The sweep is the README's (bench_experiments.py (b)): `activation_patch(model, clean, corrupted, logit_diff,
kind="heads")` with random GPT-2-small weights (seeded, so every process builds the same model). Each side is one
`torchrun --standalone --nproc_per_node N` launch of this file (`--worker`): the model is built, one forward warms
up, the ranks meet at a barrier, and the sweep is timed from there to a barrier after it (rank 0 reports). Start-up
(importing torch, building the model) is not timed: it is the same per process and does not grow with the sweep.
Rounds alternate which side runs first; the speed-up is the median over rounds of (1-rank time / N-rank time).
Before a number is printed the N-rank values are checked equal to the 1-rank values (<= 1e-6).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

TARGET = 1.7  # 2 ranks of one thread against 1


def worker(args: argparse.Namespace) -> None:
    from bench_experiments import build

    from hookvene import distributed
    from hookvene.experiments.metrics import logit_diff
    from hookvene.experiments.patching import activation_patch

    torch.set_num_threads(1)
    distributed.init_from_env()
    model = build(args.quick)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(2)  # the inputs of bench_experiments.bench_heads
    n_examples, n_pos = 8, 16
    clean = torch.randint(0, cfg.d_vocab, (n_examples, n_pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, [2, n_pos // 2]] = torch.randint(0, cfg.d_vocab, (n_examples, 2), generator=gen)
    answer, wrong = torch.randint(0, cfg.d_vocab, (2, n_examples), generator=gen)
    with torch.no_grad():
        model(clean[:1])  # warm-up
    distributed.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    result = activation_patch(model, clean, corrupted, logit_diff(answer, wrong), kind="heads")
    cpu = time.process_time() - c0
    distributed.barrier()
    wall = time.perf_counter() - t0
    cpus = distributed.gather_objects(cpu) if distributed.is_distributed() else [cpu]  # every rank's CPU time
    if distributed.is_main():
        with open(args.worker, "w") as f:
            json.dump({"wall": wall, "cpu": max(cpus), "values": result.values.flatten().tolist()}, f)


def launch(n: int, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", path] + (["--quick"] if quick else [])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{n}-rank run failed:\n{proc.stderr[-3000:]}")
        with open(path) as f:
            return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rounds = args.rounds or (1 if args.quick else 3)
    runs: dict[int, list[dict]] = {1: [], args.ranks: []}
    for r in range(rounds):
        for n in ((1, args.ranks) if r % 2 == 0 else (args.ranks, 1)):
            runs[n].append(launch(n, args.quick))
    one, many = runs[1], runs[args.ranks]
    for a, b in zip(one, many):
        diff = max(abs(x - y) for x, y in zip(a["values"], b["values"]))
        assert diff <= 1e-6, f"{args.ranks} ranks differ from 1 rank by {diff}"
    ratios = [a["wall"] / b["wall"] for a, b in zip(one, many)]
    speedup = statistics.median(ratios)
    shape = "4 layers x 4 heads (--quick)" if args.quick else "GPT-2 small shape, 12 layers x 12 heads"
    print(f"all-heads activation patching, {shape}, 8 prompt pairs x 16 tokens, one thread per rank, {rounds} rounds")
    print()
    print("| ranks | sweep wall s (median) | CPU s of the busiest rank (median) | speed-up (median of rounds) "
          "| target |")
    print("|---:|---:|---:|---:|---|")
    print(f"| 1 | {statistics.median(a['wall'] for a in one):.2f} | {statistics.median(a['cpu'] for a in one):.2f} "
          f"| 1.00x | |")
    ok = "ok" if speedup >= TARGET or args.ranks != 2 else "MISSED"
    print(f"| {args.ranks} | {statistics.median(b['wall'] for b in many):.2f} | "
          f"{statistics.median(b['cpu'] for b in many):.2f} | {speedup:.2f}x "
          f"({', '.join(f'{x:.2f}' for x in ratios)}) | >= {TARGET}x {ok} |")
    print(f"\nvalues: {args.ranks} ranks equal 1 rank (max abs diff "
          f"{max(max(abs(x - y) for x, y in zip(a['values'], b['values'])) for a, b in zip(one, many)):.1e})")


if __name__ == "__main__":
    main()
