"""Batched experiment sweeps against the per-cell loops they replace, on GPT-2 small's shape with random weights.

    python benchmarks/bench_experiments.py                # 12 layers x 16 positions, 10 noise samples; 12 x 12 heads
    python benchmarks/bench_experiments.py --quick        # a 4-layer, 256-wide model and 8 positions: a smoke test
    python benchmarks/bench_experiments.py --threads 1    # pin torch's thread count (steadier on a shared machine)

(a) Causal tracing, residual stream, window 1, 10 noise samples, the full layers x positions grid:
    - `causal_trace(...)`: one call, timed whole (its grid plus the clean and corrupted baselines);
    - the seed tutorial's approach (spec 002, Tutorial 2, extended to positions as in ROME): for every (layer, pos)
      cell a new `pv.IntervenableModel` with [NoiseIntervention on block_input of layer 0 at the subject positions,
      VanillaIntervention restoring block_output of `layer` at `pos`], called with base = the prompt repeated
      10 times (one row per noise sample) and sources=[None, the prompt repeated 10 times] (the tutorial passes
      the same inputs as base and source; pyvene needs a source row per base row). This is the row the issue's
      target is for ("a new IntervenableModel and a full source+base forward per cell");
    - "1 source row": the same loop with one source row mapped to the 10 base rows by explicit (source, base)
      unit locations, which hookvene accepts and pyvene does not: a faster loop, reported for comparison.
    A sample of cells is timed and the mean extrapolated to the grid (layers x positions cells, baselines not
    counted: the estimate favours the loop). hookvene's IntervenableModel ends each source run after the layer it
    reads, so both loops are already cheaper than pyvene's full source forward.
(b) The all-heads activation-patching sweep (layers x heads cells, hook_z, one cell = one head at every position) on
    a batch of prompt pairs: `activation_patch(..., kind="heads")`, timed whole, against a loop with one
    `pv.IntervenableModel` forward per cell (one IntervenableModel per layer, built outside the timing; base =
    corrupted, sources = [clean], unit "h"); a sample of cells timed, the mean extrapolated to all cells.

Before a ratio is printed, the two sides are checked to compute the same thing: restoring the last layer at the last
position gives the clean probability back on both sides of (a), and each sampled cell of (b) equals the sweep's.
Timings on a shared machine are indicative; see benchmarks/README.md.
"""

import argparse
import statistics
import time

import torch

TARGETS = {"causal tracing": 10.0, "all-heads patching": 5.0}  # the loop variant below has none: it is reported


def build(quick: bool, seed: int = 0):
    """HF GPT2LMHeadModel with GPT-2 small's shape (or a small one for --quick), random weights, and the hookvene
    model made from it (weights shared)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import hookvene

    torch.manual_seed(seed)
    shape = dict(n_layer=4, n_embd=256, n_head=4) if quick else dict(n_layer=12, n_embd=768, n_head=12)
    hf = GPT2LMHeadModel(GPT2Config(**shape, vocab_size=50257, n_positions=1024)).eval()
    return hookvene.from_pretrained(hf).eval()


class Timer:
    """Wall time and this process's CPU time of a block. With one thread (--threads 1), CPU time is what the
    computation itself cost, whatever other processes do; wall time also counts the waits on a busy machine."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def spread(n_total: int, k: int) -> list[int]:
    """k indices spread evenly over range(n_total) (first and last included)."""
    k = min(k, n_total)
    return sorted({round(i * (n_total - 1) / max(1, k - 1)) for i in range(k)})


# -- (a) causal tracing -------------------------------------------------------------------------------------------

