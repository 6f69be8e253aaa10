"""A seeded, MOSEI-shaped synthetic dataset written as ``.csd`` files.

Files (same names and layout as the released CMU-MOSEI computational sequences)::

    CMU_MOSEI_TimestampedWords.csd        words (bytes, 'sp' pause tokens included)
    CMU_MOSEI_TimestampedWordVectors.csd  300-d word vectors, one per word ('sp' -> zeros)
    CMU_MOSEI_COVAREP.csd                 74-d acoustic frames at 20 Hz
    CMU_MOSEI_VisualFacet42.csd           35-d visual frames at 15 Hz
    CMU_MOSEI_Labels.csd                  per labelled segment: sentiment + 6 emotions in [0, 3]
    splits.json                           speaker-disjoint train / valid / test video ids
    SYNTHETIC.json                        the generator's parameters

The emotion signal lies in *changes over time*: inside each segment, at an onset time, every
modality's features step by ``signal_strength * gain_m * sum_k y_k D_m[k]`` (``y`` the six
intensities, ``D_m[k]`` fixed unit directions).  Every speaker carries a constant idiosyncratic
offset ``speaker_offset * (gain_m * sum_k c_k D_m[k] + 0.3 * n)`` along the same emotion
directions ("some people always look angry"; ``c_k`` uniform in ``[0, 3]`` on a random half of
the emotions, 0 elsewhere, ``n`` a standard normal vector), so the absolute level of a feature
says little; its change says a lot.  Splits are speaker-disjoint.

The two knobs of the study in ``configs/delta_study.yaml``:

* ``speaker_offset`` (default 1.0): scale of every speaker's constant offset.  1.0 makes it as
  large as the signal (coefficients up to 3, like the intensities); 0 removes it entirely, and
  then the absolute level of a feature carries the emotion as well as its change does.
* ``signal_strength`` (default 1.0): scale of the step at the onset, relative to the frame noise
  (``noise``, per dimension).

With both at 1.0 the data are bitwise those of earlier versions (which had no
``signal_strength``).

Knobs under which per-segment centring does not remove the nuisance (defaults: off; with every
one at its default the data are bitwise those of earlier versions, because each knob draws from
its own random stream, seeded from ``seed``, and the main stream is untouched):

* ``speaker_drift`` (default 0.0): a per-speaker *linear drift*: every feature moves at
  ``speaker_drift * (gain_m * sum_k d_k D_m[k] + 0.3 * n)`` per second of the video (``d_k``
  uniform in ``[-3, 3]`` on a random half of the emotions, 0 elsewhere), from the video's start.
  Centring a segment removes the drift's level, not its slope: a late-minus-early difference
  then sees the drift as well as the signal.
* ``signal_shape`` (default ``"step"``): ``"ramp"`` replaces each segment's step by a linear ramp
  from 0 to the full signal, starting at a random fraction ``ramp_onset`` (uniform range, default
  ``[0.1, 0.6]``) of the segment and lasting a random fraction ``ramp_duration`` (uniform range,
  default ``[0.1, 0.5]``; cut at the segment's end).
* ``signal_emotions`` (default ``{}``: every modality carries all six): per modality, the
  emotions (names, ``hdaf.data.mosei.EMOTIONS``) its signal carries, e.g. ``{vision: [happy,
  sad, anger], audio: [surprise, disgust, fear], text: []}`` for complementary modalities, where
  no single modality suffices.
* ``label_noise`` (default ``{}``: none): per modality, the probability that a segment's signal
  in that modality is drawn from another, random label (the generator's label distribution)
  instead of the segment's own: that modality's evidence then disagrees with the label.
* ``feature_scale`` (default 0.0): heterogeneous feature scales, as real acoustic and visual
  features have: every acoustic and visual feature dimension (everything written for it: signal,
  offsets, drift, noise) is multiplied by ``10 ** u``, ``u`` uniform in ``[-feature_scale,
  feature_scale]``, one draw per dimension for the whole dataset.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

from .csd import default_metadata, write_csd
from .mosei import DIMS, EMOTIONS

FILES = {
    "words": "CMU_MOSEI_TimestampedWords.csd",
    "text": "CMU_MOSEI_TimestampedWordVectors.csd",
    "audio": "CMU_MOSEI_COVAREP.csd",
    "vision": "CMU_MOSEI_VisualFacet42.csd",
    "labels": "CMU_MOSEI_Labels.csd",
}
RATES = {"audio": 20.0, "vision": 15.0}
ROOTS = {"words": "words", "text": "glove_vectors", "audio": "COVAREP", "vision": "FACET 4.2",
         "labels": "All Labels"}

DEFAULTS = dict(seed=0, n_speakers=200, videos_per_speaker=1, segments_per_video=4,
                segment_seconds=(1.5, 2.5), gap_seconds=(0.3, 1.0), word_seconds=(0.2, 0.45),
                sp_prob=0.1, vocab_size=400, noise=0.5, gains={"text": 0.6, "audio": 0.8, "vision": 1.0},
                speaker_offset=1.0, signal_strength=1.0, no_emotion_prob=0.08,
                speaker_drift=0.0, signal_shape="step", ramp_onset=(0.1, 0.6), ramp_duration=(0.1, 0.5),
                signal_emotions={}, label_noise={}, feature_scale=0.0,
                split_fractions=(0.8, 0.1, 0.1),
                dominant_probs=(0.35, 0.2, 0.15, 0.1, 0.12, 0.08))


def _params(**overrides) -> dict:
    p = json.loads(json.dumps(DEFAULTS))
    for k, v in overrides.items():
        if k not in DEFAULTS:
            raise ValueError(f"unknown synthetic-data parameter {k!r}; known: {sorted(DEFAULTS)}")
        p[k] = json.loads(json.dumps(v))
    _check(p)
    return p


def _check(p: dict) -> None:
    """Clear errors for the knobs' values (names the parameter)."""
    if p["signal_shape"] not in ("step", "ramp"):
        raise ValueError(f"synthetic-data parameter signal_shape must be 'step' or 'ramp', got {p['signal_shape']!r}")
    if not float(p["feature_scale"]) >= 0:
        raise ValueError(f"synthetic-data parameter feature_scale must be >= 0, got {p['feature_scale']!r}")
    if not float(p["speaker_drift"]) >= 0:
        raise ValueError(f"synthetic-data parameter speaker_drift must be >= 0, got {p['speaker_drift']!r}")
    for k in ("ramp_onset", "ramp_duration"):
        r = p[k]
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and 0 <= float(r[0]) <= float(r[1]) <= 1):
            raise ValueError(f"synthetic-data parameter {k} must be [low, high] with 0 <= low <= high <= 1, got {r!r}")
    for k in ("signal_emotions", "label_noise"):
        if not isinstance(p[k], dict) or any(m not in DIMS for m in p[k]):
            raise ValueError(f"synthetic-data parameter {k} must map modalities {sorted(DIMS)} to values, got {p[k]!r}")
    for m, names in p["signal_emotions"].items():
        if not isinstance(names, list) or any(e not in EMOTIONS for e in names):
            raise ValueError(f"synthetic-data parameter signal_emotions.{m} must be a list of emotions "
                             f"from {EMOTIONS}, got {names!r}")
    for m, q in p["label_noise"].items():
        if not (isinstance(q, (int, float)) and 0 <= q <= 1):
            raise ValueError(f"synthetic-data parameter label_noise.{m} must be a probability in [0, 1], got {q!r}")


