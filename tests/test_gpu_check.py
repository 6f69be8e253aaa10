"""scripts/gpu_check.sh and the pieces it runs, checked without a GPU.

* the script: syntax (``bash -n``, ``shellcheck`` when installed), ``--help``, argument errors, and
  whole runs with a fake ``python3`` (a shell script that answers like a GPU machine) in a copy of
  the script: phase order, per-phase times and limits, a phase stopped at its time budget, phases
  skipped past the deadline, the summary JSON and the copies under ``--out``;
* the quick selections: ``pytest -m quick`` collects exactly ``QUICK_GPU_TESTS`` (tests/conftest.py)
  and the 24 headline cases of bench/bench_delta_attention_gpu.py;
* scripts/gpu_sanitizer_sweep.py: its axes, ``--quick``, and CPU dry runs;
* the bench's Triton precompile, run on CPU tensors under the Triton interpreter;
* bench/report_gpu.py on a hand-made JSON shaped like the quick bench's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from conftest import QUICK_GPU_TESTS, parse_triton_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
BENCH = os.path.join(REPO, "bench")
SCRIPT = os.path.join(SCRIPTS, "gpu_check.sh")
QUICK_BUDGETS = {"build": 180, "info": 30, "tests": 120, "sanitizer": 120, "bench": 240}
PHASES = ["build", "info", "tests", "sanitizer", "bench"]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sweep():
    return _load("gpu_sanitizer_sweep", os.path.join(SCRIPTS, "gpu_sanitizer_sweep.py"))


def _quick_triton_configs():
    """QUICK_TRITON_CONFIGS as gpu_check.sh sets it."""
    with open(SCRIPT) as f:
        line = next(ln for ln in f if ln.startswith("QUICK_TRITON_CONFIGS="))
    return line.split("=", 1)[1].strip().strip('"')


# ---------------------------------------------------------------------------------------------
# the script itself
# ---------------------------------------------------------------------------------------------

def test_gpu_check_script_is_valid_bash():
    assert os.access(SCRIPT, os.X_OK), "scripts/gpu_check.sh must be executable"
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", SCRIPT], check=True)


def test_help_documents_quick_and_the_time_budgets():
    out = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("The GPU check")
    for part in ("--quick", "--budget PHASE=SECONDS", "--deadline", "pytest -m quick",
                 "QUICK_GPU_TESTS", "compute-sanitizer memcheck", "gpu_<name>_quick.json",
                 "summary_gpu_check_<name>", "TIMEOUT", "fwd <= 1.4x", "fwd+bwd <= 2.0x"):
        assert part in out, part
    for phase, secs in QUICK_BUDGETS.items():
        assert f"{phase} {secs}" in out, phase
    assert "default 450 s" in out
    assert sum(QUICK_BUDGETS.values()) > 450  # the deadline, not the sum, bounds the window
    assert "issue" not in out.lower()


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown argument"),
    (["--budget", "tests"], "--budget wants PHASE=SECONDS"),
    (["--budget", "lunch=3"], "--budget wants PHASE=SECONDS"),
    (["--deadline", "soon"], "--deadline wants seconds"),
])
def test_gpu_check_rejects_bad_arguments(args, message):
    proc = subprocess.run([SCRIPT, *args], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr


# A python3 that answers like a GPU machine: the GPU query prints an H200, everything else
# succeeds, the bench's pytest writes a JSON; FAKE_SLEEP_<what> makes one call slow.
FAKE_PYTHON = textwrap.dedent(r"""
    #!/usr/bin/env bash
    echo "python $* | HDAF_TRITON_CONFIGS=${HDAF_TRITON_CONFIGS:-}" \
         "TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-}" >> "$FAKE_LOG"
    [[ -n "${FAKE_NO_GPU:-}" && "$*" == *get_device_properties* ]] && { echo "no GPU" >&2; exit 1; }
    case "$*" in
      *get_device_properties*) echo "9.0 NVIDIA H200" ;;
      *"setup.py build_ext"*) sleep "${FAKE_SLEEP_BUILD:-0}"; echo "built" ;;
      *"--benchmark-json="*)  # like pytest: on SIGINT it still writes the JSON, exits 2
        for a in "$@"; do [[ "$a" == --benchmark-json=* ]] && json="${a#--benchmark-json=}"; done
        trap 'echo "{\"benchmarks\": []}" > "$json"; echo interrupted; exit 2' INT
        sleep "${FAKE_SLEEP_BENCH:-0}"  # SIGINT reaches the whole group: sleep ends, trap runs
        echo '{"benchmarks": []}' > "$json"
        echo "24 passed" ;;
      *"-m pytest"*)
        [[ -n "${FAKE_LINGER:-}" ]] && sleep 60 &  # a background child ignores SIGINT
        sleep "${FAKE_SLEEP_TESTS:-0}"; echo "18 passed in 1.0s" ;;
      *report_gpu.py*) echo "| D | T | SDPA fwd |" ;;
      *) echo "ok" ;;
    esac
