"""Data fuzzer: small valid CMU-MOSEI folders written with hdaf's writer, one corruption each,
read through ``load_data`` (what ``hdaf train`` / ``hdaf evaluate`` call for ``data.source: csd``).

Corruptions: the HDF5 file cut at a random byte; a features dataset of the wrong dtype (strings,
complex, bool; integers and float64 are valid) or the wrong ndim; NaN / ±Inf at random feature
positions; an interval inverted (end < start), of zero length, overlapping the previous one or
not finite; labels out of [0, 3] or not finite (and a non-finite sentiment, which is not read);
a missing ``features`` or ``intervals`` dataset; features and intervals of different lengths;
the wrong feature width; a video missing from a modality file; a words file that disagrees with
the word-vector file.  ``data.mode`` and ``data.strict`` are drawn too.

The outcome must be the one docs/data_and_training.md ("Bad input: errors and counted drops")
gives: either a ``ValueError`` (``CSDError``) naming the file, and the video id and the field
where the corruption is in one, or a load whose report counts the drop or repair under its
named reason and whose samples are clean (finite features of the documented widths, labels in
[0, 3]).  Any other exception, any numpy warning, or a corrupted value reaching a sample fails.

The MulT ``.pkl`` loader (``data.source: pkl``) is fuzzed the same way, with the same settings
and checks: a valid ``{split: {"text", "audio", "vision", "labels", "id"}}`` file, one corruption
each (the pickle cut at a random byte; not a dict; a split or a key missing; NaN / ±Inf features,
set to 0 and counted exactly; emotion labels out of [0, 3] or not finite, a non-finite sentiment;
5 or 8 label columns; sample counts that disagree between keys; strings, complex, booleans or
objects instead of numbers, integers and float64 being valid; 2-D or 4-D features; a feature
width that differs between splits; fewer or more ids than samples; an all-zero sample, dropped
and counted): an error naming the file (and the split and key), or a clean load.

The generated videos are dense (contiguous words of 0.3-1 s, frames at 15 and 20 Hz inside
them, labelled segments tiling the words, no 'sp' token, no cap or truncation reached), so an
uncorrupted folder keeps every word and frame exactly once, and the counts can be checked
exactly.  Like tests/test_fuzz_backends.py the run is derandomized and bounded by
``HDAF_FUZZ_EXAMPLES`` (default 200); ``HDAF_FUZZ_EXAMPLES=5000`` is the long run.
The regression tests at the end pin what the fuzzer found.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings

import h5py
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hdaf.data import CSDError, write_csd  # noqa: E402
from hdaf.data.loading import load_data  # noqa: E402
from hdaf.data.mosei import EMOTIONS  # noqa: E402
from hdaf.data.synthetic import FILES  # noqa: E402

EXAMPLES = int(os.environ.get("HDAF_FUZZ_EXAMPLES", "200"))
ROLES = ("words", "text", "audio", "vision", "labels")
ROOTS = {"words": "words", "text": "glove_vectors", "audio": "COVAREP", "vision": "FACET 4.2",
         "labels": "All Labels"}
RATES = {"audio": 20.0, "vision": 15.0}
UNIT = {"words": "words", "text": "words", "audio": "frames", "vision": "frames"}
SPLIT_OF = {"v0": "train", "v1": "train", "v2": "valid", "v3": "test"}
BIG = {"text": 10_000, "audio": 10_000, "vision": 10_000, "aligned": 10_000}
TOKENS = ("the", "a", "happy", "no", "well", "i", "think", "so")


# ----------------------------------------------------------------------------- valid folders
def make_videos(rng, n_words, n_segments, vision_dim, label_cols):
    """{vid: {role: (features, intervals)}} for the four videos, dense as the docstring says."""
    videos = {}
    for vid, nw, ns in zip(SPLIT_OF, n_words, n_segments):
        ends = np.cumsum(rng.uniform(0.3, 1.0, nw))
        wiv = np.stack([np.concatenate([[0.0], ends[:-1]]), ends], 1)
        W = ends[-1]
        toks = np.array([TOKENS[i] for i in rng.randint(0, len(TOKENS), nw)], dtype=object)
        entry = {"words": (toks, wiv), "text": (rng.randn(nw, 300).astype(np.float32), wiv)}
        for m, dim in (("audio", 74), ("vision", vision_dim)):
            n = int(np.floor(W * RATES[m]))
            k = np.arange(n, dtype=np.float64)
            entry[m] = (rng.randn(n, dim).astype(np.float32),
                        np.stack([k / RATES[m], (k + 1) / RATES[m]], 1))
        cuts = np.sort(rng.choice(np.arange(1, nw), ns - 1, replace=False))
        bounds = np.concatenate([[0.0], ends[cuts - 1], [W]])
        seg = np.stack([bounds[:-1], bounds[1:]], 1)
        lab = rng.randint(0, 10, (ns, 6)) / 3.0
        if label_cols == 7:
            lab = np.concatenate([rng.uniform(-3, 3, (ns, 1)), lab], 1)
        entry["labels"] = (lab.astype(np.float32), seg)
        videos[vid] = entry
    return videos


def write_folder(folder, videos):
    for role in ROLES:
        write_csd(os.path.join(folder, FILES[role]), ROOTS[role],
                  {vid: {"features": e[role][0], "intervals": e[role][1]} for vid, e in videos.items()})
    with open(os.path.join(folder, "splits.json"), "w") as f:
        json.dump({"train": ["v0", "v1"], "valid": ["v2"], "test": ["v3"]}, f)


# ----------------------------------------------------------------------------- corruptions
KINDS = ("none", "truncate", "dtype", "nonfinite_features", "nonfinite_interval", "inverted",
         "zero_length", "overlap", "label_value", "sentiment_value", "missing_dataset", "length",
         "width", "missing_video", "words_disagree")


@st.composite
def problems(draw):
    nw = draw(st.lists(st.integers(2, 7), min_size=4, max_size=4))
    ns = [draw(st.integers(2, n)) for n in nw]
    p = dict(seed=draw(st.integers(0, 2 ** 31 - 1)), n_words=nw, n_segments=ns,
             vision_dim=draw(st.sampled_from([1, 5, 35])), label_cols=draw(st.sampled_from([6, 7])),
             mode=draw(st.sampled_from(["stack", "average", "unaligned"])),
             strict=draw(st.booleans()), kind=draw(st.sampled_from(KINDS)),
             vid=draw(st.sampled_from(["v0", "v1"])), frac=draw(st.floats(0, 1, exclude_max=True)))
    kind = p["kind"]
    p["role"] = draw(st.sampled_from({
        "dtype": ROLES, "nonfinite_features": ("text", "audio", "vision"), "inverted": ROLES,
        "zero_length": ROLES, "overlap": ROLES, "label_value": ("labels",),
        "sentiment_value": ("labels",), "width": ("text", "audio", "vision"),
        "missing_video": ("words", "text", "audio", "vision"), "words_disagree": ("words",),
    }.get(kind, ROLES)))
    if kind == "sentiment_value":
        p["label_cols"] = 7
    p["dtype"] = draw(st.sampled_from(["str", "complex", "bool", "int", "float64", "ndim0", "ndim3"]))
    p["field"] = draw(st.sampled_from(["features", "intervals"]))
    p["value"] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 3.5, 1e6]))
    p["n_bad"] = draw(st.integers(1, 3))
    p["delta"] = draw(st.sampled_from([1, -1]))
    return p


def _rewrite(h5, path, data):
    del h5[path]
    h5[path] = data


def corrupt(folder, p, videos, rng):
    """Apply ``p["kind"]`` to the folder; returns what the load must give: ``error`` (with the
    ``path``, ``vid``, ``field`` and ``extra`` text the message must contain) or ``ok`` (a clean
    load, with the exact ``counts`` and the ``nonfinite`` values the report must show)."""
    kind, role, vid = p["kind"], p["role"], p["vid"]
    path = os.path.join(folder, FILES[role])
    base = f"{ROOTS[role]}/data/{vid}"
    feats, ivs = videos[vid][role]
    n = len(ivs)
    row = int(p["frac"] * n)
    named = dict(path=path, vid=vid)
    if kind == "none":
        return dict(ok=True)
    if kind == "truncate":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(int(p["frac"] * size))
        return dict(error=True, path=path)
    if kind == "missing_video":
        with h5py.File(path, "r+") as h:
            del h[base]
        if p["strict"]:
            return dict(error=True, **named)
        n_seg = len(videos[vid]["labels"][1])
        return dict(ok=True, counts={f"segments_dropped_video_missing_in_{role}": n_seg})
    with h5py.File(path, "r+") as h:
        if kind == "dtype":
            shape = np.asarray(h[base + "/features"]).shape
            if role == "words":  # numbers instead of strings
                bad = {"str": None, "float64": np.zeros(shape), "int": np.zeros(shape, np.int64),
                       "complex": np.zeros(shape, np.complex64), "bool": np.zeros(shape, bool),
                       "ndim0": np.bytes_(b"x"), "ndim3": np.zeros(shape + (2,), "S1")}[p["dtype"]]
                if bad is None:
                    return dict(ok=True)
            else:
                x = np.asarray(h[base + "/features"])
                bad = {"str": x.astype("S12"), "float64": x.astype(np.float64),
                       "int": np.round(x).astype(np.int32), "complex": x.astype(np.complex64) + 1j,
                       "bool": x > 0, "ndim0": np.float32(1.0), "ndim3": x[..., None]}[p["dtype"]]
            _rewrite(h, base + "/features", bad)
            valid = role != "words" and p["dtype"] in ("float64", "int")
            if role == "labels" and p["dtype"] == "int":
                valid = True  # integer intensities in [0, 3] are valid labels
            return dict(ok=True) if valid else dict(error=True, field="features", **named)
        if kind == "nonfinite_features":
            x = np.array(h[base + "/features"])
            flat = rng.choice(x.size, min(p["n_bad"], x.size), replace=False)
            x.reshape(-1)[flat] = p["value"] if not np.isfinite(p["value"]) else np.nan
            _rewrite(h, base + "/features", x)
            return dict(ok=True, nonfinite=(role, len(flat)))
        if kind == "nonfinite_interval":
            iv = np.array(h[base + "/intervals"])
            iv[row, int(p["frac"] * 2 * n) % 2] = p["value"] if not np.isfinite(p["value"]) else np.nan
            _rewrite(h, base + "/intervals", iv)
            return dict(error=True, field="intervals", **named)
        if kind in ("inverted", "zero_length", "overlap", "words_disagree"):
            iv = np.array(h[base + "/intervals"])
            if kind == "overlap" or kind == "words_disagree":
                row = max(row, 1)
            s, e = iv[row]
            if kind == "inverted":
                iv[row] = [e, s]
            elif kind == "zero_length":
                iv[row] = [s, s]
            elif kind == "overlap":
                ps, pe = iv[row - 1]
                iv[row, 0] = ps + 0.5 * (pe - ps)
            else:
                iv[row] += 0.01
            _rewrite(h, base + "/intervals", iv)
            if role == "text":  # one alignment gives both files their intervals: keep them equal
                with h5py.File(os.path.join(folder, FILES["words"]), "r+") as hw:
                    _rewrite(hw, f"{ROOTS['words']}/data/{vid}/intervals", iv)
            if role == "words":  # the words file must agree with the word-vector file
                return dict(error=True, field="intervals", **named)
            if kind == "inverted":
                if p["strict"]:
                    return dict(error=True, field="intervals", **named)
                key = ("segments_dropped_inverted_interval" if role == "labels"
                       else f"{role}_{UNIT[role]}_dropped_inverted_interval")
                return dict(ok=True, counts={key: 1})
            if kind == "overlap":
                key = ("segments_overlapping_previous" if role == "labels"
                       else f"{role}_{UNIT[role]}_overlapping_previous")
                return dict(ok=True, counts={key: 1})
            if role == "labels":  # a zero-length segment holds no word
                return dict(ok=True, counts={"segments_dropped_no_text": 1})
            return dict(ok=True)
        if kind in ("label_value", "sentiment_value"):
            x = np.array(h[base + "/features"])
            col = 0 if kind == "sentiment_value" else x.shape[1] - 6 + int(p["frac"] * 6 * 7) % 6
            x[row, col] = p["value"]
            _rewrite(h, base + "/features", x)
            if kind == "sentiment_value":
                return dict(ok=True)  # sentiment is not read
            if 0 <= p["value"] <= 3:
                return dict(ok=True)
            return dict(error=True, field="features", extra=EMOTIONS[col - (x.shape[1] - 6)], **named)
        if kind == "missing_dataset":
            del h[f"{base}/{p['field']}"]
            return dict(error=True, field=p["field"], **named)
        if kind == "length":
            x = np.array(h[f"{base}/{p['field']}"])
            x = x[:-1] if p["delta"] < 0 else np.concatenate([x, x[-1:]], 0)
            _rewrite(h, f"{base}/{p['field']}", x)
            return dict(error=True, field=p["field"], **named)
        if kind == "width":
            x = np.array(h[base + "/features"])
            x = x[:, :-1] if (p["delta"] < 0 and x.shape[1] > 1) else np.concatenate([x, x[:, :1]], 1)
            _rewrite(h, base + "/features", x)
            return dict(error=True, field="features", **named)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- the check
def csd_config(folder, p):
    mode = "unaligned" if p["mode"] == "unaligned" else "aligned"
    return {"source": "csd", "dir": folder, "mode": mode,
            "aligned_combine": "average" if p["mode"] == "average" else "stack",
            "max_frames_per_word": 64, "max_len": dict(BIG), "split": "auto", "strict": p["strict"]}


def total(rep, key):
    return sum(rep.get(s, key) for s in ("all", "train", "valid", "test"))


def check_samples(datasets, rep, dims):
    """Report counts are non-negative ints; every sample has finite float32 features of the
    given widths, masks that leave a step, and six labels in [0, 3]."""
    for sec, kv in rep.counts.items():
        for k, v in kv.items():
            assert isinstance(v, int) and v >= 0, f"report count {sec}/{k} = {v!r}"
    for s, ds in datasets.items():
        for x in ds.samples:
            for m, d in dims.items():
                a, mk = x[m], x[m + "_mask"]
                assert a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == d, (x["id"], m, a.shape)
                assert np.isfinite(a).all(), f"{x['id']}: non-finite {m} feature reached a sample"
                assert mk.dtype == bool and mk.shape == (a.shape[0],) and not mk.all()
            lab = x["labels"]
            assert lab.shape == (6,) and np.isfinite(lab).all() and (lab >= 0).all() and (lab <= 3).all()


def check_clean(datasets, rep, p, expect, videos):
    check_samples(datasets, rep, {"text": 300, "audio": 74, "vision": p["vision_dim"]})
    for key, n in expect.get("counts", {}).items():
        assert total(rep, key) == n, f"expected {key} = {n}, report:\n{rep}"
    n_seg = sum(len(v["labels"][1]) for v in videos.values())
    kept = total(rep, "segments_kept")
    if p["kind"] == "none":
        assert kept == n_seg, rep
        for sec, kv in rep.counts.items():
            for k, v in kv.items():
                assert v == 0 or not any(w in k for w in ("dropped", "outside", "truncated",
                                                          "nonfinite", "overlapping")), (k, v)
    if "nonfinite" in expect:
        m, n = expect["nonfinite"]
        got = total(rep, f"{m}_nonfinite_values_set_to_0")
        if p["mode"] == "average" and m != "text":
            assert 1 <= got <= n, rep  # frames averaged into one vector per word
        else:
            assert got == n, f"{n} non-finite {m} values written, {got} counted:\n{rep}"


def loaded(dcfg, p, expect):
    """``load_data(dcfg)`` for a corrupted input: None after checking that the error names what
    ``expect`` says (the file, and the video or split, field and text it gives), else
    ``(datasets, report)`` of a load that must be clean. Any other exception or a numpy
    warning fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy cast warning is a corrupted value let through
        try:
            datasets, rep = load_data(dcfg, log=lambda *a: None)
        except ValueError as exc:  # CSDError is a ValueError
            msg = str(exc)
            assert expect.get("error"), f"{p['kind']}: unexpected error: {msg}"
            assert expect["path"] in msg, f"error does not name the file {expect['path']}: {msg}"
            if "vid" in expect:
                assert repr(expect["vid"]) in msg, f"error does not name the video: {msg}"
            if "field" in expect:
                assert repr(expect["field"]) in msg, f"error does not name {expect['field']!r}: {msg}"
            if "extra" in expect:
                assert expect["extra"] in msg, msg
            return None
    assert not expect.get("error"), f"{p['kind']} ({p}) was accepted silently:\n{rep}"
    return datasets, rep


