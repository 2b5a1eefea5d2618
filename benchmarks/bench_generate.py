"""Greedy generation throughput: hookvene (with a steering intervention) against `transformers`' own `generate`,
on the same random GPT-2-small-shaped weights.

    python benchmarks/bench_generate.py            # 7 rounds
    python benchmarks/bench_generate.py --quick    # 2 rounds, for a smoke test

Batch 1, a 16-token prompt, 64 new tokens, greedy. Variants:

    transformers            hf.generate(do_sample=False, min_new_tokens=max_new_tokens=64), its default cache
                            (it cannot stop early), no intervention
    hookvene steering       IntervenableModel.generate with an AdditionIntervention steering vector on
                            layer 6 mlp_output, every position of every step (the default semantics)
    hookvene no hooks       model.generate with nothing attached

Each round times every variant once, in a rotating order, so that load from other processes hits all variants
alike; the table reports the median tokens/s over rounds and the median of the per-round ratios to
`transformers` (ratio = tokens/s of the variant / tokens/s of transformers; higher is better).
Target (the issue): hookvene steering >= 0.9x.
"""

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_forward import bench  # noqa: E402

TARGETS = {"hookvene steering": 0.9}
PROMPT, NEW = 16, 64


def build(seed: int = 0):
    """HF GPT2LMHeadModel with GPT-2 small's shape and random weights (default attention), and the hookvene
    model made from that same object (weights shared)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import hookvene

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    hf = GPT2LMHeadModel(cfg).eval()
    ours = hookvene.from_pretrained(hf)
    return hf, ours


def variants(hf, ours, new: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    import hookvene as pv

    steer = pv.IntervenableModel([{"layer": 6, "component": "mlp_output",
                                   "intervention_type": pv.AdditionIntervention}], ours)
    vector = torch.randn(hf.config.n_embd, generator=torch.Generator().manual_seed(2)) * 0.5

    def hf_generate(ids: torch.Tensor) -> torch.Tensor:
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=hf.config.eos_token_id)

    return {
        "transformers": hf_generate,
        "hookvene steering": lambda ids: steer.generate({"input_ids": ids}, source_representations=vector,
                                                        max_new_tokens=new)[1],
        "hookvene no hooks": lambda ids: ours.generate(ids, max_new_tokens=new),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke test, noisy numbers)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, --quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    warmup = 1
    if args.threads:
        torch.set_num_threads(args.threads)

    hf, ours = build()
    fns = variants(hf, ours, NEW)
    ids = torch.randint(0, hf.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    # same function first: the timings only compare like with like if the un-intervened tokens agree
    same = torch.equal(fns["transformers"](ids), fns["hookvene no hooks"](ids))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, HF attention: "
          f"{hf.config._attn_implementation}, {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params, "
          f"batch 1, prompt {PROMPT}, {NEW} new tokens greedy, {rounds} rounds, {warmup} warm-up; "
          f"hookvene (no hooks) tokens == transformers tokens: {same}\n")
    with torch.no_grad():  # every variant really generates NEW tokens (none stops early)
        for name, fn in fns.items():
            out = fn(ids)
            assert out.shape == (ids.shape[0], ids.shape[1] + NEW), (name, tuple(out.shape))
    times = bench(fns, ids, rounds, warmup)
    hf_times = times["transformers"]
    print("| generate | median tokens/s | best tokens/s | median s / call | ratio to transformers (tok/s) "
          "| target |")
    print("|---|---:|---:|---:|---:|---|")
    for name, ts in times.items():
        ratio = statistics.median(h / t for t, h in zip(ts, hf_times))
        target = TARGETS.get(name)
        verdict = "" if target is None else f">= {target}x {'ok' if ratio >= target else 'MISSED'}"
        print(f"| {name} | {NEW / statistics.median(ts):.1f} | {NEW / min(ts):.1f} | {statistics.median(ts):.3f} | "
              f"{ratio:.3f}x | {verdict} |")


if __name__ == "__main__":
    main()
