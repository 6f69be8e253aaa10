"""Training and evaluation: metrics on hand-checked cases, config, atomic checkpoints, bitwise
resume, 2-process DDP on CPU, evaluate / experiment / info commands."""
from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from hdaf.cli import main
from hdaf.training import checkpoint as ckpt
from hdaf.training.config import DEFAULTS, get_config
from hdaf.training.metrics import compute_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = dict(n_speakers=10, videos_per_speaker=1, segments_per_video=3, segment_seconds=[1.5, 2.5])


def _have_models() -> bool:
    try:
        import hdaf.models  # noqa: F401
        return hasattr(hdaf.models, "build_model")
    except Exception:
        return False


def model_section(name: str = "hdaf") -> dict:
    """The real model with a tiny config when hdaf.models is there, else the stand-in."""
    if _have_models():
        import hdaf.models as M

        cls = getattr(M, {"hdaf": "HDAFConfig", "mult": "MulTConfig"}[name], None)
        known = set(cls().to_dict()) if cls is not None else set()
        small = {k: v for k, v in TINY_MODEL.get(name, {}).items() if k in known}
        return {"name": name, "config": small}
    return {"name": "hdaf.training.tiny:build", "config": {"hidden": 8, "dropout": 0.2}}


# Small sizes for the real models; keys the model's config does not know are left out.
TINY_MODEL = {
    "hdaf": {"d_model": 16, "hidden": 16, "embed_dim": 16, "d_ch": 16, "num_heads": 2, "heads": 2,
             "num_layers": 1, "layers": 1, "dropout": 0.1, "dcca_dim": 8, "d_r": 8,
             "ff_dim": 32, "max_distance": 4},
    "mult": {"d_model": 16, "hidden": 16, "embed_dim": 16, "num_heads": 2, "heads": 2,
             "num_layers": 1, "layers": 1, "dropout": 0.1, "ff_dim": 32},
}


def tiny_config(tmp_path, data_dir, **train_over) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["device"] = "cpu"
    cfg["data"].update({"dir": data_dir, "synthetic": TINY_DATA})
    cfg["model"] = model_section()
    st = cfg["train"]["stages"]
    for s, ep in (("unimodal", 2), ("dcca", 1), ("fusion", 2)):
        st[s].update({"epochs": ep, "batch_size": 4, "lr": 1e-3})
        st[s].pop("lr_per_modality", None)
    cfg["train"].update({"progress": False, "eval_batch_size": 16})
    cfg["train"].update(train_over)
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from hdaf.data.synthetic import ensure_synthetic

    d = str(tmp_path_factory.mktemp("syn"))
    ensure_synthetic(d, **TINY_DATA)
    return d


def _quiet(*a, **k):
    pass


# ----------------------------------------------------------------------------- metrics
def test_metrics_softmax_by_hand():
    labels = np.array([[2, 0, 0, 0, 0, 0],      # dominant happy
                       [0, 1, 1, 0, 0, 0],      # tie sad/anger -> sad (lowest index)
                       [0, 0, 0, 0, 0, 0],      # no emotion: excluded from Acc6, counted
                       [0, 0, 0, 0, 0, 3]], float)  # fear
    logits = np.zeros((4, 6))
    logits[0, 0] = logits[1, 2] = logits[2, 1] = logits[3, 5] = 5.0  # softmax p = .967 / .0066
    m = compute_metrics(logits, labels, head="softmax")
    assert m["n"] == 4 and m["n_no_emotion"] == 1
    # predicted classes happy, anger, fear vs true happy, sad, fear on the 3 rows with emotion
    assert m["acc6"] == pytest.approx(2 / 3)
    # per-class F1: happy 1, sad 0, fear 1, each support 1 -> weighted (1+0+1)/3
    assert m["f1_6"] == pytest.approx(2 / 3)
    assert m["bacc6"] == pytest.approx(2 / 3)          # recalls 1, 0, 1
    pe = m["per_emotion"]
    # presence predicted where softmax p > 1/6: happy r0, anger r1, sad r2, fear r3
    assert pe["happy"]["acc2"] == 1 and pe["happy"]["f1"] == 1
    # sad: true [0,1,0,0], predicted [0,0,1,0] -> acc 2/4; F1(absent) = 2/3 (support 3),
    # F1(present) = 0 (support 1) -> weighted 0.5; balanced accuracy (2/3 + 0)/2
    assert pe["sad"]["acc2"] == pytest.approx(0.5)
    assert pe["sad"]["f1"] == pytest.approx(0.5)
    assert pe["sad"]["bacc"] == pytest.approx(1 / 3)
    assert pe["anger"]["acc2"] == 1 and pe["fear"]["acc2"] == 1
    assert pe["surprise"]["acc2"] == 1 and np.isnan(pe["surprise"]["bacc"])
    assert pe["sad"]["positives"] == 1