def run_problem(p):
    rng = np.random.RandomState(p["seed"])
    videos = make_videos(rng, p["n_words"], p["n_segments"], p["vision_dim"], p["label_cols"])
    with tempfile.TemporaryDirectory() as folder:
        write_folder(folder, videos)
        expect = corrupt(folder, p, videos, rng)
        result = loaded(csd_config(folder, p), p, expect)
        if result is not None:
            check_clean(*result, p, expect, videos)


# One setting for every data fuzzer: derandomized, bounded by HDAF_FUZZ_EXAMPLES.
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=list(HealthCheck), database=None)


@FUZZ
@given(p=problems())
def test_fuzz_csd_loader(p):
    run_problem(p)


# ----------------------------------------------------------------------------- MulT .pkl files
# A valid file: {split: {"text" [N,T,300], "audio" [N,T,74], "vision" [N,T,Dv], "labels", "id"}}
# with N >= 1 samples per split, each with 1..T real (non-zero) rows per modality, zeros after.
PKL_KINDS = ("none", "truncate", "not_dict", "missing_split", "missing_key", "nonfinite",
             "label_value", "sentiment_value", "label_cols", "rows", "dtype", "ndim", "width",
             "id_length", "empty_sample")
PKL_SPLITS = ("train", "valid", "test")
PKL_DIMS = {"text": 300, "audio": 74}


