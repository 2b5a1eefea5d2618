"""Induction heads, found and explained in one call (`hookvene induction --model M`; tested on GPT-2 checkpoints).

The data are repeated random tokens: `<bos> A A`, with A a sequence of L distinct random tokens. Nothing in the
first half can be predicted; in the repeated half, each token can be, by an *induction head*: at a position holding
token x it attends to the position just after the earlier x (L - 1 back) and copies the token there. To find that
position it needs, at every key position, the identity of the *previous* token: a *previous-token head* in an
earlier layer writes it into the residual stream, and the induction head's keys read it (K-composition, Elhage et
al. 2021, "A Mathematical Framework for Transformer Circuits").

`induction_analysis` measures each step of that story on a model:

1. per-head previous-token and induction scores (mean attention to position q - 1, resp. q - L + 1);
2. the loss on the first half and on the repeated half, per position;
3. K-composition scores between every earlier-layer head's OV circuit and every later-layer head's QK circuit
   (`model.all_composition_scores("K")`, from the `FactoredMatrix` weight views), against the same score for
   random matrices of the same shapes;
4. mean-ablating the previous-token and induction heads (and, as a control, each head alone);
5. path patching from each earlier head to the induction head's keys only.

Load the model with TransformerLens's weight processing (`fold_ln=True, center_writing_weights=True`, as the CLI
does), so that the weight views include the LayerNorm scales the heads actually see; the other steps give the
same numbers either way. `InductionReport.found` is the verdict; on a model without the circuit the report still
names the best-scoring heads, and says no. The bundled `induction-gpt2` has the circuit (L0H0 -> L1H0); the
bundled `ioi-gpt2` does not.
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hookvene.experiments.path_patching import path_patch
from hookvene.factored_matrix import FactoredMatrix, composition_score
from hookvene.viz import heatmap, line_plot

# What counts as "found" (the verdict line). A head that always attends one step back scores 1, a uniform
# head about 2 / seq_len; an induction head that attends 0.5 to its target already cuts the loss far below chance.
SCORE_THRESHOLD = 0.4
ABLATION_THRESHOLD = 1.0  # nats: mean-ablating the circuit's two heads must raise the repeated-half loss this much


def random_tokens(vocab: Sequence[int] | Tensor, n: int, half: int, bos: int, generator: torch.Generator,
                  repeat: bool = True) -> Int[Tensor, "n pos"]:
    """`n` rows of `<bos>` + 2 * `half` tokens from `vocab`: with `repeat`, `half` distinct random tokens twice
    (`<bos> A A`); without, 2 * `half` tokens drawn independently (tokens may recur, what follows them does not)."""
    vocab = torch.as_tensor(vocab)
    if repeat and half > len(vocab):
        raise ValueError(f"a half of {half} distinct tokens needs at least {half} tokens in the vocabulary, "
                         f"got {len(vocab)}")
    if repeat:
        first = vocab[torch.rand(n, len(vocab), generator=generator).argsort(-1)[:, :half]]
        body = torch.cat([first, first], dim=1)
    else:
        body = vocab[torch.randint(len(vocab), (n, 2 * half), generator=generator)]
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)


def per_position_loss(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
                      ) -> Float[Tensor, "batch targets"]:
    """-log p(tokens[:, j] | tokens[:, :j]) for j = 1 .. pos - 1 (column j - 1)."""
    logprobs = logits[:, :-1].float().log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def half_losses(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]) -> tuple[Tensor, Tensor]:
    """Mean loss on the first half (predicting A) and on the repeated half from its second token (its first token
    follows the end of A and cannot be known), of `<bos> A A` sequences."""
    half = (tokens.shape[1] - 1) // 2
    loss = per_position_loss(logits, tokens)  # column j - 1 predicts token j
    return loss[:, :half].mean(), loss[:, half + 1:].mean()


def prev_token_scores(patterns: Float[Tensor, "layer batch head q k"]) -> Float[Tensor, "layer head"]:
    """Mean attention from each position q >= 1 to q - 1."""
    return patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, -1))


def current_token_scores(patterns: Float[Tensor, "layer batch head q k"]) -> Float[Tensor, "layer head"]:
    """Mean attention from each position q >= 1 to q itself."""
    return patterns.diagonal(dim1=-2, dim2=-1)[..., 1:].mean(dim=(1, -1))


def induction_scores(patterns: Float[Tensor, "layer batch head q k"], half: int) -> Float[Tensor, "layer head"]:
    """Mean attention from each position q of the repeated half to q - half + 1, the token after the previous
    occurrence of token q, in `<bos> A A` sequences with |A| = `half`."""
    return patterns.diagonal(offset=-(half - 1), dim1=-2, dim2=-1)[..., 2:].mean(dim=(1, -1))


def random_composition_baseline(d_model: int, d_head: int, n: int = 200, seed: int = 0) -> Tensor:
    """Composition scores of `n` pairs of random (Gaussian) factored matrices with a head's shapes: what the
    score is for heads that do not compose."""
    g = torch.Generator().manual_seed(seed)

    def random_circuit() -> FactoredMatrix:
        return FactoredMatrix(torch.randn(d_model, d_head, generator=g), torch.randn(d_head, d_model, generator=g))
    return torch.stack([composition_score(random_circuit(), random_circuit()) for _ in range(n)])


def mean_ablation_hooks(heads: Sequence[tuple[int, int]]) -> list[tuple[str, Any]]:
    """Hooks replacing each head's output (hook_z) with its mean over the batch at each position: the head then
    passes on nothing about the tokens of the sequence (random tokens: the mean carries none)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def make(hs: list[int]) -> Any:
        def hook(z: Tensor, hook: Any) -> Tensor:
            z = z.clone()
            z[:, :, hs] = z[:, :, hs].mean(0, keepdim=True)
            return z
        return hook
    return [(f"blocks.{layer}.attn.hook_z", make(hs)) for layer, hs in sorted(by_layer.items())]


