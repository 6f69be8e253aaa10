"""bench/report.py and the GPU bench's case runner, without a GPU.

The GPU cases of bench/bench_delta_attention_gpu.py run here on CPU tensors with a fake CUDA
event timer (tiny shapes), so the code a GPU run executes is exercised and its rows feed the GPU
tables. The timings are meaningless and never leave this test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)

import bench_delta_attention_gpu as gpu_bench  # noqa: E402
import report_gpu  # noqa: E402


def test_cpu_report_renders_the_committed_tables_unchanged():
    base = os.path.join(BENCH, "results", "cpu_2core_amd_epyc")
    out = subprocess.run([sys.executable, os.path.join(BENCH, "report.py"), base + ".json"],
                         capture_output=True, text=True, check=True).stdout
    with open(base + ".md") as f:
        assert out == f.read()


class _FakeEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class _FakeBenchmark:
    def __init__(self):
        self.extra_info, self.group, self.rounds = {}, None, 0

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        for _ in range(rounds):
            target()
        self.rounds = rounds


@pytest.fixture
def cpu_bench(monkeypatch):
    monkeypatch.setattr(gpu_bench, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_bench, "B", 1)
    monkeypatch.setattr(gpu_bench, "H", 2)
    monkeypatch.setattr(gpu_bench, "ROUND_S", 0.002)
    monkeypatch.setattr(gpu_bench, "DTYPES", {"bf16": torch.float32})
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU (CPU test)")

    def run(provider, D, T, mode, window=None, as_provider=None):
        b = _FakeBenchmark()
        gpu_bench._run_case(b, provider, "bf16", D, T, mode, window)
        b.extra_info.update(dtype="torch.bfloat16", provider=as_provider or provider)
        return {"extra_info": b.extra_info, "stats": {"median": 1.0, "iqr": 0.0}}
    return run


def test_gpu_cases_run_and_render(cpu_bench, tmp_path):
    rows = []
    for T in (16, 40):
        for mode in ("fwd", "fwd+bwd"):
            rows.append(cpu_bench("sdpa", 8, T, mode))
            rows.append(cpu_bench("sdpa_bias", 8, T, mode))
            rows.append(cpu_bench("cpu", 8, T, mode, as_provider="triton"))  # stands in
    for mode in ("fwd", "fwd+bwd"):
        rows.append(cpu_bench("sdpa_window", 8, 40, mode, window=4))
        rows.append(cpu_bench("cpu", 8, 40, mode, window=4, as_provider="cuda"))
    info = rows[0]["extra_info"]
    assert info["iterations"] >= 1 and len(info["ms_rounds"]) in (3, 7) and info["ms"] > 0
    assert info["tflops"] == pytest.approx(gpu_bench.flops(16, 8, "fwd") / info["ms"] / 1e9)
    with pytest.raises(pytest.skip.Exception, match="n/a: FlexAttention refuses the backward"):
        cpu_bench("flex", 8, 16, "fwd+bwd")

    path = tmp_path / "gpu_fake.json"
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": rows}))
    report = os.path.join(BENCH, "report.py")
    md = subprocess.run([sys.executable, report, str(path)], capture_output=True, text=True,
                        check=True).stdout
    assert "GPU: Fake GPU (CPU test)" in md and "**bf16, fwd+bwd**" in md
    assert "| FlexAttention | n/a | n/a |" in md  # no backward: n/a, not a missing value
    assert "Sliding window" in md and "SDPA + window mask" in md
    assert "fwd+bwd ≤ 2.0× SDPA without bias" in md and "not measured" in md
    auto = subprocess.run([sys.executable, report, str(path), "--auto-table"], capture_output=True,
                          text=True, check=True).stdout
    assert auto.startswith('    ("cuda", torch.bfloat16, 8): {"triton": (')  # no cuda rows at D=8


def test_visible_fraction_counts_the_band():
    for T, w in ((1, 3), (7, 0), (7, 2), (50, 10), (50, 60)):
        i = torch.arange(T)
        brute = ((i[None, :] - i[:, None]).abs() <= w).double().mean().item()
        assert gpu_bench.visible_fraction(T, w) == pytest.approx(brute)


def test_targets_say_met_or_missed_with_the_figure():
    def row(provider, ms, mode="fwd", T=4096, peak=100):
        return dict(provider=provider, T=T, D=64, mode=mode, window=None, dtype="torch.bfloat16",
                    ms=ms, median_ms=ms, tflops=None, peak=peak)

    idx = report_gpu.index([row("sdpa", 1.0), row("triton", 1.3), row("cuda", 10.0),
                            row("sdpa", 2.0, "fwd+bwd"), row("triton", 3.0, "fwd+bwd", peak=140)])
    text = report_gpu.targets(idx)
    line = next(ln for ln in text.splitlines() if ln.startswith("| fwd ≤ 1.4×"))
    assert "1.30× (bf16 D=64 T=4096): **met**, stretch missed" in line
    assert "10.00× (bf16 D=64 T=4096): **missed**" in line
    mem = next(ln for ln in text.splitlines() if ln.startswith("| peak memory"))
    assert "1.40× (bf16 D=64 T=4096): **met**" in mem