@st.composite
def pkl_problems(draw):
    kind = draw(st.sampled_from(PKL_KINDS))
    return dict(seed=draw(st.integers(0, 2 ** 31 - 1)), n=draw(st.lists(st.integers(1, 4),
                min_size=3, max_size=3)), T=draw(st.integers(1, 6)),
                vision_dim=draw(st.sampled_from([1, 5, 35])), label_cols=draw(st.sampled_from(
                    [6, 7])), label_3d=draw(st.booleans()), with_id=draw(st.booleans()), kind=kind,
                split=draw(st.sampled_from(PKL_SPLITS)), key=draw(st.sampled_from(
                    ("text", "audio", "vision", "labels"))),
                dtype=draw(st.sampled_from(["str", "complex", "bool", "object", "int", "float64"])),
                value=draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 3.5, 1e6])),
                n_bad=draw(st.integers(1, 3)), delta=draw(st.sampled_from([1, -1])),
                frac=draw(st.floats(0, 1, exclude_max=True)))


def make_pkl(rng, p):
    dims = dict(PKL_DIMS, vision=p["vision_dim"])
    raw = {}
    for s, n in zip(PKL_SPLITS, p["n"]):
        d = {}
        for m, dim in dims.items():
            x = np.zeros((n, p["T"], dim), np.float32)
            for k in range(n):
                r = rng.randint(1, p["T"] + 1)
                x[k, :r] = rng.randn(r, dim) + 5  # real rows, never all zero
            d[m] = x
        lab = rng.randint(0, 10, (n, 6)) / 3.0
        if p["label_cols"] == 7:
            lab = np.concatenate([rng.uniform(-3, 3, (n, 1)), lab], 1)
        d["labels"] = (lab[:, None] if p["label_3d"] else lab).astype(np.float32)
        if p["with_id"]:
            d["id"] = np.array([[f"{s}v{k}", str(k)] for k in range(n)])
        raw[s] = d
    return raw


