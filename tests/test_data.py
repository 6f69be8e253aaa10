"""Data pipeline: .csd I/O (and compatibility with the CMU-MultimodalSDK both ways), bad-input
errors, aligned / unaligned preprocessing with exact drop counts, splits, synthetic data, pkl."""
from __future__ import annotations

import json
import os
import pickle

import h5py
import numpy as np
import pytest
import torch

from hdaf.data import CSDError, load_csd, load_csd_folder, read_csd, write_csd
from hdaf.data.dataset import ResumableSampler, SegmentDataset, collate
from hdaf.data.pkl import load_pkl
from hdaf.data.splits import random_split, resolve_split
from hdaf.data.synthetic import FILES, generate_synthetic

SMALL = dict(n_speakers=5, videos_per_speaker=1, segments_per_video=2)


# ----------------------------------------------------------------------------- helpers
def _ivs(starts, step):
    starts = np.asarray(starts, float)
    return np.stack([starts, starts + step], 1)


def write_hand_dataset(folder, labels=None, words=None):
    """One video 'v1' of 6 s with hand-countable content (see test_aligned_counts_by_hand).

    vision: a frame every 0.25 s (24 frames, feature value = frame index);
    audio:  a frame every 0.20 s (30 frames, feature value = frame index);
    words:  a [0,.5) sp [.5,.8) b [.8,1.6) | c [3,3.4) d [3.4,4) | e [5.2,5.6) (outside segments);
    labelled segments: [0, 2) and [3, 5).
    """
    os.makedirs(folder, exist_ok=True)
    words = words or [("a", 0.0, 0.5), ("sp", 0.5, 0.8), ("b", 0.8, 1.6), ("c", 3.0, 3.4),
                      ("d", 3.4, 4.0), ("e", 5.2, 5.6)]
    toks = np.array([w[0] for w in words], dtype=object)
    wiv = np.array([[w[1], w[2]] for w in words], float)
    wvec = np.stack([np.full(300, i + 1, np.float32) for i in range(len(words))])
    vis = np.repeat(np.arange(24, dtype=np.float32)[:, None], 35, 1)
    aud = np.repeat(np.arange(30, dtype=np.float32)[:, None], 74, 1)
    lab = labels if labels is not None else np.array([[0, 1, 0, 0, 0, 0, 0], [0, 0, 2, 0, 0, 0, 0]], np.float32)
    write_csd(os.path.join(folder, FILES["words"]), "words", {"v1": {"features": toks, "intervals": wiv}})
    write_csd(os.path.join(folder, FILES["text"]), "glove_vectors", {"v1": {"features": wvec, "intervals": wiv}})
    write_csd(os.path.join(folder, FILES["vision"]), "FACET 4.2",
              {"v1": {"features": vis, "intervals": _ivs(np.arange(24) * 0.25, 0.25)}})
    write_csd(os.path.join(folder, FILES["audio"]), "COVAREP",
              {"v1": {"features": aud, "intervals": _ivs(np.arange(30) * 0.2, 0.2)}})
    write_csd(os.path.join(folder, FILES["labels"]), "All Labels",
              {"v1": {"features": lab, "intervals": np.array([[0.0, 2.0], [3.0, 5.0]])}})
    split = os.path.join(folder, "splits.json")
    with open(split, "w") as f:
        json.dump({"train": ["v1"], "valid": [], "test": []}, f)
    return folder


def load_hand(folder, **kw):
    return load_csd_folder(folder, split=os.path.join(folder, "splits.json"), **kw)


# ----------------------------------------------------------------------------- csd I/O
def test_write_read_roundtrip(tmp_path):
    p = str(tmp_path / "x.csd")
    feats = np.random.RandomState(0).randn(4, 3).astype(np.float32)
    write_csd(p, "COVAREP", {"v": {"features": feats, "intervals": _ivs([0, 1, 2, 3], 1)}},
              {"creator": "me", "extra": {"k": [1, 2]}})
    with read_csd(p) as seq:
        f, i = seq["v"]
        assert seq.root_name == "COVAREP" and seq.keys() == ["v"]
        assert seq.metadata["creator"] == "me" and seq.metadata["extra"] == {"k": [1, 2]}
    np.testing.assert_array_equal(f, feats)
    np.testing.assert_array_equal(i, _ivs([0, 1, 2, 3], 1))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_mmsdk_reads_what_hdaf_writes(tmp_path):
    md = pytest.importorskip("mmsdk.mmdatasdk")
    folder = generate_synthetic(str(tmp_path / "syn"), **SMALL)
    for role in ("text", "audio", "vision", "labels", "words"):
        ours, _, root = load_csd(folder[role])
        ds = md.mmdataset({role: folder[role]})
        theirs = ds[role]
        assert set(theirs.data.keys()) == set(ours.keys())
        for vid in ours:
            np.testing.assert_array_equal(theirs.data[vid]["intervals"][:], ours[vid]["intervals"])
            got = theirs.data[vid]["features"][:]
            if role == "words":
                got = np.array([w[0].decode() for w in got], dtype=object)
            np.testing.assert_array_equal(got, ours[vid]["features"])
        rn = theirs.metadata["root name"]
        assert (rn.decode() if isinstance(rn, bytes) else rn) == root


