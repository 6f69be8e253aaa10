"""``load_data(config)``: the one entry point training uses (synthetic, ``.csd`` folder, or ``.pkl``)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional, Tuple

import torch

from .dataset import SegmentDataset
from .mosei import find_files, load_csd_folder
from .normalize import normalize_segments
from .pkl import load_pkl
from .report import DataReport
from .synthetic import ensure_synthetic


def _file_digest(path: Optional[str]) -> list:
    """``[absolute path, sha256 of the content]``, or ``[path, None]`` for a file that is not
    there (its absence decides the result too: e.g. no ``splits.json``)."""
    if path is None or not os.path.isfile(path):
        return [path, None]
    h = hashlib.sha256()
    with open(path, "rb") as f:  # hashlib.file_digest needs Python 3.11; we support 3.10
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return [os.path.abspath(path), h.hexdigest()]


def csd_cache_key(folder: str, kw: dict) -> str:
    """The key of ``load_csd_folder(folder, **kw)``'s cached result: the configuration and the
    content of every file the loader reads (the ``.csd`` files :func:`find_files` picks and
    the split file), hashed. Contents, not sizes or modification times: a file rewritten with
    the same size, its time stamp restored, still gets a new key. Hashing reads the files once
    per call (a few seconds per GB), well below the loading it saves."""
    paths = find_files(folder, kw.get("files"), kw.get("visual", "facet"))
    split = kw.get("split", "auto")
    split_file = (os.path.join(folder, "splits.json") if split == "auto"
                  else None if split in ("standard", "random") else split)
    inputs = [_file_digest(p) for p in (*paths.values(), split_file)]
    blob = json.dumps([os.path.abspath(folder), kw, inputs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_data(dcfg: dict, log=print) -> Tuple[Dict[str, SegmentDataset], DataReport]:
    """``dcfg`` is the ``data`` section of the config (see ``hdaf.training.config.DEFAULTS``).

    ``source``: ``"synthetic"`` generates the synthetic dataset into ``dir`` when missing (seeded),
    then reads it like real data; ``"csd"`` reads a folder of CMU-MOSEI ``.csd`` files; ``"pkl"``
    reads MulT-style tensors from ``path``. With ``cache_dir`` set, the preprocessed segments
    of a ``.csd`` folder are stored there under :func:`csd_cache_key` and reused while the
    configuration and the files' contents are unchanged.
    """
    source = dcfg.get("source", "synthetic")
    common = dict(max_segments=dcfg.get("max_segments"))
    if source == "pkl":
        samples, rep = load_pkl(dcfg["path"], max_len=dcfg.get("max_len"), **common)
    elif source in ("synthetic", "csd"):
        folder = dcfg["dir"]
        if source == "synthetic":
            made = ensure_synthetic(folder, **(dcfg.get("synthetic") or {}))
            log(f"[data] synthetic dataset {'generated in' if made else 'reused from'} {folder}")
        kw = dict(mode=dcfg.get("mode", "aligned"), aligned_combine=dcfg.get("aligned_combine", "stack"),
                  max_frames_per_word=dcfg.get("max_frames_per_word", 8), max_len=dcfg.get("max_len"),
                  aligned_span=dcfg.get("aligned_span", "word"),
                  split=dcfg.get("split", "auto"), seed=dcfg.get("split_seed", 0),
                  fractions=tuple(dcfg.get("split_fractions", (0.8, 0.1, 0.1))),
                  files=dcfg.get("files"), visual=dcfg.get("visual", "facet"),
                  remove_sp=dcfg.get("remove_sp", True), strict=dcfg.get("strict", False), **common)
        cache_dir = dcfg.get("cache_dir")
        cache = None
        if cache_dir:
            cache = os.path.join(cache_dir, f"segments-{csd_cache_key(folder, kw)}.pt")
        if cache and os.path.exists(cache):
            blob = torch.load(cache, weights_only=False)
            samples, rep = blob["samples"], DataReport.from_dict(blob["report"])
            rep.note(f"segments read from cache {cache}")
        else:
            samples, rep = load_csd_folder(folder, **kw)
            if cache:
                os.makedirs(cache_dir, exist_ok=True)
                tmp = cache + ".tmp"
                torch.save({"samples": samples, "report": rep.to_dict()}, tmp)
                os.replace(tmp, cache)
    else:
        raise ValueError(f"data.source must be 'synthetic', 'csd' or 'pkl', got {source!r}")
    samples = normalize_segments(samples, dcfg.get("normalize") or "none")
    for s, v in samples.items():
        if not v:
            raise ValueError(f"data: split '{s}' is empty after preprocessing; see the report:\n{rep}")
    return {s: SegmentDataset(v) for s, v in samples.items()}, rep
