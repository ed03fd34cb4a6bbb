"""CheXpert's label names and label values, shared by pretraining sources and downstream sets."""

from __future__ import annotations

import math
from typing import Literal

# The five competition classes: zero-shot and retrieval defaults everywhere.
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# The linear probe's default classes on multi-label sets that carry all of them.
PROBE_CLASSES = CHEXPERT_COMPETITION + ("Pneumothorax", "Lung Lesion", "Support Devices")

# The phantom data set's findings, in the bit order of its stored masks, with their CheXpert
# names (its `labels` member, zero-shot prompts, segmentation classes).
PHANTOM_FINDINGS = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "pleural_effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "nodule": "Lung Lesion",
    "support_devices": "Support Devices",
}

Uncertain = Literal["keep", "ignore", "ones", "zeros"]
_UNCERTAIN = {"keep": -1.0, "ignore": math.nan, "ones": 1.0, "zeros": 0.0}


def chexpert_value(raw: str, uncertain: Uncertain = "keep") -> float | None:
    """One labeller cell: 1 positive, 0 negative, -1 uncertain (mapped by `uncertain`: kept as
    -1, NaN to leave it out, or 1 / 0), blank not mentioned (None). Anything else raises."""
    text = raw.strip()
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value {raw!r} (expected 1, 0, -1 or blank)")
    return _UNCERTAIN[uncertain] if value == -1.0 else value
