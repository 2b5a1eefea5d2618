"""Train the bundled teaching model ``hookvene/zoo/ioi-gpt2``: a 4-layer GPT-2 that solves IOI.

Usage (from the repository root; about 3 minutes, on one CPU thread by default)::

    python scripts/train_ioi_model.py

The model is a ``transformers.GPT2LMHeadModel`` with a word-level tokenizer over the IOI vocabulary.  It is
trained with the ordinary next-token loss on IOI sentences ("<bos> prompt IO.") built from the *training*
templates and name pairs only (see ``hookvene.experiments.ioi``), then evaluated on prompts whose template
and name pair were both held out.  Names are random in every sentence, so the answer can only be produced by
attending back to the names in the context: the task needs attention, which is what makes the model a
useful subject for head-patching analyses.

Everything is seeded and runs on the CPU, so the same command reproduces the checkpoint (bit for bit on the
same torch build and thread count).  Results go to ``<out>/training_report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# Import the checkout's own hookvene even when the package is not installed (the script lives in scripts/).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hookvene.experiments.ioi import (  # noqa: E402
    BASE_TEMPLATES,
    CORRUPTIONS,
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
    IOIDataset,
    corrupt,
    logit_diff,
    make_ioi_dataset,
    tokenize_ioi,
)

BOS = "<|endoftext|>"  # GPT-2 convention: one token serves as bos and eos
PAD, UNK = "<pad>", "<unk>"
EVAL_SEED = 12345  # seed of the evaluation sets; recorded in the report (the zoo test samples with seed + 1)


def build_tokenizer(n_positions: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose tokens follow GPT-2's byte-level spelling ("ĠMary" for " Mary").

    GPT-2's own ByteLevel pre-tokenizer splits words from punctuation and attaches the preceding space to a
    word as "Ġ"; a WordLevel model then maps each such piece to one id.  So ``" " + name`` is one token, as
    in GPT-2, and ``hookvene.experiments.ioi.name_token`` works unchanged.  A BOS token is prepended by the
    post-processor, so ``tokenizer(text)`` gives exactly what the model was trained on.
    """
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces: set[str] = set()
    for order in ("ABBA", "BABA"):
        for template in TEMPLATES[order]:
            # "X" stands in for every slot; it is not a vocabulary word, so its pieces are dropped below.
            text = re.sub(r"\[(A|B|PLACE|OBJECT)\]", "X", template)
            pieces.update(p for p, _ in pre.pre_tokenize_str(text) if p not in ("X", "ĠX"))
    pieces.update("Ġ" + w for w in (*NAMES, *PLACES, *OBJECTS))
    vocab = {tok: i for i, tok in enumerate([BOS, PAD, UNK, *sorted(pieces)])}

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=n_positions,
        padding_side="right",
    )


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, dataset: IOIDataset) -> dict[str, float]:
    """Accuracy (IO logit > S logit), top-1 accuracy and mean logit difference on prompts."""
    was_training = model.training
    model.eval()
    batch = tokenize_ioi(dataset, tokenizer)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    diff = logit_diff(logits, batch, per_example=True)
    final = logits[torch.arange(len(dataset)), batch["end_pos"]]
    model.train(was_training)
    return {
        "n": len(dataset),
        "accuracy": (diff > 0).float().mean().item(),
        "top1_accuracy": (final.argmax(-1) == batch["io_ids"]).float().mean().item(),
        "logit_diff": diff.mean().item(),
        "logit_diff_std": diff.std().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "hookvene" / "zoo" / "ioi-gpt2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 1 keeps the result independent of the machine"
    )
    parser.add_argument("--eval-n", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=200)
    args = parser.parse_args()

    t0 = time.perf_counter()
    # Two warnings are expected and harmless here: no attention mask during training (see the loop) and
    # GPT-2's config carrying loss_type=None.  Errors still show.
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    n_positions = 32
    tokenizer = build_tokenizer(n_positions)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=512,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, {n_params:,} parameters, {len(BASE_TEMPLATES)} base templates")

    # One fresh sentence per (step, row): training never repeats an example, so the model cannot get by on
    # memorising (name pair, template) combinations.
    n_train = args.steps * args.batch_size
    train = tokenizer(
        make_ioi_dataset(n_train, seed=args.seed, templates="train", names="train").texts(),
        padding=True,
        return_tensors="pt",
    )
    if train["input_ids"].shape[1] > n_positions:
        raise RuntimeError(f"sentences of {train['input_ids'].shape[1]} tokens exceed n_positions={n_positions}")
    if (train["input_ids"] == tokenizer.unk_token_id).any():
        raise RuntimeError("a training sentence contains a word outside the vocabulary")
    labels = train["input_ids"].masked_fill(train["attention_mask"] == 0, -100)

    heldout = make_ioi_dataset(args.eval_n, seed=EVAL_SEED, templates="heldout", names="heldout")
    train_eval = make_ioi_dataset(args.eval_n, seed=EVAL_SEED, templates="train", names="train")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    for step in range(args.steps):
        rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
        # No attention mask needed (and building one costs time each step): padding is on the right, so
        # causal attention never lets a real token see a pad, and pads carry label -100.
        out = model(input_ids=train["input_ids"][rows], labels=labels[rows])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            m = evaluate(model, tokenizer, heldout[:500])
            print(
                f"step {step + 1:5d}  loss {out.loss.item():.3f}  held-out acc {m['accuracy']:.3f}  "
                f"logit diff {m['logit_diff']:.2f}  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    train_time = time.perf_counter() - t0

    model.eval()
    report_eval = {
        "heldout": evaluate(model, tokenizer, heldout),
        "train_distribution": evaluate(model, tokenizer, train_eval),
    }
    # Corruptions of the held-out set, measured with the clean IO/S names: ABC should bring the logit
    # difference near 0, swapping IO and S should flip its sign.
    for kind in CORRUPTIONS:
        report_eval[f"heldout_{kind}"] = evaluate(model, tokenizer, corrupt(heldout, kind))

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # transformers 5 writes its own class name ("TokenizersBackend"); the generic name also loads in 4.x.
    tok_config_path = args.out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")

    report = {
        "command": "python scripts/train_ioi_model.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "threads": args.threads,
        "train_examples": n_train,
        "train_wall_time_s": round(train_time, 1),  # set-up and training, before the final evaluation
        "total_wall_time_s": round(time.perf_counter() - t0, 1),
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "d_model": config.n_embd,
        "n_positions": config.n_positions,
        "eval_seed": EVAL_SEED,
        # accuracy: IO logit > S logit at the last prompt token; top1_accuracy: IO is the argmax there;
        # logit_diff: mean IO - S logit.  Corrupted sets are scored with the clean IO and S names.
        "eval": report_eval,
        "heldout_accuracy": report_eval["heldout"]["accuracy"],
        "heldout_logit_diff": report_eval["heldout"]["logit_diff"],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    h = report_eval["heldout"]
    print(
        f"held-out (unseen templates and name pairs, n={h['n']}): accuracy {h['accuracy']:.4f}, "
        f"top-1 {h['top1_accuracy']:.4f}, mean logit diff {h['logit_diff']:.2f}; "
        f"ABC {report_eval['heldout_abc']['logit_diff']:.2f}, "
        f"swap_io_s {report_eval['heldout_swap_io_s']['logit_diff']:.2f}; trained in {train_time:.0f}s"
    )
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