def test_hdaf_reads_what_mmsdk_writes(tmp_path):
    """mmsdk deploys a copy of every synthetic file; hdaf's whole pipeline gives the same samples."""
    md = pytest.importorskip("mmsdk.mmdatasdk")
    from mmsdk.mmdatasdk.configurations.metadataconfigs import featuresetMetadataTemplate

    src = str(tmp_path / "syn")
    paths = generate_synthetic(src, **SMALL)
    dst = tmp_path / "via_mmsdk"
    dst.mkdir()
    for role, fname in FILES.items():
        ours, _, root = load_csd(paths[role])
        data = {}
        for vid, e in ours.items():
            f = e["features"]
            if role == "words":
                f = np.array([[w.encode()] for w in f])
            data[vid] = {"features": f, "intervals": e["intervals"]}
        cs = md.computational_sequence(root)
        cs.setData(data, root)
        meta = {k: "sdk" for k in featuresetMetadataTemplate}
        meta["root name"] = root
        cs.setMetadata(meta, root)
        cs.deploy(str(dst / fname))
    (dst / "splits.json").write_text(open(paths["splits"]).read())
    a, _ = load_csd_folder(src, mode="aligned")
    b, _ = load_csd_folder(str(dst), mode="aligned")
    with read_csd(str(dst / FILES["audio"])) as seq:
        assert seq.metadata["creator"] == "sdk"
    for s in a:
        assert [x["id"] for x in a[s]] == [x["id"] for x in b[s]]
        for x, y in zip(a[s], b[s]):
            for k in ("text", "audio", "vision", "labels", "text_mask", "audio_mask", "vision_mask"):
                np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- bad inputs
def test_missing_modality_file(tmp_path):
    folder = write_hand_dataset(str(tmp_path / "d"))
    os.unlink(os.path.join(folder, FILES["audio"]))
    with pytest.raises(FileNotFoundError) as e:
        load_hand(folder)
    assert "audio" in str(e.value) and folder in str(e.value) and "COVAREP" in str(e.value)


