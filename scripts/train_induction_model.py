"""Train a 2-layer GPT-2 meant to form induction heads, for ``hookvene/zoo/induction-gpt2`` (not shipped yet).

Usage (from the repository root; four to five minutes on one thread of the shared 2-core machine under load)::

    python scripts/train_induction_model.py --out DIR

STATUS: no recipe tried so far forms the textbook induction circuit (a layer-1 head attending to the token after
the earlier copy of the current token, its keys reading a layer-0 previous-token head), so nothing is bundled and
``--out`` has no default. Measured (seed 0; repeated-half loss on the evaluation batch ``<bos> A A``, |A| = 20,
chance 4.61; "prev" / "ind" = best previous-token score in layer 0 / best induction score in layer 1):

- ``<bos> A A`` rows only (no prefix R), L 4..24, 2400 steps: 0.064, but through the shortcut described below
  (induction score of the best layer-1 head 0.005; ``hookvene induction`` reports "found: no").
- with the prefix R, L 4..24, a quarter plain rows: 4.34 after 1800 steps, 4.02 after 3800; no head attends to the
  previous token (scores <= 0.09) at 2400 steps. d_model 64 at learning rate 3e-3: 4.61 after 1100 steps.
- the previous defaults (rows ``<bos> R A A``, A at the end after a random prefix R, L 12..24, a tenth plain rows,
  no skip-bigram rows, warm-up 20 steps, 3000 steps; the script as of commit b0bbfaf): 3.44 at step 1750, 3.35 at
  3000, plain-row loss up to 4.86: a plateau where the model copies any earlier token (519 s). The same recipe run
  to 5500 steps (an earlier session): 3.41.
- skip-bigram "chain" rows (the defaults below: 30% of the rows at first, decaying linearly to none at step 800;
  lr 1e-3, d_model 128, 2400 steps, 270 s): previous-token heads form (L0H0 0.92, L0H1
  0.90), and once the chain rows are gone the repeated-half loss falls (4.08 at step 1400, 1.30 at 1600, 0.59 at
  2400; first half 4.61). But not through an induction head: ind 0.05. All four layer-1 heads attend to q - 18, one
  position *after* the induction target (mean attention 0.82-0.86), and read the target as that position's previous
  token (V-composition with the previous-token heads); the key match comes from L0H3, which attends 1 and 3 back (in
  a chain x[t - 1] = f(x[t - 3]), so 3 back is informative). ``hookvene induction --model DIR``: found: no (top
  K-composition into the best layer-1 head from L0H3, 0.275 vs a random 95th percentile of 0.092; mean-ablating
  L0H3 alone raises the repeated-half loss 0.59 -> 2.85, L0H0 -> 1.94).
- the same chain rows, not decaying (20-30% throughout; an experiment harness with these rows, L 4..24 or
  12..24), lr 1e-3 to 5e-3, d_model 64 or 128: prev 0.6-0.9 within 500-1000 steps, but the repeated half stays at
  chance (4.57-4.62) through 750-2250 steps (no copying at all); lr 1e-2: the same at 300 steps. Adding rows of many
  short repeats, or rows where A repeats to the end of the row: no change by 1100 steps.
- chain rows decaying by step 400: prev fades to 0.09 by step 1200 (copying only, 4.13).
- noisy chain rows (each token follows the table with probability 1/2, else random; a hand-edited copy), decaying by
  step 800: prev 0.35 at step 400, fading to 0.07 / 0.05 at steps 1000 / 1400 (copying only, 3.65 at 1400).
- "identity" skip rows (x[t + 1] = x[t - 1], i.e. A B A B ...; a hand-edited table): no previous-token head
  (prev 0.07), copying only (3.20 at step 1200).
- ``--skip-rows triplet`` (triplets (a, r, f(a)): 1 back is informative, 3 back is not), decaying by step 800 or
  1200: prev about 0.3 at step 400, fading as the triplet rows thin out (0.03 / 0.05 at step 2000) while copying
  forms; repeated half 3.47 / 2.88 at 2400 (441 s each, two runs at once), ind <= 0.04.
  With a floor of 10% or 20% triplet rows kept to the end: prev 0.15 / 0.33 at step 1200, ind <= 0.04, repeated
  half 3.6 / 3.8 (hand-edited copy of this script; not an option here).
- identity triplets (a, r, a), so that the previous-token head's output is the token's own embedding and the
  induction QK would be near the identity (hand-edited): with a 20% floor, prev 0.21-0.26 through step 1400, repeated
  half 3.98, ind 0.03; decaying by step 1200, prev 0.04 at 1400, 3.43, ind 0.03. Stopped at step 1400.

So a previous-token head is easy to get (skip-bigram rows), and copying is easy to get, but in ~2400 steps the
layer-1 QK never latched onto the previous-token head's output: with chain rows it found the shifted route above,
otherwise the previous-token heads faded once nothing rewarded them alone. Untried: a larger d_head (2 heads of 64),
a smaller vocabulary, frozen sinusoidal positions, more steps than the budget (the plateau in the no-skip recipe
lasted past 5500 steps).

The model is a ``transformers.GPT2LMHeadModel`` over a vocabulary of 100 syllables ("ba", "be", ... "zu"). It is
trained with the ordinary next-token loss on 49-token sequences: skip-bigram rows (above), a tenth plain random
rows (drawn independently, so a token may recur without what follows it recurring), and rows holding one repeated
segment ``A A`` (A is L distinct random syllables, L from 12 to 24 drawn per row) at a random start, with random
syllables before and after it. Nothing in a first half can be predicted; everything in a repeated half after its
first token can, by looking up where the current token occurred before and copying the token that followed it.
That is the induction circuit: a previous-token head in layer 0 and an induction head in layer 1 that finds its
source by K-composition with it.

The random start matters. Trained on ``<bos> A A`` alone (A always starting at position 1), the model found a
positional shortcut instead: layer-0 heads attending to position q / 2 stored pairs of neighbouring first-half
tokens, which layer 1 read. With a random start, the repeat starts at a different position in every row, so only a
lookup by content works.

Everything is seeded and runs on one CPU thread, so a rerun writes byte-identical files (same torch build; checked
on two full 2400-step runs of the first recipe, two 100-step runs of the prefix-R recipe, two 60-step runs of the
chain-row defaults, with different ``--out``: all six files identical; and two full runs of the chain-row defaults,
270 s and 457 s: identical weights, the second report adding only the later ``skip_rows`` field). The report,
``<out>/training_report.json``, holds only deterministic numbers; the wall time is printed.
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
MIN_HALF, MAX_HALF = 12, 24
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
                   skip_table: torch.Tensor, generator: torch.Generator, skip_rows: str = "chain") -> torch.Tensor:
    """One batch of rows `<bos>` + 2 * MAX_HALF tokens, in random order. A `skip_fraction` of the rows are skip-bigram
    rows, where a token is predictable only by a head that reads the token before the current one: "chain" rows are
    two random tokens, then x[t + 1] = skip_table[x[t - 1]] throughout; "triplet" rows are triplets (a, r, f(a)) of
    random a, r, with f = skip_table. A `plain_fraction` are plain random tokens; the rest hold one repeated segment
    A A (|A| = L distinct tokens, L drawn per row from MIN_HALF..MAX_HALF) at a random start, random tokens around."""
    n_skip, n_plain = round(batch_size * skip_fraction), round(batch_size * plain_fraction)
    n_tokens, length = len(vocab), 2 * MAX_HALF
    idx = torch.randint(n_tokens, (batch_size, length), generator=generator)  # indices into vocab
    if skip_rows == "triplet":
        idx[:n_skip, 2::3] = skip_table[idx[:n_skip, 0::3][:, :idx[:, 2::3].shape[1]]]
    else:
        for i in range(n_skip):
            for t in range(2, length):
                idx[i, t] = skip_table[idx[i, t - 2]]
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
    parser.add_argument("--out", type=Path, required=True,
                        help="checkpoint directory (hookvene/zoo/induction-gpt2 once a recipe forms the circuit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--decay-steps", type=int, default=400, help="the last steps, where lr decays linearly to 10%%")
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--plain-fraction", type=float, default=0.1, help="share of plain random rows per batch")
    parser.add_argument("--skip-fraction", type=float, default=0.3,
                        help="share of skip-bigram rows in the first batch; it decays linearly to 0 at --skip-steps")
    parser.add_argument("--skip-steps", type=int, default=800)
    parser.add_argument("--skip-rows", choices=["chain", "triplet"], default="chain", help="kind of skip-bigram rows")
    parser.add_argument("--eval-every", type=int, default=200)
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

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    decay_start = args.steps - args.decay_steps

    # Linear warm-up, a constant rate, then a linear decay to 10%. The rate stays high until the end on purpose:
    # the loss sits on a plateau (the model only copies tokens seen anywhere before) for about 1400 steps, until
    # the previous-token and induction heads form together, and a decaying rate would stretch that plateau.
    def lr_factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if step < decay_start:
            return 1.0
        return 1.0 - 0.9 * (step - decay_start) / max(1, args.decay_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    curve = []
    for step in range(args.steps):
        skip_fraction = args.skip_fraction * max(0.0, 1.0 - step / args.skip_steps)
        batch = training_batch(vocab, bos, args.batch_size, args.plain_fraction, skip_fraction, skip_table, data,
                               args.skip_rows)
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
        "decay_steps": args.decay_steps,
        "weight_decay": args.weight_decay,
        "plain_fraction": args.plain_fraction,
        "skip_fraction": args.skip_fraction,
        "skip_steps": args.skip_steps,
        "skip_rows": args.skip_rows,
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
