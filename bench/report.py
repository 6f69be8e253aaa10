"""Turn a pytest-benchmark JSON file into markdown results tables.

    pytest bench/ --benchmark-only --benchmark-json=bench/results.json
    python bench/report.py bench/results.json > bench/results.md
    python bench/report.py --readme bench/results/cpu_<name>.json      # the README's compact table
    python bench/report.py bench/results/gpu_<name>.json --auto-table   # rows for hdaf/dispatch.py

A CPU run gives the per-T tables of bench_delta_attention.py; a GPU run (bench_delta_attention_gpu.py,
rows with D and dtype) gives per-dtype tables with TFLOP/s, peak memory, the window comparison and
the GPU speed targets (met / missed with the figure), all from the JSON (see report_gpu.py).
``--readme`` prints one compact table with the machine, date, versions and command under it, as
README.md shows it (``bench/update_readme.py`` pastes it there).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import report_gpu
from bench_rows import load


def fmt_mb(b):
    return "–" if b is None else f"{b / 2**20:.0f}"


def tables(rows):
    out = []
    by = defaultdict(dict)
    for r in rows:
        by[(r["mode"], r["window"])][(r["provider"], r["T"])] = r
    for (mode, window), cases in sorted(by.items(), key=lambda kv: (kv[0][1] is not None, kv[0][0])):
        providers = sorted({p for p, _ in cases}, key=lambda p: ["sdpa", "cpu", "triton", "cuda",
                           "flex", "sdpa_bias", "gather", "naive"].index(p) if p in
                           ["sdpa", "cpu", "triton", "cuda", "flex", "sdpa_bias", "gather", "naive"] else 99)
        Ts = sorted({t for _, t in cases})
        title = f"{mode}" + (f", window={window}" if window is not None else "")
        out.append(f"\n**{title}** — median ms (ratio to sdpa without bias) / peak extra MiB\n")
        out.append("| T | " + " | ".join(providers) + " |")
        out.append("|---:|" + "---:|" * len(providers))
        for T in Ts:
            floor = cases.get(("sdpa", T))
            cells = []
            for p in providers:
                r = cases.get((p, T))
                if r is None:
                    cells.append("–")
                    continue
                ratio = f" ({r['median_ms'] / floor['median_ms']:.2f}×)" if floor else ""
                cells.append(f"{r['median_ms']:.1f}{ratio} / {fmt_mb(r['peak'])}")
            out.append(f"| {T} | " + " | ".join(cells) + " |")
    return "\n".join(out)


README_MIN_T = 1024  # the README's table shows T >= this (all T when none is that long)
CPU_ROWS = [  # (provider, mode, label) in the README's CPU table
    ("sdpa", "fwd", "SDPA, no bias (the floor), fwd"),
    ("cpu", "fwd", "**hdaf `cpu`, fwd**"),
    ("sdpa_bias", "fwd", "SDPA + materialized bias, fwd"),
    ("gather", "fwd", "`gather` reference, fwd"),
    ("flex", "fwd", "FlexAttention (`torch.compile`, score_mod gathering P), fwd"),
    ("sdpa", "fwd+bwd", "SDPA, no bias, fwd+bwd"),
    ("cpu", "fwd+bwd", "**hdaf `cpu`, fwd+bwd**"),
    ("sdpa_bias", "fwd+bwd", "SDPA + materialized bias, fwd+bwd"),
    ("gather", "fwd+bwd", "`gather` reference, fwd+bwd"),
]


def _isa(machine):
    flags = set(machine.get("cpu", {}).get("flags", []))
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"


def _provenance(path, doc, rows, machine_line):
    """The lines under the README's CPU table: machine, date, versions, commit, shape, command.
    The JSON's ``run`` block (bench/conftest.py) is preferred where a file has one."""
    machine, commit = doc.get("machine_info", {}), doc.get("commit_info", {})
    run, r0 = doc.get("run") or {}, (rows[0] if rows else {})
    torch_v = run.get("torch") or r0.get("torch")
    sha = run.get("commit") or commit.get("id") or "?"
    dirty = run["dirty"] if run.get("dirty") is not None else commit.get("dirty")
    date = (run.get("date_utc") or doc.get("datetime") or "?")[:10]
    dims = dict(B=r0.get("B"), H=r0.get("H"), D=r0.get("head_dim"), R=r0.get("R"))
    shape = ", ".join(f"{k}={v}" for k, v in dims.items() if v is not None)
    rounds = "–".join(str(n) for n in sorted({b["stats"]["rounds"] for b in doc["benchmarks"]
                                              if "stats" in b})) or "?"
    command = (run.get("command")
               or f"pytest bench/bench_delta_attention.py --benchmark-only --benchmark-json={path}")
    versions = [f"Python {machine.get('python_version', '?')}",
                f"torch {torch_v}" if torch_v else "torch not recorded in the JSON",
                f"pytest-benchmark {doc.get('version', '?')}"]
    facts = [machine_line, f"Date: {date}.", f"Versions: {', '.join(versions)}.",
             f"Commit {sha[:10]}{' (with uncommitted changes)' if dirty else ''}."]
    if shape:
        facts.append(f"Shape: {shape}.")
    facts.append(f"Median of {rounds} rounds.")
    return [" ".join(facts), "",
            f"Command: `{command}`, then `python bench/report.py --readme {path}`; every case: "
            f"`python bench/report.py {path}`."]


