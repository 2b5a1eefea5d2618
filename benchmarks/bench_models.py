"""No-hook forward of GPT-Neo, T5 and the GRU against their references, on the same random weights, one run.

    python benchmarks/bench_models.py [--quick] [--threads N]

Rows (batch x positions):
    GPT-Neo 125M shape (12 layers, 768, local window 256), 4 x 128    vs transformers GPTNeoForCausalLM
    T5-small shape (6 + 6 layers, 512, ReLU FFN), 4 x 64 enc / 32 dec  vs transformers T5ForConditionalGeneration
    GRU (2 layers, hidden 256), 8 x 64 steps                           vs torch.nn.GRU (its fused C++ kernel)

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 4 if args.quick else 12
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds\n")
    print("| model | reference ms | hookvene ms | ratio | target |")
    print("|---|---:|---:|---:|---|", flush=True)
    for make in (gpt_neo, t5, gru):
        name, fns = make()
        with torch.no_grad():
            err = (fns["reference"]() - fns["hookvene"]()).abs().max().item()
        assert err < 1e-3, f"{name}: outputs disagree by {err}"
        times = bench({k: (lambda _ids, f=f: f()) for k, f in fns.items()}, None, rounds, 1)
        ratio = statistics.median(h / r for h, r in zip(times["hookvene"], times["reference"]))
        target = "<= 1.05x" if "GRU" not in name else "reported"
        print(f"| {name} | {statistics.median(times['reference']) * 1e3:.1f} | "
              f"{statistics.median(times['hookvene']) * 1e3:.1f} | {ratio:.2f}x | {target} |", flush=True)


if __name__ == "__main__":
    main()
