"""The rows of a pytest-benchmark JSON file written by this folder's benches, one home for
``report.py`` (CPU tables, README block), ``report_gpu.py`` (GPU tables) and ``plot_bench.py``.

A row is one benchmark with a ``provider`` in its ``extra_info`` (other suites' rows, such as
``bench_gqa_varlen.py``'s, are left out): provider, T, mode, window, the median and IQR in ms,
peak extra memory, and the GPU bench's fields (device, dtype, D, ms, TFLOP/s, ...; None on CPU).
"""
from __future__ import annotations

import json


def load(path):
    """``(machine_info, commit_info, rows)`` of the JSON file at ``path``."""
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
                         R=info.get("R"), threads=info.get("threads"),
                         head_dim=info.get("head_dim")))
    return data.get("machine_info", {}), data.get("commit_info", {}), rows
