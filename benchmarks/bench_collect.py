"""`collect_activations` throughput against a `transformers` forward truncated at the same layer, in one run.

    python benchmarks/bench_collect.py --threads 1          # GPT-2 small shape, blocks.5.hook_resid_post, 32 x 128
    python benchmarks/bench_collect.py --quick              # a 4-layer, 256-wide model: a smoke test

Both sides read the same weights (the hookvene model is made from the HF object) and the same 32 prompts of 128
random tokens, 8 per forward. `transformers`: `GPT2Model` with its block list cut after block 6, i.e. exactly the
blocks that produce `blocks.5.hook_resid_post` (plus its final LayerNorm), outputs kept in memory. hookvene:
`collect_activations(model, ids, ["blocks.5.hook_resid_post"], batch_size=8, out=fresh folder)`, which stops each
forward after block 5 by itself and writes the rows to a safetensors shard (the write is timed too). Rounds
alternate which side runs first; the ratio is the median over rounds of (transformers time / hookvene time), i.e.
hookvene's tokens/s relative to transformers'. The rows written are checked equal to `run_with_cache`'s.
"""

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

TARGET = 0.95


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    import hookvene
    from hookvene.collect import collect_activations

    torch.manual_seed(0)
    shape = dict(n_layer=4, n_embd=256, n_head=4) if args.quick else dict(n_layer=12, n_embd=768, n_head=12)
    hf = GPT2LMHeadModel(GPT2Config(**shape, vocab_size=50257, n_positions=1024)).eval()
    model = hookvene.from_pretrained(hf)
    layer = 1 if args.quick else 5
    hook = f"blocks.{layer}.hook_resid_post"
    truncated = hf.transformer
    truncated.h = nn.ModuleList(list(truncated.h)[: layer + 1])  # the blocks up to the hook, nothing after
    ids = torch.randint(0, 50257, (32, 128), generator=torch.Generator().manual_seed(1))
    batch = 8

    def run_hf() -> list[torch.Tensor]:
        with torch.no_grad():
            return [truncated(x).last_hidden_state for x in ids.split(batch)]

    def run_hookvene(folder: str):
        return collect_activations(model, ids, [hook], batch_size=batch, out=folder)

    run_hf()  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        run_hookvene(f"{tmp}/warm")
        times: dict[str, list[float]] = {"transformers": [], "hookvene": []}
        for r in range(args.rounds):
            for side in (("transformers", "hookvene") if r % 2 == 0 else ("hookvene", "transformers")):
                t0 = time.perf_counter()
                result = run_hf() if side == "transformers" else run_hookvene(f"{tmp}/round{r}")
                times[side].append(time.perf_counter() - t0)
        got = next(iter(result))[hook]  # the last hookvene round's rows: the stream of every token, in order
        _, cache = model.run_with_cache(ids[:batch], names_filter=[hook])
        assert got.shape == (ids.numel(), model.cfg.d_model)
        torch.testing.assert_close(got[: batch * ids.shape[1]], cache[hook].reshape(-1, got.shape[-1]))
    ratios = [t / h for t, h in zip(times["transformers"], times["hookvene"])]
    tokens = ids.numel()
    name = "4 layers x 256 (--quick)" if args.quick else "GPT-2 small shape"
    print(f"activation collection at {hook}, {name}, {ids.shape[0]} prompts x {ids.shape[1]} tokens, batch {batch}, "
          f"{args.rounds} rounds")
    print()
    print("| side | median s | tokens/s | throughput ratio (median of rounds) | target |")
    print("|---|---:|---:|---:|---|")
    t, h = statistics.median(times["transformers"]), statistics.median(times["hookvene"])
    print(f"| transformers, truncated after block {layer} | {t:.2f} | {tokens / t:.0f} | 1.00x | |")
    ratio = statistics.median(ratios)
    print(f"| hookvene collect_activations (to disk) | {h:.2f} | {tokens / h:.0f} | {ratio:.2f}x "
          f"({', '.join(f'{x:.2f}' for x in ratios)}) | >= {TARGET}x {'ok' if ratio >= TARGET else 'MISSED'} |")


if __name__ == "__main__":
    main()
