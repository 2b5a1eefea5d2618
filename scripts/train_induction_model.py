"""Train ``hookvene/zoo/induction-gpt2``: a 2-layer GPT-2 in which the textbook induction circuit forms.

Usage (from the repository root; 106 s of training, 113 s in all, on one thread of the shared 2-core development
machine when idle; 127 s of training with another job running)::

    python scripts/train_induction_model.py [--out hookvene/zoo/induction-gpt2]

The model is a ``transformers.GPT2LMHeadModel`` (2 layers, d_model 128, 2 heads of 64, a small MLP of 128) over a
vocabulary of 100 syllables ("ba", "be", ... "zu"), trained with the ordinary next-token loss on 49-token rows:

- *repeat rows* (most of each batch): one segment ``A A`` (A is L distinct random syllables, L from 16 to 24 drawn per
  row) at a random start, random syllables before and after it. Nothing in a first half can be predicted; the
  repeated half can, from its second token, by looking up where the current token occurred before and copying the
  token that followed it: a previous-token head in layer 0 and an induction head in layer 1 that finds its source
  by K-composition with it.
- *plain rows* (a tenth): random syllables drawn independently, so a token may recur without what follows it
  recurring.
- *skip-bigram rows* (half of the first batch, thinning out linearly to none at step 800): blocks of four
  syllables ``a b f(a) f(b)`` at a random phase, f a fixed random permutation. At half the positions the next
  token is f of the token one back, and only a head that reads the previous token predicts it, so layer 0 grows a
  previous-token head early (0.97 by step 400). Once the rows thin out it fades (0.21 at step 1000) and comes back
  as the induction heads of layer 1 form on top of it (the repeated half falls from 2.5 to 0.36 between steps 1000
  and 1200).

Why these choices (each measured; see the zoo README):

- Blocks of four rather than one chain x[t + 1] = f(x[t - 1]) over the whole row (the first recipe): in a chain,
  three back is informative too (x[t - 3] gives x[t - 1]), layer 0 grew heads attending one *and* three back, and
  layer 1 often took a shifted route (attending one past the induction target and reading the target as that
  position's previous token, by V-composition). The chain recipe (30% of rows, |A| 12 to 24, 2400 steps, 173 s)
  formed the textbook circuit for seeds 0 and 1 around step 1900 and not for seed 2, and every cheaper variant of
  it failed (lr 2e-3; batches of 16 or 24; skip-bigram rows gone by step 400, or by step 500 with lr 1.5e-3). Its
  circuit was crisper (previous-token score 0.74, path patching to 3.82, the two circuit heads' ablation back to
  chance). With blocks of four, seeds 0, 1 and 2 all form the circuit by step 1300; the bundled checkpoint is
  seed 2, the crispest at step 1600 (seed 0: repeated half 0.226, previous-token 0.42, induction 0.77; seed 1:
  0.166, 0.46, 0.81; seed 2: 0.130, 0.54, 0.90).
- |A| from 16, not 12: with blocks of four and |A| from 12, layer 1 split between the two routes (seed 0:
  induction scores 0.30 at step 2100; seeds 1 and 2 at step 1800: repeated half 0.49 and 0.76, induction scores
  0.58 and 0.01). The price: repeats shorter than 16 are predicted poorly (zoo README).
- Triples ``a b f(a)`` (a third of the positions) were too weak a signal: no previous-token head formed (0.04) and
  the model sat where it copies any earlier token (repeated half 3.5 at step 2400).
- A floor of skip-bigram rows stops the induction heads from forming: none by step 2300 with 10% or 20% chain
  rows (though the previous-token head stayed at 0.7 to 0.8), none by step 1600 with 5% or 10% blocks.
- Earlier, with chain rows: without skip-bigram rows (4 heads of 32) the model sat on the copy-any-earlier-token
  plateau past 2400 steps; with 4 heads of 32 layer 1 found the shifted route; trained on ``<bos> A A`` alone (A
  always at position 1) it found a positional shortcut (layer-0 heads attending to position q / 2).
- The rate stays constant after a 50-step warm-up: with the chain recipe, a rate decaying over the last 400 steps
  left the repeated half at 0.33 instead of 0.17.

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
from hookvene.experiments.induction import (  # noqa: E402
    half_losses,
    induction_scores,
    prev_token_scores,
    random_tokens,
)

BOS = "<|endoftext|>"  # GPT-2 convention: one token serves as bos and eos
PAD, UNK = "<pad>", "<unk>"
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"]  # 100 readable one-token "words"
MIN_HALF, MAX_HALF = 16, 24
N_POSITIONS = 1 + 2 * MAX_HALF  # the longest training sequence: <bos> A A with |A| = 24
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


def training_batch(vocab: torch.Tensor, bos: int, batch_size: int, plain_fraction: float, skip_fraction: float,
                   skip_table: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One batch of rows `<bos>` + 2 * MAX_HALF tokens, in random order: a `skip_fraction` of skip-bigram rows
    (blocks a b f(a) f(b), f = skip_table), a `plain_fraction` of plain random rows, and the rest
    repeat rows: one segment A A (|A| = L distinct tokens, L drawn per row from MIN_HALF..MAX_HALF) at a random
    start, random tokens around it."""
    n_skip, n_plain = round(batch_size * skip_fraction), round(batch_size * plain_fraction)
    n_tokens, length = len(vocab), 2 * MAX_HALF
    idx = torch.randint(n_tokens, (batch_size, length), generator=generator)  # indices into vocab
    # Skip-bigram rows are blocks of four, a b f(a) f(b), at a random phase: at half the positions the next token
    # is f of the token one back, and nothing further back helps (the blocks are independent).
    phase = torch.randint(4, (n_skip,), generator=generator)
    follows = (torch.arange(length) - phase[:, None]) % 4 >= 2  # positions holding f(a) or f(b)
    for t in range(2, length):
        idx[:n_skip, t] = torch.where(follows[:, t], skip_table[idx[:n_skip, t - 2]], idx[:n_skip, t])
    for i in range(n_skip + n_plain, batch_size):
        half = int(torch.randint(MIN_HALF, MAX_HALF + 1, (1,), generator=generator))
        segment = torch.randperm(n_tokens, generator=generator)[:half]
        start = int(torch.randint(0, length - 2 * half + 1, (1,), generator=generator))
        idx[i, start:start + half] = segment
        idx[i, start + half:start + 2 * half] = segment
    rows = torch.cat([torch.full((batch_size, 1), bos, dtype=torch.long), vocab[idx]], dim=1)
    return rows[torch.randperm(batch_size, generator=generator)]


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, tokens: torch.Tensor, plain: torch.Tensor) -> dict[str, float]:
    """Mean next-token loss on the first half, the repeated half (from its second token) and plain sequences."""
    model.eval()
    out = model(input_ids=tokens, output_attentions=True)
    first, repeated = half_losses(out.logits, tokens)
    patterns = torch.stack(out.attentions)  # layer batch head q k
    prev, ind = prev_token_scores(patterns), induction_scores(patterns, (tokens.shape[1] - 1) // 2)
    plain_loss = torch.nn.functional.cross_entropy(model(input_ids=plain).logits[:, :-1].flatten(0, 1),
                                                   plain[:, 1:].flatten())
    model.train()
    return {"first_half_loss": round(float(first), 4), "repeated_half_loss": round(float(repeated), 4),
            "plain_random_loss": round(float(plain_loss), 4),
            "best_prev_token_score_L0": round(float(prev[0].max()), 4),
            "best_induction_score_L1": round(float(ind[1].max()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "hookvene" / "zoo" / "induction-gpt2",
                        help="checkpoint directory (default: the bundled model's)")
    parser.add_argument("--seed", type=int, default=2, help="the bundled model's (seeds 0 and 1 form a weaker "
                        "circuit: docstring)")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--plain-fraction", type=float, default=0.1, help="share of plain random rows per batch")
    parser.add_argument("--skip-fraction", type=float, default=0.5,
                        help="share of skip-bigram rows in the first batch; it decays linearly to 0 at --skip-steps")
    parser.add_argument("--skip-steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=200)
    args = parser.parse_args()

    t0 = time.perf_counter()
    transformers.logging.set_verbosity_error()  # GPT-2's config carries loss_type=None: a harmless warning
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one thread: the same floating-point reductions on every machine
    torch.use_deterministic_algorithms(True)
    # ...without its NaN-filling of every new tensor (about 5% of a step in a profile here): no result reads memory
    # before it is written, so the files stay byte-identical
    torch.utils.deterministic.fill_uninitialized_memory = False

    tokenizer = build_tokenizer()
    bos = tokenizer.bos_token_id
    vocab = torch.tensor(tokenizer.convert_tokens_to_ids(["Ġ" + s for s in SYLLABLES]))
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=128, n_layer=2, n_head=2,
        n_inner=128,  # a small MLP (1 x d_model, GPT-2 has 4x): the task is solved by attention
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=bos, pad_token_id=tokenizer.pad_token_id, attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_attn = sum(p.numel() for n, p in model.named_parameters() if ".attn." in n)
    n_mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    print(f"vocab {len(tokenizer)}, {n_params:,} parameters ({n_attn:,} attention, {n_mlp:,} MLP)")

    data = torch.Generator().manual_seed(args.seed)  # the training stream: a fresh batch every step
    skip_table = torch.randperm(len(vocab), generator=data)  # a fixed random permutation: x[t + 1] = f(x[t - 1])
    eval_gen = torch.Generator().manual_seed(EVAL_SEED)
    eval_tokens = random_tokens(vocab, 500, EVAL_HALF, bos, eval_gen, repeat=True)
    eval_plain = random_tokens(vocab, 500, EVAL_HALF, bos, eval_gen, repeat=False)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay,
                                  foreach=True)  # one kernel per op over all parameters: same values, fewer calls

    # A linear warm-up, then a constant rate to the end on purpose: the loss sits on a plateau until the induction
    # circuit forms, around step 1100 (with the first recipe, a rate decaying at the end cost accuracy: docstring).
    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / args.warmup_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    curve = []
    for step in range(args.steps):
        skip_fraction = args.skip_fraction * max(0.0, 1.0 - step / args.skip_steps)
        batch = training_batch(vocab, bos, args.batch_size, args.plain_fraction, skip_fraction, skip_table, data)
        out = model(input_ids=batch, labels=batch, use_cache=False)  # (no key/value cache to build: never decodes)
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
                  f"prev-token L0 {m['best_prev_token_score_L0']:.2f}  "
                  f"induction L1 {m['best_induction_score_L1']:.2f}  "
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
        # where the files go is not part of the recipe: a run with another --out writes byte-identical files
        "command": "python scripts/train_induction_model.py" + "".join(
            f" {a}" for a in sys.argv[1:] if a != "--out" and not a.startswith("--out=") and a != str(args.out)),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "plain_fraction": args.plain_fraction,
        "skip_fraction": args.skip_fraction,
        "skip_steps": args.skip_steps,
        "half_length_range": [MIN_HALF, MAX_HALF],
        "sequence_length": N_POSITIONS,
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
