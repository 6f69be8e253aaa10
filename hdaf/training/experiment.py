"""The main job: train and evaluate every Table-2 row, print and save the results table.

``experiment.runs`` maps a run name to config overrides of the base config; each run trains in
``<run_dir>/<name>`` (resuming when it was interrupted, skipping when finished).  The table is
assembled by ``experiment.table``: rows name a run and a head (``fused`` or a modality).

With several seeds (``seeds=[...]``, ``hdaf experiment --seeds 0,1,2``, or ``experiment.seeds``)
the experiment runs once per seed and reports means, intervals and paired tests; with
``experiment.sweep`` it does so for each value of a config key.  ``hdaf.training.multiseed`` does
that aggregation and is handed ``run_single`` and the runs and table to use: it never imports this
module, so the two do not import each other.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Dict

from . import baseline, multiseed, numerics
from .config import deep_update, dump
from .report import build_table, plot_curves, save_table, to_markdown

DEFAULT_RUNS = {
    "hdaf_aligned": {"data": {"mode": "aligned"}},
    "hdaf_unaligned": {"data": {"mode": "unaligned"}},
    "hdaf_no_delta": {"data": {"mode": "aligned"}, "model": {"config": {"use_delta": False}}},
    "mult_aligned": {"data": {"mode": "aligned"}, "model": {"name": "mult"},
                     "train": {"schedule": "end_to_end"}},
    # non-neural: logistic regression on late-minus-early window means (hdaf.training.baseline)
    "change_baseline": {"data": {"mode": "unaligned"}, "model": {"name": "change_baseline"}},
}

DEFAULT_TABLE = [
    ["Unimodal Delta Self-Attention (HDAF unimodal heads, aligned)", [
        ["Text only", "hdaf_aligned", "text"],
        ["Visuals only", "hdaf_aligned", "vision"],
        ["Acoustics only", "hdaf_aligned", "audio"]]],
    ["Multimodal Fused Hierarchical Attention (HDAF)", [
        ["Aligned data", "hdaf_aligned", "fused"],
        ["Unaligned data", "hdaf_unaligned", "fused"]]],
    ["Ablation", [
        ["HDAF, delta term off (aligned)", "hdaf_no_delta", "fused"]]],
    ["Comparison", [
        ["MulT (aligned)", "mult_aligned", "fused"]]],
    ["Non-neural baseline", [
        ["Change baseline: vision", "change_baseline", "vision"],
        ["Change baseline: audio", "change_baseline", "audio"],
        ["Change baseline: both", "change_baseline", "fused"]]],
]


def run_experiment(cfg: dict, only=None, log=print, seeds=None) -> dict:
    """One seed (``run_single``), or several seeds / a sweep when ``seeds`` or
    ``experiment.seeds`` / ``experiment.sweep`` ask for them (``hdaf.training.multiseed``)."""
    exp = cfg.get("experiment") or {}
    if seeds is None and exp.get("seeds") is not None:
        seeds = exp["seeds"]
    if seeds is None and not exp.get("sweep"):
        return run_single(cfg, only=only, log=log)
    if isinstance(seeds, str):
        seeds = multiseed.parse_seeds(seeds)
    seeds = [int(s) for s in seeds] if seeds is not None else [int(cfg.get("seed", 0))]
    plan = dict(run_one=run_single, runs=exp.get("runs") or DEFAULT_RUNS,
                table_spec=exp.get("table") or DEFAULT_TABLE)
    if exp.get("sweep"):
        return multiseed.run_sweep(cfg, seeds, only=only, log=log, **plan)
    return multiseed.run_seeds(cfg, seeds, only=only, log=log, **plan)


def run_single(cfg: dict, only=None, log=print) -> dict:
    """Train (or reuse) every run of ``experiment.runs`` with ``cfg``'s seed; build the table."""
    from .trainer import train  # local: keeps `hdaf info` free of training imports

    exp = cfg.get("experiment") or {}
    runs: Dict[str, dict] = exp.get("runs") or DEFAULT_RUNS
    table_spec = exp.get("table") or DEFAULT_TABLE
    base = copy.deepcopy(cfg)
    base.pop("experiment", None)
    root = cfg["run_dir"]
    os.makedirs(root, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        dump(cfg, os.path.join(root, "experiment_config.yaml"))
    results, histories, timings = {}, {}, {}
    t0 = time.time()
    for name, over in runs.items():
        if only and name not in only:
            continue
        rcfg = deep_update(copy.deepcopy(base), over or {})
        rcfg["run_dir"] = os.path.join(root, name)
        metrics_path = os.path.join(rcfg["run_dir"], f"metrics_{rcfg['eval']['split']}.json")
        final = os.path.join(rcfg["run_dir"], "final.pt")
        t = time.time()
        if (rcfg.get("model") or {}).get("name") == baseline.NAME:  # seconds: always recomputed
            log(f"[experiment] ===== {name} =====")
            results[name] = baseline.run_change_baseline(
                rcfg, ((over or {}).get("model") or {}).get("config"), log=log)
        elif os.path.exists(final) and os.path.exists(metrics_path):
            log(f"[experiment] {name}: finished earlier, reusing {metrics_path}")
            with open(metrics_path) as f:
                results[name] = json.load(f)
        else:
            log(f"[experiment] ===== {name} =====")
            summary = train(rcfg, resume=True, log=None)
            results[name] = summary.get("metrics")
        timings[name] = round(time.time() - t, 1)
        hp = os.path.join(rcfg["run_dir"], "history.json")
        if os.path.exists(hp):
            with open(hp) as f:
                histories[name] = json.load(f)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return {"table": None, "paths": {}, "results": results}
    groups = []
    for title, rows in table_spec:
        grow = []
        for label, run, head in rows:
            m = multiseed.metrics_of(results.get(run), head)
            grow.append((label, m, None if m is not None else "not run"))
        groups.append((title, grow))
    table = build_table(groups)
    table["timings_s"] = timings
    table["total_s"] = round(time.time() - t0, 1)
    table["split"] = base["eval"]["split"]
    table["numerics"] = numerics.describe(base.get("threads"))
    title = (f"Emotion classification, {base['data'].get('source')} data "
             f"({base['data'].get('dir') or base['data'].get('path')}), {table['split']} split")
    paths = save_table(table, root, title=title)
    if histories:
        paths["curves"] = plot_curves(histories, os.path.join(root, "curves.png"))
    md = to_markdown(table, title=title)
    log("\n" + md)
    log(f"\n[experiment] done in {table['total_s']}s (per run: {timings}); "
        + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return {"table": table, "paths": paths, "results": results}
