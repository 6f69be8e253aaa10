"""The change baseline: a non-neural row of the results table (``model.name: change_baseline``).

Features, per segment and per modality: the mean of the *last* fifth of the segment's valid
(unmasked) steps minus the mean of the *first* fifth, per feature dimension (at least one step
each; ``window_fraction`` sets the fifth).  The segments are the models' own inputs: the same
``load_data`` call, so ``data.mode`` (aligned / unaligned) and ``data.normalize`` apply as they
do for every model.  Under ``normalize: center`` the features equal those of the raw input up to
float rounding (subtracting the segment's mean from every step cancels in a difference); under
``standardize`` they are the differences of the standardised steps the models see.

Classifier: a multinomial logistic regression (scikit-learn, ``lbfgs``) on the standardised
features (``StandardScaler``) predicting the dominant emotion (``hdaf.training.metrics``;
segments with no emotion have none and are left out of fitting, but are scored as every model's
are).  One classifier per feature set: each modality of ``modalities`` alone and their
concatenation (``"both"`` for the default vision + audio).

What is fitted on what:

* for every ``C`` of ``C_grid``, scaler and classifier are fitted on the **train** split and
  scored (Acc6) on the **valid** split;
* the chosen ``C`` is the one with the highest valid Acc6 (ties: the smallest ``C``, i.e. the
  strongest regularisation); its train-fitted classifier is kept, no refit on train + valid;
* that classifier is evaluated once on ``eval.split`` with ``compute_metrics`` (the models'
  metrics code; its class probabilities as a softmax head's).  The eval split is never read
  before this point.

Deterministic: ``lbfgs`` with BLAS limited to one thread during fitting and prediction, so the
result does not depend on the machine's thread count.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np

from .metrics import compute_metrics, dominant

NAME = "change_baseline"
DEFAULTS = {"modalities": ["vision", "audio"], "C_grid": [0.001, 0.01, 0.1, 1.0, 10.0],
            "window_fraction": 0.2, "max_iter": 2000}


def _settings(config: dict) -> dict:
    unknown = sorted(set(config or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"model.config for {NAME}: unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **(config or {})}
    from ..data.mosei import MODALITIES
    mods = list(s["modalities"])
    if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
        raise ValueError(f"model.config.modalities for {NAME}: distinct names from {MODALITIES}, "
                         f"got {s['modalities']!r}")
    grid = [float(c) for c in s["C_grid"]]
    if not grid or any(not c > 0 for c in grid):
        raise ValueError(f"model.config.C_grid for {NAME}: a non-empty list of positive numbers, "
                         f"got {s['C_grid']!r}")
    wf = float(s["window_fraction"])
    if not 0 < wf <= 0.5:
        raise ValueError(f"model.config.window_fraction for {NAME}: in (0, 0.5], got {wf!r}")
    return dict(modalities=mods, C_grid=sorted(grid), window_fraction=wf, max_iter=int(s["max_iter"]))


def change_features(sample: dict, modality: str, window_fraction: float = 0.2) -> np.ndarray:
    """Late-window mean minus early-window mean of ``sample[modality]`` over its valid steps."""
    x = np.asarray(sample[modality], dtype=np.float64)
    x = x[~np.asarray(sample[modality + "_mask"], dtype=bool)]
    if len(x) == 0:
        raise ValueError(f"segment {sample.get('id')!r} has no valid {modality} step")
    k = max(1, int(len(x) * window_fraction))
    return x[-k:].mean(0) - x[:k].mean(0)


def _design(samples: Sequence[dict], mods: List[str], wf: float):
    X = np.stack([np.concatenate([change_features(s, m, wf) for m in mods]) for s in samples])
    y = np.stack([np.asarray(s["labels"], np.float64) for s in samples])
    return X, y


def _fit(X, y, C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cls, has = dominant(y)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter))
    return clf.fit(X[has], cls[has])


def _logits(clf, X, n_classes: int) -> np.ndarray:
    """Log class probabilities in all ``n_classes`` columns (a class absent from the training
    rows gets probability 0, log -> a large negative number)."""
    p = np.zeros((len(X), n_classes))
    p[:, clf.classes_] = clf.predict_proba(X)
    return np.log(np.maximum(p, 1e-300))


def fit_select_evaluate(datasets: Dict[str, Sequence[dict]], config: dict, eval_split: str,
                        threshold=None) -> dict:
    """``datasets``: ``{"train", "valid", eval_split: samples}``.  Returns the result in the
    trainer's layout — ``{"fused": metrics of "both", "unimodal": {modality: metrics}}`` — with
    ``"selection"``: per feature set the valid Acc6 of every ``C`` and the chosen one."""
    from threadpoolctl import threadpool_limits

    s = _settings(config)
    for split in ("train", "valid", eval_split):
        if split not in datasets:
            raise ValueError(f"{NAME}: split {split!r} missing; have {sorted(datasets)}")
    sets = {m: [m] for m in s["modalities"]}
    if len(s["modalities"]) > 1:
        sets["both"] = list(s["modalities"])
    out = {"fused": None, "unimodal": {}, "selection": {}, "settings": s,
           "n": {k: len(v) for k, v in datasets.items()}}
    with threadpool_limits(1):
        for name, mods in sets.items():
            Xtr, ytr = _design(datasets["train"], mods, s["window_fraction"])
            Xva, yva = _design(datasets["valid"], mods, s["window_fraction"])
            K = ytr.shape[1]
            scores, fits = {}, {}
            for C in s["C_grid"]:
                fits[C] = _fit(Xtr, ytr, C, s["max_iter"])
                scores[C] = compute_metrics(_logits(fits[C], Xva, K), yva, "softmax")["acc6"]
            best = max(s["C_grid"], key=lambda c: (scores[c], -c))  # ties: smallest C
            Xev, yev = _design(datasets[eval_split], mods, s["window_fraction"])
            m = compute_metrics(_logits(fits[best], Xev, K), yev, "softmax", threshold)
            out["selection"][name] = {"C": best, "valid_acc6": {str(c): v for c, v in scores.items()}}
            if name == "both" or len(sets) == 1:
                out["fused"] = m
            if name in s["modalities"]:
                out["unimodal"][name] = m
    return out


def run_change_baseline(cfg: dict, settings: dict = None, log=print) -> dict:
    """Load the data as the models do (``cfg["data"]``), fit, select, evaluate; write
    ``<run_dir>/metrics_<eval split>.json``.  Seconds on the main job's data.  ``settings``:
    the baseline's own ``model.config`` (keys of ``DEFAULTS``), i.e. the experiment run's, not
    the base config's (that one configures the neural models)."""
    from ..data.loading import load_data

    datasets, _ = load_data(cfg["data"], log=log)
    split = cfg["eval"]["split"]
    res = fit_select_evaluate({k: v.samples for k, v in datasets.items()},
                              settings or {}, split,
                              threshold=cfg["eval"].get("threshold"))
    res["split"] = split
    os.makedirs(cfg["run_dir"], exist_ok=True)
    path = os.path.join(cfg["run_dir"], f"metrics_{split}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2, default=float)
    log(f"[{NAME}] chosen C on valid: " + ", ".join(f"{k}: {v['C']:g}" for k, v in res["selection"].items())
        + f"; metrics: {path}")
    return res
