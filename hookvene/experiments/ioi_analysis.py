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
from torch import nn

from hookvene.experiments.ioi import HELDOUT_TEMPLATE_IDS, corrupt, make_ioi_dataset, tokenize_ioi
from hookvene.experiments.metrics import logit_diff
from hookvene.experiments.patching import activation_patch
from hookvene.experiments.results import SweepResult
from hookvene.viz import attention_html


@dataclass
class HeadFinding:
    layer: int
    head: int
    effect: float  # normalized patching effect: 1 = restoring this head alone recovers the clean logit diff
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

    def summary(self) -> str:
        lines = [f"IOI on {self.n} prompts (template {self.template}, ABBA + BABA)",
                 f"  clean logit diff (IO - S)      {self.clean_logit_diff:+.3f}   accuracy {self.accuracy:.1%}",
                 f"  corrupted (ABC) logit diff     {self.corrupted_logit_diff:+.3f}",
                 "  heads whose clean output restores the most logit diff (normalized effect), and where the "
                 "final token looks:",
                 "    head     effect   attn->IO  attn->S1  attn->S2"]
        for f in self.top_heads:
            lines.append(f"    L{f.layer}H{f.head:<4} {f.effect:+7.2f}   {f.attn_to_io:8.2f}  {f.attn_to_s1:8.2f}  "
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
    corr_inputs = {"input_ids": corrupted["input_ids"], "attention_mask": corrupted["attention_mask"]}
    metric = logit_diff(clean["io_ids"], clean["s_ids"], pos=clean["end_pos"])
    with torch.no_grad():
        ex = torch.arange(n)
        per_example = metric(model(**inputs).logits, ex)
    heads = activation_patch(model, inputs, corr_inputs, metric, kind="heads", batch_size=batch_size,
                             progress=progress)
    resid = activation_patch(model, inputs, corr_inputs, metric, kind="resid_pre", batch_size=batch_size,
                             progress=progress)
    tokens = [tokenizer.decode(t) for t in clean["input_ids"][0]]
    resid.cols = [f"{i}:{t.strip()}" for i, t in enumerate(tokens)]

    effect = heads.normalized
    order = torch.argsort(effect.flatten(), descending=True)[:top_k].tolist()
    top = [(i // effect.shape[1], i % effect.shape[1]) for i in order]
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in sorted({layer for layer, _ in top})]
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=names)
    rows = torch.arange(n)
    findings = []
    for layer, head in top:
        from_end = cache[f"blocks.{layer}.attn.hook_pattern"][rows, head, clean["end_pos"]]  # batch k_pos
        findings.append(HeadFinding(layer, head, float(effect[layer, head]),
                                    *(float(from_end[rows, clean[k]].mean()) for k in ("io_pos", "s1_pos", "s2_pos"))))
    report = IOIReport(n, template, float(per_example.mean()), heads.corrupted,
                       float((per_example > 0).float().mean()), heads, resid, findings)
    if out_dir is not None:
        report.files = _write(report, cache, tokens, top, out_dir)
    return report


def _write(report: IOIReport, cache: Any, tokens: list[str], top: list[tuple[int, int]], out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    files = {"head patching heatmap": os.path.join(out_dir, "ioi_heads.png"),
             "residual patching heatmap": os.path.join(out_dir, "ioi_resid.png"),
             "attention of the top heads": os.path.join(out_dir, "ioi_attention.html"),
             "results": os.path.join(out_dir, "ioi_heads.pt")}
    report.heads.plot(files["head patching heatmap"], title="IOI: logit diff with one head's clean output restored")
    report.resid.plot(files["residual patching heatmap"], title="IOI: logit diff with resid_pre restored")
    patterns = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, head] for layer, head in top])
    attention_html(tokens, patterns, files["attention of the top heads"],
                   [f"L{layer}H{head} (example 0)" for layer, head in top], title="IOI: top heads")
    report.heads.save(files["results"])
    return files
