"""MulT-style ``.pkl`` tensors: ``{"train"|"valid"|"test": {"text", "audio", "vision", "labels"}}``.

``text [N,T,300]``, ``audio [N,T,74]``, ``vision [N,T,35]`` (zero-padded), ``labels`` of shape
``[N,6]``, ``[N,1,6]``, ``[N,7]`` or ``[N,1,7]`` (sentiment first: dropped).  Rows of all zeros
are padding (the MulT files carry no masks); non-finite values (the released MOSEI audio has
``-inf``) are set to 0 and counted.
"""
from __future__ import annotations

import pickle
from typing import Dict, List, Optional

import numpy as np

from .csd import CSDError
from .mosei import MODALITIES, check_labels
from .report import DataReport
from .splits import SPLITS


def _numbers(value, where: str, ndims) -> np.ndarray:
    """``value`` as a float32 array of one of ``ndims`` dimensions, or a ValueError naming
    ``where`` and what was found (strings, complex, booleans, ragged lists)."""
    try:
        a = np.asarray(value)
    except ValueError as exc:  # a ragged nesting of lists
        raise ValueError(f"{where} is not an array ({exc})") from None
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{where} must hold real numbers, got dtype {a.dtype}")
    if a.ndim not in ndims:
        raise ValueError(f"{where} must be {' or '.join(f'{d}-D' for d in ndims)}, got shape "
                         f"{a.shape}")
    with np.errstate(over="ignore"):  # beyond float32: inf, then set to 0 and counted
        return a.astype(np.float32)


def _split_arrays(d, path: str, s: str) -> dict:
    """One split's modalities ``[N,T,D]``, labels ``[N,6|7]`` and ids (N strings), checked."""
    where = f"file {path}: split '{s}'"
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a dict of arrays, got {type(d).__name__}")
    missing = [k for k in (*MODALITIES, "labels") if k not in d]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    out = {m: _numbers(d[m], f"{where}, '{m}' [N,T,D]", (3,)) for m in MODALITIES}
    lab = _numbers(d["labels"], f"{where}, 'labels' [N,6|7] or [N,1,6|7]", (2, 3))
    n = len(out["text"])
    for name, a in (*((m, out[m]) for m in MODALITIES[1:]), ("labels", lab)):
        if len(a) != n:
            raise ValueError(f"{where}: 'text' has {n} samples but '{name}' has {len(a)}")
    lab = lab.reshape(n, -1)
    if lab.shape[1] not in (6, 7):
        raise ValueError(f"{where}: 'labels' have {lab.shape[1]} columns per sample; need the 6 "
                         "emotions (or sentiment + 6 emotions)")
    try:
        emo = check_labels(lab, path, s)
    except CSDError as exc:  # it names a video's 'features'; here they are the split's labels
        raise ValueError(f"{where}, 'labels': {exc.message}") from None
    ids = d.get("id")
    if ids is None:
        ids = [f"{s}[{k}]" for k in range(n)]
    else:
        if len(ids) != n:
            raise ValueError(f"{where}: 'id' has {len(ids)} entries for {n} samples")
        ids = [str(np.asarray(i).reshape(-1)[0]) for i in ids]
    return dict(out, labels=emo, id=ids)


def load_pkl(path: str, max_segments: Optional[int] = None, max_len: Optional[dict] = None,
             report: Optional[DataReport] = None):
    rep = report or DataReport("data report (pkl)")
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"pkl file {path} not found") from None
    except Exception as exc:
        raise ValueError(f"file {path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict) or any(s not in raw for s in SPLITS):
        raise ValueError(f"file {path}: expected a dict with keys train/valid/test, got "
                         f"{list(raw)[:5] if isinstance(raw, dict) else type(raw).__name__}")
    rep.note(f"pkl: {path} (MulT layout; all-zero rows treated as padding)")
    out: Dict[str, List[dict]] = {}
    split_arrays = {s: _split_arrays(raw[s], path, s) for s in SPLITS}
    for m in MODALITIES:
        widths = {s: a[m].shape[2] for s, a in split_arrays.items()}
        if len(set(widths.values())) > 1:
            raise ValueError(f"file {path}: '{m}' features must have one width in every split, "
                             f"got {widths}")
    for s in SPLITS:
        arrays = split_arrays[s]
        emo, ids = arrays.pop("labels"), arrays.pop("id")
        n = len(emo)
        samples = []
        for k in range(n):
            sample = {"id": ids[k], "video_id": ids[k].split("[")[0], "labels": emo[k]}
            ok = True
            for m in MODALITIES:
                x = arrays[m][k]
                bad = ~np.isfinite(x)
                if bad.any():
                    rep.add(s, f"{m}_nonfinite_values_set_to_0", int(bad.sum()))
                    x = np.where(bad, 0.0, x).astype(np.float32)
                mask = ~np.any(x != 0, axis=1)
                L = (max_len or {}).get(m)
                if L is not None and (~mask).sum() > L:
                    keep = np.nonzero(~mask)[0]
                    rep.add(s, f"{m}_steps_truncated", len(keep) - L)
                    mask[keep[L:]] = True
                if mask.all():
                    rep.add(s, f"segments_dropped_no_{m}", 1, example=ids[k])
                    ok = False
                    break
                sample[m], sample[m + "_mask"] = x, mask
            if ok:
                samples.append(sample)
        if max_segments is not None and len(samples) > max_segments:
            rep.add(s, "segments_dropped_by_max_segments", len(samples) - max_segments)
            samples = samples[:max_segments]
        rep.add(s, "segments", n)
        rep.add(s, "segments_kept", len(samples))
        out[s] = samples
    return out, rep
