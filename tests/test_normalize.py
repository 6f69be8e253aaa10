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