def test_corrupted_and_truncated_files(tmp_path):
    p = tmp_path / "junk.csd"
    p.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(CSDError) as e:
        read_csd(str(p))
    assert str(p) in str(e.value)
    folder = write_hand_dataset(str(tmp_path / "d"))
    lab = os.path.join(folder, FILES["vision"])
    raw = open(lab, "rb").read()
    with open(lab, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(CSDError) as e:
        load_hand(folder)
    assert lab in str(e.value)


def test_truncated_dataset_names_video(tmp_path):
    """A file whose header is intact but whose data chunks were cut off: error names file + id."""
    p = str(tmp_path / "t.csd")
    big = np.random.RandomState(0).randn(20000, 74).astype(np.float32)
    write_csd(p, "COVAREP", {"vidX": {"features": big, "intervals": _ivs(np.arange(20000) * 0.05, 0.05)}})
    size = os.path.getsize(p)
    with h5py.File(p, "r") as h:
        off = h["COVAREP/data/vidX/features"].id.get_offset()
    assert off is not None and off < size
    with open(p, "r+b") as f:
        f.truncate(off + 1000)
    with pytest.raises(CSDError) as e:
        with read_csd(p) as seq:
            seq["vidX"]
    assert p in str(e.value)


def test_length_mismatch_names_file_and_video(tmp_path):
    folder = write_hand_dataset(str(tmp_path / "d"))
    p = os.path.join(folder, FILES["vision"])
    with h5py.File(p, "r+") as h:
        del h["FACET 4.2/data/v1/intervals"]
        h["FACET 4.2/data/v1/intervals"] = _ivs(np.arange(23) * 0.25, 0.25)
    with pytest.raises(CSDError) as e:
        load_hand(folder)
    msg = str(e.value)
    assert p in msg and "'v1'" in msg and "different lengths" in msg
    with pytest.raises(CSDError, match="do not match"):
        write_csd(str(tmp_path / "bad.csd"), "x", {"v": {"features": np.zeros((3, 2)), "intervals": np.zeros((2, 2))}})


def test_load_data_cache_never_serves_a_changed_file(tmp_path):
    """load_data keys its cache on the files' contents: a labels file rewritten in place, same
    size, its modification time restored, is read anew; unchanged files come from the cache."""
    from hdaf.data.loading import load_data

    folder = str(tmp_path / "d")
    generate_synthetic(folder, n_speakers=10, videos_per_speaker=1, segments_per_video=1)
    dcfg = dict(source="csd", dir=folder, cache_dir=str(tmp_path / "cache"))

    def labels_and_cached():
        data, rep = load_data(dcfg, log=lambda *a: None)
        cached = any(n.startswith("segments read from cache") for n in rep.notes)
        return {s["id"]: s["labels"].tolist() for d in data.values() for s in d.samples}, cached

    first, cached = labels_and_cached()
    assert not cached and labels_and_cached() == (first, True)
    path = os.path.join(folder, FILES["labels"])
    before = os.stat(path)
    with h5py.File(path, "r+") as h:
        vid = sorted(h["All Labels/data"])[0]
        feats = h[f"All Labels/data/{vid}/features"]
        new = 3.0 - feats[0, 1]  # a different value in [0, 3], written in place
        feats[0, 1] = new
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second, cached = labels_and_cached()
    assert not cached and second[f"{vid}[0]"][0] == pytest.approx(new) != first[f"{vid}[0]"][0]
    assert labels_and_cached() == (second, True)


def test_labels_out_of_range(tmp_path):
    bad = np.array([[0, 1, 0, 0, 0, 0, 0], [0, 0, 3.5, 0, 0, 0, 0]], np.float32)
    folder = write_hand_dataset(str(tmp_path / "d"), labels=bad)
    with pytest.raises(CSDError) as e:
        load_hand(folder)
    msg = str(e.value)
    assert os.path.join(folder, FILES["labels"]) in msg and "'v1'" in msg and "sad" in msg and "3.5" in msg


def test_unknown_ids(tmp_path):
    folder = write_hand_dataset(str(tmp_path / "d"))
    with read_csd(os.path.join(folder, FILES["audio"])) as seq:
        with pytest.raises(CSDError) as e:
            seq["nope"]
    assert "'nope'" in str(e.value) and FILES["audio"] in str(e.value)
    split = tmp_path / "s.json"
    split.write_text(json.dumps({"train": ["v1"], "valid": ["ghost"], "test": []}))
    with pytest.raises(KeyError) as e:
        load_csd_folder(folder, split=str(split))
    assert "'ghost'" in str(e.value) and str(split) in str(e.value)


def test_video_missing_from_one_modality_is_counted_or_strict(tmp_path):
    folder = write_hand_dataset(str(tmp_path / "d"))
    p = os.path.join(folder, FILES["vision"])
    write_csd(p, "FACET 4.2", {"other": {"features": np.zeros((2, 35)), "intervals": _ivs([0, 1], 1)}})
    out, rep = load_hand(folder)
    assert out["train"] == [] and rep.get("train", "segments_dropped_video_missing_in_vision") == 2
    with pytest.raises(CSDError) as e:
        load_hand(folder, strict=True)
    assert p in str(e.value) and "'v1'" in str(e.value)


# ----------------------------------------------------------------------------- preprocessing
def test_aligned_stack_counts_by_hand(tmp_path):
    folder = write_hand_dataset(str(tmp_path / "d"))
    out, rep = load_hand(folder, mode="aligned", aligned_combine="stack", max_frames_per_word=8)
    c = lambda k: rep.get("train", k)  # noqa: E731
    assert c("segments_labelled") == 2 and c("segments_kept") == 2
    assert c("text_words_outside_labelled_segments") == 1          # 'e'
    assert c("vision_frames_outside_labelled_segments") == 8       # 24 - 8 - 8
    assert c("audio_frames_outside_labelled_segments") == 10       # 30 - 10 - 10
    assert c("words_in_segments") == 5 and c("words_removed_sp_token") == 1
    assert c("vision_frames_outside_words_dropped") == 7           # 3 in seg 0, 4 in seg 1
    assert c("audio_frames_outside_words_dropped") == 9            # 4 + 5
    assert c("audio_frames_over_word_cap_dropped") == 0
    s0, s1 = out["train"]
    assert s0["id"] == "v1[0]" and s1["id"] == "v1[1]"
    # seg 0: word a -> K=2 (2 vision, 2 audio), word b -> K=4 (3 vision, 4 audio)
    assert s0["text"].shape == (6, 300) and s0["vision"].shape == (6, 35) and s0["audio"].shape == (6, 74)
    assert s0["text_mask"].tolist() == [False, True, False, True, True, True]
    assert s0["vision_mask"].tolist() == [False, False, False, False, False, True]
    assert s0["audio_mask"].tolist() == [False] * 6
    assert s0["text"][[0, 2], 0].tolist() == [1.0, 3.0]            # word vectors of 'a' and 'b'
    assert s0["vision"][:5, 0].tolist() == [0, 1, 3, 4, 5]         # frames .125 .375 | .875 1.125 1.375
    assert s0["audio"][:, 0].tolist() == [0, 1, 4, 5, 6, 7]
    assert s1["text"].shape[0] == 5                                  # c: K=2, d: K=3
    np.testing.assert_array_equal(s0["labels"], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(s1["labels"], [0, 2, 0, 0, 0, 0])


def test_aligned_cap_and_truncation_counts(tmp_path):
    folder = write_hand_dataset(str(tmp_path / "d"))
    _, rep = load_hand(folder, mode="aligned", max_frames_per_word=3)
    assert rep.get("train", "audio_frames_over_word_cap_dropped") == 1   # word b: 4 audio frames
    assert rep.get("train", "vision_frames_over_word_cap_dropped") == 0
    out, rep = load_hand(folder, mode="aligned", max_len={"aligned": 5})
    assert rep.get("train", "text_words_truncated") == 1                 # 'b' no longer fits
    assert rep.get("train", "vision_frames_truncated") == 3
    assert rep.get("train", "audio_frames_truncated") == 4
    assert rep.get("train", "segments_truncated_aligned") == 1
    assert [len(s["text"]) for s in out["train"]] == [2, 5]


def test_aligned_span_to_next_word_by_hand(tmp_path):
    """aligned_span='to_next_word': a word spans from its start to the next kept word's start
    (the first from the segment's start, the last to its end): every frame of a segment is kept,
    in time order, and nothing is counted as outside words."""
    folder = write_hand_dataset(str(tmp_path / "d"))
    out, rep = load_hand(folder, mode="aligned", aligned_span="to_next_word", max_frames_per_word=8)
    c = lambda k: rep.get("train", k)  # noqa: E731
    assert c("vision_frames_outside_words_dropped") == 0 and c("audio_frames_outside_words_dropped") == 0
    assert c("audio_frames_over_word_cap_dropped") == 0
    s0, s1 = out["train"]
    # seg 0: a spans [0, .8) -> vision 0-2, audio 0-3 (K=4); b spans [.8, 2) -> vision 3-7, audio 4-9 (K=6)
    assert s0["text_mask"].tolist() == [False] + [True] * 3 + [False] + [True] * 5
    assert s0["vision"][~s0["vision_mask"], 0].tolist() == list(range(8))
    assert s0["audio"][~s0["audio_mask"], 0].tolist() == list(range(10))
    assert s0["vision_mask"].tolist() == [False] * 3 + [True] + [False] * 5 + [True]
    # seg 1: c spans [3, 3.4) -> vision 12-13, audio 15-16; d spans [3.4, 5) -> vision 14-19, audio 17-24
    assert s1["vision"][~s1["vision_mask"], 0].tolist() == list(range(12, 20))
    assert s1["audio"][~s1["audio_mask"], 0].tolist() == list(range(15, 25))
    assert len(s1["text"]) == 2 + 8
    # the cap still applies, counted
    _, rep = load_hand(folder, mode="aligned", aligned_span="to_next_word", max_frames_per_word=4)
    assert rep.get("train", "audio_frames_over_word_cap_dropped") == 2 + 4      # b: 6 -> 4; d: 8 -> 4
    assert rep.get("train", "vision_frames_over_word_cap_dropped") == 1 + 2     # b: 5 -> 4; d: 6 -> 4
    with pytest.raises(ValueError, match="aligned_span"):
        load_hand(folder, mode="aligned", aligned_span="gaps")


def test_aligned_average(tmp_path):
    folder = write_hand_dataset(str(tmp_path / "d"))
    out, rep = load_hand(folder, mode="aligned", aligned_combine="average")
    s0 = out["train"][0]
    assert s0["text"].shape == (2, 300) and s0["vision"].shape == (2, 35)
    assert s0["vision"][:, 0].tolist() == [0.5, 4.0]                  # mean(0,1), mean(3,4,5)
    assert s0["audio"][:, 0].tolist() == [0.5, 5.5]                   # mean(0,1), mean(4..7)
    assert not s0["vision_mask"].any()


def test_unaligned_counts(tmp_path):
    folder = write_hand_dataset(str(tmp_path / "d"))
    out, rep = load_hand(folder, mode="unaligned", max_len={"vision": 6})
    s0, s1 = out["train"]
    assert s0["text"].shape[0] == 2 and s0["audio"].shape[0] == 10 and s0["vision"].shape[0] == 6
    assert s1["text"].shape[0] == 2 and s1["audio"].shape[0] == 10
    assert rep.get("train", "vision_frames_truncated") == 4
    assert rep.get("train", "vision_frames_outside_words_dropped") == 0   # nothing else is dropped
    assert rep.get("train", "audio_frames_truncated") == 0
    assert s0["vision"][:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_segment_without_frames_dropped_and_counted(tmp_path):
    words = [("a", 0.0, 0.5), ("b", 3.0, 3.4)]
    folder = write_hand_dataset(str(tmp_path / "d"), words=words)
    p = os.path.join(folder, FILES["vision"])
    write_csd(p, "FACET 4.2", {"v1": {"features": np.ones((4, 35)), "intervals": _ivs(np.arange(4) * 0.25, 0.25)}})
    out, rep = load_hand(folder, mode="unaligned")
    assert [s["id"] for s in out["train"]] == ["v1[0]"]
    assert rep.get("train", "segments_dropped_no_vision") == 1
    assert "v1[1]" in rep.summary()


# ----------------------------------------------------------------------------- splits / synthetic / pkl
def test_random_split_seeded():
    ids = [f"v{i}" for i in range(50)]
    a, b = random_split(ids, seed=3), random_split(list(reversed(ids)), seed=3)
    assert a == b and [len(a[s]) for s in ("train", "valid", "test")] == [40, 5, 5]
    assert not (set(a["train"]) & set(a["test"])) and random_split(ids, seed=4) != a


def test_standard_folds_from_mmsdk():
    pytest.importorskip("mmsdk.mmdatasdk")
    from mmsdk.mmdatasdk.dataset.standard_datasets.CMU_MOSEI import cmu_mosei_std_folds as f

    ids = list(f.standard_train_fold[:7]) + list(f.standard_test_fold[:2]) + ["not_a_mosei_id"]
    from hdaf.data.report import DataReport

    rep = DataReport()
    sp = resolve_split("standard", ids, report=rep)
    assert sp["train"] == list(f.standard_train_fold[:7]) and sp["test"] == list(f.standard_test_fold[:2])
    assert rep.get("splits", "ids_in_no_standard_fold_(unused)") == 1


def test_synthetic_shape_and_determinism(tmp_path):
    a = generate_synthetic(str(tmp_path / "a"), seed=5, **SMALL)
    b = generate_synthetic(str(tmp_path / "b"), seed=5, **SMALL)
    for role in ("text", "audio", "vision", "labels"):
        da, _, _ = load_csd(a[role])
        db, _, _ = load_csd(b[role])
        assert da.keys() == db.keys()
        for v in da:
            np.testing.assert_array_equal(da[v]["features"], db[v]["features"])
    lab, _, _ = load_csd(a["labels"])
    emo = np.concatenate([e["features"][:, 1:] for e in lab.values()])
    assert emo.shape[1] == 6 and emo.min() >= 0 and emo.max() <= 3
    vis, _, _ = load_csd(a["vision"])
    aud, _, _ = load_csd(a["audio"])
    v = next(iter(vis))
    assert np.allclose(np.diff(vis[v]["intervals"][:, 0]), 1 / 15) and vis[v]["features"].shape[1] == 35
    assert np.allclose(np.diff(aud[v]["intervals"][:, 0]), 1 / 20) and aud[v]["features"].shape[1] == 74
    sp = json.load(open(a["splits"]))
    spk = {s: {x.split("_")[0] for x in sp[s]} for s in sp}
    assert not (spk["train"] & spk["test"]) and not (spk["train"] & spk["valid"])  # speaker-disjoint


def test_pkl_loader(tmp_path):
    rng = np.random.RandomState(0)

    def split(n):
        text = rng.randn(n, 6, 300).astype(np.float32)
        text[:, :2] = 0                              # left padding as in MulT's files
        audio = rng.randn(n, 6, 74).astype(np.float32)
        audio[0, 3, 5] = -np.inf
        vision = rng.randn(n, 6, 35).astype(np.float32)
        labels = np.zeros((n, 1, 7), np.float32)
        labels[:, 0, 2] = 1.0
        return {"text": text, "audio": audio, "vision": vision, "labels": labels}

    p = tmp_path / "m.pkl"
    with open(p, "wb") as f:
        pickle.dump({"train": split(4), "valid": split(2), "test": split(2)}, f)
    out, rep = load_pkl(str(p))
    s = out["train"][0]
    assert s["text_mask"].tolist() == [True, True, False, False, False, False]
    assert s["audio"][3, 5] == 0 and rep.get("train", "audio_nonfinite_values_set_to_0") == 1
    np.testing.assert_array_equal(s["labels"], [0, 1, 0, 0, 0, 0])


def test_collate_and_sampler():
    s = [{"id": str(i), "labels": np.zeros(6, np.float32),
          **{m: np.ones((n, d), np.float32) for m, d in (("text", 3), ("audio", 2), ("vision", 2))},
          **{m + "_mask": np.zeros(n, bool) for m in ("text", "audio", "vision")}} for i, n in enumerate([2, 4])]
    b = collate(s)
    assert b["text"].shape == (2, 4, 3) and b["text_mask"].tolist() == [[False, False, True, True], [False] * 4]
    assert b["text"][0, 2:].abs().sum() == 0
    full = ResumableSampler(10, 3, seed=1)
    r0, r1 = (ResumableSampler(10, 3, seed=1, rank=r, world_size=2) for r in (0, 1))
    i0, i1 = sum(r0.batches(), []), sum(r1.batches(), [])
    assert len(i0) == len(i1) == 5 and sorted(i0 + i1) == list(range(10))
    part = ResumableSampler(10, 3, seed=1)
    part.set_epoch(0, start_batch=2)
    assert list(part) == full.batches()[2:]
    full.set_epoch(1)
    assert full.batches() != ResumableSampler(10, 3, seed=1).batches()
    assert torch.is_tensor(b["labels"])


# ----------------------------------------------------------------------------- synthetic knobs
def test_synthetic_offset_and_signal_knobs(tmp_path):
    """The generator's draws do not depend on the knobs (they only scale), so differences between
    datasets generated with the same seed isolate each term: the speaker offset is a constant per
    video that scales with speaker_offset; the signal is 0 outside [onset, segment end)."""
    import hashlib

    from hdaf.data.synthetic import ensure_synthetic

    def vis(name, **kw):
        generate_synthetic(str(tmp_path / name), **SMALL, **kw)
        seq = read_csd(str(tmp_path / name / FILES["vision"]))
        lab = read_csd(str(tmp_path / name / FILES["labels"]))
        return ({v: np.asarray(seq[v][0], np.float64) for v in seq.keys()},
                {v: np.asarray(lab[v][1]) for v in lab.keys()},
                {v: np.asarray(seq[v][1]).mean(1) for v in seq.keys()})

    base, segs, mid = vis("none", speaker_offset=0.0, signal_strength=0.0)
    off1, _, _ = vis("off1", speaker_offset=1.0, signal_strength=0.0)
    off2, _, _ = vis("off2", speaker_offset=2.0, signal_strength=0.0)
    sig, _, _ = vis("sig", speaker_offset=0.0, signal_strength=1.5)
    for v in base:
        mids = mid[v]
        d1 = off1[v] - base[v]
        assert np.allclose(d1, d1[0:1], atol=1e-5)              # one constant offset per video
        assert np.abs(d1[0]).max() > 0.05
        assert np.allclose(off2[v] - base[v], 2 * d1, atol=1e-5)
        ds = sig[v] - base[v]
        outside = np.ones(len(ds), bool)
        for a, b in segs[v]:
            outside &= ~((mids >= a) & (mids < b))
        assert np.abs(ds[outside]).max() < 1e-5                 # no signal outside segments
        assert base[v].std() == pytest.approx(0.5, rel=0.15)    # what is left is the noise
    assert any(np.abs(sig[v] - base[v]).max() > 0.1 for v in base)
    # knobs at 1.0 give bitwise the data of the version before they existed
    generate_synthetic(str(tmp_path / "default"), n_speakers=20)
    f = np.ascontiguousarray(read_csd(str(tmp_path / "default" / FILES["vision"]))["spk000_v00"][0])
    assert hashlib.sha256(f.tobytes()).hexdigest()[:16] == "ef06a0cef58cbf10"
    # a stamp written before signal_strength existed is reused, not regenerated
    stamp = tmp_path / "default" / "SYNTHETIC.json"
    p = json.loads(stamp.read_text())
    del p["signal_strength"]
    stamp.write_text(json.dumps(p))
    assert ensure_synthetic(str(tmp_path / "default"), n_speakers=20) is None
    assert ensure_synthetic(str(tmp_path / "default"), n_speakers=20, signal_strength=2.0) is not None


# ----------------------------------------------------------------------------- generator knobs
def _content_hash(folder):
    """sha256 of every array in the ``.csd`` files (by path, dtype, bytes) and of splits.json:
    the data, independent of HDF5's file layout (SYNTHETIC.json, the parameter record, is not
    hashed: it lists every knob, new ones included)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(os.listdir(folder)):
        p = os.path.join(folder, f)
        if f.endswith(".csd"):
            with h5py.File(p, "r") as g:
                def visit(name, obj):
                    if isinstance(obj, h5py.Dataset):
                        a = np.asarray(obj[()])
                        h.update(name.encode())
                        h.update(str(a.dtype).encode())
                        h.update(repr(a.tolist()).encode() if a.dtype == object else a.tobytes())
                g.visititems(visit)
        elif f == "splits.json":
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_synthetic_defaults_are_bitwise_unchanged(tmp_path):
    """The main job's data (the generator's defaults) and a small draw hash as they did before
    the drift / ramp / complementary / label-noise knobs existed (hashes taken then)."""
    generate_synthetic(str(tmp_path / "d"))
    assert _content_hash(str(tmp_path / "d")) == \
        "02f19401317e851c11b55f084657703ee1f90f3442cdb9ad5664a93420d7e0bb"
    generate_synthetic(str(tmp_path / "s"), n_speakers=10)
    assert _content_hash(str(tmp_path / "s")) == \
        "0eb5b130844bdb1c013501d6dd59a3a2cf643de0eb0cb35abd275cfdbb8cd90e"


def _frames(folder, role):
    return load_csd(os.path.join(folder, FILES[role]))[0]


def test_synthetic_change_knobs(tmp_path):
    """Each knob changes what it says and nothing else: labels, words and splits stay those of
    the default draw; drift makes frames differ by a line in time; with no emotion carried and
    no offset, a modality's frames are pure noise (the default draw's noise)."""
    base = str(tmp_path / "base")
    generate_synthetic(base, **SMALL)
    lab0 = _frames(base, "labels")
    for name, kw in {"drift": dict(speaker_drift=0.5), "ramp": dict(signal_shape="ramp"),
                     "comp": dict(signal_emotions={"vision": ["happy"], "audio": ["sad"], "text": []}),
                     "noise": dict(label_noise={"audio": 1.0})}.items():
        d = str(tmp_path / name)
        generate_synthetic(d, **SMALL, **kw)
        lab = _frames(d, "labels")
        for v in lab0:
            np.testing.assert_array_equal(lab[v]["features"], lab0[v]["features"])
        with open(os.path.join(d, "splits.json")) as f, open(os.path.join(base, "splits.json")) as g:
            assert json.load(f) == json.load(g)
        a, a0 = _frames(d, "audio"), _frames(base, "audio")
        assert any(not np.array_equal(a[v]["features"], a0[v]["features"]) for v in a0), name
    # drift: the difference to the default draw is linear in time, per feature
    a, a0 = _frames(str(tmp_path / "drift"), "vision"), _frames(base, "vision")
    v = sorted(a0)[0]
    diff = (a[v]["features"] - a0[v]["features"]).astype(np.float64)
    mid = a0[v]["intervals"].mean(1)
    slope = np.linalg.lstsq(mid[:, None], diff, rcond=None)[0]
    np.testing.assert_allclose(mid[:, None] * slope, diff, atol=1e-4)
    assert np.abs(slope).max() > 0.01
    # ramps: within a segment, the signal grows in several steps (a step has two levels)
    generate_synthetic(str(tmp_path / "r0"), **SMALL, speaker_offset=0.0, noise=0.0, signal_shape="ramp")
    x = _frames(str(tmp_path / "r0"), "vision")
    lab = _frames(str(tmp_path / "r0"), "labels")
    v = next(v for v in lab if lab[v]["features"][0, 1:].max() > 0)
    a, b = lab[v]["intervals"][0]
    mid = x[v]["intervals"].mean(1)
    seg = x[v]["features"][(mid >= a) & (mid < b)]
    assert len(np.unique(np.round(np.linalg.norm(seg, axis=1), 4))) > 3
    # complementary: text carries nothing, so with no offset and no noise its vectors are the vocabulary's
    generate_synthetic(str(tmp_path / "c0"), **SMALL, speaker_offset=0.0, noise=0.0,
                       signal_emotions={"text": []})
    generate_synthetic(str(tmp_path / "c1"), **SMALL, speaker_offset=0.0, noise=0.0, signal_strength=0.0)
    t0, t1 = _frames(str(tmp_path / "c0"), "text"), _frames(str(tmp_path / "c1"), "text")
    for v in t0:
        np.testing.assert_array_equal(t0[v]["features"], t1[v]["features"])


def test_synthetic_feature_scale(tmp_path):
    """feature_scale multiplies every acoustic and visual dimension by one constant in
    10 ** [-s, s] for the whole dataset; words, text, labels and splits are those of the default draw."""
    base, sc = str(tmp_path / "base"), str(tmp_path / "scaled")
    generate_synthetic(base, **SMALL)
    generate_synthetic(sc, **SMALL, feature_scale=1.5)
    for role in ("text", "labels", "words"):
        a, a0 = _frames(sc, role), _frames(base, role)
        for v in a0:
            assert np.array_equal(np.asarray(a[v]["features"]), np.asarray(a0[v]["features"])), role
    for m in ("audio", "vision"):
        a, a0 = _frames(sc, m), _frames(base, m)
        x = np.concatenate([a[v]["features"] for v in sorted(a0)]).astype(np.float64)
        x0 = np.concatenate([a0[v]["features"] for v in sorted(a0)]).astype(np.float64)
        ratio = x / x0
        g = np.median(ratio, 0)
        np.testing.assert_allclose(ratio, np.broadcast_to(g, ratio.shape), rtol=1e-5)
        assert np.all(np.abs(np.log10(g)) <= 1.5 + 1e-6) and np.log10(g).max() - np.log10(g).min() > 1.0


@pytest.mark.parametrize("kw, word", [
    (dict(feature_scale=-0.5), "feature_scale"),
    (dict(signal_shape="saw"), "signal_shape"), (dict(speaker_drift=-1), "speaker_drift"),
    (dict(ramp_onset=[0.7, 0.2]), "ramp_onset"), (dict(signal_emotions={"video": []}), "signal_emotions"),
    (dict(signal_emotions={"audio": ["joy"]}), "signal_emotions.audio"),
    (dict(label_noise={"audio": 1.5}), "label_noise.audio")])
def test_synthetic_knob_errors_name_the_parameter(tmp_path, kw, word):
    with pytest.raises(ValueError, match=word.replace(".", r"\.")):
        generate_synthetic(str(tmp_path), **SMALL, **kw)


def test_change_grid_config_parses_and_every_setting_generates(tmp_path):
    """configs/change_grid.yaml: >= 5 seeds, an analysis plan, and every setting a valid set of
    generator overrides (tiny sizes here)."""
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "change_grid.yaml")) as f:
        grid = yaml.safe_load(f)
    assert len(set(grid["seeds"])) >= 5
    assert grid["analysis"]["split"] == "test" and grid["analysis"]["diagnosis_split"] == "valid"
    assert "reference" in grid["settings"] and len(grid["settings"]) >= 6
    for name, over in grid["settings"].items():
        d = str(tmp_path / name)
        generate_synthetic(d, **SMALL, **over)
        assert os.path.exists(os.path.join(d, FILES["vision"])), name
