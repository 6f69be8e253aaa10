"""Per-segment input normalisation (``data.normalize``)."""
from __future__ import annotations

import numpy as np
import pytest

from hdaf.data.normalize import normalize_segments
from hdaf.data.mosei import MODALITIES


def _sample(rng, T=6, masked=(4, 5)):
    s = {"id": "v[0]", "labels": np.zeros(7, np.float32)}
    for m, d in zip(MODALITIES, (5, 3, 4)):
        x = (rng.randn(T, d) * 2 + 7).astype(np.float32)
        mask = np.zeros(T, bool)
        mask[list(masked)] = True
        x[mask] = 0
        s[m], s[m + "_mask"] = x, mask
    return s


@pytest.mark.parametrize("mode", ["center", "standardize"])
def test_per_segment_statistics_over_valid_positions(mode):
    rng = np.random.RandomState(0)
    s = _sample(rng)
    out = normalize_segments({"train": [s]}, mode)["train"][0]
    for m in MODALITIES:
        keep = ~s[m + "_mask"]
        v = out[m][keep].astype(np.float64)
        ref = s[m][keep] - s[m][keep].mean(0)
        if mode == "standardize":
            ref = ref / (s[m][keep].astype(np.float64).std(0) + 1e-5)
        np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-5)
        assert np.all(out[m][~keep] == 0)
        np.testing.assert_allclose(v.mean(0), 0, atol=1e-5)
    assert out is not s and s["text"][0, 0] != out["text"][0, 0]  # inputs untouched


def test_constant_offset_removed_and_none_is_identity():
    rng = np.random.RandomState(1)
    s = _sample(rng)
    shifted = {k: v for k, v in s.items()}
    for m in MODALITIES:
        keep = ~s[m + "_mask"]
        x = s[m].copy()
        x[keep] += 3.5  # a speaker's constant offset
        shifted[m] = x
    a = normalize_segments({"t": [s]}, "center")["t"][0]
    b = normalize_segments({"t": [shifted]}, "center")["t"][0]
    for m in MODALITIES:
        np.testing.assert_allclose(a[m], b[m], atol=1e-5)
    same = {"t": [s]}
    assert normalize_segments(same, "none") is same


def test_fully_masked_modality_stays_zero_and_bad_mode():
    rng = np.random.RandomState(2)
    s = _sample(rng, T=3, masked=(0, 1, 2))
    out = normalize_segments({"t": [s]}, "standardize")["t"][0]
    assert all(np.all(out[m] == 0) for m in MODALITIES)
    with pytest.raises(ValueError, match="data.normalize.*'zscore'"):
        normalize_segments({"t": [s]}, "zscore")


def test_load_data_applies_it(tmp_path):
    from hdaf.data.loading import load_data
    tiny = {"n_speakers": 10, "segments_per_video": 2, "vocab_size": 20}
    base = {"source": "synthetic", "dir": str(tmp_path / "syn"), "synthetic": tiny, "mode": "unaligned"}
    raw, _ = load_data(base, log=lambda *_: None)
    cen, _ = load_data({**base, "normalize": "center"}, log=lambda *_: None)
    for a, b in zip(raw["train"].samples, cen["train"].samples):
        keep = ~a["vision_mask"]
        np.testing.assert_allclose(b["vision"][keep], a["vision"][keep] - a["vision"][keep].mean(0),
                                   atol=1e-4)


def test_center_scale_uses_the_training_split_only():
    """center_scale: each segment centred, then divided per dimension by the standard deviation
    of the centred training steps; the other splits do not move the scale."""
    rng = np.random.RandomState(3)
    train = [_sample(rng, T=7, masked=(6,)) for _ in range(4)]
    valid = [_sample(rng, T=5, masked=()) for _ in range(2)]
    out = normalize_segments({"train": train, "valid": valid}, "center_scale")
    for m in MODALITIES:
        cen = [s[m][~s[m + "_mask"]].astype(np.float64) for s in train]
        cen = np.concatenate([c - c.mean(0) for c in cen])
        sd = cen.std(0) + 1e-5
        for split, items in (("train", train), ("valid", valid)):
            for s, o in zip(items, out[split]):
                keep = ~s[m + "_mask"]
                ref = (s[m][keep] - s[m][keep].mean(0)) / sd
                np.testing.assert_allclose(o[m][keep], ref, rtol=1e-4, atol=1e-5)
                assert np.all(o[m][~keep] == 0)
    # the training split's centred steps end with unit variance per dimension
    for m in MODALITIES:
        v = np.concatenate([o[m][~s[m + "_mask"]] for s, o in zip(train, out["train"])])
        np.testing.assert_allclose(v.std(0), 1.0, rtol=1e-3)
    # another valid split gives the same training scale
    other = [_sample(rng, T=5, masked=()) for _ in range(3)]
    again = normalize_segments({"train": train, "valid": other}, "center_scale")
    for m in MODALITIES:
        np.testing.assert_allclose(again["train"][0][m], out["train"][0][m])


def test_center_scale_removes_per_dimension_scales():
    """Multiplying a feature dimension by a constant everywhere (units, a sensor's gain) leaves
    center_scale's output unchanged; a dimension constant in training keeps scale 1."""
    rng = np.random.RandomState(4)
    data = {"train": [_sample(rng) for _ in range(3)], "test": [_sample(rng) for _ in range(2)]}
    gains = {m: 10.0 ** rng.uniform(-1.5, 1.5, data["train"][0][m].shape[1]) for m in MODALITIES}
    scaled = {k: [{**s, **{m: (s[m] * gains[m]).astype(np.float32) for m in MODALITIES}} for s in v]
              for k, v in data.items()}
    a = normalize_segments(data, "center_scale")
    b = normalize_segments(scaled, "center_scale")
    for k in data:
        for x, y in zip(a[k], b[k]):
            for m in MODALITIES:
                np.testing.assert_allclose(x[m], y[m], rtol=2e-3, atol=2e-4)
    flat = {k: [{**s, "audio": np.full_like(s["audio"], 5.0)} for s in v] for k, v in data.items()}
    out = normalize_segments(flat, "center_scale")
    assert all(np.all(s["audio"] == 0) for v in out.values() for s in v)


def test_center_scale_needs_a_training_split():
    rng = np.random.RandomState(5)
    with pytest.raises(ValueError, match="center_scale.*'train'"):
        normalize_segments({"valid": [_sample(rng)]}, "center_scale")
