"""Cost of one interchange intervention, as a ratio to a plain `transformers` forward on the same weights.

GPT-2 small shape (12 layers, d_model 768, vocab 50257), random weights, batch 1 x 16 and 8 x 128 tokens,
no_grad. Rows:

    transformers          plain HF forward (the denominator)
    interchange L6        VanillaIntervention on block_output of layer 6 at one position, base + source input
                          (target <= 1.5x: the source run stops after layer 6 and skips the LM head)
    given activations     the same with `activations_sources` (no source run; target <= 1.1x)

Measurements alternate between the variants inside one loop and report medians, to be fair on a busy machine.

    python benchmarks/bench_interventions.py [--quick] [--threads 1]
"""

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hookvene as pv


def variants(hf, iv, base: dict, source: dict, acts: dict, p: int) -> dict:
    return {
        "hf": lambda: hf(**base),
        "interchange": lambda: iv(base, [source], {"sources->base": p}),
        "given": lambda: iv(base, unit_locations={"base": p}, activations_sources=acts),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 is steadier when shared)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).eval()
    model = pv.from_pretrained(hf)
    iv = pv.IntervenableModel({"layer": 6, "component": "block_output"}, model)
    repeats = 5 if args.quick else 15
    print("| shape | transformers (ms) | interchange L6 | given activations |")
    print("|---|---|---|---|")
    for batch, pos in ((1, 16), (8, 128)):
        base = {"input_ids": torch.randint(0, 50257, (batch, pos))}
        source = {"input_ids": torch.randint(0, 50257, (batch, pos))}
        acts = {iv.sorted_keys[0]: torch.randn(batch, 1, 768)}
        runs = variants(hf, iv, base, source, acts, pos // 2)
        times: dict[str, list[float]] = {k: [] for k in runs}
        with torch.no_grad():
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(repeats):
                for k, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {batch} x {pos} | {med['hf'] * 1e3:.1f} | {med['interchange'] / med['hf']:.2f}x | "
              f"{med['given'] / med['hf']:.2f}x |")


if __name__ == "__main__":
    main()
