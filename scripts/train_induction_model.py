"""Train the bundled teaching model ``hookvene/zoo/induction-gpt2``: a 2-layer GPT-2 that forms induction heads.

Usage (from the repository root; about two minutes on one CPU thread)::

    python scripts/train_induction_model.py

The model is a ``transformers.GPT2LMHeadModel`` over a vocabulary of 100 syllables ("ba", "be", ... "zu"). It is
trained with the ordinary next-token loss on sequences of random tokens whose second half repeats the first
(``<bos> A A``, A being L distinct random syllables), three rows in four, and on plain random sequences (syllables
drawn independently, so a token may recur without what follows it recurring), one row in four. Nothing in a first
half can be predicted; everything in a repeated half after its first token can, by looking up where the current
token occurred before and copying the token that followed it. That is the induction circuit: a previous-token
head in layer 0 and an induction head in layer 1 that finds its source by K-composition with it.

The half length L is drawn per batch (all rows of a batch have the same length, so there is no padding), from 4
to 31: with a fixed L the model could solve the task with a head that attends a fixed distance back instead.

Everything is seeded and runs on one CPU thread, so a rerun writes byte-identical files (same torch build). The
report, ``<out>/training_report.json``, holds only deterministic numbers; the wall time is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
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
from hookvene.experiments.induction import half_losses, random_tokens  # noqa: E402

BOS = "<|endoftext|>"  # GPT-2 convention: one token serves as bos and eos
PAD, UNK = "<pad>", "<unk>"
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"]  # 100 readable one-token "words"
N_POSITIONS = 64
MIN_HALF, MAX_HALF = 4, 31  # 1 + 2 * 31 = 63 tokens fit the 64 positions
EVAL_SEED = 12345  # seed of the evaluation batch; the zoo test samples with EVAL_SEED + 1
EVAL_HALF = 20


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the syllables, spelled like GPT-2's tokens ("Ġka" for " ka").

    The ByteLevel pre-tokenizer (with a prefix space, so the first word is spelled like every other) splits
    "ka lo mi" into "Ġka", "Ġlo", "Ġmi"; the WordLevel model maps each to one id. BOS is prepended by the
    post-processor, so ``tokenizer(text)`` gives exactly what the model was trained on."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    vocab = {tok: i for i, tok in enumerate([BOS, PAD, UNK, *("Ġ" + s for s in SYLLABLES)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=N_POSITIONS, padding_side="right")


def training_batch(vocab: torch.Tensor, bos: int, batch_size: int, plain_fraction: float,
                   generator: torch.Generator) -> torch.Tensor:
    """One batch: the half length L for the whole batch, then repeated rows and plain random rows, shuffled."""
    half = int(torch.randint(MIN_HALF, MAX_HALF + 1, (1,), generator=generator))
    n_plain = round(batch_size * plain_fraction)
    rows = torch.cat([random_tokens(vocab, batch_size - n_plain, half, bos, generator, repeat=True),
                      random_tokens(vocab, n_plain, half, bos, generator, repeat=False)])
    return rows[torch.randperm(batch_size, generator=generator)]


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, tokens: torch.Tensor, plain: torch.Tensor) -> dict[str, float]:
    """Mean next-token loss on the first half, the repeated half (from its second token) and plain sequences."""
    model.eval()
    logits = model(input_ids=tokens).logits
    first, repeated = half_losses(logits, tokens)
    plain_loss = torch.nn.functional.cross_entropy(model(input_ids=plain).logits[:, :-1].flatten(0, 1),
                                                   plain[:, 1:].flatten())
    model.train()
    return {"first_half_loss": round(float(first), 4), "repeated_half_loss": round(float(repeated), 4),
            "plain_random_loss": round(float(plain_loss), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "hookvene" / "zoo" / "induction-gpt2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--plain-fraction", type=float, default=0.25, help="share of plain random rows per batch")
    parser.add_argument("--eval-every", type=int, default=100)
    args = parser.parse_args()

    t0 = time.perf_counter()
    transformers.logging.set_verbosity_error()  # GPT-2's config carries loss_type=None: a harmless warning
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one thread: the same floating-point reductions on every machine
    torch.use_deterministic_algorithms(True)

    tokenizer = build_tokenizer()
    bos = tokenizer.bos_token_id
    vocab = torch.tensor(tokenizer.convert_tokens_to_ids(["Ġ" + s for s in SYLLABLES]))
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=128, n_layer=2, n_head=4,
        n_inner=128,  # a small MLP (1 x d_model, GPT-2 has 4x): the task is solved by attention
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=bos, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_attn = sum(p.numel() for n, p in model.named_parameters() if ".attn." in n)
    n_mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    print(f"vocab {len(tokenizer)}, {n_params:,} parameters ({n_attn:,} attention, {n_mlp:,} MLP)")

    data = torch.Generator().manual_seed(args.seed)  # the training stream: a fresh batch every step
    eval_gen = torch.Generator().manual_seed(EVAL_SEED)
    eval_tokens = random_tokens(vocab, 500, EVAL_HALF, bos, eval_gen, repeat=True)
    eval_plain = random_tokens(vocab, 500, EVAL_HALF, bos, eval_gen, repeat=False)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    curve = []
    for step in range(args.steps):
        batch = training_batch(vocab, bos, args.batch_size, args.plain_fraction, data)
        out = model(input_ids=batch, labels=batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            m = evaluate(model, eval_tokens, eval_plain)
            curve.append({"step": step + 1, "train_loss": round(out.loss.item(), 4), **m})
            print(f"step {step + 1:5d}  train loss {out.loss.item():.3f}  first half {m['first_half_loss']:.3f}  "
                  f"repeated half {m['repeated_half_loss']:.3f}  plain {m['plain_random_loss']:.3f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    train_time = time.perf_counter() - t0

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # transformers 5 writes its own class name ("TokenizersBackend"); the generic name also loads in 4.x.
    tok_config_path = args.out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")

    report = {
        "command": "python scripts/train_induction_model.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "plain_fraction": args.plain_fraction,
        "half_length_range": [MIN_HALF, MAX_HALF],
        "threads": 1,
        "n_params": n_params,
        "n_params_attention": n_attn,
        "n_params_mlp": n_mlp,
        "vocab_size": len(tokenizer),
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "d_model": config.n_embd,
        "n_inner": config.n_inner,
        "n_positions": config.n_positions,
        # 500 sequences "<bos> A A" with |A| = eval_half (distinct syllables) and 500 plain random sequences of the
        # same length. first_half_loss: mean loss predicting A's tokens; repeated_half_loss: predicting the repeat
        # from its second token on (its first token cannot be known); plain_random_loss: every token.
        "eval_seed": EVAL_SEED,
        "eval_half": EVAL_HALF,
        "eval": curve[-1],
        "curve": curve,
        "chance_loss": round(math.log(len(SYLLABLES)), 4),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"first half {curve[-1]['first_half_loss']:.3f} (chance {math.log(len(SYLLABLES)):.3f}), repeated half "
          f"{curve[-1]['repeated_half_loss']:.3f}; trained in {train_time:.0f}s, "
          f"{time.perf_counter() - t0:.0f}s in all; saved to {args.out}")


if __name__ == "__main__":
    main()