def corrupt_pkl(path, raw, p, rng):
    """Apply ``p["kind"]`` to the MulT dict and write it to ``path``; returns what the load
    must give, as :func:`corrupt` does (errors name the file, and the split and key)."""
    kind, s, key = p["kind"], p["split"], p["key"]
    d = raw[s]
    named = dict(error=True, path=path, extra=f"split '{s}'")
    expect = dict(ok=True)
    k = int(p["frac"] * len(d["text"]))
    if kind == "not_dict":
        raw = [raw[t] for t in PKL_SPLITS]
        expect = dict(error=True, path=path)
    elif kind == "missing_split":
        del raw[s]
        expect = dict(error=True, path=path)
    elif kind == "missing_key":
        del d[key]
        expect = dict(named, field=key)
    elif kind == "nonfinite" and key != "labels":
        real = np.argwhere(d[key][k].any(-1)).ravel()
        cells = [(r, c) for r in real for c in range(d[key].shape[2])]
        for i in rng.choice(len(cells), min(p["n_bad"], len(cells)), replace=False):
            d[key][(k,) + cells[i]] = p["value"] if not np.isfinite(p["value"]) else np.nan
        expect = dict(ok=True, nonfinite=(s, key, min(p["n_bad"], len(cells))))
    elif kind in ("label_value", "sentiment_value"):
        lab = d["labels"].reshape(len(d["labels"]), -1)
        if kind == "sentiment_value" and lab.shape[1] == 7:
            lab[k, 0] = p["value"]  # sentiment is not read
        elif kind == "label_value":
            lab[k, lab.shape[1] - 6 + int(p["frac"] * 42) % 6] = p["value"]
            if not 0 <= p["value"] <= 3:
                expect = named
    elif kind == "label_cols":
        lab = d["labels"].reshape(len(d["labels"]), -1)
        d["labels"] = lab[:, :5] if p["delta"] < 0 else np.concatenate(  # 6 and 7 are valid
            [lab, np.zeros((len(lab), 8 - lab.shape[1]), np.float32)], 1)
        expect = named
    elif kind == "rows":
        a = d[key]
        d[key] = a[:-1] if p["delta"] < 0 else np.concatenate([a, a[-1:]], 0)
        expect = dict(named, field=key if key != "text" else "audio")
        if key == "text":  # every other key then disagrees with 'text'
            expect.pop("field")
    elif kind == "dtype" and key != "labels":
        a = d[key]
        d[key] = {"str": a.astype("S8"), "complex": a.astype(np.complex64) + 1j, "bool": a > 0,
                  "object": a.astype(object), "int": np.round(a).astype(np.int32),
                  "float64": a.astype(np.float64)}[p["dtype"]]
        if p["dtype"] not in ("int", "float64"):
            expect = dict(named, field=key)
        elif p["dtype"] == "int":  # rows rounded to all zeros become padding
            expect = dict(ok=True, drops=True)
    elif kind == "ndim" and key != "labels":
        d[key] = d[key][..., 0] if p["delta"] < 0 else d[key][..., None]
        expect = dict(named, field=key)
    elif kind == "width" and key != "labels":
        a = d[key]
        d[key] = a[..., :-1] if p["delta"] < 0 and a.shape[2] > 1 else np.concatenate(
            [a, a[..., :1]], 2)
        expect = dict(error=True, path=path, field=key)
    elif kind == "id_length" and "id" in d:
        d["id"] = d["id"][:-1] if p["delta"] < 0 else np.concatenate([d["id"], d["id"][-1:]])
        expect = dict(named, field="id")
    elif kind == "empty_sample" and key != "labels" and len(d["text"]) > 1:  # none left: error
        d[key][k] = 0
        expect = dict(ok=True, counts={f"segments_dropped_no_{key}": 1})
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    if kind == "truncate":
        with open(path, "r+b") as f:
            f.truncate(int(p["frac"] * os.path.getsize(path)))
        expect = dict(error=True, path=path)
    return expect