def test_metrics_ties_in_predictions_and_mae():
    labels = np.array([[0, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0]], float)
    zeros = np.zeros((2, 6))
    m = compute_metrics(zeros, labels, head="softmax")
    assert m["acc6"] == 1.0                     # all-equal logits -> class 0 = happy
    assert m["mae"] == pytest.approx(8 / 12)    # 3p = 0.5 everywhere: (6*.5 + 2.5 + 5*.5) / 12
    s = compute_metrics(zeros, labels, head="sigmoid")
    assert s["mae"] == pytest.approx(1.5)       # 3*sigmoid(0) = 1.5: (6*1.5 + 1.5 + 5*1.5) / 12
    assert s["per_emotion"]["happy"]["acc2"] == 0.5   # p = 0.5 is not > 0.5: nothing present


def test_metrics_sigmoid_presence():
    labels = np.array([[1, 0, 2, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0]], float)
    logits = np.full((3, 6), -4.0)
    logits[0, 0], logits[0, 2] = 1.0, 2.0       # happy and anger present; argmax anger
    logits[1, 5] = 3.0
    logits[2, 3] = 0.5                          # predicts surprise, true sad
    m = compute_metrics(logits, labels, head="sigmoid")
    # dominant: anger, fear, sad; predicted: anger, fear, surprise
    assert m["acc6"] == pytest.approx(2 / 3)
    pe = m["per_emotion"]
    assert pe["happy"]["acc2"] == 1 and pe["anger"]["acc2"] == 1 and pe["fear"]["acc2"] == 1
    assert pe["sad"]["acc2"] == pytest.approx(2 / 3) and pe["surprise"]["acc2"] == pytest.approx(2 / 3)
    # surprise: true [0,0,0], predicted [0,0,1]: F1(absent) = 2*1*(2/3)/(1+2/3) = 0.8, support 3
    assert pe["surprise"]["f1"] == pytest.approx(0.8)


# ----------------------------------------------------------------------------- config / checkpoints
def test_config_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stages:\n    dcca:\n      lr: 3e-4\nseed: 4\n")
    cfg = get_config(str(p), ["train.stages.dcca.epochs=7", "data.mode=unaligned", "model.config.use_delta=false",
                              "data.max_len={text: 9}"])
    assert cfg["train"]["stages"]["dcca"]["lr"] == 3e-4 and cfg["seed"] == 4
    assert cfg["train"]["stages"]["dcca"]["epochs"] == 7 and cfg["data"]["mode"] == "unaligned"
    assert cfg["model"]["config"]["use_delta"] is False and cfg["data"]["max_len"] == {"text": 9}
    assert cfg["train"]["stages"]["fusion"]["epochs"] == DEFAULTS["train"]["stages"]["fusion"]["epochs"]
    assert DEFAULTS["train"]["stages"]["dcca"]["lr"] == 2e-4      # defaults untouched


def test_atomic_save(tmp_path):
    p = str(tmp_path / "c.pt")
    ckpt.atomic_save({"a": torch.ones(3)}, p)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ckpt.atomic_save({"a": Boom()}, p)
    assert torch.equal(torch.load(p)["a"], torch.ones(3))          # old file intact
    assert os.listdir(tmp_path) == ["c.pt"]                        # no temp file left


# ----------------------------------------------------------------------------- resume
def _train(cfg, resume=False):
    from hdaf.training.trainer import train

    return train(cfg, resume=resume, log=_quiet)


def _state(run_dir):
    return torch.load(os.path.join(run_dir, "final.pt"), weights_only=False)["model"]


