"""CMU-MOSEI from computational sequences: segments, aligned / unaligned sequences, drop report.

A *segment* is one labelled interval of a video (one row of the labels file); its id is
``"<video_id>[<row>]"`` as in the SDK.  Everything below is counted in a :class:`DataReport`.

Frame/word membership rule (one rule everywhere): an item with interval ``[s, e]`` belongs to an
interval ``[a, b)`` when its midpoint ``(s+e)/2`` lies in ``[a, b)``.  So a frame belongs to at
most one word and one segment (no duplication), unlike the SDK's overlap-based ``align``.

Aligned mode (paper §6.1, verbal modality as the base): per kept word, the visual and acoustic
frames inside the word's interval are

* ``"stack"``: stacked with padding: the word occupies ``K_w = min(max(n_vision, n_audio, 1),
  max_frames_per_word)`` positions in all three sequences; the word vector fills the first, the
  frames fill the first ``n`` of theirs, every other position is zero and masked.  All three
  sequences of a segment have the same length, positions share one time interval.
* ``"average"``: averaged to one vector per word (the SDK's collapse); a word with no frames of a
  modality gets a zero vector, masked.

Which frames belong to a word (``aligned_span``):

* ``"word"`` (default): the frames whose midpoint lies in the word's own interval (the SDK's
  rule); frames inside a segment but inside no kept word (pauses, removed 'sp' tokens, gaps) are
  dropped and counted;
* ``"to_next_word"``: a word's span runs from its start to the next kept word's start (the
  first from the segment's start, the last to the segment's end), so every frame of the segment
  belongs to exactly one word and none is dropped for lying between words: pauses stay in the
  aligned sequences, in time order.

Aligned mode only; frames beyond ``max_frames_per_word`` in one word are still dropped (counted).

Unaligned mode: the raw sequences of each modality inside the segment, no base modality; only
truncation to ``max_len`` (counted) ever shortens them.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from .csd import ComputationalSequence, CSDError
from .report import DataReport
from .splits import SPLITS, resolve_split

EMOTIONS = ("happy", "sad", "anger", "surprise", "disgust", "fear")
MODALITIES = ("text", "audio", "vision")
DIMS = {"text": 300, "audio": 74, "vision": 35}
LABEL_MAX = 3.0

# Glob patterns per role, tried in order, matched case-insensitively against file names.
FILE_PATTERNS = {
    "words": ["*TimestampedWords.csd", "*Words.csd"],
    "text": ["*TimestampedWordVectors*.csd", "*WordVectors*.csd", "*glove*.csd"],
    "audio": ["*COVAREP*.csd"],
    "vision_facet": ["*Facet*42*.csd", "*FACET*.csd", "*Facet*.csd"],
    "vision_openface": ["*OpenFace*2*.csd", "*OpenFace*.csd"],
    "labels": ["*Labels*.csd", "*labels*.csd"],
}


def _glob_ci(folder: str, pattern: str) -> List[str]:
    import fnmatch

    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(folder, n) for n in names if fnmatch.fnmatch(n.lower(), pattern.lower()))


def find_files(data_dir: str, files: Optional[Dict[str, str]] = None,
               visual: str = "facet") -> Dict[str, Optional[str]]:
    """Paths of the words, word-vector, COVAREP, visual and labels files in ``data_dir``.

    ``files`` overrides per role (``words``, ``text``, ``audio``, ``vision``, ``labels``), relative
    to ``data_dir`` or absolute.  ``visual``: ``"facet"`` (FACET 4.2) or ``"openface"`` (OpenFace 2).
    A missing required file raises ``FileNotFoundError`` naming the folder, the role and the
    patterns tried; the words file is optional ('sp' tokens are then not removed).
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    files = dict(files or {})
    out: Dict[str, Optional[str]] = {}
    roles = {"words": FILE_PATTERNS["words"], "text": FILE_PATTERNS["text"],
             "audio": FILE_PATTERNS["audio"],
             "vision": FILE_PATTERNS["vision_openface" if visual == "openface" else "vision_facet"],
             "labels": FILE_PATTERNS["labels"]}
    for role, patterns in roles.items():
        if files.get(role):
            p = files[role] if os.path.isabs(files[role]) else os.path.join(data_dir, files[role])
            if not os.path.exists(p):
                raise FileNotFoundError(f"missing {role} file {p} (set in data.files.{role})")
            out[role] = p
            continue
        found = None
        for pat in patterns:
            hits = [h for h in _glob_ci(data_dir, pat) if not (role == "words" and "vector" in h.lower())]
            if hits:
                found = hits[0]
                break
        if found is None and role != "words":
            raise FileNotFoundError(
                f"missing {role} modality file in {data_dir}: no file matches {patterns} "
                f"(name it explicitly with --set data.files.{role}=FILE)")
        out[role] = found
    return out