@dataclass
class InductionReport:
    model_name: str
    n: int
    half: int
    prev_scores: Tensor  # (layer, head)
    induction_scores: Tensor  # (layer, head)
    loss_per_position: Tensor  # (2 * half,): column j - 1 = loss predicting token j
    first_half_loss: float
    repeated_half_loss: float
    n_vocab: int  # how many tokens the sequences were drawn from: chance loss is ln(n_vocab)
    prev_head: tuple[int, int]
    induction_head: tuple[int, int]
    composition: Tensor  # (layer, head, layer, head): model.all_composition_scores("K"), 0 unless l1 < l2
    baseline_mean: float  # random-matrix composition scores: mean and 95th percentile
    baseline_p95: float
    ablation: dict[str, float]  # repeated-half loss with these heads mean-ablated ("none", "L0H1", "L0H1+L1H2")
    ablated_loss_per_position: Tensor  # (2 * half,) with the circuit's two heads ablated
    path: Tensor  # (sender layers, heads): repeated-half loss with one sender patched into the induction keys
    path_clean: float
    path_corrupted: float
    files: dict[str, str] = field(default_factory=dict)

    @property
    def chance_loss(self) -> float:
        return math.log(self.n_vocab)

    @property
    def top_composition(self) -> tuple[tuple[int, int], float]:
        """The earlier-layer head whose output the induction head's keys read most, and its score."""
        into = self.composition[:self.induction_head[0], :, self.induction_head[0], self.induction_head[1]]
        idx = int(into.argmax())
        sender = divmod(idx, into.shape[1])
        return sender, float(into[sender])

    @property
    def circuit_ablation(self) -> float:
        """The repeated-half loss with both circuit heads mean-ablated."""
        return self.ablation[f"{head_name(self.prev_head)}+{head_name(self.induction_head)}"]

    @property
    def found(self) -> bool:
        """Both heads clear SCORE_THRESHOLD, the induction head's keys read the previous-token head more than any
        other head (and above the random baseline), and ablating the two raises the loss by ABLATION_THRESHOLD."""
        (sender, score) = self.top_composition
        return (float(self.prev_scores[self.prev_head]) >= SCORE_THRESHOLD
                and float(self.induction_scores[self.induction_head]) >= SCORE_THRESHOLD
                and sender == self.prev_head and score > self.baseline_p95
                and self.circuit_ablation - self.ablation["none"] >= ABLATION_THRESHOLD)

    def summary(self) -> str:
        pl, ph = self.prev_head
        il, ih = self.induction_head
        sender, comp = self.top_composition
        lines = [f"Induction on {self.model_name}: {self.n} sequences <bos> A A, |A| = {self.half} random tokens",
                 f"  loss on the first half     {self.first_half_loss:.3f}   (chance: ln {self.n_vocab} = "
                 f"{self.chance_loss:.3f})",
                 f"  loss on the repeated half  {self.repeated_half_loss:.3f}   (from its second token)",
                 "  mean attention per head, H0 H1 ... (previous-token: to q - 1; induction: to the token after the "
                 "earlier copy of token q):"]
        n_layers, n_heads = self.prev_scores.shape
        for layer in range(n_layers):
            lines.append(f"    L{layer}  previous-token " + " ".join(f"{float(v):.2f}" for v in self.prev_scores[layer])
                         + "   induction " + " ".join(f"{float(v):.2f}" for v in self.induction_scores[layer]))
        lines += [f"  previous-token head L{pl}H{ph} (score {float(self.prev_scores[pl, ph]):.3f}), "
                  f"induction head L{il}H{ih} (score {float(self.induction_scores[il, ih]):.3f})",
                  f"  K-composition into L{il}H{ih}'s keys: highest from {head_name(sender)} ({comp:.3f}); "
                  f"random matrices: mean {self.baseline_mean:.3f}, 95th percentile {self.baseline_p95:.3f}",
                  f"  repeated-half loss with one head mean-ablated, H0 H1 ... (none: {self.ablation['none']:.3f}):"]
        for layer in range(n_layers):
            lines.append(f"    L{layer}  " + " ".join(f"{self.ablation[head_name((layer, h))]:.3f}"
                                                 for h in range(n_heads)))
        lines.append(f"  with both circuit heads mean-ablated ({head_name(self.prev_head)}+"
                     f"{head_name(self.induction_head)}): {self.circuit_ablation:.3f}")
        lines.append(f"  path patching L{pl}H{ph} -> L{il}H{ih} keys (first half replaced): repeated-half loss "
                     f"{float(self.path[pl, ph]):.3f} (clean {self.path_clean:.3f}, whole corrupted run "
                     f"{self.path_corrupted:.3f})")
        others = [(la, h) for la in range(self.path.shape[0]) for h in range(self.path.shape[1]) if (la, h) != (pl, ph)]
        if others:
            worst = max(others, key=lambda s: float(self.path[s]))
            lines.append(f"    largest from any other head: {head_name(worst)} {float(self.path[worst]):.3f}")
        lines.append(f"  induction circuit found: {'yes' if self.found else 'no'}")
        lines += [f"  {name}: {path}" for name, path in self.files.items()]
        return "\n".join(lines)


