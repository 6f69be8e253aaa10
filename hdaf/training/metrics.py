"""Evaluation metrics (scikit-learn); the protocol is written out in docs/data_and_training.md.

* **Dominant emotion** of a row of intensities ``y [6]``: ``argmax y`` with ties going to the
  *lowest index* among the maxima (emotion order happy, sad, anger, surprise, disgust, fear).
  Rows with no emotion (all six intensities 0) have no dominant emotion: they are *excluded*
  from the 6-class metrics and counted in ``n_no_emotion``.
* **Predicted class**: ``argmax`` of the head's probabilities (same tie rule).
* ``acc6``: accuracy of the predicted class vs the dominant emotion; ``f1_6``: weighted F1 over
  the six classes (support-weighted mean of per-class F1); ``bacc6``: balanced accuracy.
* **Presence** of emotion k: ``y_k > 0``.  Predicted presence: ``p_k > threshold`` with
  ``p = sigmoid(logits)``, threshold 0.5, for a sigmoid head; ``p = softmax(logits)``,
  threshold ``1/6`` (above uniform), for a softmax head.
* Per emotion: ``acc2`` (binary accuracy), ``f1`` (weighted F1 of the two classes), ``bacc``
  (balanced accuracy), over *all* rows.
* ``mae``: mean absolute error between ``y`` and ``3 * p`` over all rows and emotions (an
  intensity proxy: comparable only between models with the same head).
"""
from __future__ import annotations

import warnings
from typing import Dict, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

EMOTIONS = ("happy", "sad", "anger", "surprise", "disgust", "fear")


def probabilities(logits: np.ndarray, head: str) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if head == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if head == "softmax":
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(f"head must be 'softmax' or 'sigmoid', got {head!r}")


def dominant(labels: np.ndarray):
    """``(class index [N], has_emotion [N] bool)``; ties -> lowest index."""
    labels = np.asarray(labels, dtype=np.float64)
    return labels.argmax(axis=1), labels.max(axis=1) > 0


def compute_metrics(logits: np.ndarray, labels: np.ndarray, head: str = "softmax",
                    threshold: float = None, emotions: Sequence[str] = EMOTIONS) -> Dict[str, object]:
    with warnings.catch_warnings():  # sklearn warns on classes absent from y_true; expected here
        warnings.simplefilter("ignore", UserWarning)
        return _compute(logits, labels, head, threshold, emotions)


def _compute(logits, labels, head, threshold, emotions):
    logits, labels = np.asarray(logits), np.asarray(labels, dtype=np.float64)
    if logits.shape != labels.shape or logits.ndim != 2:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} must both be [N, 6]")
    p = probabilities(logits, head)
    thr = threshold if threshold is not None else (0.5 if head == "sigmoid" else 1.0 / labels.shape[1])
    true_cls, has = dominant(labels)
    pred_cls = p.argmax(axis=1)
    K = labels.shape[1]
    out: Dict[str, object] = {"n": int(len(labels)), "n_no_emotion": int((~has).sum()),
                              "head": head, "presence_threshold": float(thr)}
    if has.any():
        t, q = true_cls[has], pred_cls[has]
        out["acc6"] = float(accuracy_score(t, q))
        out["f1_6"] = float(f1_score(t, q, labels=list(range(K)), average="weighted", zero_division=0))
        out["bacc6"] = float(balanced_accuracy_score(t, q))
    else:
        out["acc6"] = out["f1_6"] = out["bacc6"] = float("nan")
    per = {}
    for k, name in enumerate(emotions):
        t = labels[:, k] > 0
        q = p[:, k] > thr
        per[name] = {"acc2": float(accuracy_score(t, q)),
                     "f1": float(f1_score(t, q, average="weighted", zero_division=0)),
                     "bacc": float(balanced_accuracy_score(t, q)) if t.any() and (~t).any() else float("nan"),
                     "positives": int(t.sum())}
    out["per_emotion"] = per
    out["mae"] = float(np.abs(labels - 3.0 * p).mean())
    return out
