"""The `hookvene` command.

    hookvene ioi   [--model ioi-gpt2] [--out out/]        IOI circuit analysis (the README's main job)
    hookvene induction [--model induction-gpt2] [--contrast ioi-gpt2]   induction heads: scores, composition,
                                                           ablation, path patching
    hookvene trace --prompt ... --subject ... --target ...  causal tracing heatmap
    hookvene patch --clean ... --corrupted ... --answer ... --wrong ...   activation patching heatmap
    hookvene info  MODEL                                   components, hooks and sizes

Under `torchrun --nproc_per_node N -m hookvene ...` the sweeps of `ioi`, `trace` and `patch` split their cells
across the N processes (see `hookvene.distributed`); rank 0 prints and writes the figures.

`--model` takes a bundled model name (`hookvene.zoo_models()`), a local HF checkpoint directory, or a hub name
(`gpt2`, needs the network). Every command prints a short table and writes its figure under `--out`.

Exit status: 0 on success, 2 for a usage error (argparse's message), 1 for an error while running; both kinds of
message start with `hookvene <command>: error:`.
"""

import argparse
import importlib.metadata
import os
import sys
import time
import warnings
from typing import Any

import torch

from hookvene.components import table_for
from hookvene.distributed import init_from_env, is_main
from hookvene.experiments.causal_tracing import KINDS as TRACE_KINDS
from hookvene.experiments.causal_tracing import causal_trace
from hookvene.experiments.induction import induction_analysis
from hookvene.experiments.ioi_analysis import ioi_analysis
from hookvene.experiments.metrics import answer_token, logit_diff
from hookvene.experiments.patching import ALL_KINDS, activation_patch
from hookvene.loading import from_pretrained, load_tokenizer, resolve_path

DEFAULT_MODEL = "ioi-gpt2"
# Below this many parameters a forward pass is too small to split across threads: one thread is fastest, and an
# OpenMP pool larger than the free cores of a busy machine makes every step several times slower.
SMALL_MODEL = 20_000_000


class CLIError(Exception):
    """A problem with what the command was asked to do: `hookvene <command>: error: ...`, exit status 1."""


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    path = resolve_path(args.model)
    tokenizer = load_tokenizer(resolve_path(args.tokenizer) if args.tokenizer else path)
    if tokenizer is None:
        where = repr(args.tokenizer) if args.tokenizer else f"{args.model!r} (next to its weights)"
        raise CLIError(f"no tokenizer files in {where}: pass --tokenizer with a directory holding the tokenizer's "
                       f"files (tokenizer.json, ...) or a hub name, or save the tokenizer next to the weights")
    model = from_pretrained(path, lm_head=True)
    model.tokenizer = tokenizer  # the sweeps warn about unknown words through it
    set_threads(args, model)
    return model, tokenizer


def set_threads(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """`--threads`, or by default 1 for a small model (SMALL_MODEL) and torch's choice for a larger one."""
    if args.threads is None:
        small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL
        args.threads = 1 if small else torch.get_num_threads()
    torch.set_num_threads(args.threads)


def _prompt_title(prompt: str) -> str:
    return repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")


def _positions(tokenizer: Any, prompt: str, fragment: str) -> list[int]:
    """Token positions covering the first occurrence of `fragment` in `prompt`."""
    start = prompt.find(fragment)
    if start < 0:
        raise CLIError(f"subject {fragment!r} does not occur in the prompt {prompt!r}")
    enc = tokenizer(prompt, return_offsets_mapping=True)
    end = start + len(fragment)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]