def test_resume_is_bitwise_identical(tmp_path, data_dir):
    from hdaf.training.trainer import Interrupted

    ref_cfg = tiny_config(tmp_path / "ref", data_dir)
    _train(ref_cfg)
    ref = _state(ref_cfg["run_dir"])
    # steps per epoch: 24 training segments / batch 4 = 6; interrupt mid-epoch in stage 1,
    # and again mid-epoch in stage 3 (step 6*2 + 6*1 + 4 = 22)
    cfg = tiny_config(tmp_path / "int", data_dir, stop_after_steps=9)
    with pytest.raises(Interrupted):
        _train(cfg)
    assert not os.path.exists(os.path.join(cfg["run_dir"], "final.pt"))
    cfg["train"]["stop_after_steps"] = 22
    with pytest.raises(Interrupted):
        _train(cfg, resume=True)
    cfg["train"]["stop_after_steps"] = None
    _train(cfg, resume=True)
    got = _state(cfg["run_dir"])
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    h1 = json.load(open(os.path.join(ref_cfg["run_dir"], "history.json")))
    h2 = json.load(open(os.path.join(cfg["run_dir"], "history.json")))
    strip = lambda h: [{k: v for k, v in e.items() if k != "time_s"} for e in h]  # noqa: E731
    assert strip(h1) == strip(h2)
    # the staged schedule wrote one checkpoint per stage
    assert sorted(os.listdir(os.path.join(cfg["run_dir"], "checkpoints"))) == [
        "last.pt", "stage_dcca.pt", "stage_fusion.pt", "stage_unimodal.pt"]
    # evaluate command reproduces the test metrics written at the end of training
    m_train = json.load(open(os.path.join(cfg["run_dir"], "metrics_test.json")))
    assert main(["evaluate", "--run-dir", cfg["run_dir"], "--device", "cpu"]) == 0
    m_eval = json.load(open(os.path.join(cfg["run_dir"], "metrics_test.json")))
    assert m_eval["fused"] == m_train["fused"]
    assert os.path.exists(os.path.join(cfg["run_dir"], "curves.png"))
    assert os.path.exists(os.path.join(cfg["run_dir"], "data_report.txt"))


def test_staged_then_end_to_end_schedule(tmp_path, data_dir):
    """train.schedule='staged+end_to_end': the paper's three stages, then one joint stage that
    starts from the fusion stage's weights and trains every parameter."""
    import torch

    cfg = tiny_config(tmp_path, data_dir, schedule="staged+end_to_end")
    cfg["train"]["end_to_end"].update({"epochs": 1, "batch_size": 8})
    _train(cfg)
    hist = json.load(open(os.path.join(cfg["run_dir"], "history.json")))
    assert [e["stage"] for e in hist] == ["unimodal"] * 2 + ["dcca"] + ["fusion"] * 2 + ["end_to_end"]
    ck = os.path.join(cfg["run_dir"], "checkpoints")
    assert sorted(os.listdir(ck)) == ["last.pt", "stage_dcca.pt", "stage_end_to_end.pt", "stage_fusion.pt",
                                      "stage_unimodal.pt"]
    fus = torch.load(os.path.join(ck, "stage_fusion.pt"), weights_only=False)["model"]
    e2e = torch.load(os.path.join(ck, "stage_end_to_end.pt"), weights_only=False)["model"]
    # the joint stage moved the encoders (frozen since the unimodal stage) and the fusion layers
    enc = [k for k in fus if k.startswith("encoders.vision.conv")]
    assert enc and all(not torch.equal(fus[k], e2e[k]) for k in enc)
    assert not torch.equal(fus["out.weight"], e2e["out.weight"])
    with pytest.raises(ValueError, match="train.schedule"):
        _train(tiny_config(tmp_path / "bad", data_dir, schedule="staged+fusion"))


def test_existing_run_needs_resume_or_overwrite(tmp_path, data_dir):
    cfg = tiny_config(tmp_path, data_dir, schedule="end_to_end")
    cfg["train"]["end_to_end"].update({"epochs": 1, "batch_size": 8})
    _train(cfg)
    with pytest.raises(FileExistsError):
        _train(cfg)
    from hdaf.training.trainer import train

    train(cfg, overwrite=True, log=_quiet)


# ----------------------------------------------------------------------------- numerics
def test_threads_key_is_checked_and_restored():
    from hdaf.training import numerics

    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="'threads'"):
            numerics.check_threads(bad)
    prev = torch.get_num_threads()
    with numerics.pinned_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == prev
    with numerics.pinned_threads(None) as n:
        assert n == prev
    d = numerics.describe(1)
    assert d["torch_threads"] == 1 and d["aten_cpu_capability"] and set(numerics.ISA_ENV) <= set(d)


