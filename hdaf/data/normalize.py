"""Per-segment input normalisation (``data.normalize``), applied after loading, to every model.

Each modality of each segment is normalised on its own, per feature dimension, over the
segment's valid (unmasked) positions; masked positions stay 0:

* ``"none"`` (default): the features as read;
* ``"center"``: subtract the segment's mean;
* ``"standardize"``: subtract the mean and divide by the standard deviation (``+ eps``);
* ``"center_scale"``: subtract the segment's mean, then divide each feature dimension by one
  number per modality and dimension: the standard deviation of the centred features over every
  valid step of the **training split** (``+ eps``; a dimension constant in training keeps scale
  1).  Heterogeneous feature scales (real COVAREP / FACET dimensions span orders of magnitude)
  then no longer decide which dimensions a model attends to first; the scale is fitted on the
  training split only and applied unchanged to every split, as a standard scaler is.

``none``, ``center`` and ``standardize`` use only the segment itself; ``center_scale`` adds the
training split's per-dimension scale, and nothing else (no labels, speaker ids, or statistics of
other splits), so test segments are normalised exactly as training ones.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .mosei import MODALITIES

MODES = ("none", "center", "standardize", "center_scale")
SCALE_SPLIT = "train"


def normalize_segments(samples: Dict[str, List[dict]], mode: str = "none",
                       eps: float = 1e-5) -> Dict[str, List[dict]]:
    """``samples`` as returned by the loaders (``{split: [sample, ...]}``); returns new samples
    (the inputs are not modified)."""
    if mode not in MODES:
        raise ValueError(f"data.normalize must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return samples
    scale = _train_scale(samples, eps) if mode == "center_scale" else None
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
                    elif scale is not None:
                        v = v / scale[m]
                    y[keep] = v.astype(np.float32)
                s[m] = y
            done.append(s)
        out[split] = done
    return out


def _train_scale(samples: Dict[str, List[dict]], eps: float) -> Dict[str, np.ndarray]:
    """Per modality and feature dimension: the standard deviation of the segment-centred features
    over every valid step of the training split (``+ eps``; exactly 1 where it is 0)."""
    if SCALE_SPLIT not in samples:
        raise ValueError(f"data.normalize='center_scale' fits its scale on the {SCALE_SPLIT!r} split, "
                         f"which is missing (splits: {sorted(samples)})")
    scale = {}
    for m in MODALITIES:
        n, s1, s2, dim = 0, 0.0, 0.0, None
        for s in samples[SCALE_SPLIT]:
            x = np.asarray(s[m], dtype=np.float64)
            dim = x.shape[-1]
            keep = ~np.asarray(s[m + "_mask"], dtype=bool)
            if keep.any():
                v = x[keep] - x[keep].mean(0, keepdims=True)
                n, s1, s2 = n + len(v), s1 + v.sum(0), s2 + (v * v).sum(0)
        if dim is None:
            raise ValueError(f"data.normalize='center_scale': the {SCALE_SPLIT!r} split is empty")
        sd = np.sqrt(np.maximum(s2 / max(n, 1) - (s1 / max(n, 1)) ** 2, 0.0)) if n else np.zeros(dim)
        scale[m] = np.where(sd > 0, sd + eps, 1.0)
    return scale
