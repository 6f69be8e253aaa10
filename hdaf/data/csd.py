"""Read and write CMU-MultimodalSDK computational sequences (``.csd``) with h5py.

Layout (the SDK's ``writeCSD``)::

    /<root name>/data/<video_id>/features    T x D   (float; or bytes for the words file)
    /<root name>/data/<video_id>/intervals   T x 2   (seconds: start, end)
    /<root name>/metadata/<key>              shape (1,), variable-length str

Metadata values are strings; the SDK writes ``str(value)``, hdaf writes JSON when the value
is not already a string.  :func:`read_csd` gives back the JSON-decoded value when a string parses
as JSON, else the string itself.

Every failure raises :class:`CSDError` naming the file (and the video id and the field, ``features``
or ``intervals``, where there is one).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Iterator, Mapping, Optional, Tuple

import h5py
import numpy as np

# The SDK's metadata template (mmsdk.mmdatasdk.configurations.metadataconfigs); copied so that
# writing does not need mmsdk installed.
METADATA_KEYS = (
    "root name", "computational sequence description", "computational sequence version",
    "alignment compatible", "dataset name", "dataset version", "creator", "contact",
    "featureset bib citation", "dataset bib citation",
)


class CSDError(ValueError):
    """A computational sequence file is missing, unreadable or inconsistent."""

    def __init__(self, message: str, path: Optional[str] = None, video_id: Optional[str] = None,
                 field: Optional[str] = None):
        parts = []
        if path is not None:
            parts.append(f"file {path}")
        if video_id is not None:
            parts.append(f"video id {video_id!r}")
        if field is not None:
            parts.append(f"field {field!r}")
        prefix = (", ".join(parts) + ": ") if parts else ""
        super().__init__(prefix + message)
        self.path, self.video_id, self.field = path, video_id, field
        self.message = message  # without the location


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, TypeError):
            return value
    return value


class ComputationalSequence:
    """An open ``.csd`` file; entries are read lazily: ``seq[vid] -> (features, intervals)``.

    Use as a context manager or call :meth:`close`.  ``features`` of the words file are decoded
    to a 1-D array of ``str``.
    """

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise CSDError("computational sequence file not found", self.path)
        if os.path.isdir(self.path):
            raise CSDError("is a directory, expected a .csd (HDF5) file", self.path)
        try:
            self._h5 = h5py.File(self.path, "r")
        except Exception as exc:  # OSError for truncated/corrupt files
            raise CSDError(f"not a readable HDF5 computational sequence (corrupted or truncated?): "
                           f"{type(exc).__name__}: {exc}", self.path) from None
        try:
            roots = list(self._h5.keys())
            if len(roots) != 1:
                raise CSDError(f"expected exactly one root group, found {roots}", self.path)
            self.root_name = roots[0]
            root = self._h5[self.root_name]
            if not isinstance(root, h5py.Group) or "data" not in root:
                raise CSDError(f"root group {self.root_name!r} has no 'data' group", self.path)
            self._data = root["data"]
            self.metadata: Dict[str, object] = {}
            if "metadata" in root:
                for key in root["metadata"].keys():
                    ds = root["metadata"][key]
                    raw = ds[0] if ds.shape not in ((), None) and len(ds.shape) else ds[()]
                    self.metadata[key] = _decode(raw)
        except CSDError:
            self._h5.close()
            raise
        except Exception as exc:
            self._h5.close()
            raise CSDError(f"corrupted computational sequence: {type(exc).__name__}: {exc}",
                           self.path) from None

    # --- mapping interface -------------------------------------------------------------------
    def keys(self):
        try:
            return list(self._data.keys())
        except Exception as exc:
            raise CSDError(f"cannot list video ids (corrupted?): {exc}", self.path) from None

    def __contains__(self, vid: str) -> bool:
        return vid in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, vid: str) -> Tuple[np.ndarray, np.ndarray]:
        if vid not in self._data:
            raise CSDError("unknown video id (not in this computational sequence)", self.path, vid)
        raw, field = {}, None
        try:
            grp = self._data[vid]
            if not isinstance(grp, h5py.Group):
                raise CSDError("entry is a dataset, expected a group holding 'features' and "
                               "'intervals'", self.path, vid)
            for field in ("features", "intervals"):
                if field not in grp:
                    raise CSDError(f"dataset missing (the entry has {sorted(grp.keys())})",
                                   self.path, vid, field)
                if not isinstance(grp[field], h5py.Dataset):
                    raise CSDError("is a group, expected a dataset", self.path, vid, field)
                raw[field] = grp[field][()]
        except CSDError:
            raise
        except Exception as exc:  # truncated dataset chunks raise OSError here
            raise CSDError(f"cannot read entry (corrupted or truncated file?): "
                           f"{type(exc).__name__}: {exc}", self.path, vid, field) from None
        ivs = _check_intervals(raw["intervals"], self.path, vid)
        feats = _check_features(raw["features"], len(ivs), self.path, vid)
        return feats, ivs

    def close(self) -> None:
        try:
            self._h5.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"ComputationalSequence({self.path!r}, root={self.root_name!r}, entries={len(self)})"


def _check_intervals(raw, path: str, vid: str) -> np.ndarray:
    """``T x 2`` finite numbers (seconds) as float64, or a :class:`CSDError`."""
    ivs = np.asarray(raw)
    if ivs.dtype.kind not in "iuf":
        raise CSDError(f"intervals must be numbers (seconds), got dtype {ivs.dtype}", path, vid,
                       "intervals")
    if ivs.ndim != 2 or ivs.shape[1] != 2:
        raise CSDError(f"intervals must be T x 2, got shape {ivs.shape}", path, vid, "intervals")
    ivs = ivs.astype(np.float64)
    bad = ~np.isfinite(ivs).all(1)
    if bad.any():
        r = int(np.argmax(bad))
        raise CSDError(f"intervals contain NaN or inf: row {r} is {ivs[r].tolist()}", path, vid,
                       "intervals")
    return ivs


def _check_features(raw, n: int, path: str, vid: str) -> np.ndarray:
    """``T x D`` numbers as float32, or strings (the words file) as a 1-D object array.

    Integers are read as numbers; booleans, complex numbers and compound types are errors (a
    cast would silently change the values).  Values beyond float32's range become inf and are
    then handled as non-finite values.
    """
    feats = np.asarray(raw)
    kind = feats.dtype.kind
    if kind in ("S", "O", "U"):
        if not (feats.ndim == 1 or (feats.ndim == 2 and feats.shape[1] == 1)):
            raise CSDError(f"string features (a words file) must be T x 1, got shape {feats.shape}",
                           path, vid, "features")
    elif kind in ("i", "u", "f"):
        if feats.ndim not in (1, 2):
            raise CSDError(f"features must be T x D numbers, got shape {feats.shape}", path, vid,
                           "features")
    else:
        raise CSDError(f"features must be float or integer numbers (strings in a words file), "
                       f"got dtype {feats.dtype}", path, vid, "features")
    if feats.ndim == 1:
        feats = feats[:, None]
    if feats.shape[0] != n:
        raise CSDError(f"features and intervals have different lengths: {feats.shape[0]} rows "
                       f"here, {n} in 'intervals'", path, vid, "features")
    if kind in ("S", "O", "U"):
        return np.array([_as_str(f) for f in feats[:, 0]], dtype=object)
    with np.errstate(over="ignore"):
        return np.asarray(feats, dtype=np.float32)


def _as_str(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    if isinstance(x, np.ndarray):
        return _as_str(x.reshape(-1)[0])
    return str(x)


def read_csd(path: str) -> ComputationalSequence:
    """Open a ``.csd`` file (see :class:`ComputationalSequence`)."""
    return ComputationalSequence(path)


def load_csd(path: str) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, object], str]:
    """Read a whole file into memory: ``(data {vid: {"features", "intervals"}}, metadata, root)``."""
    with ComputationalSequence(path) as seq:
        data = {}
        for vid in seq.keys():
            f, i = seq[vid]
            data[vid] = {"features": f, "intervals": i}
        return data, dict(seq.metadata), seq.root_name


def default_metadata(root_name: str, description: str = "", **extra) -> Dict[str, object]:
    md = {k: "" for k in METADATA_KEYS}
    md.update({"root name": root_name, "computational sequence description": description,
               "computational sequence version": "1.0", "alignment compatible": True,
               "dataset name": "hdaf", "dataset version": "1.0", "creator": "hdaf",
               "contact": "", "featureset bib citation": "", "dataset bib citation": ""})
    md.update(extra)
    return md


def write_csd(path: str, root_name: str, data: Mapping[str, Mapping[str, np.ndarray]],
              metadata: Optional[Mapping[str, object]] = None) -> str:
    """Write ``data {vid: {"features": T x D, "intervals": T x 2}}`` in the SDK's layout.

    Feature arrays of strings (the words file) are stored as ``T x 1`` byte strings as in the
    released CMU-MOSEI files.  The file is written to a temporary name in the same folder and
    moved into place, so a crash never leaves a half-written ``.csd``.
    """
    md = default_metadata(root_name)
    if metadata:
        md.update(metadata)
    md["root name"] = root_name
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".csd", dir=folder)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h5:
            root = h5.create_group(root_name)
            dgrp = root.create_group("data")
            for vid, entry in data.items():
                feats = entry["features"]
                ivs = np.asarray(entry["intervals"], dtype=np.float64)
                if isinstance(feats, np.ndarray) and feats.dtype.kind in ("U", "O", "S"):
                    feats = np.array([[_as_str(w).encode("utf-8")] for w in feats.reshape(-1)],
                                     dtype=object if feats.size == 0 else None)
                    if feats.size == 0:
                        feats = np.zeros((0, 1), dtype="S1")
                else:
                    feats = np.asarray(feats, dtype=np.float32)
                    if feats.ndim == 1:
                        feats = feats[:, None]
                if ivs.ndim != 2 or ivs.shape[1] != 2 or ivs.shape[0] != feats.shape[0]:
                    raise CSDError(f"features {feats.shape} and intervals {ivs.shape} do not "
                                   "match (need T x D and T x 2)", path, vid)
                g = dgrp.create_group(vid)
                g.create_dataset("features", data=feats)
                g.create_dataset("intervals", data=ivs)
            mgrp = root.create_group("metadata")
            for key, value in md.items():
                ds = mgrp.create_dataset(key, (1,), dtype=h5py.special_dtype(vlen=str))
                ds[0] = value if isinstance(value, str) else json.dumps(value, default=str)
            h5.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
