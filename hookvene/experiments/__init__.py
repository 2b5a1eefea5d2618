"""Experiment helpers built on hookvene: datasets and metrics for circuit analyses (IOI so far)."""

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
    logit_diff,
    make_ioi_dataset,
    name_token,
    tokenize_ioi,
)

__all__ = [
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
    "logit_diff",
    "make_ioi_dataset",
    "name_token",
    "tokenize_ioi",
]
