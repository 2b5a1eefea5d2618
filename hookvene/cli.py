"""The `hookvene` command.

    hookvene ioi   [--model ioi-gpt2] [--out out/]        IOI circuit analysis (the README's main job)
    hookvene induction [--model induction-gpt2] [--contrast ioi-gpt2]   induction heads, found and explained
    hookvene trace --prompt ... --subject ... --target ...  causal tracing heatmap
    hookvene patch --clean ... --corrupted ... --answer ... --wrong ...   activation patching heatmap
    hookvene info  MODEL                                   components, hooks and sizes

Under `torchrun --nproc_per_node N -m hookvene ...` the sweeps of `ioi`, `trace` and `patch` split their cells
across the N processes (see `hookvene.distributed`); rank 0 prints and writes the figures.

`--model` takes a bundled model name (`hookvene.zoo_models()`), a local HF checkpoint directory, or a hub name
(`gpt2`, needs the network). Every command prints a short table and writes its figure under `--out`.
"""

import argparse
import os
import sys
import time
from typing import Any

import torch

from hookvene.components import table_for
from hookvene.distributed import init_from_env, is_main
from hookvene.experiments.causal_tracing import KINDS as TRACE_KINDS
from hookvene.experiments.causal_tracing import causal_trace
from hookvene.experiments.induction import induction_analysis
from hookvene.experiments.ioi_analysis import ioi_analysis
from hookvene.experiments.metrics import logit_diff
from hookvene.experiments.patching import KINDS, activation_patch
from hookvene.loading import from_pretrained, load_tokenizer, resolve_path

DEFAULT_MODEL = "ioi-gpt2"


def _load(name: str) -> tuple[Any, Any]:
    path = resolve_path(name)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise SystemExit(f"{name!r} has no tokenizer files next to its weights; save the tokenizer there too")
    return from_pretrained(path, lm_head=True), tokenizer


def _positions(tokenizer: Any, prompt: str, fragment: str) -> list[int]:
    """Token positions covering the first occurrence of `fragment` in `prompt`."""
    start = prompt.find(fragment)
    if start < 0:
        raise SystemExit(f"subject {fragment!r} does not occur in the prompt {prompt!r}")
    enc = tokenizer(prompt, return_offsets_mapping=True)
    end = start + len(fragment)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]


def _single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise SystemExit(f"{text!r} is not in this tokenizer's vocabulary (it encodes to the unknown token)")
    if len(ids) != 1:
        raise SystemExit(f"{text!r} is {len(ids)} tokens for this tokenizer; pass a single-token answer "
                         f"(with its leading space, e.g. ' Paris')")
    return ids[0]


def cmd_ioi(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    model, tokenizer = _load(args.model)
    torch.manual_seed(args.seed)
    report = ioi_analysis(model, tokenizer, n=args.n, seed=args.seed, out_dir=args.out if is_main() else None,
                          top_k=args.top_k)
    if not is_main():  # every rank holds the whole result; one prints it
        return
    print(report.summary())
    print(f"done in {time.perf_counter() - t0:.1f}s")


def cmd_induction(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    for name in [args.model] + ([args.contrast] if args.contrast else []):
        # TransformerLens's weight processing: the QK / OV views then include the LayerNorm scales (the other
        # numbers do not change: the processed model computes the same next-token distributions).
        model = from_pretrained(resolve_path(name), lm_head=True, fold_ln=True, center_writing_weights=True)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise SystemExit(f"{name!r} has no tokenizer files next to its weights; save the tokenizer there too")
        vocab = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        report = induction_analysis(model, vocab, bos, n=args.n, half=args.half, seed=args.seed, out_dir=args.out,
                                    model_name=os.path.basename(os.path.normpath(name)))
        print(report.summary() + "\n")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def cmd_trace(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args.model)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    subject = _positions(tokenizer, args.prompt, args.subject)
    result = causal_trace(model, inputs["input_ids"], subject, _single_token(tokenizer, args.target), kind=args.kind,
                          n_samples=args.samples, seed=args.seed, progress=True)
    tokens = [tokenizer.decode(t) for t in inputs["input_ids"][0]]
    result.cols = [f"{t.strip()}*" if i in subject else t.strip() for i, t in enumerate(tokens)]
    if not is_main():  # every rank holds the whole result; one writes it
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"trace_{args.kind}.png")
    result.plot(path, title=f"P({args.target.strip()!r}) with {args.kind} restored (* = corrupted subject)",
                center=result.corrupted, cmap="Purples")
    print(result.table())
    print(f"figure: {path}")


def cmd_patch(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args.model)
    clean = tokenizer(args.clean, return_tensors="pt")["input_ids"]
    corrupted = tokenizer(args.corrupted, return_tensors="pt")["input_ids"]
    metric = logit_diff(_single_token(tokenizer, args.answer), _single_token(tokenizer, args.wrong))
    result = activation_patch(model, clean, corrupted, metric, kind=args.kind, progress=True)
    if result.col_label == "position":
        result.cols = [f"{i}:{tokenizer.decode(t).strip()}" for i, t in enumerate(clean[0])]
    if not is_main():  # every rank holds the whole result; one writes it
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"patch_{args.kind}.png")
    result.plot(path)
    print(result.table())
    print(f"figure: {path}")


