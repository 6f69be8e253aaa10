"""Multi-seed experiments and sweeps: every metric as mean ± sd with a 95 % interval, paired tests.

``run_seeds(cfg, seeds, run_one=..., runs=..., table_spec=...)`` runs the single-seed experiment
``run_one`` once per seed, in ``<run_dir>/seed<s>``, and aggregates.  ``experiment.run_experiment``
passes ``experiment.run_single`` and the runs and table; this module does not import
``experiment``.  A seed sets ``cfg["seed"]`` (initial weights, dropout, batch order) and, for
synthetic data with ``experiment.seed_data: true`` (the default), also ``data.synthetic.seed`` (a
new draw of speakers, emotion directions, labels and noise, in ``<data.dir>/seed<s>``): each seed is
then an independent replicate of the whole experiment, and every model of one seed sees the same
data and splits, so models are compared *paired* by seed.

``run_sweep(cfg, seeds, ...)`` repeats that for each value of ``experiment.sweep.key`` (a dotted
config key, e.g. ``data.synthetic.speaker_offset``) in ``<run_dir>/<leaf>=<value>`` and writes
``<run_dir>/sweep.{md,json,png}``.

Outputs of ``run_seeds`` (``<run_dir>/results.{md,json}``): per table row, the per-seed values of
every column and their ``stats.summarize``; per ``experiment.compare`` pair ``[a, b]``, ``[a, b, head]`` or ``[a, b, head_a, head_b]``
(default ``DEFAULT_COMPARE``, where run: HDAF aligned vs the no-delta ablation, vs MulT and vs
each of its unimodal heads, and unaligned vs aligned), ``stats.paired`` of ``a - b`` per column.  The statistics are in ``hdaf.training.stats``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from typing import Callable, Dict, List, Optional, Sequence

from .config import set_key
from .report import COLUMNS, row_values, to_markdown
from .stats import fmt_ci, fmt_p, paired, summarize

# The paper's claims: fused HDAF against its delta-term-off ablation, MulT, each of its own
# unimodal heads (same run, paired by seed) and unaligned against aligned input.
DEFAULT_COMPARE = [["hdaf_aligned", "hdaf_no_delta"], ["hdaf_aligned", "mult_aligned"],
                   ["hdaf_aligned", "hdaf_aligned", "fused", "text"],
                   ["hdaf_aligned", "hdaf_aligned", "fused", "audio"],
                   ["hdaf_aligned", "hdaf_aligned", "fused", "vision"],
                   ["hdaf_unaligned", "hdaf_aligned"]]
SHOWN = ("Acc6", "F1")  # columns shown in the markdown; every column is in the JSON


def parse_seeds(text: str) -> List[int]:
    """``"0,1,2"``, ``"0-4"`` (inclusive) or a mix ``"0-2,7"`` -> distinct non-negative ints."""
    out: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            out.extend(range(int(m[1]), int(m[2]) + 1))
        elif part.isdigit():
            out.append(int(part))
        elif part:
            raise ValueError(f"--seeds: expected integers like 0,1,2 or 0-4, got {text!r}")
    if not out or len(set(out)) != len(out):
        raise ValueError(f"--seeds: expected distinct integers like 0,1,2 or 0-4, got {text!r}")
    return out


def _timer():
    t0, c0 = time.time(), time.process_time()
    la0 = os.getloadavg() if hasattr(os, "getloadavg") else None

    def done() -> dict:
        return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                "loadavg_start": la0, "loadavg_end": os.getloadavg() if la0 is not None else None}
    return done


def _seed_config(cfg: dict, seed: int) -> dict:
    c = copy.deepcopy(cfg)
    exp = c.get("experiment") or {}
    c["experiment"] = {k: exp[k] for k in ("runs", "table") if k in exp}
    c["seed"] = int(seed)
    c["run_dir"] = os.path.join(cfg["run_dir"], f"seed{seed}")
    d = c["data"]
    if d.get("source", "synthetic") == "synthetic" and exp.get("seed_data", True):
        d["synthetic"] = dict(d.get("synthetic") or {}, seed=int(seed))
        d["dir"] = os.path.join(d["dir"], f"seed{seed}")
    return c


def _compare_pairs(exp: dict, runs: Dict[str, dict]) -> List[List[str]]:
    pairs = exp.get("compare")
    if pairs is None:
        pairs = [p for p in DEFAULT_COMPARE if p[0] in runs and p[1] in runs]
    for p in pairs:
        if not (isinstance(p, (list, tuple)) and len(p) in (2, 3, 4)):
            raise ValueError("experiment.compare: each entry is [run_a, run_b], "
                             f"[run_a, run_b, head] or [run_a, run_b, head_a, head_b], got {p!r}")
    return [list(p) for p in pairs]


def metrics_of(res: Optional[dict], head: str) -> Optional[dict]:
    if res is None:
        return None
    return res["fused"] if head == "fused" else (res.get("unimodal") or {}).get(head)


def aggregate(per_seed: Dict[int, Dict[str, dict]], table_spec, pairs, confidence: float = 0.95) -> dict:
    """``per_seed``: ``{seed: {run: metrics of the run (fused + unimodal)}}`` -> the summary."""
    seeds = list(per_seed)
    out = {"seeds": seeds, "confidence": confidence, "columns": COLUMNS, "groups": [], "comparisons": []}
    labels = {}
    for title, rows in table_spec:
        g = {"title": title, "rows": []}
        for label, run, head in rows:
            vals = {s: row_values(metrics_of(per_seed[s].get(run), head)) for s in seeds}
            ran = [s for s in seeds if per_seed[s].get(run) is not None]
            stats = [summarize([vals[s][i] for s in seeds], confidence) for i in range(len(COLUMNS))]
            g["rows"].append({"label": label, "run": run, "head": head, "seeds_run": ran,
                              "per_seed": {str(s): vals[s] for s in seeds}, "stats": stats,
                              "mean": [None if math.isnan(st["mean"]) else st["mean"] for st in stats]})
            labels.setdefault((run, head), label)
        out["groups"].append(g)
    for p in pairs:
        a, b = p[0], p[1]
        head = p[2] if len(p) > 2 else "fused"
        head_b = p[3] if len(p) > 3 else head
        va = {s: row_values(metrics_of(per_seed[s].get(a), head)) for s in seeds}
        vb = {s: row_values(metrics_of(per_seed[s].get(b), head_b)) for s in seeds}
        out["comparisons"].append({
            "a": a, "b": b, "head": head, "head_b": head_b, "a_label": labels.get((a, head), a),
            "b_label": labels.get((b, head_b), b if head_b == "fused" else f"{b} ({head_b})"),
            "stats": {c: paired([va[s][i] for s in seeds], [vb[s][i] for s in seeds], confidence)
                      for i, c in enumerate(COLUMNS)}})
    return out


def summary_markdown(summary: dict, title: str) -> str:
    conf = int(round(100 * summary["confidence"]))
    n = len(summary["seeds"])
    idx = {c: COLUMNS.index(c) for c in SHOWN}
    head = ["Description"] + sum([[f"{c} mean ± sd", f"{c} {conf}% CI"] for c in SHOWN], [])
    lines = [f"**{title}** — {n} seeds ({', '.join(map(str, summary['seeds']))}); percent, "
             f"mean ± sample sd over seeds and the {conf}% Student-t interval of the mean",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in summary["groups"]:
        lines.append("| *" + g["title"] + "* |" + " |" * (len(head) - 1))
        for r in g["rows"]:
            cells = []
            for c in SHOWN:
                st = r["stats"][idx[c]]
                if math.isnan(st["mean"]):
                    cells += ["N/A", "N/A"]
                    continue
                sd = "n/a" if math.isnan(st["sd"]) else f"{st['sd']:.1f}"
                ci = "n/a (n=1)" if math.isnan(st["ci_low"]) else f"[{st['ci_low']:.1f}, {st['ci_high']:.1f}]"
                cells += [f"{st['mean']:.1f} ± {sd}", ci]
            lines.append("| " + r["label"] + " | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        ph = ["Paired comparison (A − B, same seeds)"] + sum(
            [[f"{c} diff [{conf}% CI]", "p (paired t)", "p (Wilcoxon)", "seeds A > B"] for c in SHOWN], [])
        lines += ["", "| " + " | ".join(ph) + " |", "|" + "---|" * len(ph)]
        for cmp in summary["comparisons"]:
            cells = []
            for c in SHOWN:
                st = cmp["stats"][c]
                cells += [fmt_ci(st, signed=True), fmt_p(st["p_t"]), fmt_p(st["p_wilcoxon"]),
                          f"{st['n_a_better']}/{st['n']}"]
            lines.append(f"| {cmp['a_label']} − {cmp['b_label']} | " + " | ".join(cells) + " |")
    claims = claims_markdown(summary)
    if claims:
        lines += ["", claims]
    lines += ["", "CI: mean ± t(n−1)·sd/√n; paired t: scipy.stats.ttest_rel; Wilcoxon: "
              f"scipy.stats.wilcoxon (signed-rank, two-sided; with {n} seeds its smallest p is "
              f"{2 / 2 ** n:.3g}).  Per-seed values: results.json."]
    means = {"columns": COLUMNS, "groups": [
        {"title": g["title"], "rows": [{"label": r["label"], "values": r["mean"], "note": None}
                                       for r in g["rows"]]} for g in summary["groups"]]}
    lines += ["", to_markdown(means, title=f"{title}: means over {n} seeds, every column")]
    return "\n".join(lines)


def _comparison(summary: dict, a: str, b: str, head_a: str = "fused", head_b: str = "fused"):
    for c in summary.get("comparisons", []):
        if (c["a"], c["b"], c["head"], c.get("head_b", c["head"])) == (a, b, head_a, head_b):
            return c
    return None


def claims_markdown(summary: dict, column: str = "Acc6") -> Optional[str]:
    """The paper's three claims, checked against their targets from a multi-seed summary (the
    comparisons of ``DEFAULT_COMPARE``); ``None`` when the summary lacks the runs they need.

    * HDAF aligned ≥ MulT aligned − 1 point (the paper's own margin is −1.0): the mean paired
      difference;
    * fused HDAF above its best unimodal head (the head with the highest mean), paired t p < 0.05;
    * unaligned within ±2 points of aligned: the mean paired difference;
    * the delta term's gain over ``use_delta=false``: reported, no target.
    """
    heads = [h for h in ("text", "audio", "vision")
             if _comparison(summary, "hdaf_aligned", "hdaf_aligned", "fused", h)]
    need = [_comparison(summary, "hdaf_aligned", "mult_aligned"),
            _comparison(summary, "hdaf_unaligned", "hdaf_aligned")]
    if not heads or any(c is None for c in need):
        return None
    means = {}
    for g in summary["groups"]:
        for r in g["rows"]:
            if r["run"] == "hdaf_aligned" and r["head"] in heads:
                means[r["head"]] = r["stats"][COLUMNS.index(column)]["mean"]
    best = max(heads, key=lambda h: -math.inf if math.isnan(means.get(h, math.nan)) else means[h])
    conf = int(round(100 * summary["confidence"]))
    lines = [f"| Claim ({column}) | A − B, mean [{conf}% CI] | p (paired t) | "
             "seeds A > B | target |", "|---|---|---|---|---|"]

    def row(claim, cmp, verdict):
        st = cmp["stats"][column]
        lines.append(f"| {claim} | {fmt_ci(st, signed=True)} | {fmt_p(st['p_t'])} | "
                     f"{st['n_a_better']}/{st['n']} | {verdict} |")

    def ok(flag):
        return "**met**" if flag else "**missed**"

    c = need[0]
    row("HDAF aligned − MulT aligned", c, f"≥ −1: {ok(c['stats'][column]['mean_diff'] >= -1.0)}")
    c = _comparison(summary, "hdaf_aligned", "hdaf_aligned", "fused", best)
    st = c["stats"][column]
    row(f"HDAF fused − best unimodal head ({c['b_label']})", c,
        f"> 0 with p < 0.05: {ok(st['mean_diff'] > 0 and st['p_t'] < 0.05)}")
    c = need[1]
    row("HDAF unaligned − aligned", c, f"within ±2: {ok(abs(c['stats'][column]['mean_diff']) <= 2.0)}")
    c = _comparison(summary, "hdaf_aligned", "hdaf_no_delta")
    if c is not None:
        row("HDAF − HDAF with the delta term off", c, "reported")
    return "\n".join(lines)


def run_seeds(cfg: dict, seeds: Sequence[int], *, run_one: Callable[..., dict], runs: Dict[str, dict],
              table_spec, only=None, log=print) -> dict:
    """``run_one(cfg, only=, log=)`` -> ``{"results": {run: metrics}, "table": ...}`` for one seed;
    ``runs`` / ``table_spec``: the experiment's runs and table (for the comparisons and summary)."""
    exp = cfg.get("experiment") or {}
    pairs = _compare_pairs(exp, {k: v for k, v in runs.items() if not only or k in only})
    confidence = float(exp.get("confidence", 0.95))
    root = cfg["run_dir"]
    os.makedirs(root, exist_ok=True)
    timer = _timer()
    per_seed, seed_s = {}, {}
    for i, s in enumerate(seeds):
        log(f"[experiment] ===== seed {s} ({i + 1}/{len(seeds)}) in {root} =====")
        t = time.time()
        res = run_one(_seed_config(cfg, s), only=only, log=log)
        seed_s[str(s)] = round(time.time() - t, 1)
        per_seed[s] = res["results"]
        if res.get("table") is None:  # under torchrun only rank 0 aggregates
            return {"summary": None, "paths": {}, "per_seed": per_seed}
    summary = aggregate(per_seed, table_spec, pairs, confidence)
    summary["timing"] = dict(timer(), per_seed_s=seed_s)
    summary["split"] = cfg["eval"]["split"]
    summary["per_seed_dirs"] = {str(s): os.path.join(root, f"seed{s}") for s in seeds}
    d = cfg["data"]
    title = (f"Emotion classification, {d.get('source')} data "
             f"({d.get('dir') or d.get('path')}), {summary['split']} split")
    md = summary_markdown(summary, title)
    paths = {"json": os.path.join(root, "results.json"), "markdown": os.path.join(root, "results.md")}
    with open(paths["json"], "w") as f:
        json.dump(summary, f, indent=1, default=float)
    with open(paths["markdown"], "w") as f:
        f.write(md + "\n")
    log("\n" + md)
    log(f"\n[experiment] {len(seeds)} seeds done in {summary['timing']['wall_s']}s wall, "
        f"{summary['timing']['cpu_s']}s CPU; " + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return {"summary": summary, "paths": paths, "per_seed": per_seed}


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_sweep(cfg: dict, seeds: Sequence[int], *, run_one: Callable[..., dict], runs: Dict[str, dict],
              table_spec, only=None, log=print) -> dict:
    """``run_seeds`` for each value of ``experiment.sweep.key``; arguments as for ``run_seeds``."""
    exp = cfg.get("experiment") or {}
    sw = exp.get("sweep") or {}
    key, values = sw.get("key"), sw.get("values")
    if not key or not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"experiment.sweep needs 'key' (a dotted config key) and a non-empty list "
                         f"'values', got {sw!r}")
    leaf = key.split(".")[-1]
    root = cfg["run_dir"]
    os.makedirs(root, exist_ok=True)
    timer = _timer()
    points = []
    for v in values:
        tag = f"{leaf}={_fmt_value(v)}"
        c = copy.deepcopy(cfg)
        c["experiment"] = {k: x for k, x in exp.items() if k != "sweep"}
        set_key(c, key, v)
        c["run_dir"] = os.path.join(root, tag)
        if c["data"].get("source", "synthetic") == "synthetic":
            c["data"]["dir"] = os.path.join(cfg["data"]["dir"], tag)
        log(f"[experiment] ===== sweep {key} = {v} =====")
        res = run_seeds(c, seeds, run_one=run_one, runs=runs, table_spec=table_spec, only=only, log=log)
        if res["summary"] is None:
            return {"sweep": None, "paths": {}}
        points.append({"value": v, "run_dir": c["run_dir"], "summary": res["summary"]})
    sweep = {"key": key, "values": list(values), "seeds": list(seeds), "points": [
        {"value": p["value"], "run_dir": p["run_dir"],
         "rows": {r["label"]: {c: r["stats"][i] for i, c in enumerate(COLUMNS)}
                  for g in p["summary"]["groups"] for r in g["rows"] if r["head"] == "fused"},
         "comparisons": [{"label": f"{x['a_label']} − {x['b_label']}", **x}
                         for x in p["summary"]["comparisons"]]}
        for p in points]}
    sweep["timing"] = timer()
    paths = {"json": os.path.join(root, "sweep.json"), "markdown": os.path.join(root, "sweep.md")}
    md = sweep_markdown(sweep)
    with open(paths["json"], "w") as f:
        json.dump(sweep, f, indent=1, default=float)
    with open(paths["markdown"], "w") as f:
        f.write(md + "\n")
    paths["plot"] = plot_sweep(sweep, os.path.join(root, "sweep.png"))
    log("\n" + md)
    log(f"\n[experiment] sweep done in {sweep['timing']['wall_s']}s wall, {sweep['timing']['cpu_s']}s CPU; "
        + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return {"sweep": sweep, "paths": paths}


def sweep_markdown(sweep: dict) -> str:
    leaf = sweep["key"].split(".")[-1]
    labels = list(sweep["points"][0]["rows"]) if sweep["points"] else []
    cmps = [c["label"] for c in sweep["points"][0]["comparisons"]] if sweep["points"] else []
    out = []
    for metric in SHOWN:
        head = [f"`{leaf}`"] + [f"{l}" for l in labels] + sum([[f"{c}", "p (t)"] for c in cmps], [])
        out += [f"**{metric}** (percent; mean [95% CI] over {len(sweep['seeds'])} seeds; "
                "differences paired by seed)", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in sweep["points"]:
            cells = [_fmt_value(p["value"])] + [fmt_ci(p["rows"][l][metric]) for l in labels]
            for c in p["comparisons"]:
                cells += [fmt_ci(c["stats"][metric], signed=True), fmt_p(c["stats"][metric]["p_t"])]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def plot_sweep(sweep: dict, path: str) -> str:
    """Top: each fused model's mean with its interval against the swept value; bottom: the paired
    differences with their intervals (0 = no difference).  One column per shown metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(p["value"]) for p in sweep["points"]]
    labels = list(sweep["points"][0]["rows"])
    cmps = [c["label"] for c in sweep["points"][0]["comparisons"]]
    fig, axes = plt.subplots(2, len(SHOWN), figsize=(5.5 * len(SHOWN), 7.5), squeeze=False, sharex=True)
    span = (max(xs) - min(xs)) or 1.0
    for j, metric in enumerate(SHOWN):
        ax = axes[0, j]
        for k, lab in enumerate(labels):
            st = [p["rows"][lab][metric] for p in sweep["points"]]
            dx = (k - (len(labels) - 1) / 2) * 0.015 * span  # keep error bars apart
            _errorbar(ax, [x + dx for x in xs], st, lab, "o-", f"C{k}")
        ax.set_ylabel(f"test {metric} (%)")
        ax.set_title(f"{metric}: mean and 95% CI over {len(sweep['seeds'])} seeds")
        ax.legend(fontsize=8)
        ax = axes[1, j]
        for k, lab in enumerate(cmps):
            st = [p["comparisons"][k]["stats"][metric] for p in sweep["points"]]
            dx = (k - (len(cmps) - 1) / 2) * 0.015 * span
            _errorbar(ax, [x + dx for x in xs], st, lab, "s--", f"C{len(labels) + k}")  # own colours
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_ylabel(f"paired difference in {metric} (points)")
        ax.set_xlabel(sweep["key"])
        if cmps:
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _errorbar(ax, xs, stats, label, fmt, color) -> None:
    m = [s["mean"] if "mean" in s else s["mean_diff"] for s in stats]
    lo = [0.0 if math.isnan(s["ci_low"]) else mm - s["ci_low"] for s, mm in zip(stats, m)]
    hi = [0.0 if math.isnan(s["ci_high"]) else s["ci_high"] - mm for s, mm in zip(stats, m)]
    ax.errorbar(xs, m, yerr=[lo, hi], fmt=fmt, capsize=4, ms=5, label=label, color=color)