def _mid(iv: np.ndarray) -> np.ndarray:
    return 0.5 * (iv[:, 0] + iv[:, 1]) if len(iv) else np.zeros((0,), np.float64)


def _inside(mid: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.nonzero((mid >= a) & (mid < b))[0]


def check_labels(labels: np.ndarray, path: str, vid: str) -> np.ndarray:
    """The six emotion columns of a labels entry, checked to lie in [0, 3]."""
    if np.asarray(labels).dtype == object:
        raise CSDError("labels must be numbers, got strings", path, vid, "features")
    lab = np.asarray(labels, dtype=np.float64)
    if lab.ndim != 2 or lab.shape[1] not in (6, 7):
        raise CSDError(f"labels must be N x 7 (sentiment + 6 emotions) or N x 6, got shape "
                       f"{lab.shape}", path, vid, "features")
    emo = lab[:, -6:]
    bad = ~np.isfinite(emo) | (emo < -1e-6) | (emo > LABEL_MAX + 1e-6)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise CSDError(f"emotion label out of range [0, 3]: segment {r} {EMOTIONS[c]} = {float(emo[r, c])!r}",
                       path, vid, "features")
    return np.clip(emo, 0.0, LABEL_MAX).astype(np.float32)


class _Config:
    def __init__(self, mode="aligned", aligned_combine="stack", max_frames_per_word=8,
                 max_len=None, remove_sp=True, strict=False, sp_tokens=("sp", "[sp]"),
                 aligned_span="word"):
        if mode not in ("aligned", "unaligned"):
            raise ValueError(f"data.mode must be 'aligned' or 'unaligned', got {mode!r}")
        if aligned_combine not in ("stack", "average"):
            raise ValueError(f"data.aligned_combine must be 'stack' or 'average', got {aligned_combine!r}")
        if aligned_span not in ("word", "to_next_word"):
            raise ValueError(f"data.aligned_span must be 'word' or 'to_next_word', got {aligned_span!r}")
        self.mode, self.combine, self.span = mode, aligned_combine, aligned_span
        self.cap = int(max_frames_per_word)
        ml = {"text": 50, "audio": 200, "vision": 150, "aligned": 200}
        ml.update(max_len or {})
        self.max_len = ml
        self.remove_sp, self.strict, self.sp_tokens = remove_sp, strict, set(sp_tokens)


def _segment(vid, j, seg, feats, ivs, words, cfg: _Config, rep: DataReport, sec: str):
    """One sample dict (or None when the segment is dropped; counted)."""
    a, b = float(seg[0]), float(seg[1])
    sid = f"{vid}[{j}]"
    tmid = _mid(ivs["text"])
    widx = _inside(tmid, a, b)
    rep.add(sec, "words_in_segments", len(widx))
    if words is not None and cfg.remove_sp:
        keep = np.array([str(words[i]).strip().lower() not in cfg.sp_tokens for i in widx], dtype=bool)
        rep.add(sec, "words_removed_sp_token", int((~keep).sum()))
        widx = widx[keep] if len(widx) else widx
    fidx = {}
    for m in ("audio", "vision"):
        fidx[m] = _inside(_mid(ivs[m]), a, b)
        rep.add(sec, f"{m}_frames_in_segments", len(fidx[m]))
    out = {"id": sid, "video_id": vid}
    if cfg.mode == "unaligned":
        for m, idx in (("text", widx), ("audio", fidx["audio"]), ("vision", fidx["vision"])):
            L = cfg.max_len[m]
            if len(idx) > L:
                rep.add(sec, f"{m}_{'words' if m == 'text' else 'frames'}_truncated", len(idx) - L)
                rep.add(sec, f"segments_truncated_{m}", 1)
                idx = idx[:L]
            out[m] = feats[m][idx].astype(np.float32)
            out[m + "_mask"] = np.zeros(len(idx), dtype=bool)
    else:
        wiv = ivs["text"][widx]
        if cfg.span == "to_next_word" and len(wiv):
            spans = np.empty_like(wiv)
            spans[:, 0] = wiv[:, 0]
            spans[0, 0] = min(a, wiv[0, 0])
            spans[:-1, 1] = np.maximum(wiv[1:, 0], wiv[:-1, 0])
            spans[-1, 1] = max(b, wiv[-1, 1])
            wiv = spans
        wmid_assign = {}
        for m in ("audio", "vision"):
            mids = _mid(ivs[m])[fidx[m]]
            free = np.ones(len(mids), dtype=bool)
            per_word = []
            for (ws, we) in wiv:
                # overlapping words: a frame goes to the first word that holds its midpoint
                hit = free & (mids >= ws) & (mids < we)
                per_word.append(fidx[m][hit])
                free &= ~hit
            rep.add(sec, f"{m}_frames_outside_words_dropped", int(free.sum()))
            wmid_assign[m] = per_word
        rows = {m: [] for m in MODALITIES}
        masks = {m: [] for m in MODALITIES}
        total = 0
        for wi, w in enumerate(widx):
            if cfg.combine == "stack":
                n = {m: len(wmid_assign[m][wi]) for m in ("audio", "vision")}
                K = max(1, n["audio"], n["vision"])
                if K > cfg.cap:
                    for m in ("audio", "vision"):
                        rep.add(sec, f"{m}_frames_over_word_cap_dropped", max(0, n[m] - cfg.cap))
                    K = cfg.cap
                if total + K > cfg.max_len["aligned"]:
                    rest = len(widx) - wi
                    rep.add(sec, "text_words_truncated", rest)
                    for m in ("audio", "vision"):
                        rep.add(sec, f"{m}_frames_truncated",
                                sum(min(len(s), cfg.cap) for s in wmid_assign[m][wi:]))
                    rep.add(sec, "segments_truncated_aligned", 1)
                    break
                total += K
                t = np.zeros((K, feats["text"].shape[1]), np.float32)
                t[0] = feats["text"][w]
                tm = np.ones(K, bool)
                tm[0] = False
                rows["text"].append(t)
                masks["text"].append(tm)
                for m in ("audio", "vision"):
                    sel = wmid_assign[m][wi][:K]
                    x = np.zeros((K, feats[m].shape[1]), np.float32)
                    x[:len(sel)] = feats[m][sel]
                    mk = np.ones(K, bool)
                    mk[:len(sel)] = False
                    rows[m].append(x)
                    masks[m].append(mk)
                    if len(sel) == 0:
                        rep.add(sec, f"words_without_{m}_frames", 1)
            else:  # average
                if total + 1 > cfg.max_len["aligned"]:
                    rep.add(sec, "text_words_truncated", len(widx) - wi)
                    for m in ("audio", "vision"):
                        rep.add(sec, f"{m}_frames_truncated", sum(len(s) for s in wmid_assign[m][wi:]))
                    rep.add(sec, "segments_truncated_aligned", 1)
                    break
                total += 1
                rows["text"].append(feats["text"][w][None].astype(np.float32))
                masks["text"].append(np.zeros(1, bool))
                for m in ("audio", "vision"):
                    sel = wmid_assign[m][wi]
                    if len(sel):
                        rows[m].append(feats[m][sel].mean(0, keepdims=True).astype(np.float32))
                        masks[m].append(np.zeros(1, bool))
                    else:
                        rows[m].append(np.zeros((1, feats[m].shape[1]), np.float32))
                        masks[m].append(np.ones(1, bool))
                        rep.add(sec, f"words_without_{m}_frames", 1)
        for m in MODALITIES:
            d = feats[m].shape[1]
            out[m] = np.concatenate(rows[m], 0) if rows[m] else np.zeros((0, d), np.float32)
            out[m + "_mask"] = np.concatenate(masks[m], 0) if masks[m] else np.zeros((0,), bool)
    for m in MODALITIES:
        if out[m].shape[0] == 0 or out[m + "_mask"].all():
            rep.add(sec, f"segments_dropped_no_{m}", 1, example=sid)
            return None
        bad = ~np.isfinite(out[m])
        if bad.any():
            rep.add(sec, f"{m}_nonfinite_values_set_to_0", int(bad.sum()), example=sid)
            out[m] = np.where(bad, 0.0, out[m]).astype(np.float32)
    return out


# Two intervals overlap when one starts more than this before the previous one ends (seconds):
# touching intervals written with rounding error are not overlaps.
OVERLAP_TOL = 1e-6


def _inverted_rows(iv: np.ndarray, path: str, vid: str, cfg: _Config) -> np.ndarray:
    """Rows whose interval ends before it starts; an error under ``strict``."""
    bad = np.nonzero(iv[:, 1] < iv[:, 0])[0]
    if len(bad) and cfg.strict:
        r = int(bad[0])
        raise CSDError(f"row {r} has an inverted interval (end {iv[r, 1]!r} < start {iv[r, 0]!r}; "
                       "data.strict is on, otherwise the row is dropped and counted)",
                       path, vid, "intervals")
    return bad


def _overlaps(iv: np.ndarray) -> int:
    """How many intervals start before the previous one ends (counted, not dropped)."""
    return int((iv[1:, 0] < iv[:-1, 1] - OVERLAP_TOL).sum()) if len(iv) > 1 else 0


def _read_video(seqs, vid: str, cfg: _Config, rep: DataReport, sec: str, widths: dict):
    """Features and intervals of every modality (and the words) of one video, checked.

    Errors name the file, the video id and the field; rows with an inverted interval are
    dropped and counted (an error under ``strict``); overlaps with the previous row are counted.
    """
    feats, ivs = {}, {}
    for m in MODALITIES:
        path = seqs[m].path
        feats[m], ivs[m] = seqs[m][vid]
        if feats[m].dtype == object:
            raise CSDError(f"{m} features must be numbers, got strings (is this a words file?)",
                           path, vid, "features")
        d = feats[m].shape[1]
        if d == 0:
            raise CSDError(f"{m} features have no columns (shape {feats[m].shape})", path, vid,
                           "features")
        if m == "vision":  # any width, the same for every video
            want, first = widths.setdefault(m, (d, vid))
            if d != want:
                raise CSDError(f"vision features are {d}-dimensional here but {want}-dimensional "
                               f"in video {first!r}", path, vid, "features")
        elif d != DIMS[m]:
            raise CSDError(f"{m} features must be {DIMS[m]}-dimensional, got {d}", path, vid,
                           "features")
    words = None
    if "words" in seqs:
        wpath = seqs["words"].path
        words, wiv = seqs["words"][vid]
        if words.dtype != object:
            raise CSDError(f"the words file must hold strings, got numbers ({words.dtype})",
                           wpath, vid, "features")
        if len(words) != len(ivs["text"]):
            raise CSDError(f"words file has {len(words)} words but the word-vector file "
                           f"{seqs['text'].path} has {len(ivs['text'])}", wpath, vid, "features")
        differ = np.nonzero(np.abs(wiv - ivs["text"]).max(1) > OVERLAP_TOL)[0]
        if len(differ):
            r = int(differ[0])
            raise CSDError(f"word {r} has the interval {wiv[r].tolist()} here but "
                           f"{ivs['text'][r].tolist()} in the word-vector file {seqs['text'].path}",
                           wpath, vid, "intervals")
    for m, unit in (("text", "words"), ("audio", "frames"), ("vision", "frames")):
        bad = _inverted_rows(ivs[m], seqs[m].path, vid, cfg)
        if len(bad):
            keep = np.ones(len(ivs[m]), dtype=bool)
            keep[bad] = False
            feats[m], ivs[m] = feats[m][keep], ivs[m][keep]
            if m == "text" and words is not None:
                words = words[keep]
            rep.add(sec, f"{m}_{unit}_dropped_inverted_interval", len(bad), example=vid)
        rep.add(sec, f"{m}_{unit}_overlapping_previous", _overlaps(ivs[m]), example=vid)
    return feats, ivs, words


def load_csd_folder(data_dir: str, mode: str = "aligned", aligned_combine: str = "stack",
                    max_frames_per_word: int = 8, max_len: Optional[dict] = None,
                    aligned_span: str = "word",
                    split: str = "auto", seed: int = 0, fractions=(0.8, 0.1, 0.1),
                    files: Optional[Dict[str, str]] = None, visual: str = "facet",
                    remove_sp: bool = True, strict: bool = False,
                    max_segments: Optional[int] = None, report: Optional[DataReport] = None):
    """Read a folder of CMU-MOSEI ``.csd`` files into ``({split: [sample, ...]}, report)``.

    A sample is ``{"id", "video_id", "text", "text_mask", "audio", "audio_mask", "vision",
    "vision_mask", "labels"}`` (numpy; masks ``True`` = padding; labels the six emotions).
    ``strict=True`` turns "video missing from a modality file" and "inverted interval" into errors
    instead of counted drops.  ``max_segments`` caps segments per split (counted) for quick runs.
    """
    cfg = _Config(mode, aligned_combine, max_frames_per_word, max_len, remove_sp, strict,
                  aligned_span=aligned_span)
    rep = report or DataReport(f"data report ({mode})")
    paths = find_files(data_dir, files, visual)
    rep.note("files: " + ", ".join(f"{k}={os.path.basename(v) if v else None}" for k, v in paths.items()))
    rep.note(f"mode={mode}" + (f", aligned_combine={aligned_combine}, max_frames_per_word="
                               f"{cfg.cap}, aligned_span={aligned_span}" if mode == "aligned" else "")
             + f", max_len={cfg.max_len}")
    if paths["words"] is None:
        rep.note("no words file: 'sp' pause tokens cannot be identified and are kept")
    seqs = {}
    try:
        for role, p in paths.items():
            if p is not None:
                seqs[role] = ComputationalSequence(p)
        labels = seqs["labels"]
        ids = labels.keys()
        folds = resolve_split(split, ids, data_dir=data_dir, seed=seed, fractions=fractions, report=rep)
        out = {s: [] for s in SPLITS}
        widths = {}
        in_split = {v: s for s in SPLITS for v in folds[s]}
        unused = [v for v in ids if v not in in_split]
        if unused:
            rep.add("all", "videos_in_no_split_unused", len(unused), example=unused[0])
        for s in SPLITS:
            for vid in folds[s]:
                lab_raw, seg_iv = labels[vid]
                emo = check_labels(lab_raw, labels.path, vid)
                rep.add(s, "videos", 1)
                rep.add(s, "segments_labelled", len(emo))
                missing = [r for r in ("text", "audio", "vision", "words")
                           if r in seqs and vid not in seqs[r]]
                if missing:
                    if cfg.strict:
                        r = missing[0]
                        raise CSDError("video id in the labels file is missing from this modality "
                                       "file", seqs[r].path, vid)
                    rep.add(s, f"segments_dropped_video_missing_in_{missing[0]}", len(emo), example=vid)
                    continue
                feats, ivs, words = _read_video(seqs, vid, cfg, rep, s, widths)
                # frames / words outside every labelled segment of this video
                for m, unit in (("text", "words"), ("audio", "frames"), ("vision", "frames")):
                    mid = _mid(ivs[m])
                    inany = np.zeros(len(mid), bool)
                    for (a, b) in seg_iv:
                        inany |= (mid >= a) & (mid < b)
                    rep.add(s, f"{m}_{unit}_outside_labelled_segments", int((~inany).sum()))
                inverted = _inverted_rows(seg_iv, labels.path, vid, cfg)
                if len(inverted):
                    rep.add(s, "segments_dropped_inverted_interval", len(inverted),
                            example=f"{vid}[{inverted[0]}]")
                rep.add(s, "segments_overlapping_previous", _overlaps(seg_iv), example=vid)
                for j in range(len(emo)):
                    if j in inverted:
                        continue
                    sample = _segment(vid, j, seg_iv[j], feats, ivs, words, cfg, rep, s)
                    if sample is None:
                        continue
                    sample["labels"] = emo[j]
                    out[s].append(sample)
        for s in SPLITS:
            if max_segments is not None and len(out[s]) > max_segments:
                rep.add(s, "segments_dropped_by_max_segments", len(out[s]) - max_segments)
                out[s] = out[s][:max_segments]
            rep.add(s, "segments_kept", len(out[s]))
    finally:
        for sq in seqs.values():
            sq.close()
    return out, rep