def _mult_weights(tmp_path, data_dir, outer_threads, threads):
    """MulT at its real width (where LayerNorm's and Linear's backward split their reductions
    over threads), one short epoch, trained with ``threads`` while the process has
    ``outer_threads``."""
    cfg = tiny_config(tmp_path / f"t{outer_threads}_{threads}", data_dir, schedule="end_to_end")
    cfg["model"] = {"name": "mult", "config": {"dropout": 0.3}}
    cfg["train"]["end_to_end"].update({"epochs": 1, "batch_size": 8, "lr": 1e-3})
    cfg["threads"] = threads
    prev = torch.get_num_threads()
    torch.set_num_threads(outer_threads)
    try:
        _train(cfg)
        assert torch.get_num_threads() == outer_threads   # restored after training
    finally:
        torch.set_num_threads(prev)
    return _state(cfg["run_dir"])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run 2 threads")
def test_pinned_threads_make_training_independent_of_the_thread_count(tmp_path, data_dir):
    """With ``threads: 1`` a training gives the same weights whatever thread count the process
    had; without it, one and two threads give different weights (the control: if torch ever
    stops depending on the thread count, the pinned half still holds)."""
    pinned = [_mult_weights(tmp_path, data_dir, n, threads=1) for n in (1, 2)]
    for k in pinned[0]:
        assert torch.equal(pinned[0][k], pinned[1][k]), k
    free = [_mult_weights(tmp_path, data_dir, n, threads=None) for n in (1, 2)]
    if all(torch.equal(free[0][k], free[1][k]) for k in free[0]):
        pytest.skip("this torch gives the same weights on 1 and 2 threads even unpinned")


# ----------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_identical_weights(tmp_path, data_dir):
    cfg = tiny_config(tmp_path, data_dir, schedule="end_to_end")
    cfg["train"]["end_to_end"].update({"epochs": 1, "batch_size": 4, "lr": 1e-3})
    import yaml

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "hdaf", "train", "--config", str(p)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.load(open(os.path.join(cfg["run_dir"], "ranks", f"rank{i}.json"))) for i in (0, 1)]
    assert [x["world_size"] for x in ranks] == [2, 2]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    final = _state(cfg["run_dir"])
    assert ckpt.state_fingerprint(final) == ranks[0]["fingerprint"]
    init = torch.load(os.path.join(cfg["run_dir"], "checkpoints", "last.pt"), weights_only=False)
    assert len(init["rng"]) == 2                            # RNG state of each rank is saved


