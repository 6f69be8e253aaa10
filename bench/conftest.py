"""bench/ on sys.path (for _memory and report modules), and a ``run`` block in every
pytest-benchmark JSON: the command, GPU, torch / triton / CUDA versions, git commit and UTC date.
``HDAF_BENCH_COMMAND`` (set by scripts/gpu_check.sh to its own command line) names the command;
the pytest command line is kept as ``pytest_command``. A run interrupted with SIGINT (Ctrl-C, or
gpu_check.sh's time budget) still writes the cases it finished."""
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent


def _git(*args):
    """git's stdout in the checkout, stripped; None when git fails."""
    try:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def run_info(config):
    """What produced a bench JSON file: command, GPU, versions, git commit, UTC date."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    pytest_cmd = " ".join(["python -m pytest", *config.invocation_params.args])
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": os.environ.get("HDAF_BENCH_COMMAND") or pytest_cmd,
        "pytest_command": pytest_cmd,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "commit": _git("rev-parse", "HEAD") or None,
        "dirty": bool(status) if status is not None else None,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["run"] = run_info(config)


@pytest.hookimpl(hookwrapper=True, optionalhook=True)
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    # A case stopped before its first round (Ctrl-C, or gpu_check.sh's time budget sending
    # SIGINT) has no timings, and pytest-benchmark would fail on it instead of writing the file.
    benchmarks[:] = [b for b in benchmarks if b]
    yield
