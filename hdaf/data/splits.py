"""Train/valid/test folds: the SDK's standard CMU-MOSEI folds, a seeded 80:10:10 split, or a file."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

SPLITS = ("train", "valid", "test")


def standard_folds() -> Dict[str, List[str]]:
    """The CMU-MultimodalSDK standard CMU-MOSEI video-id folds (needs ``mmsdk`` installed)."""
    try:
        from mmsdk.mmdatasdk.dataset.standard_datasets.CMU_MOSEI import cmu_mosei_std_folds as f
    except Exception as exc:  # ImportError, or mmsdk's own import-time failures
        raise RuntimeError("split='standard' needs the CMU-MultimodalSDK (pip install "
                           f"cmu-multimodal-sdk; module mmsdk): {type(exc).__name__}: {exc}") from None
    return {"train": list(f.standard_train_fold), "valid": list(f.standard_valid_fold),
            "test": list(f.standard_test_fold)}


def random_split(ids: Sequence[str], seed: int = 0,
                 fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> Dict[str, List[str]]:
    """A seeded split of ``ids`` (sorted first, so the result does not depend on input order)."""
    ids = sorted(set(ids))
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, "
                         f"got {list(fractions)}")
    order = np.random.RandomState(seed).permutation(len(ids))
    n = len(ids)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    parts = (order[:n_train], order[n_train:n_train + n_valid], order[n_train + n_valid:])
    return {name: [ids[i] for i in sorted(p)] for name, p in zip(SPLITS, parts)}


def load_split_file(path: str) -> Dict[str, List[str]]:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {path} not found") from None
    except ValueError as exc:
        raise ValueError(f"split file {path} is not valid JSON: {exc}") from None
    missing = [s for s in SPLITS if s not in d]
    if missing:
        raise ValueError(f"split file {path} lacks the keys {missing} (needs train, valid, test)")
    return {s: [str(v) for v in d[s]] for s in SPLITS}


def resolve_split(spec: str, available_ids: Iterable[str], data_dir: Optional[str] = None,
                  seed: int = 0, fractions=(0.8, 0.1, 0.1), report=None) -> Dict[str, List[str]]:
    """Video ids per split.

    ``spec``: ``"standard"`` (SDK folds), ``"random"`` (seeded 80:10:10 of the available ids),
    ``"auto"`` (``<data_dir>/splits.json`` if present, else ``"standard"`` when most available ids
    are in the standard folds, else ``"random"``), or a path to a JSON file
    ``{"train": [...], "valid": [...], "test": [...]}``.

    Ids of a split file that are not in the data raise (unknown ids); standard-fold ids missing
    from the data and available ids in no fold are counted in ``report``.
    """
    available = sorted(set(available_ids))
    avail_set = set(available)
    source = spec
    if spec == "auto":
        candidate = os.path.join(data_dir, "splits.json") if data_dir else None
        if candidate and os.path.exists(candidate):
            spec = source = candidate
        else:
            try:
                folds = standard_folds()
                in_folds = avail_set & set(sum(folds.values(), []))
                spec = "standard" if len(in_folds) >= 0.5 * max(1, len(available)) else "random"
            except RuntimeError:
                spec = "random"
            source = f"auto -> {spec}"
    if spec == "random":
        out = random_split(available, seed=seed, fractions=fractions)
    elif spec == "standard":
        folds = standard_folds()
        out = {}
        for s in SPLITS:
            present = [v for v in folds[s] if v in avail_set]
            if report is not None:
                report.add("splits", f"standard_{s}_ids_absent_from_data", len(folds[s]) - len(present))
            out[s] = present
        infold = set(sum(folds.values(), []))
        if report is not None:
            nofold = [v for v in available if v not in infold]
            report.add("splits", "ids_in_no_standard_fold_(unused)", len(nofold),
                       example=nofold[0] if nofold else None)
    else:
        path = spec
        out = load_split_file(path)
        for s in SPLITS:
            unknown = [v for v in out[s] if v not in avail_set]
            if unknown:
                raise KeyError(f"split file {path}: {len(unknown)} unknown video id(s) in '{s}', "
                               f"e.g. video id {unknown[0]!r} is not in the labels file / data")
    seen = {}
    for s in SPLITS:
        for v in out[s]:
            if v in seen and seen[v] != s:
                raise ValueError(f"split {source}: video id {v!r} is in both '{seen[v]}' and '{s}'")
            seen[v] = s
    if report is not None:
        report.note(f"split: {source} (videos: " + ", ".join(f"{s}={len(out[s])}" for s in SPLITS) + ")")
    return out
