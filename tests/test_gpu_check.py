"""scripts/gpu_check.sh and scripts/gpu_sanitizer_sweep.py, the parts that run without a GPU."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")


def _sweep():
    spec = importlib.util.spec_from_file_location("gpu_sanitizer_sweep",
                                                  os.path.join(SCRIPTS, "gpu_sanitizer_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_script_is_valid_bash():
    path = os.path.join(SCRIPTS, "gpu_check.sh")
    assert os.access(path, os.X_OK), "scripts/gpu_check.sh must be executable"
    subprocess.run(["bash", "-n", path], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", path], check=True)


def test_sanitizer_sweep_covers_the_issue_10_axes():
    sweep = _sweep()
    cases = list(sweep.cases())
    dims = {d for _, _, d, _ in cases}
    assert any(dk != dv for dk, dv in dims)
    assert min(min(d) for d in dims) == 16 and max(max(d) for d in dims) == 128
    assert {T for _, T, _, _ in cases} == {1, 7, 63, 100, 300}
    assert {dt for *_, dt in cases} == {"float16", "bfloat16", "float32", "float64"}
    assert {c for c, *_ in cases} == set(sweep.CONFIGS)  # padding, causal, windows, masked rows


def test_sanitizer_sweep_runs_on_cpu(capsys):
    sweep = _sweep()
    assert sweep.main(["--list"]) == 0
    assert "70 runs" in capsys.readouterr().out  # cuda + triton per case
    assert sweep.main(["--device", "cpu", "--backends", "cpu", "--max-cases", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 runs, 0 failed" in out and "FAIL" not in out


def test_sanitizer_sweep_reports_a_failing_backend(capsys, monkeypatch):
    sweep = _sweep()
    monkeypatch.setitem(sweep.TOL, "float16", -1.0)  # every float16 case must now fail
    assert sweep.main(["--device", "cpu", "--backends", "cpu", "--max-cases", "1"]) == 1
    assert "FAIL cpu" in capsys.readouterr().out


@pytest.mark.parametrize("arg", ["--bogus"])
def test_gpu_check_rejects_unknown_arguments(arg):
    proc = subprocess.run([os.path.join(SCRIPTS, "gpu_check.sh"), arg], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