def head_name(head: tuple[int, int]) -> str:
    return f"L{head[0]}H{head[1]}"


def induction_analysis(model: nn.Module, vocab: Sequence[int] | Tensor, bos: int, n: int = 200,
                       half: int | None = None, seed: int = 0, out_dir: str | None = None,
                       model_name: str = "model") -> InductionReport:
    """Run the analysis (module doc) on `n` sequences `<bos> A A` of tokens from `vocab`; `half` defaults to 20,
    or less where the model has fewer positions. With `out_dir`, write the three figures and the numbers."""
    n_ctx = model.cfg.n_ctx
    half = min(20, (n_ctx - 1) // 2) if half is None else half
    if 2 * half + 1 > n_ctx:
        raise ValueError(f"sequences of 2 * {half} + 1 tokens do not fit the model's {n_ctx} positions")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if n_layers < 2:
        raise ValueError("an induction circuit needs two layers; this model has one")
    g = torch.Generator().manual_seed(seed)
    tokens = random_tokens(vocab, n, half, bos, g)
    with torch.no_grad():
        out, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
        patterns = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(n_layers)])
        prev, ind = prev_token_scores(patterns), induction_scores(patterns, half)
        loss = per_position_loss(out.logits, tokens)
        first, repeated = half_losses(out.logits, tokens)

        # The induction head: the highest induction score after layer 0; the previous-token head: the highest
        # previous-token score in an earlier layer (the only heads its keys can read).
        il, ih = divmod(int(ind[1:].argmax()), n_heads)
        il += 1
        pl, ph = divmod(int(prev[:il].argmax()), n_heads)

        composition = model.all_composition_scores("K").detach()  # 0 unless the sender's layer is earlier
        baseline = random_composition_baseline(model.cfg.d_model, model.cfg.d_head, seed=seed)

        def repeated_loss(hooks: list) -> tuple[float, Tensor]:
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks).logits
            return float(half_losses(logits, tokens)[1]), per_position_loss(logits, tokens).mean(0)

        ablation = {"none": float(repeated)}
        for layer in range(n_layers):
            for head in range(n_heads):
                ablation[head_name((layer, head))] = repeated_loss(mean_ablation_hooks([(layer, head)]))[0]
        both, ablated_per_position = repeated_loss(mean_ablation_hooks([(pl, ph), (il, ih)]))
        ablation[f"{head_name((pl, ph))}+{head_name((il, ih))}"] = both

    # Path patching: the corrupted sequences have another first half (the repeat is gone), so a previous-token
    # head there writes other previous tokens at the first half's positions, where the induction head looks.
    corrupted = tokens.clone()
    corrupted[:, 1:half + 1] = random_tokens(vocab, n, half, bos, g)[:, 1:half + 1]

    def repeated_half_loss(logits: Tensor, ex: Tensor) -> Tensor:  # per row, against the clean tokens
        return per_position_loss(logits, tokens[ex.cpu()].to(logits.device))[:, half + 1:].mean(-1)

    senders = [(layer, head) for layer in range(il) for head in range(n_heads)]
    path = path_patch(model, tokens, corrupted, repeated_half_loss, receivers=[(f"blocks.{il}.attn.hook_k", ih)],
                      senders=senders)
    report = InductionReport(model_name, n, half, prev, ind, loss.mean(0), float(first), float(repeated),
                             len(vocab), (pl, ph), (il, ih), composition, float(baseline.mean()),
                             float(baseline.quantile(0.95)), ablation, ablated_per_position,
                             path.values[:il], path.clean, path.corrupted)
    if out_dir is not None:
        report.files = write_figures(report, out_dir)
    return report


