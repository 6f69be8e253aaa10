"""examples/: the tiny-Llama example runs end to end (a few steps) and writes what it reports."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_llama():
    return _example("train_tiny_llama_delta")


@pytest.mark.parametrize("task", ["rises", "rank"])
def test_tiny_llama_data_labels_the_groups(tiny_llama, task):
    ids = tiny_llama.make_batch(64, torch.Generator().manual_seed(0), task)
    assert ids.shape == (64, tiny_llama.SEQ_LEN) and bool((ids[:, 0] == tiny_llama.BOS).all())
    groups = ids[:, 1:].reshape(64, tiny_llama.N_GROUPS, tiny_llama.GROUP + 1).tolist()
    for row in groups:
        for *v, c in row:
            assert len(set(v)) == len(v) and max(v) < tiny_llama.N_VALUES
            want = (sum(b > a for a, b in zip(v, v[1:])) if task == "rises"
                    else sum(x < v[-1] for x in v[:-1]))
            assert c == tiny_llama.COUNT0 + want
    # the scored positions are exactly those whose next token is a count token
    nxt = ids[:, tiny_llama.SCORED + 1]
    assert bool(((nxt >= tiny_llama.COUNT0) & (nxt < tiny_llama.BOS)).all())
    assert int((ids >= tiny_llama.COUNT0).sum()) == 64 * (tiny_llama.N_GROUPS + 1)


def test_tiny_llama_main_writes_both_variants_and_trains_the_delta_weights(tiny_llama, tmp_path):
    out = tmp_path / "res.json"
    res = tiny_llama.main(["--seeds", "0", "1", "--steps", "4", "--eval-every", "2",
                           "--n-test", "16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == res["summary"]
    for key in ("command", "date", "machine", "versions", "args", "task", "seeds", "summary",
                "wall_seconds"):
        assert key in saved, key
    assert saved["machine"]["cpu_count"] == os.cpu_count()
    assert {"torch", "transformers"} <= set(saved["versions"])
    assert [r["seed"] for r in saved["seeds"]] == [0, 1]
    for r in saved["seeds"]:
        for variant in ("base", "delta"):
            v = r[variant]
            assert math.isfinite(v["test_loss"]) and 0.0 <= v["test_acc"] <= 1.0
            assert [c["step"] for c in v["curve"]] == [2, 4]
            assert all(math.isfinite(c["train_loss_all_tokens"]) for c in v["curve"])
        # the delta variant really runs delta attention, and training moved its added weights
        assert r["delta"]["attn_implementation"] == "hdaf_delta"
        assert r["base"]["attn_implementation"] != "hdaf_delta"
        assert r["delta"]["delta_weight_change"] > 0
        assert r["delta"]["parameters"] > r["base"]["parameters"]
    for metric in ("test_loss", "test_acc"):
        s = saved["summary"][metric]
        assert set(s) == {"base", "delta", "delta_minus_base"}
        assert s["delta_minus_base"]["sd"] is not None  # two seeds: a spread
        d = [r["delta"][metric] - r["base"][metric] for r in saved["seeds"]]
        assert s["delta_minus_base"]["mean"] == pytest.approx(sum(d) / 2, abs=1e-4)
