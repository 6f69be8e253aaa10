"""Turn a pytest-benchmark JSON file into the README's results tables (markdown).

    pytest bench/ --benchmark-only --benchmark-json=bench/results.json
    python bench/report.py bench/results.json > bench/results.md
    python bench/report.py bench/results/gpu_<name>.json --auto-table   # rows for hdaf/dispatch.py

A CPU run gives the per-T tables of bench_delta_attention.py; a GPU run (bench_delta_attention_gpu.py,
rows with D and dtype) gives per-dtype tables with TFLOP/s, peak memory, the window comparison and
the issue-11 targets (met / missed with the figure), all from the JSON (see report_gpu.py).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "provider" not in info:
            continue
        rows.append(dict(provider=info["provider"], T=info["T"], mode=info["mode"],
                         window=info.get("window"), median_ms=b["stats"]["median"] * 1e3,
                         iqr_ms=b["stats"]["iqr"] * 1e3, peak=info.get("peak_extra_bytes"),
                         device=info.get("device"), dtype=info.get("dtype"), D=info.get("D"),
                         ms=info.get("ms"), tflops=info.get("tflops"), gpu=info.get("gpu"),
                         torch=info.get("torch"), B=info.get("B"), H=info.get("H"),
                         R=info.get("R")))
    return data.get("machine_info", {}), data.get("commit_info", {}), rows


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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--auto-table", action="store_true",
                    help="print AUTO_MEASUREMENTS rows for hdaf/dispatch.py (GPU JSON)")
    args = ap.parse_args()
    machine, commit, rows = load(args.json)
    gpu_rows = [r for r in rows if r["D"] is not None]  # bench_delta_attention_gpu.py rows
    if gpu_rows or args.auto_table:
        import report_gpu

        print(report_gpu.auto_table(gpu_rows) if args.auto_table
              else report_gpu.render(machine, commit, gpu_rows))
        return
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"{machine.get('cpu', {}).get('count', '?')} cores; python {machine.get('python_version', '?')}; "
          f"commit {commit.get('id', '?')[:10]}{' (dirty)' if commit.get('dirty') else ''}")
    print(tables(rows))


if __name__ == "__main__":
    main()