# ----------------------------------------------------------------------------- commands
def test_info_command(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "auto" in out
    import importlib.metadata
    assert "  torch:" in out.split("packages:")[1]                # the resolved versions
    assert importlib.metadata.version("numpy") in out.split("packages:")[1]


def test_experiment_table(tmp_path, data_dir, capsys):
    cfg = tiny_config(tmp_path, data_dir)
    for s in ("unimodal", "dcca", "fusion"):
        cfg["train"]["stages"][s]["epochs"] = 1
    cfg["experiment"] = {
        "runs": {"a": {"data": {"mode": "aligned"}},
                 "u": {"data": {"mode": "unaligned"}, "train": {"schedule": "end_to_end",
                                                               "end_to_end": {"epochs": 1}}}},
        "table": [["Unimodal", [["Text only", "a", "text"]]],
                  ["Fused", [["Aligned", "a", "fused"], ["Unaligned", "u", "fused"], ["Missing", "zz", "fused"]]]],
    }
    from hdaf.training.experiment import run_experiment

    res = run_experiment(cfg, log=print)
    out = capsys.readouterr().out
    assert "| Aligned |" in out and "Missing (not run)" in out and "Acc6" in out
    table = json.load(open(os.path.join(cfg["run_dir"], "results.json")))
    rows = {r["label"]: r["values"] for g in table["groups"] for r in g["rows"]}
    m = json.load(open(os.path.join(cfg["run_dir"], "a", "metrics_test.json")))
    assert rows["Aligned"][0] == pytest.approx(100 * m["fused"]["acc6"])
    assert rows["Text only"][1] == pytest.approx(100 * m["unimodal"]["text"]["f1_6"])
    assert rows["Missing"] == [None] * 14
    assert os.path.exists(os.path.join(cfg["run_dir"], "results.md"))
    assert os.path.exists(os.path.join(cfg["run_dir"], "curves.png"))
    assert res["results"]["u"] is not None


def test_experiment_two_seeds_and_sweep(tmp_path, capsys):
    """The multi-seed runner on the stand-in model: per-seed runs, data drawn per seed, summary
    statistics equal to those of the per-seed metrics, paired differences; then a sweep."""
    import yaml

    from hdaf.training.stats import paired, summarize

    tiny = {"name": "hdaf.training.tiny:build", "config": {"hidden": 8, "dropout": 0.0}}
    cfg = {"run_dir": str(tmp_path / "exp"), "device": "cpu",
           "data": {"dir": str(tmp_path / "syn"), "synthetic": TINY_DATA},
           "model": tiny,
           "train": {"schedule": "end_to_end", "progress": False, "eval_batch_size": 16,
                     "end_to_end": {"epochs": 1, "batch_size": 8, "lr": 1e-2}},
           "experiment": {
               "runs": {"a": {}, "b": {"model": {"config": {"hidden": 4}}}},
               "table": [["Fused", [["A", "a", "fused"], ["B", "b", "fused"]]],
                         ["Unimodal", [["A text", "a", "text"]]]],
               "compare": [["a", "b"]]}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["experiment", "--config", str(p), "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "2 seeds (0, 1)" in out and "| A − B |" in out
    root = cfg["run_dir"]
    res = json.load(open(os.path.join(root, "results.json")))
    assert res["seeds"] == [0, 1] and os.path.exists(os.path.join(root, "results.md"))
    acc = {r: [100 * json.load(open(os.path.join(root, f"seed{s}", r, "metrics_test.json")))["fused"]["acc6"]
               for s in (0, 1)] for r in ("a", "b")}
    row = res["groups"][0]["rows"][0]
    assert [row["per_seed"][s][0] for s in ("0", "1")] == pytest.approx(acc["a"])
    ref = summarize(acc["a"])
    for k in ("mean", "sd", "ci_low", "ci_high"):
        assert row["stats"][0][k] == pytest.approx(ref[k])
    cmp = res["comparisons"][0]["stats"]["Acc6"]
    assert cmp["diffs"] == pytest.approx([x - y for x, y in zip(acc["a"], acc["b"])])
    assert cmp["p_t"] == pytest.approx(paired(acc["a"], acc["b"])["p_t"], nan_ok=True)
    # every seed drew its own dataset, shared by the runs of that seed
    s0 = json.load(open(tmp_path / "syn" / "seed0" / "SYNTHETIC.json"))
    s1 = json.load(open(tmp_path / "syn" / "seed1" / "SYNTHETIC.json"))
    assert (s0["seed"], s1["seed"]) == (0, 1)
    assert res["timing"]["wall_s"] >= 0 and set(res["timing"]["per_seed_s"]) == {"0", "1"}

    # a sweep of two offsets, one seed each (no interval with n = 1), one run
    cfg = get_config(str(p), [f"run_dir={tmp_path / 'sweep'}"])
    cfg["experiment"].update(seeds=[3], compare=[],
                             sweep={"key": "data.synthetic.speaker_offset", "values": [0.0, 2.0]})
    from hdaf.training.experiment import run_experiment

    sw = run_experiment(cfg, only=["a"], log=_quiet)["sweep"]
    assert [pt["value"] for pt in sw["points"]] == [0.0, 2.0]
    assert math.isnan(sw["points"][0]["rows"]["A"]["Acc6"]["ci_low"])
    for v in ("0", "2"):
        made = json.load(open(tmp_path / "syn" / f"speaker_offset={v}" / "seed3" / "SYNTHETIC.json"))
        assert made["speaker_offset"] == float(v) and made["seed"] == 3
    for f in ("sweep.json", "sweep.md", "sweep.png"):
        assert os.path.exists(os.path.join(cfg["run_dir"], f))


def test_multiseed_does_not_import_experiment():
    """experiment -> multiseed only: multiseed is handed the single-seed runner and the defaults,
    so no import of experiment appears anywhere in it (the two modules used to import each other)."""
    import ast

    import hdaf.training.multiseed as ms

    tree = ast.parse(open(ms.__file__).read())
    names = [(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert not [n for n in names if "experiment" in n], names


# ----------------------------------------------------------------------------- change baseline
def _ramp_samples(n, seed, T=30, d=4):
    """Segments whose dominant emotion is in a ramp of vision feature k (k = class), on top of a
    per-segment random level: the level says nothing, the change says the class."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        k = i % 6
        y = np.zeros(6, np.float32)
        y[k] = 2.0
        v = rng.randn(1, 6) * 3.0 + 0.3 * rng.randn(T, 6)
        v[:, k] += np.linspace(0.0, 2.0, T)
        a = rng.randn(T, d)
        out.append({"id": f"s{seed}_{i}", "text": np.zeros((3, 5), np.float32),
                    "text_mask": np.zeros(3, bool), "vision": v.astype(np.float32),
                    "vision_mask": np.zeros(T, bool), "audio": a.astype(np.float32),
                    "audio_mask": np.zeros(T, bool), "labels": y})
    return out


def test_change_baseline_beats_chance_and_selects_on_valid_only():
    from hdaf.training.baseline import change_features, fit_select_evaluate

    data = {"train": _ramp_samples(120, 0), "valid": _ramp_samples(36, 1), "test": _ramp_samples(36, 2)}
    # padding is ignored: masked steps do not enter the windows
    s = dict(data["train"][0])
    s["vision"] = np.concatenate([s["vision"], np.full((5, 6), 99.0, np.float32)])
    s["vision_mask"] = np.concatenate([s["vision_mask"], np.ones(5, bool)])
    np.testing.assert_allclose(change_features(s, "vision"), change_features(data["train"][0], "vision"))
    res = fit_select_evaluate(data, {}, "test")
    assert res["unimodal"]["vision"]["acc6"] > 0.8 and res["fused"]["acc6"] > 0.6  # chance: 1/6
    assert res["unimodal"]["audio"]["acc6"] < 0.5  # audio is noise
    assert set(res["selection"]) == {"vision", "audio", "both"}
    again = fit_select_evaluate(data, {}, "test")
    assert json.dumps(again, default=float) == json.dumps(res, default=float)  # deterministic
    # the eval split's labels are never read for selection: corrupt them, C is unchanged
    bad = [dict(x, labels=np.roll(x["labels"], 1)) for x in data["test"]]
    res2 = fit_select_evaluate(dict(data, test=bad), {}, "test")
    assert res2["selection"] == res["selection"]
    assert res2["unimodal"]["vision"]["acc6"] < 0.3
    with pytest.raises(ValueError, match="C_grid"):
        fit_select_evaluate(data, {"C_grid": []}, "test")
    with pytest.raises(ValueError, match="unknown keys"):
        fit_select_evaluate(data, {"Cs": [1.0]}, "test")
    with pytest.raises(ValueError, match="'valid' missing"):
        fit_select_evaluate({"train": data["train"], "test": data["test"]}, {}, "test")


def test_change_baseline_in_the_experiment_table_and_summary(tmp_path, data_dir, capsys):
    """Its own run (``--only`` selects it, no training), in both data modes, with the default
    table's "Non-neural baseline" rows in the single-seed table and the multi-seed summary."""
    from hdaf.training.experiment import DEFAULT_TABLE, run_experiment

    cfg = tiny_config(tmp_path, data_dir)
    cfg["data"]["normalize"] = "center"
    cfg["experiment"] = {"runs": {
        "change_baseline": {"data": {"mode": "unaligned"}, "model": {"name": "change_baseline",
                                                                    "config": {"C_grid": [0.1, 1.0]}}},
        "baseline_aligned": {"data": {"mode": "aligned"}, "model": {"name": "change_baseline"}},
        "hdaf_aligned": {}}, "table": DEFAULT_TABLE}
    res = run_experiment(cfg, only=["change_baseline", "baseline_aligned"], log=print)
    out = capsys.readouterr().out
    assert "| *Non-neural baseline* |" in out
    for row in ("Change baseline: vision", "Change baseline: audio", "Change baseline: both"):
        assert f"| {row} |" in out
    assert "Aligned data (not run)" in out
    assert not os.path.exists(os.path.join(cfg["run_dir"], "hdaf_aligned"))
    assert res["results"]["baseline_aligned"]["fused"]["n"] == res["results"]["change_baseline"]["fused"]["n"]
    m = json.load(open(os.path.join(cfg["run_dir"], "change_baseline", "metrics_test.json")))
    assert m["selection"]["both"]["C"] in (0.1, 1.0)
    cfg["run_dir"] = str(tmp_path / "seeds")
    run_experiment(cfg, only=["change_baseline"], seeds=[0, 1], log=_quiet)
    summary = json.load(open(os.path.join(cfg["run_dir"], "results.json")))
    rows = {r["label"]: r for g in summary["groups"] for r in g["rows"]}
    assert rows["Change baseline: both"]["seeds_run"] == [0, 1]
    assert "Change baseline: audio" in open(os.path.join(cfg["run_dir"], "results.md")).read()
