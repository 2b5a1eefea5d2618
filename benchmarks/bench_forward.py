"""Forward-pass overhead of hookvene against plain `transformers`, on the same random GPT-2-small-shaped weights.

    python benchmarks/bench_forward.py            # 15 rounds per shape
    python benchmarks/bench_forward.py --quick    # 4 rounds per shape, for a smoke test

Each round times every variant once, in a rotating order, so that load from other processes hits all variants
alike; the table reports medians over rounds and the median of the per-round ratios to `transformers`.
See benchmarks/README.md.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

TARGETS = {"no hooks": 1.05, "full cache": 1.3}


def build(seed: int = 0):
    """HF GPT2LMHeadModel with GPT-2 small's shape and random weights (default attention: sdpa), and the
    hookvene model made from that same object (weights shared)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import hookvene

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    hf = GPT2LMHeadModel(cfg).eval()
    ours = hookvene.from_pretrained(hf)
    return hf, ours


def variants(hf, ours) -> dict[str, Callable[[torch.Tensor], object]]:
    def one_hook(t, hook):  # reads the residual stream, as a probe would
        one_hook.last = t

    return {
        "transformers": lambda ids: hf(ids).logits,
        "no hooks": lambda ids: ours(ids).logits,
        "one hook (resid)": lambda ids: ours.run_with_hooks(ids, fwd_hooks=[("blocks.6.hook_resid_post", one_hook)]),
        "one hook (pattern)": lambda ids: ours.run_with_hooks(
            ids, fwd_hooks=[("blocks.6.attn.hook_pattern", one_hook)]),
        "full cache": lambda ids: ours.run_with_cache(ids),
    }


def bench(fns: dict[str, Callable], ids: torch.Tensor, rounds: int, warmup: int) -> dict[str, list[float]]:
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(warmup):
            for n in names:
                fns[n](ids)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
            for n in order:
                t0 = time.perf_counter()
                fns[n](ids)
                times[n].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke test, noisy numbers)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default 15, --quick 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--shapes", default="1x16,8x128", help="comma-separated BATCHxPOS list")
    args = ap.parse_args()
    rounds = args.rounds or (4 if args.quick else 15)
    warmup = 1 if args.quick else 3
    if args.threads:
        torch.set_num_threads(args.threads)

    hf, ours = build()
    fns = variants(hf, ours)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, HF attention: "
          f"{hf.config._attn_implementation}, {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params, "
          f"{rounds} rounds, {warmup} warm-up\n")

    print("| batch x pos | forward | median ms | min ms | ratio to transformers | target |")
    print("|---|---|---:|---:|---:|---|", flush=True)
    for shape in args.shapes.split(","):
        batch, pos = map(int, shape.lower().split("x"))
        ids = torch.randint(0, hf.config.vocab_size, (batch, pos), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():  # same function first: the ratios are only meaningful if the outputs agree
            err = (fns["transformers"](ids) - fns["no hooks"](ids)).abs().max().item()
        assert err < 1e-3, f"hookvene and transformers disagree by {err}"
        times = bench(fns, ids, rounds, warmup)
        hf_times = times["transformers"]
        for name, ts in times.items():
            ratio = statistics.median(t / h for t, h in zip(ts, hf_times))
            target = TARGETS.get(name)
            verdict = "" if target is None or name == "transformers" else (
                f"<= {target}x {'ok' if ratio <= target else 'MISSED'}")
            print(f"| {batch} x {pos} | {name} | {statistics.median(ts) * 1e3:.1f} | {min(ts) * 1e3:.1f} | "
                  f"{ratio:.3f}x | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
