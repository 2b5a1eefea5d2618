"""The IOI circuit analysis in one call: logit difference, head and residual patching, and what the heads that
matter attend to. `hookvene ioi` runs it on the bundled `ioi-gpt2` model (or any GPT-2-family model).

Clean prompts come from one IOI template in both orders (so every prompt has the same length and positions line
up for the residual sweep); corrupted prompts replace the three names by fresh ones (the paper's ABC
distribution), which removes the IOI signal. Patching restores clean activations into the corrupted run.
"""

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hookvene.experiments.ioi import HELDOUT_TEMPLATE_IDS, OBJECTS, PLACES, corrupt, make_ioi_dataset, tokenize_ioi
from hookvene.experiments.metrics import logit_diff
from hookvene.experiments.patching import activation_patch
from hookvene.experiments.results import SweepResult
from hookvene.viz import attention_html

ATTENTION_EXAMPLES = 8  # prompts the attention page offers (every one is the full page of tables)


@dataclass
class HeadFinding:
    layer: int
    head: int
    effect: float  # normalized effect: 1 = restoring this head alone recovers the clean logit diff, 0 = nothing
    raw_effect: float  # the change in logit diff it makes (patched - corrupted)
    attn_to_io: float  # mean attention from the final position to the IO / S1 / S2 name tokens
    attn_to_s1: float
    attn_to_s2: float


@dataclass
class IOIReport:
    n: int
    template: int
    clean_logit_diff: float
    corrupted_logit_diff: float
    accuracy: float
    heads: SweepResult
    resid: SweepResult
    top_heads: list[HeadFinding]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def reliable(self) -> bool:
        """Whether the clean-corrupted gap is large enough for normalized effects (SweepResult.reliable)."""
        return self.heads.reliable

    def summary(self) -> str:
        gap = self.clean_logit_diff - self.corrupted_logit_diff
        lines = [f"IOI on {self.n} prompts (template {self.template}, ABBA + BABA)",
                 f"  clean logit diff (IO - S)      {self.clean_logit_diff:+.3f}   accuracy {self.accuracy:.1%}",
                 f"  corrupted (ABC) logit diff     {self.corrupted_logit_diff:+.3f}   gap {gap:+.3f}"]
        if self.reliable:
            lines += ["  heads ranked by |effect| (normalized: 1 = the head's clean output alone restores the clean "
                      "logit diff, 0 = no effect,",
                      "  negative = it pushes the other way), and where the final token looks:",
                      "    head     effect   attn->IO  attn->S1  attn->S2"]
        else:
            lines += [f"  WARNING: the gap is below {self.heads.min_gap:g}: clean and corrupted prompts look alike to "
                      f"this model (does it do IOI?),",
                      "  so normalized effects would divide by noise. Heads ranked by their raw change in logit diff:",
                      "    head   change   attn->IO  attn->S1  attn->S2"]
        for f in self.top_heads:
            shown = f.effect if self.reliable else f.raw_effect
            lines.append(f"    L{f.layer}H{f.head:<4} {shown:+7.2f}   {f.attn_to_io:8.2f}  {f.attn_to_s1:8.2f}  "
                         f"{f.attn_to_s2:8.2f}")
        lines += [f"  {name}: {path}" for name, path in self.files.items()]
        return "\n".join(lines)


