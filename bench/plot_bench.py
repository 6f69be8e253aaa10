"""Time against sequence length per provider, from a bench JSON file: the README's figure.

    python bench/plot_bench.py bench/results/cpu_2core_amd_epyc.json --out docs/figures/cpu_time_vs_T.png

Two panels (forward, forward+backward), log-log, the median of each case; every provider in the
file is drawn (a GPU file adds ``triton`` and ``cuda``). Runs without a window only.
``bench/update_readme.py`` calls this after it rewrites the tables.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rows import load  # noqa: E402

STYLE = {  # provider: (label, colour, marker, line)
    "sdpa": ("SDPA, no bias (the floor)", "black", "o", "-"),
    "cpu": ("hdaf cpu", "tab:red", "s", "-"),
    "triton": ("hdaf triton", "tab:orange", "D", "-"),
    "cuda": ("hdaf cuda", "tab:brown", "v", "-"),
    "sdpa_bias": ("SDPA + materialized bias", "tab:blue", "^", "--"),
    "flex": ("FlexAttention (score_mod)", "tab:purple", "P", "--"),
    "gather": ("gather reference", "tab:green", "x", ":"),
    "naive": ("naive reference", "tab:gray", "+", ":"),
}


def plot(path: str, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine, _, rows = load(path)
    rows = [r for r in rows if r["window"] is None]
    gpu = any(r["D"] is not None for r in rows)
    if gpu:  # one dtype and head dim: the first of bf16 D=64 or whatever was measured
        key = min({(r["dtype"] != "torch.bfloat16", r["D"], r["dtype"]) for r in rows})
        rows = [r for r in rows if (r["D"], r["dtype"]) == key[1:]]
    ms = lambda r: r["ms"] if r.get("ms") is not None else r["median_ms"]  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for p, (label, colour, marker, line) in STYLE.items():
            pts = sorted((r["T"], ms(r)) for r in rows if r["provider"] == p and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), line, color=colour, marker=marker, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_title({"fwd": "forward", "fwd+bwd": "forward + backward"}[mode])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time per call (ms)")
    handles = {}
    for ax in axes:  # one legend with every provider drawn in either panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[0].legend(handles.values(), handles.keys(), fontsize=8, loc="upper left")
    if gpu:
        where = f"{rows[0].get('gpu') or 'GPU'}, {str(rows[0]['dtype']).replace('torch.', '')}"
    else:
        cpu = machine.get("cpu", {})
        where = f"{cpu.get('brand_raw', 'CPU')}, {cpu.get('count', '?')} cores, float32"
    fig.suptitle(f"Delta attention vs SDPA: {where} ({os.path.basename(path)})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json")
    ap.add_argument("--out", default="docs/figures/cpu_time_vs_T.png")
    args = ap.parse_args(argv)
    print(plot(args.json, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
