"""Per-segment input normalisation (``data.normalize``), applied after loading, to every model.

Each modality of each segment is normalised on its own, per feature dimension, over the
segment's valid (unmasked) positions; masked positions stay 0:

* ``"none"`` (default): the features as read;
* ``"center"``: subtract the segment's mean;
* ``"standardize"``: subtract the mean and divide by the standard deviation (``+ eps``).

Only the segment itself is used: no statistic crosses segments, speakers or splits, so test
segments are normalised exactly as training ones, without labels or speaker ids.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .mosei import MODALITIES

MODES = ("none", "center", "standardize")


def normalize_segments(samples: Dict[str, List[dict]], mode: str = "none",
                       eps: float = 1e-5) -> Dict[str, List[dict]]:
    """``samples`` as returned by the loaders (``{split: [sample, ...]}``); returns new samples
    (the inputs are not modified)."""
    if mode not in MODES:
        raise ValueError(f"data.normalize must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return samples
    out: Dict[str, List[dict]] = {}
    for split, items in samples.items():
        done = []
        for s in items:
            s = dict(s)
            for m in MODALITIES:
                x = np.asarray(s[m], dtype=np.float32)
                keep = ~np.asarray(s[m + "_mask"], dtype=bool)
                y = np.zeros_like(x)
                if keep.any():
                    v = x[keep].astype(np.float64)
                    v = v - v.mean(0, keepdims=True)
                    if mode == "standardize":
                        v = v / (v.std(0, keepdims=True) + eps)
                    y[keep] = v.astype(np.float32)
                s[m] = y
            done.append(s)
        out[split] = done
    return out
