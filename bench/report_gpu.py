"""The GPU tables of bench/report.py: rows of bench_delta_attention_gpu.py -> markdown.

    python bench/report_gpu.py bench/results/gpu_<name>_quick.json              # every table
    python bench/report_gpu.py bench/results/gpu_<name>_quick.json --headline   # the README's

The headline table (``headline``) is the README's GPU table: per (D, T) with T >= 4096, the ms per
call of SDPA without bias and of hdaf ``triton`` / ``cuda``, forward and forward+backward, each
hdaf time with its ratio to SDPA's and whether it meets the speed target (forward <= 1.4x,
forward+backward <= 2.0x SDPA without bias). Under it: the GPU, torch / triton / CUDA versions,
git commit, UTC date and command, from the JSON's ``run`` block (bench/conftest.py).

Ratios are to SDPA without bias on the same (dtype, D, T, mode); the window table compares with
SDPA given the window mask. The targets table checks each speed and memory target per hdaf backend
over every measured configuration (the worst figure is shown). A missing value is a case that did
not run (out of memory, the backend unavailable, or a run cut short by its time budget);
FlexAttention's backward is "n/a" (it refuses it when P requires grad).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from bench_rows import load

ORDER = ["sdpa", "triton", "cuda", "flex", "sdpa_bias", "sdpa_window"]
NAMES = {"sdpa": "SDPA, no bias (floor)", "triton": "hdaf `triton`", "cuda": "hdaf `cuda`",
         "flex": "FlexAttention", "sdpa_bias": "SDPA + materialized bias",
         "sdpa_window": "SDPA + window mask"}
HDAF = ("triton", "cuda")


def _short(dtype):
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(dtype, dtype)


def _ms(r):
    return r["ms"] if r.get("ms") is not None else r["median_ms"]


def index(rows):
    """{(dtype, D, T, mode, window): {provider: row}}"""
    out = defaultdict(dict)
    for r in rows:
        out[(_short(r["dtype"]), r["D"], r["T"], r["mode"], r["window"])][r["provider"]] = r
    return out


def _cell(r, floor, na=False):
    if r is None:
        return "n/a" if na else "–"
    ratio = f" ({_ms(r) / _ms(floor):.2f}×)" if floor else ""
    tf = f" · {r['tflops']:.0f}" if r.get("tflops") is not None else ""
    return f"{_ms(r):.3g}{ratio}{tf}"


def _mib(r, floor):
    if r is None or r.get("peak") is None:
        return "–"
    ratio = f" ({r['peak'] / floor['peak']:.2f}×)" if floor and floor.get("peak") else ""
    return f"{r['peak'] / 2**20:.0f}{ratio}"


HEADLINE_MIN_T = 4096
HEADLINE_TARGETS = {"fwd": 1.4, "fwd+bwd": 2.0}  # at most this ratio to SDPA without bias


def _mark(ratio, mode):
    return "met" if ratio <= HEADLINE_TARGETS[mode] else "**missed**"


def headline(rows, dtype="bf16"):
    """The README's GPU table (module doc): one line per (D, T >= 4096) measured in ``dtype``,
    then per hdaf backend how many of those lines meet each target. "–": the case did not run."""
    idx = index(rows)
    keys = sorted({(k[1], k[2]) for k in idx if k[0] == dtype and k[4] is None
                   and k[2] >= HEADLINE_MIN_T})
    if not keys:
        return f"No {dtype} rows with T ≥ {HEADLINE_MIN_T} in this file."
    r0 = rows[0]
    out = [f"**{dtype}, B={r0.get('B', '?')}, H={r0.get('H', '?')}, R={r0.get('R', '?')}** — ms "
           "per call (ratio to SDPA without bias, target: forward ≤ "
           f"{HEADLINE_TARGETS['fwd']}×, forward+backward ≤ {HEADLINE_TARGETS['fwd+bwd']}×)", "",
           "| D | T | SDPA fwd | hdaf `triton` fwd | hdaf `cuda` fwd | SDPA fwd+bwd | "
           "hdaf `triton` fwd+bwd | hdaf `cuda` fwd+bwd |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    tally = {(b, m): [0, 0] for b in HDAF for m in HEADLINE_TARGETS}  # [met, measured]
    for D, T in keys:
        cells = [str(D), str(T)]
        for mode in ("fwd", "fwd+bwd"):
            by = idx.get((dtype, D, T, mode, None), {})
            floor = by.get("sdpa")
            cells.append(f"{_ms(floor):.3g}" if floor else "–")
            for b in HDAF:
                r = by.get(b)
                if r is None:
                    cells.append("–")
                elif floor is None:
                    cells.append(f"{_ms(r):.3g} (no SDPA time)")
                else:
                    ratio = _ms(r) / _ms(floor)
                    tally[(b, mode)][0] += ratio <= HEADLINE_TARGETS[mode]
                    tally[(b, mode)][1] += 1
                    cells.append(f"{_ms(r):.3g} ({ratio:.2f}×, {_mark(ratio, mode)})")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("Targets met (of the (D, T) measured): " + "; ".join(
        f"hdaf `{b}` forward {tally[(b, 'fwd')][0]}/{tally[(b, 'fwd')][1]}, forward+backward "
        f"{tally[(b, 'fwd+bwd')][0]}/{tally[(b, 'fwd+bwd')][1]}" for b in HDAF) + ".")
    return "\n".join(out)


def provenance(run, rows, machine=None, commit=None):
    """One line: GPU, versions, commit, UTC date and command, from the JSON's ``run`` block,
    else from what the rows and pytest-benchmark recorded."""
    run, machine, commit = run or {}, machine or {}, commit or {}
    r0 = rows[0] if rows else {}
    sha = run.get("commit") or commit.get("id") or "?"
    dirty = run.get("dirty") if "dirty" in run else commit.get("dirty")
    parts = [f"GPU: {run.get('gpu') or r0.get('gpu', '?')}",
             f"torch {run.get('torch') or r0.get('torch', '?')}",
             f"triton {run.get('triton') or r0.get('triton') or '?'}",
             f"CUDA {run.get('cuda') or r0.get('cuda') or '?'}",
             f"python {machine.get('python_version', '?')}",
             f"commit {sha[:10]}{' (dirty)' if dirty else ''}",
             f"date {run.get('date_utc') or '?'}"]
    line = "; ".join(parts) + "."
    if run.get("command"):
        line += f" Command: `{run['command']}`."
    return line


def render(machine, commit, rows, run=None):
    idx = index(rows)
    full = [k for k in idx if k[4] is None]
    dtypes = sorted({k[0] for k in full})
    cols = sorted({(k[1], k[2]) for k in full})
    r0 = rows[0] if rows else {}
    out = [provenance(run, rows, machine, commit)]
    for dt in dtypes:
        if any(k[0] == dt and k[2] >= HEADLINE_MIN_T for k in full):
            out += ["", headline(rows, dt)]
    out += ["", f"Cells: ms per call (ratio to SDPA without bias) · TFLOP/s. B={r0.get('B', '?')}, "
            f"H={r0.get('H', '?')}, Dr=64, R={r0.get('R', '?')}, x and w shared by the heads."]
    head = "| provider | " + " | ".join(f"D={d} T={t}" for d, t in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    for dt in dtypes:
        for mode in ("fwd", "fwd+bwd"):
            out += ["", f"**{dt}, {mode}**", "", head, sep]
            for p in ORDER[:-1]:
                cells = [_cell(idx[(dt, d, t, mode, None)].get(p), idx[(dt, d, t, mode, None)].get("sdpa"),
                               na=(p == "flex" and mode != "fwd")) for d, t in cols]
                out.append(f"| {NAMES[p]} | " + " | ".join(cells) + " |")
        out += ["", f"**{dt}, peak extra MiB of fwd+bwd (ratio to SDPA's)**", "", head, sep]
        for p in ORDER[:-1]:
            if p == "flex":
                continue
            cells = [_mib(idx[(dt, d, t, "fwd+bwd", None)].get(p),
                          idx[(dt, d, t, "fwd+bwd", None)].get("sdpa")) for d, t in cols]
            out.append(f"| {NAMES[p]} | " + " | ".join(cells) + " |")
    win = sorted(k for k in idx if k[4] is not None)
    if win:
        out += ["", "**Sliding window** — ms per call (× faster than SDPA given the window mask)", "",
                "| provider | " + " | ".join(f"{k[0]} D={k[1]} T={k[2]} window={k[4]} {k[3]}"
                                            for k in win) + " |", "|---|" + "---:|" * len(win)]
        for p in ("sdpa_window",) + HDAF:
            cells = []
            for k in win:
                r, ref = idx[k].get(p), idx[k].get("sdpa_window")
                cells.append("–" if r is None else f"{_ms(r):.3g}" + (
                    f" ({_ms(ref) / _ms(r):.1f}×)" if ref and p != "sdpa_window" else ""))
            out.append(f"| {NAMES[p]} | " + " | ".join(cells) + " |")
    out += ["", targets(idx)]
    return "\n".join(out)


def _values(idx, backend, select, value):
    """[(value, where)] over the configurations that select(key) accepts and that ran."""
    found = []
    for k, by in idx.items():
        if select(k) and backend in by and value(by, backend) is not None:
            found.append((value(by, backend), f"{k[0]} D={k[1]} T={k[2]}"))
    return found


def _ratio(by, b):
    return _ms(by[b]) / _ms(by["sdpa"]) if "sdpa" in by else None


def _speedup(by, b):
    return _ms(by["sdpa_window"]) / _ms(by[b]) if "sdpa_window" in by else None


def _mem(by, b):
    p, f = by[b].get("peak"), by.get("sdpa", {}).get("peak")
    return p / f if p is not None and f else None


TARGETS = [  # (text, select key, value, limit, stretch, higher is better)
    ("fwd ≤ 1.4× SDPA without bias, T ≥ 4096 (stretch 1.15×)",
     lambda k: k[3] == "fwd" and k[4] is None and k[2] >= 4096, _ratio, 1.4, 1.15, False),
    ("T=1024 fwd ≤ 2.5× SDPA", lambda k: k[3] == "fwd" and k[4] is None and k[2] == 1024,
     _ratio, 2.5, None, False),
    ("fwd+bwd ≤ 2.0× SDPA without bias (stretch 1.6×)",
     lambda k: k[3] == "fwd+bwd" and k[4] is None, _ratio, 2.0, 1.6, False),
    ("window=256, T=16384: fwd ≥ 30× faster than SDPA given the window mask",
     lambda k: k[3] == "fwd" and k[4] == 256 and k[2] == 16384, _speedup, 30.0, None, True),
    ("peak memory of fwd+bwd ≤ 1.5× SDPA's", lambda k: k[3] == "fwd+bwd" and k[4] is None,
     _mem, 1.5, None, False),
]


def targets(idx):
    out = ["**Targets** — the worst measured configuration per backend", "",
           "| target | " + " | ".join(f"hdaf `{b}`" for b in HDAF) + " |", "|---|---|---|"]
    for text, select, value, limit, stretch, higher in TARGETS:
        cells = []
        for b in HDAF:
            found = _values(idx, b, select, value)
            if not found:
                cells.append("not measured")
                continue
            v, where = (min if higher else max)(found)
            met = v >= limit if higher else v <= limit
            cell = f"{v:.2f}× ({where}): **{'met' if met else 'missed'}**"
            if stretch is not None:
                cell += f", stretch {'met' if v <= stretch else 'missed'}"
            cells.append(cell + f" ({len(found)} configs)")
        out.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def auto_table(rows):
    """AUTO_MEASUREMENTS rows for hdaf/dispatch.py: (fwd, fwd+bwd) ms of triton and cuda per
    (dtype, D) at the T closest to 4096, no window."""
    idx = index(rows)
    torch_name = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}
    lines = []
    for dt, D in sorted({(k[0], k[1]) for k in idx if k[4] is None}):
        Ts = sorted({k[2] for k in idx if k[:2] == (dt, D) and k[4] is None},
                    key=lambda t: abs(t - 4096))
        for T in Ts:
            fwd, both = idx.get((dt, D, T, "fwd", None), {}), idx.get((dt, D, T, "fwd+bwd", None), {})
            have = [b for b in HDAF if b in fwd and b in both]
            if have:
                cells = ", ".join(f'"{b}": ({_ms(fwd[b]):.3g}, {_ms(both[b]):.3g})' for b in have)
                lines.append(f'    ("cuda", {torch_name.get(dt, dt)}, {D}): {{{cells}}},  # T={T}')
                break
    return "\n".join(lines) if lines else "# no GPU rows with triton/cuda timings in this file"


def main(argv=None):
    ap = argparse.ArgumentParser(description="The GPU bench's tables from its pytest-benchmark JSON.")
    ap.add_argument("json")
    ap.add_argument("--headline", action="store_true",
                    help="only the README's table (bf16, T >= 4096) and the line naming the run")
    args = ap.parse_args(argv)
    machine, commit, rows = load(args.json)
    rows = [r for r in rows if r["D"] is not None]
    with open(args.json) as f:
        run = json.load(f).get("run")
    if not rows:
        print(f"{args.json}: no GPU bench rows", file=sys.stderr)
        return 1
    if args.headline:
        print(headline(rows) + "\n\n" + provenance(run, rows, machine, commit))
    else:
        print(render(machine, commit, rows, run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
