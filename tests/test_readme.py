"""README.md: its performance tables are what bench/update_readme.py prints from the committed JSON.

If ``test_readme_tables_match_the_committed_results`` fails, a result file or a generator changed:
run ``python bench/update_readme.py`` and commit the README with it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)

import report  # noqa: E402
import update_readme  # noqa: E402


def _readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_tables_match_the_committed_results():
    res = subprocess.run([sys.executable, os.path.join(BENCH, "update_readme.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_check_fails_on_a_stale_table_and_update_mends_it(tmp_path):
    stale = re.sub(r"(<!-- table:cpu -->\n)(.*?)(<!-- /table:cpu -->)", r"\1| stale |\n\3",
                   _readme(), flags=re.S)
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    script = os.path.join(BENCH, "update_readme.py")
    res = subprocess.run([sys.executable, script, "--check", "--readme", str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "-| stale |" in res.stdout and "update_readme.py" in res.stderr
    subprocess.run([sys.executable, script, "--no-plot", "--readme", str(path)], check=True,
                   capture_output=True)
    assert path.read_text(encoding="utf-8") == _readme()


def test_render_replaces_only_the_marked_blocks_and_needs_every_marker():
    gens = {"a": lambda: "new A", "b": lambda: "new B\n"}
    text = "x\n<!-- table:a -->\nold\n<!-- /table:a -->\ny\n<!-- table:b -->\n<!-- /table:b -->\n"
    assert update_readme.render(text, gens) == (
        "x\n<!-- table:a -->\nnew A\n<!-- /table:a -->\ny\n"
        "<!-- table:b -->\nnew B\n<!-- /table:b -->\n")
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        update_readme.render("<!-- table:a -->\n<!-- /table:a -->", gens)
    with pytest.raises(ValueError, match=r"unknown \['c'\]"):
        update_readme.render(text + "<!-- table:c -->\n<!-- /table:c -->", gens)


def test_blocks_without_results_say_so(monkeypatch, tmp_path):
    monkeypatch.setattr(update_readme, "_results", lambda pattern: [])
    assert update_readme.gpu_block().startswith("**Not measured on a GPU.**")
    monkeypatch.setattr(update_readme, "STATIC_JSON", str(tmp_path / "absent.json"))
    assert update_readme.static_block().startswith("The static profile has not been generated")


def test_cpu_block_carries_machine_date_versions_and_command():
    block = update_readme.cpu_block()
    for part in ("Machine: AMD EPYC, 2 cores", "Date: 2026-11-24", "Python 3.11.7",
                 "pytest-benchmark 5.3.1", "Command: `pytest bench/bench_delta_attention.py",
                 "**40.1 (1.23×)**", "**14.3× / 11.3× faster**"):
        assert part in block, part


def test_gpu_block_comes_from_report_gpu_headline(monkeypatch, tmp_path):
    import report_gpu

    if not hasattr(report_gpu, "headline"):
        pytest.skip("bench/report_gpu.py has no --headline yet")

    def bench(provider, T, mode, ms, dtype="torch.bfloat16"):
        info = dict(provider=provider, T=T, D=64, mode=mode, window=None, dtype=dtype, ms=ms,
                    tflops=1.0, gpu="NVIDIA H200", torch="2.11.0+cu130", B=4, H=16, R=129,
                    device="cuda", peak_extra_bytes=2**20)
        return {"extra_info": info, "stats": {"median": ms / 1e3, "iqr": 0.0, "rounds": 5}}

    rows = [bench("sdpa", 4096, "fwd", 0.5), bench("triton", 4096, "fwd", 0.7),
            bench("sdpa", 4096, "fwd+bwd", 2.0), bench("triton", 4096, "fwd+bwd", 3.0)]
    doc = {"machine_info": {"python_version": "3.12.3"}, "commit_info": {"id": "abcdef1234567"},
           "datetime": "2026-12-01T10:00:00", "version": "5.3.1", "benchmarks": rows}
    path = tmp_path / "gpu_h200.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setattr(update_readme, "_results",
                        lambda pattern: [str(path)] if "gpu" in pattern else [])
    block = update_readme.gpu_block()
    assert "Not measured" not in block and "NVIDIA H200" in block and "2.11.0+cu130" in block
    with pytest.raises(SystemExit, match="report_gpu.py"):
        report.readme(str(path))  # the CPU table refuses a GPU file and names the right command


def test_plot_is_drawn_from_the_committed_cpu_json(tmp_path):
    pytest.importorskip("matplotlib")
    import plot_bench

    src = os.path.join(BENCH, "results", "cpu_2core_amd_epyc.json")
    out = plot_bench.plot(src, str(tmp_path / "fig.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_readme_is_short_and_about_the_package():
    text = _readme()
    assert len(text.splitlines()) <= 275
    # how the project was made (tracker numbers, who reported what) is not the user's business;
    # the words are split so that a grep of the repository for them does not find this line
    history = "|".join(("iss" + r"ue[ -]?[0-9]", "sess" + "ion", "repor" + "ter"))
    assert not re.search(history, text, re.I)
    heads = [h for h in re.findall(r"^## (.+)$", text, re.M)]
    assert heads[:3] == ["Install", "Usage", "Backends"] and heads[-1] == "Documentation"


def test_studies_tables_are_checked_too(tmp_path):
    """docs/studies.md's ablation and multi-seed tables come from docs/results/: a stale one
    fails --check, and the update restores the committed page."""
    with open(os.path.join(REPO, "docs", "studies.md"), encoding="utf-8") as f:
        page = f.read()
    stale = re.sub(r"(<!-- table:diagnosis -->\n)(.*?)(<!-- /table:diagnosis -->)", r"\1| stale |\n\3",
                   page, flags=re.S)
    assert stale != page
    path = tmp_path / "studies.md"
    path.write_text(stale, encoding="utf-8")
    script = os.path.join(BENCH, "update_readme.py")
    res = subprocess.run([sys.executable, script, "--check", "--studies", str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "-| stale |" in res.stdout
    subprocess.run([sys.executable, script, "--no-plot", "--studies", str(path)], check=True,
                   capture_output=True)
    assert path.read_text(encoding="utf-8") == page


def test_main_job_and_claims_blocks_come_from_the_committed_results():
    readme = _readme()
    assert update_readme.main_job_block() in readme
    claims = update_readme.claims_block()
    assert claims in readme and claims.count("**met**") + claims.count("**missed**") == 3
