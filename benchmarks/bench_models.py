"""No-hook forward of GPT-Neo, T5 and the GRU against their references, on the same random weights, one run; then
the Llama-family and GPT-NeoX models: no-hook forward, full cache and greedy generation.

    python benchmarks/bench_models.py [--quick] [--threads N] [--models neo,t5,gru,llama,pythia]

Rows (batch x positions):
    GPT-Neo 125M shape (12 layers, 768, local window 256), 4 x 128    vs transformers GPTNeoForCausalLM
    T5-small shape (6 + 6 layers, 512, ReLU FFN), 4 x 64 enc / 32 dec  vs transformers T5ForConditionalGeneration
    GRU (2 layers, hidden 256), 8 x 64 steps                           vs torch.nn.GRU (its fused C++ kernel)
    Llama shape (8 layers, 1024, 16 query / 4 KV heads, SwiGLU 2816, vocab 32000)   vs LlamaForCausalLM
    Pythia-160M shape (12 layers, 768, 12 heads, rotary_pct 0.25, vocab 50304)      vs GPTNeoXForCausalLM
For the last two: forward and full cache (`run_with_cache`, every hook) on 2 x 64 tokens; greedy generation of
32 tokens after a 16-token prompt, batch 1, KV cache on both sides, as tokens/s.

The GRU's time loop is Python, visible in hookvene/models/gru.py so that unit `t` interventions are exact; it costs
more than the fused kernel, and the ratio is reported as measured. Timing as in bench_forward.py (rotating order,
medians of per-round ratios).
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_forward import bench  # noqa: E402

import hookvene  # noqa: E402


def gpt_neo():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(num_layers=12, hidden_size=768, num_heads=12, window_size=256, max_position_embeddings=2048,
                       attention_types=[[["global", "local"], 6]])
    hf = GPTNeoForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 128))
    ours = hookvene.from_pretrained(hf)
    return "GPT-Neo 4 x 128", {"reference": lambda: hf(ids).logits, "hookvene": lambda: ours(ids).logits}


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8, vocab_size=32128,
                   feed_forward_proj="relu")
    hf = T5ForConditionalGeneration(cfg).eval()
    enc = torch.randint(0, cfg.vocab_size, (4, 64))
    dec = torch.randint(0, cfg.vocab_size, (4, 32))
    ours = hookvene.from_pretrained(hf)
    return "T5 4 x 64/32", {"reference": lambda: hf(input_ids=enc, decoder_input_ids=dec).logits,
                            "hookvene": lambda: ours(input_ids=enc, decoder_input_ids=dec).logits}


def gru():
    from hookvene.loading.gru import from_torch_gru

    ref = torch.nn.GRU(256, 256, num_layers=2, batch_first=True).eval()
    x = torch.randn(8, 64, 256)
    ours = from_torch_gru(ref)
    return "GRU 8 x 64", {"reference": lambda: ref(x)[0], "hookvene": lambda: ours(inputs_embeds=x).last_hidden_state}


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=8, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4,
                      intermediate_size=2816, vocab_size=32000, max_position_embeddings=2048)
    return "Llama 8 x 1024, GQA 16/4", LlamaForCausalLM(cfg).eval()


def pythia():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                        vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048)
    return "Pythia-160M shape", GPTNeoXForCausalLM(cfg).eval()


def bench_lm(make, rounds: int) -> None:
    """One table row: forward and full-cache ratios, and generation tokens/s ratio, against transformers."""
    name, hf = make()
    ours = hookvene.from_pretrained(hf)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 64), generator=g)
    prompt = torch.randint(0, hf.config.vocab_size, (1, 16), generator=g)
    new = 32
    with torch.no_grad():
        err = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert err < 1e-3, f"{name}: outputs disagree by {err}"
    fns = {"reference": lambda: hf(ids).logits, "hookvene": lambda: ours(ids).logits,
           "full cache": lambda: ours.run_with_cache(ids)}
    times = bench({k: (lambda _ids, f=f: f()) for k, f in fns.items()}, None, rounds, 1)
    fwd = statistics.median(h / r for h, r in zip(times["hookvene"], times["reference"]))
    full = statistics.median(h / r for h, r in zip(times["full cache"], times["reference"]))
    gen = {"reference": lambda: hf.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                            pad_token_id=0),
           "hookvene": lambda: ours.generate(prompt, max_new_tokens=new)}
    # (no equality check here: default-initialised logits are nearly uniform, so greedy picks can flip on rounding;
    # tests/test_llama.py and tests/test_gpt_neox.py check generation on redrawn weights)
    gtimes = bench({k: (lambda _ids, f=f: f()) for k, f in gen.items()}, None, max(rounds // 2, 2), 1)
    tok_ref = new / statistics.median(gtimes["reference"])
    gen_ratio = statistics.median(r / h for h, r in zip(gtimes["hookvene"], gtimes["reference"]))
    print(f"| {name} | {statistics.median(times['reference']) * 1e3:.0f} | {fwd:.2f}x | {full:.2f}x | "
          f"{tok_ref:.1f} | {gen_ratio:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default="neo,t5,gru,llama,pythia", help="comma-separated subset")
    args = ap.parse_args()
    chosen = args.models.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 4 if args.quick else 12
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds\n")
    forward_only = [m for key, m in (("neo", gpt_neo), ("t5", t5), ("gru", gru)) if key in chosen]
    if forward_only:
        print("| model | reference ms | hookvene ms | ratio | target |")
        print("|---|---:|---:|---:|---|", flush=True)
    for make in forward_only:
        name, fns = make()
        with torch.no_grad():
            err = (fns["reference"]() - fns["hookvene"]()).abs().max().item()
        assert err < 1e-3, f"{name}: outputs disagree by {err}"
        times = bench({k: (lambda _ids, f=f: f()) for k, f in fns.items()}, None, rounds, 1)
        ratio = statistics.median(h / r for h, r in zip(times["hookvene"], times["reference"]))
        target = "<= 1.05x" if "GRU" not in name else "reported"
        print(f"| {name} | {statistics.median(times['reference']) * 1e3:.1f} | "
              f"{statistics.median(times['hookvene']) * 1e3:.1f} | {ratio:.2f}x | {target} |", flush=True)

    lms = [m for key, m in (("llama", llama), ("pythia", pythia)) if key in chosen]
    if lms:
        print("\n| model | reference forward ms | forward | full cache | reference tokens/s | generate (tokens/s) |")
        print("|---|---:|---:|---:|---:|---:|", flush=True)
        for make in lms:
            bench_lm(make, rounds)
        print("targets: forward <= 1.05x, full cache <= 1.3x, generate >= 0.9x", flush=True)


if __name__ == "__main__":
    main()