def cmd_info(args: argparse.Namespace) -> None:
    model = from_pretrained(resolve_path(args.model))
    cfg = model.cfg
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"{type(model).__name__}  {n_params / 1e6:.2f}M parameters  {len(model.hook_dict)} hook points")
    print("config: " + ", ".join(f"{k}={v}" for k, v in vars(cfg).items()))
    ids = torch.zeros(1, 4, dtype=torch.long)
    kwargs = {"decoder_input_ids": ids} if model.is_encoder_decoder else {}
    _, cache = model.run_with_cache(ids, **kwargs)
    print("\nhook points (layer 0 and globals), shape for batch 1 x 4 tokens:")
    for name, t in cache.items():
        if ".0." in name or "blocks" not in name:
            print(f"  {name:<45} {tuple(t.shape)}")
    print("\npyvene components (layer 0) -> hook:")
    for comp, entry in (table_for(model) or {}).items():
        hook = entry.at(0, cfg).hook
        print(f"  {comp:<36} {hook}")


def positive_int(text: str) -> int:
    """argparse type: a count that must be at least 1 (argparse turns the error into usage + exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hookvene", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (1 is fastest for small models on "
                   "a busy machine; default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, local checkpoint dir, or hub name")
        sp.add_argument("--out", default="out", help="folder for figures and results")
        sp.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("ioi", help="IOI circuit analysis (logit diff, head patching, attention of top heads)")
    common(sp)
    sp.add_argument("--n", type=positive_int, default=64, help="number of IOI prompts")
    sp.add_argument("--top-k", type=positive_int, default=5)
    sp.set_defaults(fn=cmd_ioi)

    sp = sub.add_parser("induction", help="induction heads: attention scores, loss on repeated tokens, K-composition, "
                        "ablation and path patching (and the same on a contrast model)")
    common(sp)
    sp.set_defaults(model="induction-gpt2")
    sp.add_argument("--contrast", default="ioi-gpt2", help="a second model to analyse the same way ('' for none)")
    sp.add_argument("--n", type=positive_int, default=200, help="number of repeated random sequences")
    sp.add_argument("--half", type=positive_int, default=None,
                    help="length of the repeated half (default 20, less if the model has fewer positions)")
    sp.set_defaults(fn=cmd_induction)

    sp = sub.add_parser("trace", help="ROME causal tracing over layers x positions")
    common(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--subject", required=True, help="substring of the prompt to corrupt")
    sp.add_argument("--target", required=True, help="answer token, with its leading space")
    sp.add_argument("--kind", choices=list(TRACE_KINDS), default="resid_post")
    sp.add_argument("--samples", type=positive_int, default=10)
    sp.set_defaults(fn=cmd_trace)

    sp = sub.add_parser("patch", help="activation patching sweep (clean into corrupted)")
    common(sp)
    sp.add_argument("--clean", required=True)
    sp.add_argument("--corrupted", required=True)
    sp.add_argument("--answer", required=True, help="the clean answer token (leading space)")
    sp.add_argument("--wrong", required=True, help="the corrupted answer token (leading space)")
    sp.add_argument("--kind", choices=list(KINDS), default="heads")
    sp.set_defaults(fn=cmd_patch)

    sp = sub.add_parser("info", help="components, hook points and sizes of a model")
    sp.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    sp.set_defaults(fn=cmd_info)

    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = init_from_env()  # started by torchrun: join the other ranks
    try:
        args.fn(args)
    except BrokenPipeError:  # `hookvene info | head`
        sys.stderr.close()
    except (ValueError, OSError) as e:
        print(f"hookvene {args.command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
