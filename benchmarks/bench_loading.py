"""Peak extra memory while loading a checkpoint: hookvene's `from_pretrained` against `transformers`', in one run.

    python benchmarks/bench_loading.py             # GPT-2-medium shape (24 layers, d_model 1024, 355M parameters)
    python benchmarks/bench_loading.py --quick     # a 4-layer, 256-wide GPT-2: a smoke test

One random-weight checkpoint is written three ways into a temporary folder: fp32 in one `model.safetensors`, fp32
in 8 shards (`save_pretrained(max_shard_size=...)`, with its index), and bf16 in one file. Each load runs in a fresh
Python process that has already imported torch, transformers and hookvene; a thread samples the process's
resident memory (`VmRSS` in /proc/self/status: heap and mapped checkpoint pages alike) every 2 ms, and the peak
minus the level before the load is the "peak extra", sampled until every weight has been read once (a tensor
that maps the file lazily is resident only then). `transformers` loads with `dtype="auto"` (the stored dtype,
as hookvene does by default).
The weights' size is the loaded parameters' bytes (tied weights once). Rows of one checkpoint alternate which
library loads first. Before a figure is printed, hookvene's weights are checked equal to the checkpoint's (and of
the checkpoint's dtype).

Targets: hookvene's peak extra <= 1.3x transformers' on the same checkpoint; 8 shards like one file; bf16 stays
bf16 (its peak extra about the bf16 weights' size, not the fp32 one).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

TARGET = 1.3


def rss() -> int:
    """Resident memory of this process: heap and mapped file pages alike (safetensors may hand out tensors that
    are views of the mapped checkpoint; those pages count as the weights' memory too)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def measure(lib: str, path: str) -> None:
    """In a fresh process: load `path` with `lib`, print {"peak_extra", "weights", "dtype", "seconds"} as JSON."""
    import torch
    import transformers

    import hookvene

    torch.set_num_threads(1)
    base = rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if lib == "transformers":
        model = transformers.GPT2LMHeadModel.from_pretrained(path, dtype="auto")  # the stored dtype, as hookvene
    else:
        model = hookvene.from_pretrained(path)
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # read every weight once: pages of a mapped file count once they are resident
        for p in model.parameters():
            p.sum()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss())
    params = {p.data_ptr(): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    if lib == "hookvene":  # the loaded weights are the checkpoint's, bit for bit
        from safetensors import safe_open

        for name in (f for f in os.listdir(path) if f.endswith(".safetensors")):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                if "transformer.wte.weight" in f.keys():
                    wte = f.get_tensor("transformer.wte.weight")
        assert torch.equal(model.embed.weight, wte), "hookvene's embedding differs from the checkpoint's"
    print(json.dumps({"peak_extra": peak[0] - base, "weights": weights, "dtype": ",".join(dtypes),
                      "seconds": seconds}))


def run_measure(lib: str, path: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--measure", lib, path], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        raise SystemExit(f"loading {path} with {lib} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def eight_shards(hf, size: int) -> str:
    """A max_shard_size that splits this model into 8 files (tensors are not split, so try a few sizes)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = hf.state_dict()
    for kb in range(size // 8 // 1000, size // 5 // 1000, max(1, size // 400 // 1000)):
        if len(split_torch_state_dict_into_shards(state, max_shard_size=f"{kb}KB").filename_to_tensors) == 8:
            return f"{kb}KB"
    return f"{size // 8 // 1000}KB"


def write_checkpoints(tmp: str, quick: bool) -> dict[str, str]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    shape = dict(n_layer=4, n_embd=256, n_head=4) if quick else dict(n_layer=24, n_embd=1024, n_head=16)
    hf = GPT2LMHeadModel(GPT2Config(**shape, vocab_size=50257, n_positions=1024))
    size = sum(p.numel() * 4 for p in {p.data_ptr(): p for p in hf.parameters()}.values())
    paths = {"fp32, one file": os.path.join(tmp, "one"), "fp32, 8 shards": os.path.join(tmp, "shards"),
             "bf16, one file": os.path.join(tmp, "bf16")}
    hf.save_pretrained(paths["fp32, one file"], max_shard_size="100GB")
    hf.save_pretrained(paths["fp32, 8 shards"], max_shard_size=eight_shards(hf, size))
    hf.to(torch.bfloat16).save_pretrained(paths["bf16, one file"], max_shard_size="100GB")
    n = len([f for f in os.listdir(paths["fp32, 8 shards"]) if f.endswith(".safetensors")])
    paths[f"fp32, {n} shards"] = paths.pop("fp32, 8 shards")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(*args.measure)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_checkpoints(tmp, args.quick)
        rows = []
        for i, (name, path) in enumerate(paths.items()):
            libs = ("transformers", "hookvene") if i % 2 == 0 else ("hookvene", "transformers")
            got = {lib: run_measure(lib, path) for lib in libs}
            rows.append((name, got))
    gb = 2**30
    shape = "4 layers x 256 (--quick)" if args.quick else "GPT-2-medium shape (24 layers x 1024, 355M parameters)"
    print(f"checkpoint load, {shape}; peak extra = peak resident memory during the load minus before it")
    print()
    print("| checkpoint | weights GiB | transformers peak extra | hookvene peak extra | hookvene / transformers | "
          "hookvene dtype | target |")
    print("|---|---:|---:|---:|---:|---|---|")
    hv_peaks = {}
    for name, got in rows:
        t, h = got["transformers"], got["hookvene"]
        ratio = h["peak_extra"] / t["peak_extra"]
        hv_peaks[name] = h["peak_extra"] / h["weights"]
        ok = "ok" if ratio <= TARGET and ("bf16" not in name or h["dtype"] == "bfloat16") else "MISSED"
        print(f"| {name} | {h['weights'] / gb:.3f} | {t['peak_extra'] / gb:.3f} GiB "
              f"({t['peak_extra'] / t['weights']:.2f}x weights) | {h['peak_extra'] / gb:.3f} GiB "
              f"({h['peak_extra'] / h['weights']:.2f}x weights) | {ratio:.2f}x | {h['dtype']} | <= {TARGET}x {ok} |")
    one, sharded = (v for k, v in hv_peaks.items() if k.startswith("fp32"))
    print(f"\nhookvene, sharded / one file: {sharded / one:.2f}x the peak extra")


if __name__ == "__main__":
    main()