""").lstrip()
FAKE_SANITIZER = textwrap.dedent(r"""
    #!/usr/bin/env bash
    echo "compute-sanitizer $*" >> "$FAKE_LOG"
    while [[ $# -gt 0 && "$1" == --* ]]; do shift 2; done
    exec "$@"
""").lstrip()


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def fake_run(tmp_path):
    """Run a copy of gpu_check.sh (its root: tmp_path/root) with the fake python3."""
    root = tmp_path / "root"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / "gpu_check.sh")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    python = _executable(fake_bin / "python3", FAKE_PYTHON)
    _executable(fake_bin / "compute-sanitizer", FAKE_SANITIZER)
    log = tmp_path / "calls.log"

    def run(*args, **env):
        full_env = dict(os.environ, PYTHON=python, FAKE_LOG=str(log), OUT="",
                        PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
                        GIT_CEILING_DIRECTORIES=str(tmp_path))
        full_env.pop("TRITON_CACHE_DIR", None)
        full_env.update(env)
        proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), *args],
                              capture_output=True, text=True, env=full_env, timeout=120)
        summaries = list((root / "bench" / "results").glob("summary_gpu_check_*.json"))
        summary = json.loads(summaries[0].read_text()) if summaries else None
        calls = log.read_text() if log.exists() else ""
        return proc, summary, calls

    run.root = root
    return run


def test_quick_run_with_a_fake_gpu_machine(fake_run, tmp_path):
    out = tmp_path / "out"
    proc, summary, calls = fake_run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "GPU: 9.0 NVIDIA H200" in text
    # each phase announces its limit and prints its wall time when it ends, in order
    for phase in PHASES:
        assert f"==== gpu_check: {phase} (limit {QUICK_BUDGETS[phase]} s, started at" in text
        assert f"==== gpu_check: PASS  {phase} (" in text
        assert f" s of {QUICK_BUDGETS[phase]} s); " in text
    assert [text.index(f"PASS  {p} (") for p in PHASES] == sorted(
        text.index(f"PASS  {p} (") for p in PHASES)
    assert "gpu_check: all phases passed" in text
    # what the phases ran
    assert "-m pytest tests/test_cuda.py tests/test_triton.py -m quick" in calls
    assert f"HDAF_TRITON_CONFIGS={_quick_triton_configs()}" in calls
    assert "compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 50 " in calls
    assert f"gpu_sanitizer_sweep.py --quick --triton-configs {_quick_triton_configs()}" in calls
    assert "bench/bench_delta_attention_gpu.py --precompile --quick" in calls
    assert ("-m pytest bench/bench_delta_attention_gpu.py -m quick --benchmark-only" in calls
            and "--benchmark-json=bench/results/gpu_nvidia_h200_quick.json" in calls)
    assert "bench/report_gpu.py bench/results/gpu_nvidia_h200_quick.json" in calls
    assert "TRITON_CACHE_DIR=" + str(fake_run.root / "build" / "gpu_check" / "triton_cache") in calls
    # the summary JSON, also copied to --out with the bench results and the logs
    assert summary["mode"] == "quick" and summary["passed"] is True
    assert summary["gpu"] == "9.0 NVIDIA H200" and summary["name"] == "nvidia_h200"
    assert summary["command"] == f"scripts/gpu_check.sh --quick --out {out}"
    assert summary["deadline_s"] == 450 and summary["date_utc"].endswith("Z")
    assert summary["bench_json"] == "bench/results/gpu_nvidia_h200_quick.json"
    assert [p["name"] for p in summary["phases"]] == PHASES
    for p in summary["phases"]:
        assert p["status"] == "pass" and p["exit"] == 0 and p["seconds"] >= 0
        assert p["budget_s"] == QUICK_BUDGETS[p["name"]]
    for name in ("summary_gpu_check_nvidia_h200_quick.json", "gpu_nvidia_h200_quick.json",
                 "gpu_nvidia_h200_quick.md", "gpu_check/tests.log", "gpu_check/bench.log"):
        assert (out / name).exists(), name


def test_a_phase_past_its_budget_is_stopped_and_the_rest_still_run(fake_run):
    proc, summary, _ = fake_run("--quick", "--budget", "tests=2", FAKE_SLEEP_TESTS="60")
    assert proc.returncode == 1
    assert "s of 2 s: stopped at its limit; log: " in proc.stdout and "TIMEOUT tests (" in proc.stdout
    status = {p["name"]: p["status"] for p in summary["phases"]}
    assert status == dict(build="pass", info="pass", tests="timeout", sanitizer="pass", bench="pass")
    tests = next(p for p in summary["phases"] if p["name"] == "tests")
    assert tests["exit"] in (124, 137) and tests["seconds"] < 30 and tests["budget_s"] == 2
    assert summary["passed"] is False


def test_a_process_left_running_by_a_stopped_phase_is_ended(fake_run):
    # it would hold the phase's log pipe open and the script with it
    proc, summary, _ = fake_run("--quick", "--budget", "tests=2", FAKE_SLEEP_TESTS="60",
                                FAKE_LINGER="1")
    tests = next(p for p in summary["phases"] if p["name"] == "tests")
    assert tests["status"] == "timeout" and tests["seconds"] < 20
    assert summary["total_s"] < 40


def test_a_bench_stopped_at_its_budget_still_reports_what_it_measured(fake_run):
    proc, summary, calls = fake_run("--quick", "--budget", "bench=3", FAKE_SLEEP_BENCH="60")
    assert proc.returncode == 1
    assert "TIMEOUT bench (" in proc.stdout and "s of 3 s: stopped at its limit" in proc.stdout
    assert calls.index("--benchmark-json=") < calls.index("bench/report_gpu.py")
    assert (fake_run.root / "bench" / "results" / "gpu_nvidia_h200_quick.md").exists()
    bench = summary["phases"][-1]
    assert bench["status"] == "timeout" and bench["seconds"] < 20


def test_phases_past_the_deadline_are_skipped(fake_run):
    proc, summary, _ = fake_run("--quick", "--deadline", "18", FAKE_SLEEP_BUILD="4")
    assert proc.returncode == 1
    status = {p["name"]: p["status"] for p in summary["phases"]}
    assert status == dict(build="pass", info="skip", tests="skip", sanitizer="skip", bench="skip")
    assert "SKIP  info (" in proc.stdout and "of the 18 s deadline" in proc.stdout
    build = summary["phases"][0]
    assert build["budget_s"] in (17, 18) and build["seconds"] >= 4  # the deadline caps it


def test_full_run_has_no_limits_unless_asked(fake_run):
    proc, summary, calls = fake_run("--skip", "sanitizer", "--skip", "bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["mode"] == "full" and summary["deadline_s"] is None
    assert {p["name"]: p["budget_s"] for p in summary["phases"]}["tests"] is None
    assert "-m pytest tests/ -q" in calls and "HDAF_TRITON_CONFIGS= " in calls
    assert "SKIP  sanitizer (--skip)" in proc.stdout


def test_no_gpu_stops_before_the_build(fake_run):
    proc, summary, calls = fake_run("--quick", FAKE_NO_GPU="1")
    assert proc.returncode == 1 and "FAIL  gpu (torch sees no CUDA GPU" in proc.stdout
    assert summary["passed"] is False and [p["name"] for p in summary["phases"]] == ["gpu"]
    assert "setup.py" not in calls


# ---------------------------------------------------------------------------------------------
# the quick selections
# ---------------------------------------------------------------------------------------------

def _collect(*args):
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--strict-markers",
                           "-p", "no:cacheprovider", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [ln for ln in proc.stdout.splitlines() if "::" in ln]


def test_quick_test_selection_exists_and_covers_both_backends():
    got = _collect("-m", "quick", "tests/test_cuda.py", "tests/test_triton.py")
    assert sorted(got) == sorted(f"tests/{t}" for t in QUICK_GPU_TESTS)  # every id exists
    assert len(set(QUICK_GPU_TESTS)) == len(QUICK_GPU_TESTS)
    cuda = [t for t in got if t.startswith("tests/test_cuda.py::")]
    triton = [t for t in got if t.startswith("tests/test_triton.py::")]
    assert cuda and triton
    for dtype in ("float16", "bfloat16"):  # the CUDA kernels' dtypes; float32 is refused
        assert any(f"-{dtype}]" in t for t in cuda), dtype
    for what in ("refuses_float32", "mqa_decode", "gqa_tq37", "varlen", "d64", "d128"):
        assert any(what in t for t in cuda), what
    for i in range(3):  # test_triton's dtype ids: float32, float16, bfloat16
        assert any(t.endswith(f"-dtype{i}]") for t in triton), i
    for case in ("causal_pad", "window", "allpad", "fully_masked", "paper_pad"):
        assert any(case in t for t in got), case
    assert not any("issue" in t for t in got)


def test_quick_bench_selection_is_the_headline():
    sys.path.insert(0, BENCH)
    import bench_delta_attention_gpu as gpu_bench

    got = _collect("-m", "quick", "bench/bench_delta_attention_gpu.py")
    ids = [t.split("[", 1)[1].rstrip("]") for t in got]
    want = {f"bf16-D{D}-{mode}-{p}-T{T}" for D in (64, 128) for T in (4096, 16384)
            for mode in ("fwd", "fwd+bwd") for p in ("sdpa", "triton", "cuda")}
    assert len(ids) == 24 and set(ids) == want
    assert ids[:6] == [f"bf16-D64-{m}-{p}-T4096" for m in ("fwd", "fwd+bwd")
                       for p in ("sdpa", "triton", "cuda")]  # shortest first, SDPA first
    # the full bench is unchanged: every dtype, D, T, mode and provider
    assert len(set(gpu_bench.cases())) == 2 * 2 * 3 * 2 * 5 == len(list(gpu_bench.cases()))


def test_quick_triton_configs_parse_and_are_autotuning_candidates():
    spec = _quick_triton_configs()
    assert parse_triton_configs(spec) == _sweep().parse_triton_configs(spec) == {
        "fwd": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}
    for bad in ("fwd=64,32,4", "bwd=64,32,4,2", "fwd"):
        with pytest.raises(ValueError):
            parse_triton_configs(bad)
    K = pytest.importorskip("hdaf.kernels.delta_attention")
    for kind, cfg in parse_triton_configs(spec).items():
        assert cfg in K.autotune_shapes(kind), (kind, cfg)


# ---------------------------------------------------------------------------------------------
# the sanitizer sweep
# ---------------------------------------------------------------------------------------------

def test_sanitizer_sweep_covers_the_axes():
    sweep = _sweep()
    cases = list(sweep.cases())
    dims = {d for _, _, d, _ in cases}
    assert any(dk != dv for dk, dv in dims)
    assert min(min(d) for d in dims) == 16 and max(max(d) for d in dims) == 128
    assert {T for _, T, _, _ in cases} == {1, 7, 63, 100, 300}
    assert {dt for *_, dt in cases} == {"float16", "bfloat16", "float32", "float64"}
    assert {c for c, *_ in cases} == set(sweep.CONFIGS)  # padding, causal, windows, masked rows


def test_sanitizer_sweep_quick_cases():
    sweep = _sweep()
    quick = sweep.QUICK_CASES
    assert all(c in sweep.CONFIGS for c, *_ in quick)
    assert {dt for *_, dt in quick} == {"float16", "bfloat16", "float32"}
    kws = [sweep.CONFIGS[c][1] for c, *_ in quick]
    assert any(kw.get("causal") for kw in kws) and any("window" in kw for kw in kws)
    assert all(sweep.CONFIGS[c][2] is not None or "window" in sweep.CONFIGS[c][1] for c, *_ in quick)


def test_sanitizer_sweep_runs_on_cpu(capsys):
    sweep = _sweep()
    assert sweep.main(["--list"]) == 0
    assert "70 runs" in capsys.readouterr().out  # cuda + triton per case
    assert sweep.main(["--list", "--quick", "--triton-configs", _quick_triton_configs()]) == 0
    out = capsys.readouterr().out
    assert "6 runs; Triton configurations pinned: {'fwd': (64, 32, 4, 2)" in out
    assert out.count("cuda ") == 3 and out.count("triton ") == 3
    assert sweep.main(["--device", "cpu", "--backends", "cpu", "--max-cases", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 runs, 0 failed" in out and "FAIL" not in out
    assert sweep.main(["--quick", "--device", "cpu", "--backends", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3 runs, 0 failed" in out and "FAIL" not in out


def test_sanitizer_sweep_reports_a_failing_backend(capsys, monkeypatch):
    sweep = _sweep()
    monkeypatch.setitem(sweep.TOL, "float16", -1.0)  # every float16 case must now fail
    assert sweep.main(["--device", "cpu", "--backends", "cpu", "--max-cases", "1"]) == 1
    assert "FAIL cpu" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the bench: Triton precompile (interpreter) and the run block
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def gpu_bench(monkeypatch):
    sys.path.insert(0, BENCH)
    import bench_delta_attention_gpu as mod

    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(mod, "B", 1)
    monkeypatch.setattr(mod, "H", 2)
    monkeypatch.setattr(mod, "MAXD", 3)
    monkeypatch.setattr(mod, "R", 7)
    monkeypatch.setattr(mod, "DTYPES", {"bf16": __import__("torch").float32})
    return mod


def test_precompile_jobs_pin_every_autotuning_candidate(gpu_bench, capsys):
    K = pytest.importorskip("hdaf.kernels.delta_attention")
    if not K.INTERPRET:
        pytest.skip("the Triton interpreter is not on in this process")
    jobs = gpu_bench.precompile_jobs(["bf16"], [16], 32)
    for kind, pos in (("fwd", 3), ("dkdv", 4), ("dq", 5)):
        assert {j[pos] for j in jobs} - {None} == set(K.autotune_shapes(kind)), kind
    # two jobs run under the interpreter: a backward one and a forward-only one
    small = [j for j in jobs if j[3] == K.autotune_shapes("fwd")[-1]][:1]
    small.append(("bf16", 16, 32, (16, 16, 2, 2), (16, 16, 2, 1), (16, 16, 2, 1)))
    assert gpu_bench.precompile(small, processes=1) == 0
    out = capsys.readouterr().out
    assert out.count("ok   bf16 D=16 T=32") == 2 and "precompiled 2 pinned runs" in out
    assert "fail" not in out.split("precompiled")[0]


def test_bench_json_run_block():
    conftest = _load("bench_conftest", os.path.join(BENCH, "conftest.py"))

    class Config:
        class invocation_params:  # noqa: N801
            args = ("bench/bench_delta_attention_gpu.py", "-m", "quick")

    info = conftest.run_info(Config)
    assert info["pytest_command"] == "python -m pytest bench/bench_delta_attention_gpu.py -m quick"
    assert set(info) >= {"command", "gpu", "torch", "triton", "cuda", "commit", "dirty", "date_utc"}
    assert info["date_utc"].endswith("Z") and len(info["commit"] or "x" * 40) == 40
    out = {}
    conftest.pytest_benchmark_update_json(Config, [], out)
    assert out["run"]["torch"] == info["torch"]
    # a case interrupted before its first round (no timings) is left out instead of failing
    benchmarks = [["round"], [], ["round"]]
    wrapper = conftest.pytest_benchmark_generate_json(Config, benchmarks, True, {}, {})
    next(wrapper)
    assert benchmarks == [["round"], ["round"]]


# ---------------------------------------------------------------------------------------------
# bench/report_gpu.py on a JSON shaped like the quick bench's
# ---------------------------------------------------------------------------------------------

# (D, T, mode) -> ms of sdpa, triton, cuda; None: the case did not run
QUICK_MS = {
    (64, 4096, "fwd"): (0.50, 0.70, 0.75),  # triton exactly 1.40x: met; cuda 1.50x: missed
    (64, 4096, "fwd+bwd"): (2.00, 3.90, 4.20),  # 1.95x met, 2.10x missed
    (64, 16384, "fwd"): (8.0, 9.6, 12.0),  # 1.20x, 1.50x
    (64, 16384, "fwd+bwd"): (32.0, 48.0, 64.0),  # 1.50x, 2.00x (met: at most 2.0x)
    (128, 4096, "fwd"): (0.80, 1.20, 1.00),  # 1.50x missed, 1.25x met
    (128, 4096, "fwd+bwd"): (3.00, 5.40, 9.00),  # 1.80x, 3.00x
    (128, 16384, "fwd"): (12.0, 14.4, 13.2),  # 1.20x, 1.10x
    (128, 16384, "fwd+bwd"): (48.0, 72.0, None),  # 1.50x; cuda cut short by its time budget
}
RUN = {"command": "scripts/gpu_check.sh --quick", "gpu": "NVIDIA H200", "torch": "2.11.0+cu130",
       "triton": "3.6.0", "cuda": "13.0", "commit": "0123456789abcdef0123456789abcdef01234567",
       "dirty": False, "date_utc": "2026-12-01T10:00:00Z"}


def _quick_json(path):
    rows = []
    for (D, T, mode), times in QUICK_MS.items():
        for provider, ms in zip(("sdpa", "triton", "cuda"), times):
            if ms is None:
                continue
            info = dict(provider=provider, T=T, D=D, mode=mode, window=None,
                        dtype="torch.bfloat16", ms=ms, ms_rounds=[ms] * 7, iterations=10,
                        tflops=100.0, peak_extra_bytes=2**30, device="cuda", gpu="NVIDIA H200",
                        torch="2.11.0+cu130", triton="3.6.0", cuda="13.0", B=4, H=16, R=129)
            rows.append({"extra_info": info, "stats": {"median": ms * 10 / 1e3, "iqr": 0.0,
                                                       "rounds": 7}})
    doc = {"machine_info": {"python_version": "3.12.3"}, "commit_info": {"id": RUN["commit"]},
           "datetime": "2026-12-01T10:00:00+00:00", "version": "5.3.1", "benchmarks": rows,
           "run": RUN}
    path.write_text(json.dumps(doc))
    return path


def _report(*args):
    return subprocess.run([sys.executable, os.path.join(BENCH, "report_gpu.py"), *args],
                          capture_output=True, text=True, check=True).stdout


def test_report_gpu_headline_from_a_quick_bench_json(tmp_path):
    path = _quick_json(tmp_path / "gpu_h200_quick.json")
    md = _report(str(path), "--headline")
    lines = md.splitlines()
    assert lines[0].startswith("**bf16, B=4, H=16, R=129** — ms per call (ratio to SDPA without "
                               "bias, target: forward ≤ 1.4×, forward+backward ≤ 2.0×)")
    assert lines[2] == ("| D | T | SDPA fwd | hdaf `triton` fwd | hdaf `cuda` fwd | SDPA fwd+bwd | "
                        "hdaf `triton` fwd+bwd | hdaf `cuda` fwd+bwd |")
    rows = [ln for ln in lines if ln.startswith("| 64 ") or ln.startswith("| 128 ")]
    assert rows == [
        "| 64 | 4096 | 0.5 | 0.7 (1.40×, met) | 0.75 (1.50×, **missed**) | 2 | 3.9 (1.95×, met) "
        "| 4.2 (2.10×, **missed**) |",
        "| 64 | 16384 | 8 | 9.6 (1.20×, met) | 12 (1.50×, **missed**) | 32 | 48 (1.50×, met) "
        "| 64 (2.00×, met) |",
        "| 128 | 4096 | 0.8 | 1.2 (1.50×, **missed**) | 1 (1.25×, met) | 3 | 5.4 (1.80×, met) "
        "| 9 (3.00×, **missed**) |",
        "| 128 | 16384 | 12 | 14.4 (1.20×, met) | 13.2 (1.10×, met) | 48 | 72 (1.50×, met) | – |",
    ]
    assert ("Targets met (of the (D, T) measured): hdaf `triton` forward 3/4, forward+backward "
            "4/4; hdaf `cuda` forward 2/4, forward+backward 1/3.") in md
    assert ("GPU: NVIDIA H200; torch 2.11.0+cu130; triton 3.6.0; CUDA 13.0; python 3.12.3; "
            "commit 0123456789; date 2026-12-01T10:00:00Z. Command: `scripts/gpu_check.sh "
            "--quick`.") in md


def test_report_gpu_full_render_of_a_quick_bench_json(tmp_path):
    path = _quick_json(tmp_path / "gpu_h200_quick.json")
    md = _report(str(path))
    assert md.startswith("GPU: NVIDIA H200; torch 2.11.0+cu130; triton 3.6.0; CUDA 13.0")
    assert "| 64 | 4096 | 0.5 | 0.7 (1.40×, met) |" in md  # the headline comes first
    assert "**bf16, fwd+bwd**" in md and "**Targets** — the worst measured configuration" in md
    assert "1.50× (bf16 D=128 T=4096): **missed**" in md  # triton's worst fwd ratio
    # bench/report.py (the other entry point) renders the same file
    out = subprocess.run([sys.executable, os.path.join(BENCH, "report.py"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "| 64 | 4096 | 0.5 | 0.7 (1.40×, met) |" in out
