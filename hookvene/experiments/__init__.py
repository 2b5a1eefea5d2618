"""One-call experiments: activation / attribution / path patching sweeps, causal tracing, IOI data + analysis, and
the induction-head analysis.

    from hookvene.experiments import activation_patch, attribution_patch, causal_trace, path_patch, metrics
"""

from hookvene.experiments import metrics
from hookvene.experiments.causal_tracing import causal_trace
from hookvene.experiments.induction import InductionReport, induction_analysis
from hookvene.experiments.ioi import (
    CORRUPTIONS,
    HELDOUT_NAME_PAIRS,
    HELDOUT_TEMPLATE_IDS,
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
    TRAIN_NAME_PAIRS,
    TRAIN_TEMPLATE_IDS,
    IOIDataset,
    IOIExample,
    corrupt,
    make_ioi_dataset,
    name_token,
    tokenize_ioi,
)
from hookvene.experiments.ioi import logit_diff as ioi_logit_diff
from hookvene.experiments.ioi_analysis import IOIReport, ioi_analysis
from hookvene.experiments.patching import ALL_KINDS, KINDS, activation_patch, attribution_patch, compare
from hookvene.experiments.path_patching import path_patch
from hookvene.experiments.results import SweepResult, UnreliableGapWarning
from hookvene.experiments.sae_patching import feature_attribution, feature_patch

__all__ = [
    "ALL_KINDS",
    "KINDS",
    "IOIReport",
    "InductionReport",
    "SweepResult",
    "UnreliableGapWarning",
    "activation_patch",
    "attribution_patch",
    "causal_trace",
    "compare",
    "feature_attribution",
    "feature_patch",
    "induction_analysis",
    "ioi_analysis",
    "metrics",
    "path_patch",
    "CORRUPTIONS",
    "HELDOUT_NAME_PAIRS",
    "HELDOUT_TEMPLATE_IDS",
    "NAMES",
    "OBJECTS",
    "PLACES",
    "TEMPLATES",
    "TRAIN_NAME_PAIRS",
    "TRAIN_TEMPLATE_IDS",
    "IOIDataset",
    "IOIExample",
    "corrupt",
    "ioi_logit_diff",
    "make_ioi_dataset",
    "name_token",
    "tokenize_ioi",
]
