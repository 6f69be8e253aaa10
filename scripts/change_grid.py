#!/usr/bin/env python3
"""Run the pre-registered change grid (configs/change_grid.yaml) and report it.

    python scripts/change_grid.py run [--jobs 2] [--settings drift_1 ramp ...]
    python scripts/change_grid.py report [--out docs/results/change_grid]

``run`` executes, for every setting, exactly the command written in the grid file: the main job
(configs/main.yaml as committed) over the grid's seeds, on the setting's own data folder
(``data/change_grid/<setting>``) and run folder (``runs/change_grid/<setting>``), with the
instruction-set pins of scripts/main.sh.  ``--jobs`` runs that many settings at once (each run is
pinned to one thread by the main config, so results do not depend on it).  A setting whose
``results.json`` exists is not run again.

``report`` reads each setting's multi-seed summary once and writes ``<out>.md`` and ``<out>.json``:
per setting the rows' means with 95 % intervals, the paper's three claims and the delta term's
gain (``hdaf.training.multiseed.claims_markdown``), and the grid's targets against the change
baseline.  Nothing is tuned here: it only reads what ``run`` wrote.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GRID = os.path.join(ROOT, "configs", "change_grid.yaml")
from hdaf.training.numerics import ISA_PINS as PINS  # noqa: E402  (scripts/main.sh's pins)
# (label in the report, run, head) of the rows reported per setting
ROWS = [("vision head", "hdaf_aligned", "vision"), ("acoustic head", "hdaf_aligned", "audio"),
        ("text head", "hdaf_aligned", "text"), ("HDAF aligned", "hdaf_aligned", "fused"),
        ("HDAF unaligned", "hdaf_unaligned", "fused"), ("HDAF, delta term off", "hdaf_no_delta", "fused"),
        ("MulT", "mult_aligned", "fused"), ("Change baseline: vision", "change_baseline", "vision"),
        ("Change baseline: audio", "change_baseline", "audio"),
        ("Change baseline: both", "change_baseline", "fused")]
# the grid's targets: (what, row, baseline row, margin)
TARGETS = [("vision head ≥ change baseline: vision − 5", "vision head", "Change baseline: vision", 5.0),
           ("acoustic head ≥ change baseline: audio − 5", "acoustic head", "Change baseline: audio", 5.0),
           ("HDAF aligned ≥ change baseline: both − 5", "HDAF aligned", "Change baseline: both", 5.0),
           ("HDAF unaligned ≥ change baseline: both − 5", "HDAF unaligned", "Change baseline: both", 5.0)]


def load_grid() -> dict:
    import yaml

    with open(GRID) as f:
        return yaml.safe_load(f)


def _seeds(grid) -> str:
    return ",".join(str(s) for s in grid["seeds"])


def command(grid: dict, setting: str) -> list:
    over = json.dumps(grid["settings"][setting] or {})
    return [sys.executable, "-m", "hdaf", "experiment", "--config", "configs/main.yaml",
            "--seeds", _seeds(grid), "--set", f"data.synthetic={over}",
            "--set", f"data.dir=data/change_grid/{setting}", "--run-dir", f"runs/change_grid/{setting}"]


def _run_one(grid: dict, setting: str) -> tuple:
    out = os.path.join(ROOT, "runs", "change_grid", setting)
    if os.path.exists(os.path.join(out, "results.json")):
        return setting, 0, 0.0, "kept"
    os.makedirs(out, exist_ok=True)
    t = time.time()
    with open(os.path.join(out, "grid.log"), "w") as log:
        rc = subprocess.call(command(grid, setting), cwd=ROOT, env={**os.environ, **PINS},
                             stdout=log, stderr=subprocess.STDOUT)
    return setting, rc, time.time() - t, os.path.join(out, "grid.log")


def run(args) -> int:
    grid = load_grid()
    names = args.settings or list(grid["settings"])
    unknown = [s for s in names if s not in grid["settings"]]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; the grid has {list(grid['settings'])}")
    failed = []
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for setting, rc, secs, where in pool.map(lambda s: _run_one(grid, s), names):
            print(f"[grid] {setting}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {secs:.0f} s ({where})",
                  flush=True)
            if rc:
                failed.append(setting)
    if failed:
        print(f"[grid] failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def _stat(summary: dict, run_name: str, head: str, column: str = "Acc6"):
    from hdaf.training.report import COLUMNS

    for g in summary["groups"]:
        for r in g["rows"]:
            if r["run"] == run_name and r["head"] == head:
                return r["stats"][COLUMNS.index(column)]
    return None


def _fmt(st) -> str:
    if st is None:
        return "n/a"
    return f"{st['mean']:.1f} [{st['ci_low']:.1f}, {st['ci_high']:.1f}]"


def _cmp(summary: dict, a: str, b: str, head_a: str = "fused", head_b: str = "fused"):
    """Acc6 statistics of the paired comparison ``a − b`` (``multiseed._comparison``'s lookup)."""
    from hdaf.training.multiseed import _comparison

    c = _comparison(summary, a, b, head_a, head_b)
    return None if c is None else c["stats"]["Acc6"]


def _claims(summary: dict) -> list:
    """The paper's three claims and the delta term's gain, as claims_markdown judges them."""
    out = []

    def add(name, st, met):
        if st is not None:
            out.append({"claim": name, "diff": st["mean_diff"], "ci_low": st["ci_low"],
                        "ci_high": st["ci_high"], "p_t": st["p_t"], "met": met(st)})

    add("HDAF aligned − MulT", _cmp(summary, "hdaf_aligned", "mult_aligned"), lambda st: st["mean_diff"] >= -1.0)
    heads = {h: _stat(summary, "hdaf_aligned", h) for h in ("text", "audio", "vision")}
    heads = {h: st for h, st in heads.items() if st is not None}
    if heads:
        best = max(heads, key=lambda h: heads[h]["mean"])
        add(f"HDAF fused − best unimodal head ({best})", _cmp(summary, "hdaf_aligned", "hdaf_aligned", "fused", best),
            lambda st: st["mean_diff"] > 0 and st["p_t"] < 0.05)
    add("HDAF unaligned − aligned", _cmp(summary, "hdaf_unaligned", "hdaf_aligned"), lambda st: abs(st["mean_diff"]) <= 2.0)
    add("HDAF − delta term off", _cmp(summary, "hdaf_aligned", "hdaf_no_delta"), lambda st: None)
    return out


def report(args) -> int:
    from hdaf.training.multiseed import claims_markdown

    grid = load_grid()
    out = {"grid": os.path.relpath(GRID, ROOT), "seeds": grid["seeds"], "settings": {}}
    md = ["# The change grid: results", "",
          f"Every setting of `configs/change_grid.yaml` (written before any was run), the main job "
          f"(`configs/main.yaml` as committed) over seeds {_seeds(grid)}, each seed a new draw of "
          f"the data; test split, read once. Acc6, percent, mean [95% interval] over seeds. "
          f"Command: `python scripts/change_grid.py run --jobs 2`, then "
          f"`python scripts/change_grid.py report`.", ""]
    missing = []
    for setting, over in grid["settings"].items():
        path = os.path.join(ROOT, "runs", "change_grid", setting, "results.json")
        if not os.path.exists(path):
            missing.append(setting)
            continue
        with open(path) as f:
            summary = json.load(f)
        rows = {label: _stat(summary, r, h) for label, r, h in ROWS}
        targets = []
        for what, a, b, margin in TARGETS:
            if rows[a] is None or rows[b] is None:
                continue
            met = rows[a]["mean"] >= rows[b]["mean"] - margin
            targets.append({"target": what, "value": rows[a]["mean"], "bound": rows[b]["mean"] - margin,
                            "met": bool(met)})
        claims = _claims(summary)
        out["settings"][setting] = {"overrides": over or {}, "rows": rows, "targets": targets, "claims": claims,
                                    "comparisons": summary.get("comparisons"),
                                    "timing": summary.get("timing"), "split": summary.get("split")}
        md += [f"## `{setting}`: `{json.dumps(over or {})}`", "",
               "| row | Acc6 |", "|---|---|"]
        md += [f"| {label} | {_fmt(st)} |" for label, st in rows.items()]
        md += ["", claims_markdown(summary) or "(claims: runs missing)", "",
               "| target | mean | bound | |", "|---|---:|---:|---|"]
        md += [f"| {t['target']} | {t['value']:.1f} | {t['bound']:.1f} | "
               f"{'**met**' if t['met'] else '**missed**'} |" for t in targets]
        md.append("")
    if missing:
        md += [f"Not run: {', '.join(missing)}.", ""]
    out["missing"] = missing
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.out)), exist_ok=True)
    with open(os.path.join(ROOT, args.out + ".json"), "w") as f:
        json.dump(out, f, indent=1, default=float)
    with open(os.path.join(ROOT, args.out + ".md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every setting (or --settings) of the grid")
    r.add_argument("--jobs", type=int, default=1, help="settings run at once (default 1)")
    r.add_argument("--settings", nargs="*", help="only these settings")
    r.set_defaults(fn=run)
    q = sub.add_parser("report", help="the per-setting report from runs/change_grid")
    q.add_argument("--out", default="docs/results/change_grid", help="path without extension")
    q.set_defaults(fn=report)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