def write_figures(report: InductionReport, out_dir: str) -> dict[str, str]:
    """The per-head score heatmap, the composition matrix, the loss per position (PNG), and the numbers (.pt), as
    `<out_dir>/<model_name>_*`."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, report.model_name.replace("/", "_") + "_")  # one set of files per model
    files = {"head scores": stem + "induction_scores.png", "composition matrix": stem + "composition.png",
             "loss per position": stem + "loss_per_position.png", "results": stem + "induction.pt"}
    n_layers, n_heads = report.prev_scores.shape
    layers = range(n_layers)
    heatmap(torch.cat([report.prev_scores, report.induction_scores]),
            [f"L{la} prev-token" for la in layers] + [f"L{la} induction" for la in layers],
            [f"H{h}" for h in range(n_heads)], col_label="head", vmin=0.0, vmax=1.0, cbar_label="mean attention",
            title=f"{report.model_name}: previous-token and induction scores per head", path=files["head scores"])
    senders = [(la, h) for la in range(n_layers - 1) for h in range(n_heads)]
    receivers = [(la, h) for la in range(1, n_layers) for h in range(n_heads)]
    comp = torch.tensor([[float(report.composition[s + r]) if s[0] < r[0] else float("nan") for r in receivers]
                         for s in senders])  # blank where the writer is not earlier
    heatmap(comp, [head_name(s) for s in senders], [head_name(r) for r in receivers], row_label="writer (OV)",
            col_label="reader (QK keys)", vmin=0.0, cbar_label="composition score",
            title=f"{report.model_name}: K-composition scores (random matrices: mean {report.baseline_mean:.2f}, "
                  f"95th pct {report.baseline_p95:.2f})", path=files["composition matrix"])
    pair = f"{head_name(report.prev_head)} + {head_name(report.induction_head)}"
    line_plot({"model": report.loss_per_position, f"{pair} mean-ablated": report.ablated_loss_per_position},
              x=list(range(1, 2 * report.half + 1)), x_label="position of the predicted token",
              y_label="loss (nats)", hline=(report.chance_loss, "chance"), vline=(report.half + 0.5, "repeat starts"),
              title=f"{report.model_name}: loss per position on <bos> A A, |A| = {report.half}",
              path=files["loss per position"])
    torch.save({k: v for k, v in vars(report).items() if k != "files"}, files["results"])
    return files