def run_pkl_problem(p):
    rng = np.random.RandomState(p["seed"])
    raw = make_pkl(rng, p)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "mult.pkl")
        expect = corrupt_pkl(path, raw, p, rng)
        result = loaded({"source": "pkl", "path": path}, p, expect)
        if result is None:
            return
        datasets, rep = result
        check_samples(datasets, rep, dict(PKL_DIMS, vision=p["vision_dim"]))
        for key, n in expect.get("counts", {}).items():
            assert total(rep, key) == n, f"expected {key} = {n}, report:\n{rep}"
        kept = total(rep, "segments_kept")
        if not expect.get("drops") and "counts" not in expect:
            assert kept == sum(p["n"]), rep
        if "nonfinite" in expect:
            s, m, n = expect["nonfinite"]
            assert rep.get(s, f"{m}_nonfinite_values_set_to_0") == n, rep


@FUZZ
@given(p=pkl_problems())
def test_fuzz_pkl_loader(p):
    run_pkl_problem(p)


# ----------------------------------------------------------------------------- regressions
# Each pins one thing the fuzzer found; the hand-made folder is tests/test_data.py's.
from test_data import load_hand, write_hand_dataset  # noqa: E402


def _replace(path, dataset, data):
    with h5py.File(path, "r+") as h:
        _rewrite(h, dataset, data)


