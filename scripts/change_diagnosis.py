#!/usr/bin/env python3
"""The diagnosis behind the main job's preprocessing: validation splits only.

    python scripts/change_diagnosis.py run [--variants nb cs ...] [--jobs 2]
    python scripts/change_diagnosis.py report [--out docs/results/change_diagnosis]
    python scripts/change_diagnosis.py probe [--variant nb --setting crd]

Why did the vision and acoustic encoders miss changes that a logistic regression on
late-minus-early window means finds?  Each *variant* (a list of ``--set`` overrides of the main
job) runs HDAF aligned and the change baseline with ``eval.split=valid`` over seeds 100-104 (new
draws of the data, none of them a seed of the main job or of configs/change_grid.yaml) on some of
the *settings* below (generator overrides), in ``runs/change_diagnosis/<variant>/<setting>``.
Every variant spells out the preprocessing it ran with (``BEFORE`` is the main job's before this
study), so it reproduces whatever configs/main.yaml holds now.  The test split is never read.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SEEDS = "100-104"
from hdaf.training.numerics import ISA_PINS as PINS  # noqa: E402  (scripts/main.sh's pins)
COMP = {"vision": ["happy", "sad", "anger"], "audio": ["surprise", "disgust", "fear"], "text": []}
SETTINGS = {
    "ref": ({}, "the main job's data (steps, constant offsets)"),
    "rd": ({"signal_shape": "ramp", "speaker_drift": 0.5}, "ramps, drift 0.5"),
    "crd": ({"signal_shape": "ramp", "speaker_drift": 0.5, "signal_emotions": COMP},
            "ramps, drift 0.5, complementary vision / audio, no text signal"),
    "crdp": ({"signal_shape": "ramp", "speaker_drift": 0.5, "sp_prob": 0.5, "signal_emotions": COMP},
             "as crd, sparse speech: half the word slots are pauses"),
    "crds": ({"signal_shape": "ramp", "speaker_drift": 0.5, "feature_scale": 1.5, "signal_emotions": COMP},
             "as crd, feature units spread over 10^±1.5"),
}
BEFORE = ["data.normalize=center", "data.aligned_span=word", "data.max_frames_per_word=8",
          'data.max_len={"text": 50, "audio": 200, "vision": 150, "aligned": 200}']
NEW = ["data.normalize=center_scale", "data.aligned_span=to_next_word", "data.max_frames_per_word=16"]
# name: (overrides, settings, runs, description)
VARIANTS = {
    "base": (BEFORE, ["ref", "rd", "crd", "crdp", "crds"], None, "before: per-segment centring, SDK word spans"),
    "none": (BEFORE[1:] + ["data.normalize=none"], ["rd", "crd"], None, "features as read"),
    "std": (BEFORE[1:] + ["data.normalize=standardize"], ["rd", "crd"], None, "per-segment standardisation"),
    "k7": (BEFORE + ["model.config.conv_kernel=7"], ["rd", "crd"], None, "Conv1D kernel 7 (receptive field)"),
    "fus8": (BEFORE + ["train.stages.fusion.epochs=8"], ["rd", "crd"], None, "fusion stage 8 epochs (budget)"),
    "cs": (BEFORE[1:] + ["data.normalize=center_scale"], ["ref", "rd", "crd", "crds"], None,
           "centring + training-split scale"),
    "span": (BEFORE[:1] + BEFORE[3:] + ["data.aligned_span=to_next_word", "data.max_frames_per_word=16"],
             ["crdp"], None, "words span to the next word, 16 frames each"),
    "nb": (NEW + BEFORE[3:], ["ref", "rd", "crd", "crdp", "crds"], None, "both (the main job's preprocessing now)"),
    "nb_unaligned": (NEW + BEFORE[3:], ["crd"], ["hdaf_unaligned", "mult_aligned"],
                     "both; unaligned HDAF and MulT"),
    "nb_dropout0.3": (NEW + BEFORE[3:] + ["model.config.dropout=0.3"], ["crd"], None, "both; dropout 0.3"),
    "nb_fusion_wd": (NEW + BEFORE[3:] + ["train.stages.fusion.weight_decay=0.01", "train.stages.fusion.lr=3e-4"],
                     ["crd"], None, "both; fusion stage weight decay 0.01, lr 3e-4"),
    "nb_unimodal2": (NEW + BEFORE[3:] + ["train.stages.unimodal.epochs=2"], ["crd"], None, "both; unimodal stage 2 epochs"),
    "nb_unimodal8": (NEW + BEFORE[3:] + ["train.stages.unimodal.epochs=8"], ["crd"], None, "both; unimodal stage 8 epochs"),
    "nb_e2e": (NEW + BEFORE[3:] + ["train.schedule=staged+end_to_end"], ["crd"], None,
               "both; stages then joint fine-tuning"),
    "nb_maxdist64": (NEW + BEFORE[3:] + ["model.config.max_distance=64"], ["crd"], None,
                     "both; relative buckets to ±64 (delta term's reach)"),
    "nb_delta_lr10": (NEW + BEFORE[3:] + ["train.stages.unimodal.delta_lr_scale=10"], ["crd"], None,
                      "both; delta weights at 10x the learning rate"),
    "nb_d128": (NEW + BEFORE[3:] + ["model.config.d_model=128"], ["crd"], None, "both; d_model 128"),
}
ROWS = [("vision head", "Visuals only"), ("acoustic head", "Acoustics only"), ("HDAF aligned", "Aligned data"),
        ("HDAF unaligned", "Unaligned data"), ("MulT", "MulT (aligned)"),
        ("baseline: vision", "Change baseline: vision"), ("baseline: audio", "Change baseline: audio"),
        ("baseline: both", "Change baseline: both")]


def _dir(variant, setting):
    return os.path.join(ROOT, "runs", "change_diagnosis", variant, setting)


def _run_one(variant, setting):
    sets, _, runs, _ = VARIANTS[variant]
    rd = _dir(variant, setting)
    if os.path.exists(os.path.join(rd, "results.json")):
        return variant, setting, 0
    cmd = [sys.executable, "-m", "hdaf", "experiment", "--config", "configs/main.yaml", "--seeds", SEEDS,
           "--set", "eval.split=valid", "--set", "data.synthetic=" + json.dumps(SETTINGS[setting][0]),
           "--set", f"data.dir=data/change_diagnosis/{setting}", "--run-dir", rd,
           "--only", *(runs or ["hdaf_aligned", "change_baseline"])]
    for s in sets:
        cmd += ["--set", s]
    os.makedirs(rd, exist_ok=True)
    with open(os.path.join(rd, "diagnosis.log"), "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, env={**os.environ, **PINS}, stdout=log, stderr=subprocess.STDOUT)
    return variant, setting, rc


def run(args) -> int:
    jobs = [(v, s) for v in (args.variants or VARIANTS) for s in VARIANTS[v][1]]
    bad = 0
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for v, s, rc in pool.map(lambda j: _run_one(*j), jobs):
            print(f"[diagnosis] {v}/{s}: {'ok' if rc == 0 else f'FAILED ({rc})'}", flush=True)
            bad += rc != 0
    return 1 if bad else 0


def _per_seed(variant, setting):
    """{row label: [valid Acc6 per seed]} from the per-seed results of a run folder."""
    rd = _dir(variant, setting)
    out = {}
    for d in sorted(x for x in os.listdir(rd) if x.startswith("seed")):
        with open(os.path.join(rd, d, "results.json")) as f:
            for g in json.load(f)["groups"]:
                for r in g["rows"]:
                    if r["values"][0] is not None:
                        out.setdefault(r["label"], []).append(r["values"][0])
    return out


def report(args) -> int:
    from hdaf.training.stats import summarize

    data = {"seeds": SEEDS, "split": "valid", "settings": {k: {"overrides": v[0], "what": v[1]}
                                                          for k, v in SETTINGS.items()}, "variants": {}}
    md = ["| variant | setting | " + " | ".join(r for r, _ in ROWS) + " |",
          "|---|---|" + "---|" * len(ROWS)]
    for v, (sets, settings, runs, what) in VARIANTS.items():
        data["variants"][v] = {"sets": sets, "runs": runs or ["hdaf_aligned", "change_baseline"],
                               "what": what, "results": {}}
        for s in settings:
            if not os.path.exists(os.path.join(_dir(v, s), "results.json")):
                continue
            per = _per_seed(v, s)
            data["variants"][v]["results"][s] = {
                label: {"per_seed": per[key], "stats": summarize(per[key])} for label, key in ROWS if key in per}
            cells = []
            for label, key in ROWS:
                cells.append(f"{summarize(per[key])['mean']:.1f}" if key in per else "–")
            md.append(f"| {what} (`{v}`) | `{s}` | " + " | ".join(cells) + " |")
    with open(os.path.join(ROOT, args.out + ".json"), "w") as f:
        json.dump(data, f, indent=1, default=float)
    with open(os.path.join(ROOT, args.out + ".md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def probe(args) -> int:
    """Is the fused head the bottleneck?  For each seed of ``<variant>/<setting>``: a logistic
    regression on the trained model's vision and acoustic unimodal logits (fitted on train, C
    chosen on valid from a small grid) against the fused head, both scored on valid."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from hdaf.data.loading import load_data
    from hdaf.training import checkpoint as ckpt
    from hdaf.training.config import load_file
    from hdaf.training.evaluate import predict
    from hdaf.training.metrics import dominant
    from hdaf.training.models_api import load_model

    rd = _dir(args.variant, args.setting)
    out = {"variant": args.variant, "setting": args.setting, "split": "valid", "per_seed": {}}
    cpu = torch.device("cpu")
    for seed in sorted(x for x in os.listdir(rd) if x.startswith("seed")):
        run = os.path.join(rd, seed, "hdaf_aligned")
        cfg = load_file(os.path.join(run, "config.yaml"))
        model, _ = load_model(ckpt.load(os.path.join(run, "final.pt"), map_location=cpu), cpu)
        ds, _ = load_data(cfg["data"], log=lambda *a: None)
        pred = {k: predict(model, ds[k], cpu) for k in ("train", "valid")}

        def xy(p):
            x = np.concatenate([p["unimodal"]["vision"], p["unimodal"]["audio"]], 1)
            c, has = dominant(p["labels"])
            return x[has], c[has], p["logits"][has]

        xt, yt, _ = xy(pred["train"])
        xv, yv, fv = xy(pred["valid"])
        with threadpool_limits(1):
            lr = max(LogisticRegression(C=c, max_iter=2000).fit(xt, yt).score(xv, yv) for c in (0.01, 0.1, 1.0, 10.0))
        out["per_seed"][seed] = {"lr_on_unimodal_logits": 100 * lr, "fused_head": 100 * float((fv.argmax(1) == yv).mean())}
        print(seed, out["per_seed"][seed], flush=True)
    for k in ("lr_on_unimodal_logits", "fused_head"):
        out[k] = float(np.mean([v[k] for v in out["per_seed"].values()]))
    with open(os.path.join(ROOT, args.out + "_probe.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("lr_on_unimodal_logits", "fused_head")}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--variants", nargs="*", choices=list(VARIANTS))
    r.add_argument("--jobs", type=int, default=1)
    r.set_defaults(fn=run)
    q = sub.add_parser("report")
    q.add_argument("--out", default="docs/results/change_diagnosis")
    q.set_defaults(fn=report)
    b = sub.add_parser("probe", help="logistic regression on the unimodal logits against the fused head")
    b.add_argument("--variant", default="nb")
    b.add_argument("--setting", default="crd")
    b.add_argument("--out", default="docs/results/change_diagnosis")
    b.set_defaults(fn=probe)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
