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

from .mosei import MODALITIES, check_labels
from .report import DataReport
from .splits import SPLITS


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
    for s in SPLITS:
        d = raw[s]
        missing = [k for k in (*MODALITIES, "labels") if k not in d]
        if missing:
            raise ValueError(f"file {path}: split '{s}' lacks {missing}")
        arrays = {m: np.asarray(d[m], dtype=np.float32) for m in MODALITIES}
        n = len(arrays["text"])
        lab = np.asarray(d["labels"], dtype=np.float32).reshape(n, -1)
        if lab.shape[1] not in (6, 7):
            raise ValueError(f"file {path}: split '{s}' labels have {lab.shape[1]} columns per "
                             "sample; need the 6 emotions (or sentiment + 6 emotions)")
        ids = d.get("id")
        ids = [str(np.asarray(i).reshape(-1)[0]) if ids is not None else f"{s}[{k}]"
               for k, i in enumerate(ids if ids is not None else range(n))]
        emo = check_labels(lab, path, f"{s} split")
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