def seed_cell(model, prompt, subject, target, layer, pos, n_samples, noise_level, source_rows) -> float:
    """One cell the seed tutorial's way: a new IntervenableModel, one source + one base forward. The source has
    `source_rows` rows: n_samples (the prompt repeated like the base, as pyvene requires) or 1 (broadcast to the
    base rows through explicit locations, which only hookvene accepts)."""
    import hookvene as pv

    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=0, component="block_input",
                                intervention=pv.NoiseIntervention(noise_level=noise_level)),
        pv.RepresentationConfig(layer=layer, component="block_output", intervention_type=pv.VanillaIntervention),
    ])
    intervenable = pv.IntervenableModel(config, model)
    noise_rows = [list(subject)] * n_samples
    locations = ([noise_rows, [[pos]] * source_rows], [noise_rows, [[pos]] * n_samples])  # (source side, base side)
    _, out = intervenable(base=prompt.repeat(n_samples, 1), sources=[None, prompt.repeat(source_rows, 1)],
                          unit_locations={"sources->base": locations})
    return float(out.logits[:, -1].softmax(-1)[:, target].mean())


def bench_causal_trace(model, n_pos: int, n_samples: int, n_cells: int, batch_size: int) -> dict:
    from hookvene.experiments.causal_tracing import causal_trace, embedding_noise_scale

    n_layers = model.cfg.n_layers
    prompt = torch.randint(0, model.cfg.d_vocab, (1, n_pos), generator=torch.Generator().manual_seed(1))
    subject = [2, 3, 4]
    with torch.no_grad():
        clean_probs = model(prompt).logits[0, -1].softmax(-1)
    target = int(clean_probs.argmax())
    scale = embedding_noise_scale(model)
    cells = [(c // n_pos, c % n_pos) for c in spread(n_layers * n_pos, n_cells)]
    loops = {"causal tracing": n_samples, "causal tracing, 1 source row": 1}  # name -> source rows
    per_cell: dict[str, list[Timer]] = {name: [] for name in loops}
    with torch.no_grad():
        for rows in loops.values():  # warm-up
            seed_cell(model, prompt, subject, target, 0, 0, n_samples, scale, rows)
        for layer, pos in cells:  # the two loops alternate cell by cell, so load bursts hit both alike
            for name, rows in loops.items():
                with Timer() as t:
                    seed_cell(model, prompt, subject, target, layer, pos, n_samples, scale, rows)
                per_cell[name].append(t)
        last = [seed_cell(model, prompt, subject, target, n_layers - 1, n_pos - 1, n_samples, scale, rows)
                for rows in loops.values()]
    with Timer() as sweep:
        res = causal_trace(model, prompt, subject, target, kind="resid_post", n_samples=n_samples, noise_scale=scale,
                           batch_size=batch_size)
    clean = float(clean_probs[target])
    for name, v in (("seed approach", last[0]), ("1 source row", last[1]), ("causal_trace", float(res.values[-1, -1]))):
        assert abs(v - clean) < 1e-4, f"{name}: restoring the last residual stream gave {v}, clean is {clean}"
    grid = f"{n_layers} layers x {n_pos} positions, {n_samples} samples"
    return [summary(name, grid, n_layers * n_pos, per_cell[name], sweep) for name in loops]


# -- (b) all-heads patching ---------------------------------------------------------------------------------------

def bench_heads(model, n_pos: int, n_examples: int, n_cells: int, batch_size: int) -> dict:
    import hookvene as pv
    from hookvene.experiments.metrics import logit_diff
    from hookvene.experiments.patching import activation_patch

    cfg = model.cfg
    gen = torch.Generator().manual_seed(2)
    clean = torch.randint(0, cfg.d_vocab, (n_examples, n_pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, [2, n_pos // 2]] = torch.randint(0, cfg.d_vocab, (n_examples, 2), generator=gen)
    answer, wrong = torch.randint(0, cfg.d_vocab, (2, n_examples), generator=gen)
    metric = logit_diff(answer, wrong)
    ex = torch.arange(n_examples)
    cells = [(c // cfg.n_heads, c % cfg.n_heads) for c in spread(cfg.n_layers * cfg.n_heads, n_cells)]
    per_layer = {layer: pv.IntervenableModel([{"layer": layer, "component": "head_attention_value_output",
                                               "unit": "h"}], model) for layer, _ in cells}
    loop_values, per_cell = {}, []
    with torch.no_grad():
        first = cells[0]
        per_layer[first[0]](base=corrupted, sources=[clean], unit_locations={"sources->base": first[1]})  # warm-up
        for layer, head in cells:
            with Timer() as t:
                _, out = per_layer[layer](base=corrupted, sources=[clean], unit_locations={"sources->base": head})
                loop_values[layer, head] = float(metric(out.logits, ex).mean())
            per_cell.append(t)
    with Timer() as sweep:
        res = activation_patch(model, clean, corrupted, metric, kind="heads", batch_size=batch_size)
    for (layer, head), v in loop_values.items():
        assert abs(float(res.values[layer, head]) - v) < 1e-3, f"cell L{layer}H{head}: sweep and loop disagree"
    n_grid = cfg.n_layers * cfg.n_heads
    return summary("all-heads patching", f"{cfg.n_layers} layers x {cfg.n_heads} heads, {n_examples} prompt pairs "
                   f"of {n_pos} tokens", n_grid, per_cell, sweep)


def summary(name: str, grid: str, n_grid: int, per_cell: list[Timer], sweep: Timer) -> dict:
    """The loop's mean per-cell time extrapolated to the whole grid, next to the sweep's measured time."""
    wall, cpu = statistics.mean(t.wall for t in per_cell), statistics.mean(t.cpu for t in per_cell)
    return dict(name=name, grid=grid, sampled=len(per_cell), loop_cell_s=wall, loop_s=wall * n_grid,
                sweep_s=sweep.wall, loop_cpu_s=cpu * n_grid, sweep_cpu_s=sweep.cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model and short prompts: a smoke test")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--cells", type=int, default=12, help="loop cells timed per experiment (default 12)")
    ap.add_argument("--examples", type=int, default=8, help="prompt pairs in the heads sweep (default 8)")
    ap.add_argument("--samples", type=int, default=10, help="noise samples in causal tracing (default 10)")
    ap.add_argument("--batch-size", type=int, default=128, help="rows per forward pass in the sweeps (default 128)")
    ap.add_argument("--only", choices=["trace", "heads"], default=None, help="run one of the two experiments")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_pos = 8 if args.quick else 16
    cells = min(args.cells, 4) if args.quick else args.cells

    model = build(args.quick)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {model.cfg.n_layers} layers, d_model "
          f"{model.cfg.d_model}, {n_params:.0f}M params, prompts of {n_pos} tokens, sweep batch_size "
          f"{args.batch_size} rows, {cells} loop cells timed per experiment\n", flush=True)
    with torch.no_grad():  # warm-up: allocator and kernels, at the sweep's batch shape
        model(torch.zeros(args.batch_size, n_pos, dtype=torch.long))

    results = []
    if args.only in (None, "trace"):
        results += bench_causal_trace(model, n_pos, args.samples, cells, args.batch_size)
    if args.only in (None, "heads"):
        results.append(bench_heads(model, n_pos, args.examples, cells, args.batch_size))

    print("| experiment | grid | loop: ms / cell (cells timed) | loop, extrapolated: wall s (CPU s) | "
          "sweep: wall s (CPU s) | speed-up: wall (CPU) | target |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in results:
        ratio, cpu_ratio = r["loop_s"] / r["sweep_s"], r["loop_cpu_s"] / r["sweep_cpu_s"]
        target = TARGETS.get(r["name"])
        verdict = f">= {target:g}x {'ok' if ratio >= target else 'MISSED'}" if target else "(none)"
        print(f"| {r['name']} | {r['grid']} | {r['loop_cell_s'] * 1e3:.1f} ({r['sampled']}) | {r['loop_s']:.1f} "
              f"({r['loop_cpu_s']:.1f}) | {r['sweep_s']:.1f} ({r['sweep_cpu_s']:.1f}) | "
              f"{ratio:.2f}x ({cpu_ratio:.2f}x) | {verdict} |")


if __name__ == "__main__":
    main()