def cmd_ioi(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    model, tokenizer = _load(args)
    torch.manual_seed(args.seed)
    report = ioi_analysis(model, tokenizer, n=args.n, seed=args.seed, out_dir=args.out if is_main() else None,
                          top_k=args.top_k)
    if not is_main():  # every rank holds the whole result; one prints it
        return
    print(report.summary())
    print(f"done in {time.perf_counter() - t0:.1f}s ({args.threads} thread{'s' * (args.threads > 1)})")


def cmd_induction(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    for name in [args.model] + ([args.contrast] if args.contrast else []):
        # TransformerLens's weight processing: the QK / OV views then include the LayerNorm scales (the other
        # numbers do not change: the processed model computes the same next-token distributions).
        model = from_pretrained(resolve_path(name), lm_head=True, fold_ln=True, center_writing_weights=True)
        tokenizer = load_tokenizer(resolve_path(args.tokenizer)) if args.tokenizer else model.tokenizer
        if tokenizer is None:
            raise CLIError(f"{name!r} has no tokenizer files next to its weights; save the tokenizer there too")
        vocab = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        report = induction_analysis(model, vocab, bos, n=args.n, half=args.half, seed=args.seed, out_dir=args.out,
                                    model_name=os.path.basename(os.path.normpath(name)))
        print(report.summary() + "\n")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def cmd_trace(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    subject = _positions(tokenizer, args.prompt, args.subject)
    result = causal_trace(model, inputs["input_ids"], subject, answer_token(tokenizer, args.target), kind=args.kind,
                          n_samples=args.samples, seed=args.seed, progress=True)
    if not is_main():  # every rank holds the whole result; one writes it
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"trace_{args.kind}.png")
    result.plot(path, title=f"P({args.target!r}) after {_prompt_title(args.prompt)}: subject {args.subject!r} "
                            f"noised, {args.kind} restored at one (layer, position); clean {result.clean:.3f}, "
                            f"noised {result.corrupted:.3f}")
    print(result.table())
    print(f"figure: {path}")


def cmd_patch(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args)
    clean = tokenizer(args.clean, return_tensors="pt")["input_ids"]
    corrupted = tokenizer(args.corrupted, return_tensors="pt")["input_ids"]
    metric = logit_diff(answer_token(tokenizer, args.answer), answer_token(tokenizer, args.wrong))
    result = activation_patch(model, clean, corrupted, metric, kind=args.kind, progress=True)
    if not is_main():  # every rank holds the whole result; one writes it
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"patch_{args.kind}.png")
    result.plot(path, title=f"logit({args.answer!r}) - logit({args.wrong!r}) after {_prompt_title(args.clean)}, "
                            f"{args.kind} patched into {_prompt_title(args.corrupted)}")
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


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help line ends with its default, except required options and those whose help says what
    happens without them (default None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser, with the same help layout as the main one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)


def version() -> str:
    try:
        return importlib.metadata.version("hookvene")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def positive_int(text: str) -> int:
    """argparse type: a count that must be at least 1 (argparse turns the error into usage + exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `hookvene` command's argument parser."""
    p = argparse.ArgumentParser(prog="hookvene", description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    p.add_argument("--version", action="version", version=f"hookvene {version()}")
    p.add_argument("--threads", type=positive_int, default=None,
                   help=f"torch CPU threads; by default 1 for models under {SMALL_MODEL // 1_000_000}M parameters "
                        f"(faster for them, and robust on a busy machine) and torch's choice for larger ones")
    sub = p.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)

    def common(sp: argparse.ArgumentParser, seeds: str | None, model: str = DEFAULT_MODEL) -> None:
        sp.add_argument("--model", default=model, help=f"bundled name, local checkpoint dir, or hub name (default: "
                                                       f"{model})")
        sp.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name, for a model directory "
                        "without tokenizer files (default: the model's own)")
        sp.add_argument("--out", default="out", help="folder for figures and results")
        if seeds:  # only where something is drawn at random
            sp.add_argument("--seed", type=int, default=0, help=f"seed of the {seeds}")

    sp = sub.add_parser("ioi", help="IOI circuit analysis (logit diff, head patching, attention of top heads)")
    common(sp, "prompts")
    sp.add_argument("--n", type=positive_int, default=64, help="number of IOI prompts")
    sp.add_argument("--top-k", type=positive_int, default=5, help="heads to list, largest |effect| first")
    sp.set_defaults(fn=cmd_ioi)

    sp = sub.add_parser("induction", help="induction heads: attention scores, loss on repeated tokens, K-composition, "
                        "ablation and path patching (and the same on a contrast model)")
    common(sp, "random sequences", model="induction-gpt2")
    sp.add_argument("--contrast", default="ioi-gpt2", help="a second model to analyse the same way (default: "
                    "ioi-gpt2, which has no induction circuit; '' for none)")
    sp.add_argument("--n", type=positive_int, default=200, help="number of repeated random sequences")
    sp.add_argument("--half", type=positive_int, default=None,
                    help="length of the repeated half (default 20, less if the model has fewer positions)")
    sp.set_defaults(fn=cmd_induction)

    sp = sub.add_parser("trace", help="ROME causal tracing over layers x positions")
    common(sp, "noise draws")
    sp.add_argument("--prompt", required=True, help="the clean prompt")
    sp.add_argument("--subject", required=True, help="substring of the prompt whose tokens get noise")
    sp.add_argument("--target", required=True, help="answer token whose probability is traced, with its leading "
                    "space (' Mary')")
    sp.add_argument("--kind", choices=list(TRACE_KINDS), default="resid_post", help="the state restored")
    sp.add_argument("--samples", type=positive_int, default=10, help="noise draws averaged per cell")
    sp.set_defaults(fn=cmd_trace)

    sp = sub.add_parser("patch", help="activation patching sweep (clean into corrupted)")
    common(sp, None)
    sp.add_argument("--clean", required=True, help="the prompt whose activations are patched in")
    sp.add_argument("--corrupted", required=True, help="the prompt patched into (same number of tokens)")
    sp.add_argument("--answer", required=True, help="the clean answer token (leading space)")
    sp.add_argument("--wrong", required=True, help="the corrupted answer token (leading space)")
    sp.add_argument("--kind", choices=list(ALL_KINDS), default="heads", help="what one cell patches")
    sp.set_defaults(fn=cmd_patch)

    sp = sub.add_parser("info", help="components, hook points and sizes of a model")
    sp.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="bundled name, local checkpoint dir, or hub name")
    sp.set_defaults(fn=cmd_info)

    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = init_from_env()  # started by torchrun: join the other ranks

    def show_warning(message: Any, category: type, *rest: Any, **kwargs: Any) -> None:
        print(f"hookvene {args.command}: warning: {message}", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            args.fn(args)
    except BrokenPipeError:  # `hookvene info | head`
        sys.stderr.close()
    except (CLIError, ValueError, OSError) as e:  # usage errors never get here: argparse exits 2 itself
        print(f"hookvene {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