def ioi_analysis(model: nn.Module, tokenizer: Any, n: int = 64, seed: int = 0, template: int | None = None,
                 top_k: int = 5, out_dir: str | None = None, batch_size: int = 128,
                 progress: bool = True) -> IOIReport:
    """Run the analysis; with `out_dir`, also write heatmaps (PNG), an attention page (HTML) and the results."""
    template = HELDOUT_TEMPLATE_IDS[0] if template is None else template
    clean_ds = make_ioi_dataset(n, seed=seed, templates=[template])
    clean = tokenize_ioi(clean_ds, tokenizer)
    corrupted = tokenize_ioi(corrupt(clean_ds, "abc"), tokenizer)
    inputs = {"input_ids": clean["input_ids"], "attention_mask": clean["attention_mask"]}
    metric = logit_diff(clean["io_ids"], clean["s_ids"], pos=clean["end_pos"])
    with torch.no_grad():
        ex = torch.arange(n)
        per_example = metric(model(**inputs).logits, ex)
    # tokenize_ioi's batches go to the sweeps as they are (they take the model inputs and leave io_ids & co.)
    heads = activation_patch(model, clean, corrupted, metric, kind="heads", batch_size=batch_size,
                             progress=progress)
    resid = activation_patch(model, clean, corrupted, metric, kind="resid_pre", batch_size=batch_size,
                             progress=progress)
    resid.cols = slot_labels(clean, tokenizer)
    # The heads that matter, by the size of their effect in either direction (a head that pushes the logit diff
    # the wrong way matters as much as one that restores it); the sign is shown.
    top = [(int(r), int(c)) for r, c, _ in heads.top(top_k)]
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in sorted({layer for layer, _ in top})]
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=names)
    rows = torch.arange(n)
    findings = []
    for layer, head in top:
        from_end = cache[f"blocks.{layer}.attn.hook_pattern"][rows, head, clean["end_pos"]]  # batch k_pos
        findings.append(HeadFinding(layer, head, float(heads.normalized_effect[layer, head]),
                                    float(heads.effect[layer, head]),
                                    *(float(from_end[rows, clean[k]].mean()) for k in ("io_pos", "s1_pos", "s2_pos"))))
    report = IOIReport(n, template, float(per_example.mean()), heads.corrupted,
                       float((per_example > 0).float().mean()), heads, resid, findings)
    if out_dir is not None:
        tokens = [[tokenizer.decode(t) for t in row[mask.bool()]] for row, mask in
                  zip(clean["input_ids"][:ATTENTION_EXAMPLES], clean["attention_mask"][:ATTENTION_EXAMPLES])]
        report.files = _write(report, cache, tokens, clean_ds.prompts[:ATTENTION_EXAMPLES], top, out_dir)
    return report


def slot_labels(batch: dict[str, Tensor], tokenizer: Any) -> list[str]:
    """One label per position of an aligned IOI batch: the token where every prompt has the same one, else the
    name slots found there across the batch ("IO/S1": IO in the ABBA prompts, S1 in the BABA ones)."""
    ids = batch["input_ids"]
    labels = []
    for p in range(ids.shape[1]):
        if bool((ids[:, p] == ids[0, p]).all()):
            labels.append(f"{p}:{tokenizer.decode(ids[0, p]).strip()}")
            continue
        slots = [name for name, key in (("IO", "io_pos"), ("S1", "s1_pos"), ("S2", "s2_pos"))
                 if bool((batch[key] == p).any())]
        words = {tokenizer.decode(t).strip() for t in ids[:, p].unique()}
        slots += [name for name, vocab in (("PLACE", PLACES), ("OBJECT", OBJECTS)) if not slots and words <= set(vocab)]
        labels.append(f"{p}:{'/'.join(slots) or '(varies)'}")
    return labels


def _write(report: IOIReport, cache: Any, tokens: list[list[str]], prompts: list[str], top: list[tuple[int, int]],
           out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    files = {"head patching heatmap": os.path.join(out_dir, "ioi_heads.png"),
             "residual patching heatmap": os.path.join(out_dir, "ioi_resid.png"),
             "attention of the top heads": os.path.join(out_dir, "ioi_attention.html"),
             "results": os.path.join(out_dir, "ioi_heads.pt")}
    which = f"{report.n} IOI prompts (template {report.template}), clean into ABC-corrupted"
    report.heads.plot(files["head patching heatmap"],
                      title=f"Logit diff (IO - S) restored by one head's clean output (hook_z), {which}")
    report.resid.plot(files["residual patching heatmap"],
                      title=f"Logit diff (IO - S) restored by the clean resid_pre at one layer and position, {which}")
    n_ex = len(tokens)
    patterns = torch.stack([torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][e, head] for layer, head in top])
                            for e in range(n_ex)])  # example head q k
    patterns = patterns[..., : len(tokens[0]), : len(tokens[0])]  # one template: every prompt has the same length
    effects = report.heads.normalized_effect if report.reliable else report.heads.effect
    attention_html(tokens, patterns, files["attention of the top heads"],
                   [f"L{layer}H{head}: effect {float(effects[layer, head]):+.2f}" for layer, head in top],
                   title="IOI: attention of the heads that matter most (ranked by |effect|, as in the summary)",
                   example_names=prompts)
    report.heads.save(files["results"])
    return files
