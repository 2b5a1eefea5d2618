"""What splicing a sparse autoencoder costs: a forward with one SAE spliced in against the plain forward plus the
SAE's own computation, on random GPT-2-small-shaped weights (nothing is downloaded).

    python benchmarks/bench_sae.py                 # 7 rounds, batch 8 x 128 tokens, d_sae = 16 x d_model
    python benchmarks/bench_sae.py --quick         # 3 rounds: a smoke test
    python benchmarks/bench_sae.py --threads 1 --shape 4x64 --layers 4

Each round times every variant once, in a rotating order; the table reports medians over rounds and, per
variant, the median over rounds of time / (plain forward + SAE alone) in that round. Target: <= 1.10 for the
spliced forwards (issue 17). See benchmarks/README.md.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

HOOK = "blocks.{layer}.hook_resid_pre"
TARGET = 1.10


def build(layers: int, d_model: int, expansion: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    import hookvene as pv

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d_model, n_head=d_model // 64, vocab_size=50257,
                                    n_positions=1024)).eval()
    model = pv.from_pretrained(hf)
    hook = HOOK.format(layer=layers // 2)
    sae = pv.SAE(pv.SAEConfig(d_in=d_model, d_sae=expansion * d_model, hook_name=hook))
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # a plausible sparsity (about a quarter of the features fire): timing does not care
    return model, sae, hook


def variants(model, sae, hook: str, resid: torch.Tensor) -> dict[str, Callable[[torch.Tensor], object]]:
    site = f"{hook}.hook_sae_acts_post"
    return {
        "plain forward": lambda ids: model(ids).logits,
        "SAE alone": lambda ids: sae(resid),
        "spliced (reconstruction)": lambda ids: model.run_with_saes(ids, saes=[sae]).logits,
        "spliced (+ error term)": lambda ids: model.run_with_saes(ids, saes=[sae], use_error_term=True).logits,
        "spliced, features cached": lambda ids: model.run_with_cache_with_saes(ids, saes=[sae], use_error_term=True,
                                                                               names_filter=site)[1][site],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--shape", default="8x128", help="batch x tokens")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--expansion", type=int, default=16, help="d_sae / d_model")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    b, n = map(int, args.shape.split("x"))
    model, sae, hook = build(args.layers, args.d_model, args.expansion)
    ids = torch.randint(0, 50257, (b, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=hook)
        resid = cache[hook]
        plain = model(ids).logits
        same = model.run_with_saes(ids, saes=[sae], use_error_term=True).logits
        assert (same - plain).abs().max() < 1e-3, "the error term must keep the forward"
        assert not model.acts_to_saes
    fns = variants(model, sae, hook, resid)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for r in range(args.warmup + args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                t = time.perf_counter()
                fns[k](ids)
                if r >= args.warmup:
                    times[k].append(time.perf_counter() - t)
    budget = [a + s for a, s in zip(times["plain forward"], times["SAE alone"])]
    print(f"GPT-2 shape: {args.layers} layers, d_model {args.d_model}; SAE at {hook}, d_sae {sae.cfg.d_sae}; "
          f"input {b} x {n}; {torch.get_num_threads()} threads; {args.rounds} rounds\n")
    print("| variant | median ms | min ms | ratio to plain + SAE alone |")
    print("|---|---|---|---|")
    for k in names:
        ratio = statistics.median(t / u for t, u in zip(times[k], budget))
        mark = "" if k.startswith(("plain", "SAE")) else (" ok" if ratio <= TARGET else f" (target {TARGET})")
        print(f"| {k} | {statistics.median(times[k]) * 1e3:.1f} | {min(times[k]) * 1e3:.1f} | {ratio:.3f}{mark} |")


if __name__ == "__main__":
    main()