def _error(folder, **kw):
    with pytest.raises(CSDError) as e:
        load_hand(folder, **kw)
    return str(e.value)


def test_string_features_in_a_numeric_file_are_an_error(tmp_path):
    """Was an IndexError (the strings became a 1-D column, then .shape[1])."""
    folder = write_hand_dataset(str(tmp_path / "d"))
    p = os.path.join(folder, FILES["audio"])
    _replace(p, "COVAREP/data/v1/features", np.full((30, 74), b"0.5"))
    msg = _error(folder)
    assert p in msg and "'v1'" in msg and "'features'" in msg


@pytest.mark.parametrize("bad", ["complex", "bool"])
def test_complex_or_bool_features_are_an_error(tmp_path, bad):
    """Complex features lost their imaginary part (a ComplexWarning); booleans became 0/1."""
    folder = write_hand_dataset(str(tmp_path / "d"))
    p = os.path.join(folder, FILES["vision"])
    x = np.ones((24, 35), np.complex64) * 1j if bad == "complex" else np.ones((24, 35), bool)
    _replace(p, "FACET 4.2/data/v1/features", x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        msg = _error(folder)
    assert p in msg and "'v1'" in msg and "'features'" in msg and "dtype" in msg


@pytest.mark.parametrize("shape", [(), (30, 74, 1)])
def test_scalar_or_3d_features_are_an_error(tmp_path, shape):
    """A scalar dataset was an IndexError; T x D x 1 a numpy broadcast error naming no file."""
    folder = write_hand_dataset(str(tmp_path / "d"))
    p = os.path.join(folder, FILES["audio"])
    _replace(p, "COVAREP/data/v1/features", np.ones(shape, np.float32))
    msg = _error(folder)
    assert p in msg and "'v1'" in msg and "'features'" in msg and "shape" in msg


@pytest.mark.parametrize("bad", ["numbers", "two columns"])
def test_words_file_must_hold_one_string_per_word(tmp_path, bad):
    """Numbers were read as the words '0.0', ...; a T x 2 string array lost its second column."""
    folder = write_hand_dataset(str(tmp_path / "d"))
    p = os.path.join(folder, FILES["words"])
    _replace(p, "words/data/v1/features", np.zeros((6, 1)) if bad == "numbers"
             else np.full((6, 2), b"a"))
    msg = _error(folder)
    assert p in msg and "'v1'" in msg and "'features'" in msg


def test_vision_width_must_agree_across_videos(tmp_path):
    """Videos with 35- and 36-dimensional FACET frames were read; batching them then failed."""
    folder = write_hand_dataset(str(tmp_path / "d"))
    for role, root in (("words", "words"), ("text", "glove_vectors"), ("audio", "COVAREP"),
                       ("vision", "FACET 4.2"), ("labels", "All Labels")):
        with h5py.File(os.path.join(folder, FILES[role]), "r+") as h:
            h.copy(h[f"{root}/data/v1"], f"{root}/data/v2")
    p = os.path.join(folder, FILES["vision"])
    _replace(p, "FACET 4.2/data/v2/features", np.zeros((24, 36), np.float32))
    with open(os.path.join(folder, "splits.json"), "w") as f:
        json.dump({"train": ["v1", "v2"], "valid": [], "test": []}, f)
    msg = _error(folder)
    assert p in msg and "'v2'" in msg and "'v1'" in msg and "'features'" in msg and "36" in msg


def test_inverted_intervals_are_dropped_and_counted_or_strict(tmp_path):
    """Rows with end < start were used as if valid (by their midpoint)."""
    folder = write_hand_dataset(str(tmp_path / "d"))
    p = os.path.join(folder, FILES["vision"])
    iv = np.stack([np.arange(24) * 0.25, np.arange(24) * 0.25 + 0.25], 1)
    iv[2] = iv[2, ::-1]
    _replace(p, "FACET 4.2/data/v1/intervals", iv)
    lab = os.path.join(folder, FILES["labels"])
    _replace(lab, "All Labels/data/v1/intervals", np.array([[0.0, 2.0], [5.0, 3.0]]))
    out, rep = load_hand(folder)
    assert rep.get("train", "vision_frames_dropped_inverted_interval") == 1
    assert rep.get("train", "segments_dropped_inverted_interval") == 1
    assert [x["id"] for x in out["train"]] == ["v1[0]"]
    assert 2.0 not in out["train"][0]["vision"][:, 0]  # frame 2 is gone
    msg = _error(folder, strict=True)
    assert p in msg and "'v1'" in msg and "'intervals'" in msg and "row 2" in msg


def test_overlapping_words_never_duplicate_frames(tmp_path):
    """A frame inside two overlapping words went into both, and the frames after them were
    dropped without being counted (the count subtracted the duplicates)."""
    folder = write_hand_dataset(str(tmp_path / "d"), words=[("a", 0.0, 1.0), ("b", 0.5, 1.5),
                                                             ("c", 3.0, 3.4), ("d", 3.4, 4.0)])
    out, rep = load_hand(folder)
    first = out["train"][0]
    frames = first["vision"][~first["vision_mask"], 0]
    assert sorted(frames) == [0, 1, 2, 3, 4, 5]  # each once: 2, 3 go to "a", the first word
    assert rep.get("train", "vision_frames_outside_words_dropped") == 2 + 4  # 6, 7 and 16..19
    assert rep.get("train", "text_words_overlapping_previous") == 1


def test_overlapping_segments_are_counted(tmp_path):
    folder = write_hand_dataset(str(tmp_path / "d"))
    lab = os.path.join(folder, FILES["labels"])
    _replace(lab, "All Labels/data/v1/intervals", np.array([[0.0, 2.0], [1.0, 5.0]]))
    out, rep = load_hand(folder)
    assert rep.get("train", "segments_overlapping_previous") == 1
    assert len(out["train"]) == 2


def test_words_file_must_agree_with_the_word_vectors(tmp_path):
    """Words were paired with vectors by position even when their intervals differed."""
    folder = write_hand_dataset(str(tmp_path / "d"))
    p = os.path.join(folder, FILES["words"])
    with h5py.File(p, "r+") as h:
        iv = np.array(h["words/data/v1/intervals"])
    iv[3] += 0.5
    _replace(p, "words/data/v1/intervals", iv)
    msg = _error(folder)
    assert p in msg and "'v1'" in msg and "'intervals'" in msg and "word 3" in msg


@pytest.mark.parametrize("case", ["missing intervals", "nan interval", "label"])
def test_errors_name_the_field(tmp_path, case):
    """Errors named the file and the video but not which dataset of the entry was wrong."""
    folder = write_hand_dataset(str(tmp_path / "d"))
    if case == "missing intervals":
        p, field = os.path.join(folder, FILES["audio"]), "intervals"
        with h5py.File(p, "r+") as h:
            del h["COVAREP/data/v1/intervals"]
    elif case == "nan interval":
        p, field = os.path.join(folder, FILES["text"]), "intervals"
        iv = np.array([[0.0, 0.5], [0.5, 0.8], [0.8, np.nan], [3, 3.4], [3.4, 4], [5.2, 5.6]])
        _replace(p, "glove_vectors/data/v1/intervals", iv)
    else:
        p, field = os.path.join(folder, FILES["labels"]), "features"
        _replace(p, "All Labels/data/v1/features", np.array([[0, 1, 0, 0, 0, 0, 0],
                                                             [0, 0, 0, 0, 0, np.nan, 0]]))
    msg = _error(folder)
    assert p in msg and "'v1'" in msg and repr(field) in msg


def _set(split, key, make):
    def change(raw):
        raw[split][key] = make(raw[split][key])
    return change


PKL_BAD = {  # what the pkl fuzzer found: (change, the key the error must name)
    "string audio": (_set("valid", "audio", lambda a: a.astype("S8")), "audio"),
    "complex vision": (_set("train", "vision", lambda a: a.astype(np.complex64) + 1j), "vision"),
    "2-D text": (_set("test", "text", lambda a: a[..., 0]), "text"),
    "fewer audio samples": (_set("train", "audio", lambda a: a[:-1]), "audio"),
    "fewer ids": (_set("valid", "id", lambda a: a[:-1]), "id"),
    "NaN label": (_set("train", "labels", lambda a: np.where(np.arange(7) == 3, np.nan, a)),
                  "labels"),
    "other vision width": (_set("test", "vision", lambda a: a[..., :-1]), "vision"),
}


@pytest.mark.parametrize("case", list(PKL_BAD))
def test_pkl_bad_arrays_are_errors_naming_the_file_and_key(tmp_path, case):
    """Strings and 2-D features were numpy errors naming no file, complex ones lost their
    imaginary part (a ComplexWarning), fewer audio samples or ids than text samples an
    IndexError, a vision width that differs between splits was accepted, and a bad label was
    reported as "video id 'train split', field 'features'"."""
    change, key = PKL_BAD[case]
    raw = make_pkl(np.random.RandomState(0), dict(n=[2, 2, 2], T=3, vision_dim=5, label_cols=7,
                                                  label_3d=True, with_id=True))
    change(raw)
    path = str(tmp_path / "m.pkl")
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    with warnings.catch_warnings(), pytest.raises(ValueError) as e:
        warnings.simplefilter("error")
        load_data({"source": "pkl", "path": path}, log=lambda *a: None)
    msg = str(e.value)
    assert path in msg and repr(key) in msg and "video id" not in msg, msg