def readme_cpu(path, doc, rows):
    machine = doc.get("machine_info", {})
    by = {(r["provider"], r["mode"], r["T"]): r for r in rows if r["window"] is None}
    Ts = sorted({t for _, _, t in by})
    Ts = [t for t in Ts if t >= README_MIN_T] or Ts
    out = ["| ms (ratio to SDPA without bias) | " + " | ".join(f"T={t}" for t in Ts) + " |",
           "|---|" + "---:|" * len(Ts)]
    for p, mode, label in CPU_ROWS:
        cells = []
        for t in Ts:
            r, floor = by.get((p, mode, t)), by.get(("sdpa", mode, t))
            if r is None:
                cells.append("–")
                continue
            v = f"{r['median_ms']:.1f}"
            if p != "sdpa" and floor:
                v += f" ({r['median_ms'] / floor['median_ms']:.2f}×)"
            cells.append(f"**{v}**" if p == "cpu" else v)
        if any(c != "–" for c in cells):
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    mem = [p for p in ("cpu", "gather", "sdpa") if any(by.get((p, "fwd+bwd", t)) for t in Ts)]
    if mem:
        names = {"cpu": "hdaf `cpu`", "gather": "`gather`", "sdpa": "SDPA"}
        out.append("| peak extra MiB, fwd+bwd: " + " / ".join(names[p] for p in mem) + " | "
                   + " | ".join(" / ".join(fmt_mb((by.get((p, "fwd+bwd", t)) or {}).get("peak"))
                                           for p in mem) for t in Ts) + " |")
    win = {(r["provider"], r["mode"]): r for r in rows if r["window"] is not None}
    if ("cpu", "fwd") in win and ("sdpa", "fwd") in win:
        w, T = win[("cpu", "fwd")]["window"], win[("cpu", "fwd")]["T"]
        modes = [m for m in ("fwd", "fwd+bwd") if ("cpu", m) in win and ("sdpa", m) in win]
        ms = lambda p: " / ".join(f"{win[(p, m)]['median_ms']:.1f}" for m in modes)  # noqa: E731
        fast = " / ".join(f"{win[('sdpa', m)]['median_ms'] / win[('cpu', m)]['median_ms']:.1f}×"
                          for m in modes)
        out += ["", f"With `window={w}` at T={T}: hdaf `cpu` {ms('cpu')} ms ({' / '.join(modes)}), "
                f"SDPA given the equivalent boolean mask {ms('sdpa')} ms: **{fast} faster** "
                f"(only the band of key tiles is visited)."]
    cpu = machine.get("cpu", {})
    threads = sorted({str(r.get("threads")) for r in rows if r.get("threads") is not None})
    dtypes = sorted({str(r.get("dtype")).replace("torch.", "") for r in rows if r.get("dtype")})
    head = (f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores ({_isa(machine)}), "
            f"{'/'.join(threads) or '?'} threads, {'/'.join(dtypes) or '?'}.")
    return "\n".join(out + [""] + _provenance(path, doc, rows, head))


def readme(path):
    """The README block of one CPU bench JSON file (a GPU file: ``report_gpu.py --headline``)."""
    with open(path) as f:
        doc = json.load(f)
    _, _, rows = load(path)
    if any(r["D"] is not None for r in rows):
        raise SystemExit(f"{path} holds GPU rows: its README table is "
                         f"`python bench/report_gpu.py {path} --headline`")
    return readme_cpu(path, doc, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--auto-table", action="store_true",
                    help="print AUTO_MEASUREMENTS rows for hdaf/dispatch.py (GPU JSON)")
    ap.add_argument("--readme", action="store_true",
                    help="print the README's compact table with machine, date, versions, command")
    args = ap.parse_args()
    if args.readme:
        print(readme(args.json))
        return
    machine, commit, rows = load(args.json)
    gpu_rows = [r for r in rows if r["D"] is not None]  # bench_delta_attention_gpu.py rows
    if gpu_rows or args.auto_table:
        print(report_gpu.auto_table(gpu_rows) if args.auto_table
              else report_gpu.render(machine, commit, gpu_rows))
        return
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"{machine.get('cpu', {}).get('count', '?')} cores; python {machine.get('python_version', '?')}; "
          f"commit {commit.get('id', '?')[:10]}{' (dirty)' if commit.get('dirty') else ''}")
    print(tables(rows))


if __name__ == "__main__":
    main()