def _labels(rng: np.random.RandomState, p: dict) -> np.ndarray:
    y = np.zeros(6, np.float64)
    if rng.rand() < p["no_emotion_prob"]:
        return y
    probs = np.asarray(p["dominant_probs"], np.float64)
    k = rng.choice(6, p=probs / probs.sum())
    y[k] = rng.randint(3, 10) / 3.0  # 1 .. 3 in steps of 1/3 (3 annotators' mean)
    for j in range(6):
        if j != k and rng.rand() < 0.25:
            y[j] = min(rng.randint(1, 4) / 3.0, y[k] - 1 / 3.0)
    return np.clip(y, 0, 3)


def _noisy(rng: np.random.RandomState, p: dict, modality: str) -> bool:
    """Whether this segment's signal in ``modality`` shows another label (``label_noise``)."""
    q = float(p["label_noise"].get(modality, 0.0))
    return q > 0 and rng.rand() < q


def _ramp(t, ramp):
    """0 before the ramp's start, 1 after its end, linear in between."""
    start, duration = ramp
    return np.clip((np.asarray(t, np.float64) - start) / duration, 0.0, 1.0)


def generate_synthetic(out_dir: str, **overrides) -> Dict[str, str]:
    """Write the dataset into ``out_dir``; returns ``{role: path}``.  Deterministic in ``seed``."""
    p = _params(**overrides)
    rng = np.random.RandomState(p["seed"])
    # one stream per knob, apart from the main one: a knob at its default draws nothing, and
    # switching one on changes neither the main draws nor another knob's
    rng_drift, rng_ramp, rng_noise, rng_scale = (np.random.RandomState([p["seed"], i]) for i in (1, 2, 3, 4))
    emo_mask = {m: np.array([e in p["signal_emotions"][m] for e in EMOTIONS], np.float64)
                for m in p["signal_emotions"]}
    drift_on, ramp_on = float(p["speaker_drift"]) > 0, p["signal_shape"] == "ramp"
    dims = dict(DIMS)
    # unit emotion directions per modality and a vocabulary of word vectors
    D = {}
    for m, d in dims.items():
        q, _ = np.linalg.qr(rng.randn(d, 6))
        D[m] = q.T  # 6 x d, orthonormal rows
    vocab = rng.randn(p["vocab_size"], dims["text"]) * 0.3
    words_vocab = [f"w{i}" for i in range(p["vocab_size"])]
    scales = {m: np.ones(dims[m]) for m in RATES}
    if float(p["feature_scale"]) > 0:
        fs = float(p["feature_scale"])
        scales = {m: 10.0 ** rng_scale.uniform(-fs, fs, dims[m]) for m in RATES}
    data = {r: {} for r in FILES}
    speakers = [f"spk{s:03d}" for s in range(p["n_speakers"])]
    videos_of = {}
    for spk in speakers:
        # constant idiosyncratic offset along the emotion directions, per modality
        off_coef = rng.rand(6) * 3.0 * (rng.rand(6) < 0.5)
        so = float(p["speaker_offset"])
        offsets = {m: so * (p["gains"][m] * off_coef @ D[m] + 0.3 * rng.randn(dims[m])) for m in dims}
        drift = {m: np.zeros(dims[m]) for m in dims}  # per second, from the video's start
        if drift_on:
            d_coef = rng_drift.uniform(-3.0, 3.0, 6) * (rng_drift.rand(6) < 0.5)
            drift = {m: float(p["speaker_drift"]) * (p["gains"][m] * d_coef @ D[m]
                                                     + 0.3 * rng_drift.randn(dims[m])) for m in dims}
        videos_of[spk] = []
        for v in range(p["videos_per_speaker"]):
            vid = f"{spk}_v{v:02d}"
            videos_of[spk].append(vid)
            t = float(rng.uniform(*p["gap_seconds"]))
            t0 = 0.0  # the video's start (frames start at 0 s)
            segs, labs = [], []
            w_feats, w_ivs, w_tok = [], [], []
            steps = []  # (start, end, onset, signal vectors)
            for j in range(p["segments_per_video"]):
                dur = float(rng.uniform(*p["segment_seconds"]))
                a, b = t, t + dur
                y = _labels(rng, p)
                onset = a + dur * float(rng.uniform(0.3, 0.6))
                ramp = None  # (start, duration) of a ramp instead of the step at `onset`
                if ramp_on:
                    r0 = a + dur * float(rng_ramp.uniform(*p["ramp_onset"]))
                    ramp = (r0, max(1e-6, min(dur * float(rng_ramp.uniform(*p["ramp_duration"])), b - r0)))
                sig = {}
                for m in dims:
                    ym = y
                    if _noisy(rng_noise, p, m):
                        ym = _labels(rng_noise, p)
                    if m in emo_mask:
                        ym = ym * emo_mask[m]
                    sig[m] = float(p["signal_strength"]) * p["gains"][m] * (ym @ D[m])
                steps.append((a, b, onset, sig, ramp))
                segs.append((a, b))
                sentiment = float(np.clip(y[0] - y[1:].max(initial=0) * 0.5 + rng.randn() * 0.3, -3, 3))
                labs.append(np.concatenate([[sentiment], y]))
                # words tiling the segment, with pauses ('sp') and small gaps
                tw = a + float(rng.uniform(0.0, 0.1))
                while True:
                    wd = float(rng.uniform(*p["word_seconds"]))
                    if tw + wd > b:
                        break
                    if rng.rand() < p["sp_prob"]:
                        w_tok.append("sp")
                        w_feats.append(np.zeros(dims["text"]))
                    else:
                        wi = rng.randint(p["vocab_size"])
                        w_tok.append(words_vocab[wi])
                        x = vocab[wi] + offsets["text"] + p["noise"] * rng.randn(dims["text"]) * 0.5
                        wmid = 0.5 * (2 * tw + wd)
                        if ramp is not None:
                            x = x + _ramp(wmid, ramp) * sig["text"]
                        elif wmid >= onset:
                            x = x + sig["text"]
                        if drift_on:
                            x = x + (wmid - t0) * drift["text"]
                        w_feats.append(x)
                    w_ivs.append((tw, tw + wd))
                    tw += wd + float(rng.uniform(0.0, 0.08))
                t = b + float(rng.uniform(*p["gap_seconds"]))
            total = t
            for m, rate in RATES.items():
                n = int(np.floor(total * rate))
                ivs = np.stack([np.arange(n) / rate, (np.arange(n) + 1) / rate], 1)
                mid = ivs.mean(1)
                x = offsets[m][None, :] + p["noise"] * rng.randn(n, dims[m])
                for (a, b, onset, sig, ramp) in steps:
                    if ramp is not None:
                        on = (mid >= a) & (mid < b)
                        x[on] += _ramp(mid[on], ramp)[:, None] * sig[m][None, :]
                    else:
                        on = (mid >= onset) & (mid < b)
                        x[on] += sig[m]
                if drift_on:
                    x += (mid - t0)[:, None] * drift[m][None, :]
                if float(p["feature_scale"]) > 0:
                    x = x * scales[m][None, :]
                data[m][vid] = {"features": x.astype(np.float32), "intervals": ivs}
            data["text"][vid] = {"features": np.asarray(w_feats, np.float32).reshape(-1, dims["text"]),
                                 "intervals": np.asarray(w_ivs, np.float64).reshape(-1, 2)}
            data["words"][vid] = {"features": np.array(w_tok, dtype=object),
                                  "intervals": np.asarray(w_ivs, np.float64).reshape(-1, 2)}
            data["labels"][vid] = {"features": np.asarray(labs, np.float32),
                                   "intervals": np.asarray(segs, np.float64)}
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for role, fname in FILES.items():
        md = default_metadata(ROOTS[role], f"synthetic MOSEI-shaped {role} (hdaf)",
                              **{"dataset name": "hdaf-synthetic-mosei"})
        paths[role] = write_csd(os.path.join(out_dir, fname), ROOTS[role], data[role], md)
    # speaker-disjoint split
    order = np.random.RandomState(p["seed"] + 1).permutation(len(speakers))
    n = len(speakers)
    n_tr = int(round(p["split_fractions"][0] * n))
    n_va = int(round(p["split_fractions"][1] * n))
    parts = {"train": order[:n_tr], "valid": order[n_tr:n_tr + n_va], "test": order[n_tr + n_va:]}
    splits = {s: sorted(v for i in idx for v in videos_of[speakers[i]]) for s, idx in parts.items()}
    with open(os.path.join(out_dir, "splits.json"), "w") as f:
        json.dump(splits, f, indent=1)
    paths["splits"] = os.path.join(out_dir, "splits.json")
    with open(os.path.join(out_dir, "SYNTHETIC.json"), "w") as f:
        json.dump(p, f, indent=1)
    paths["params"] = os.path.join(out_dir, "SYNTHETIC.json")
    return paths


def ensure_synthetic(out_dir: str, **overrides) -> Optional[Dict[str, str]]:
    """Generate into ``out_dir`` unless a dataset with the same parameters is already there.

    Returns the paths when it generated, ``None`` when it reused the folder.
    """
    p = _params(**overrides)
    stamp = os.path.join(out_dir, "SYNTHETIC.json")
    if os.path.exists(stamp) and all(os.path.exists(os.path.join(out_dir, f)) for f in FILES.values()):
        try:
            with open(stamp) as f:
                # a stamp written before a knob existed holds that knob's default (same data)
                if {**_params(), **json.load(f)} == p:
                    return None
        except ValueError:
            pass
    return generate_synthetic(out_dir, **overrides)
