"""Regenerate README.md's and docs/studies.md's tables (and the figure) from the committed results.

    python bench/update_readme.py            # rewrite the marked blocks, redraw the figure
    python bench/update_readme.py --check    # exit 1 when a block differs from what is printed here

Each block sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in README.md and is
the output of one generator, run on committed JSON:

    cpu           python bench/report.py --readme bench/results/cpu_*.json   (one per file)
    gpu           python bench/report_gpu.py bench/results/gpu_*.json --headline   (one per file)
    static_sm90   python bench/static_profile.py --report bench/results/static_sm90.json
                  (its summary; the per-configuration tables stay in static_sm90.md)
    main_job      docs/results/main_job.md (runs/main/results.md of ./scripts/main.sh)
    claims        hdaf.training.multiseed.claims_markdown(docs/results/main_job_seeds.json)

and in docs/studies.md ``diagnosis`` (docs/results/diagnosis/*.json, the validation-split
ablations listed in its index.json) and ``main_seeds`` (summary_markdown of the multi-seed JSON,
claims table included).

Where no JSON is committed the block says so, with the command that would produce it. The figure
(``bench/plot_bench.py``: time against T per provider, from the CPU JSON) is redrawn unless
``--no-plot``; ``--check`` compares the tables only (a PNG differs between matplotlib versions).
"""
from __future__ import annotations

import argparse
import difflib
import glob
import json
import math
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
FIGURE = "docs/figures/cpu_time_vs_T.png"
STATIC_JSON = "bench/results/static_sm90.json"
BLOCK = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)


def _run(*args: str) -> str:
    """stdout of ``python args...`` run in the repository root; its failure is ours."""
    res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"`python {' '.join(args)}` failed ({res.returncode}):\n{res.stderr}")
    return res.stdout


def _results(pattern: str) -> List[str]:
    """Committed result files matching ``pattern``, as repository-relative paths, sorted."""
    return sorted(os.path.relpath(p, REPO).replace(os.sep, "/")
                  for p in glob.glob(os.path.join(REPO, "bench", "results", pattern)))


#: CPU results with a table of their own (not the operator's CPU bench).
GQA_VARLEN_JSON = "bench/results/cpu_gqa_varlen.json"


def cpu_block() -> str:
    blocks = [_run("bench/report.py", "--readme", p).rstrip("\n") for p in _results("cpu_*.json")
              if p != GQA_VARLEN_JSON]
    if not blocks:
        return ("Not measured: no CPU bench result is committed. "
                "`pytest bench/bench_delta_attention.py --benchmark-only "
                "--benchmark-json=bench/results/cpu_<name>.json` writes one.")
    return "\n\n".join(blocks)


def gpu_block() -> str:
    blocks = []
    for p in _results("gpu_*.json"):
        try:
            blocks.append(_run("bench/report_gpu.py", p, "--headline").rstrip("\n"))
        except RuntimeError as exc:  # e.g. a run cut short before any case: say so, plainly
            why = str(exc).splitlines()[-1].strip() if str(exc).strip() else "no output"
            blocks.append(f"`{p}`: no GPU table ({why}).")
    if not blocks:
        return ("**Not measured on a GPU.** No GPU bench result is committed "
                "(`bench/results/gpu_*.json`), and no speed is claimed for the GPU backends. The "
                "Triton kernels are profiled statically for sm_90 instead (below). On a machine "
                "with an NVIDIA GPU, `scripts/gpu_check.sh --quick` (about 5 minutes on an H200: "
                "build, a correctness sweep of `triton` and `cuda`, a compute-sanitizer sweep, and "
                "the headline bench: bf16, D ∈ {64, 128}, T ∈ {4096, 16384}, fwd and fwd+bwd "
                "against SDPA without bias) writes the JSON that fills this table, with the "
                "targets forward ≤ 1.4× and forward+backward ≤ 2.0× SDPA at T ≥ 4096.")
    return "\n\n".join(blocks)


def static_block() -> str:
    if not os.path.exists(os.path.join(REPO, STATIC_JSON)):
        return ("The static profile has not been generated: `python bench/static_profile.py "
                f"--arch 90` compiles the Triton kernels for sm_90 (no GPU needed) and writes "
                f"`{STATIC_JSON}`.")
    md = _run("bench/static_profile.py", "--report", STATIC_JSON)
    md = md.split("\n## Every configuration", 1)[0].split("\n## Decoding: K/V", 1)[0]
    out = []
    for line in md.strip("\n").splitlines():
        # the page title (the README has its own heading) and the definitions, which the
        # results page keeps
        if line.startswith(("# ", "Shape", "Best = ")):
            continue
        out.append(f"**{line[3:]}**" if line.startswith("## ") else line)
    full = STATIC_JSON[:-len(".json")] + ".md"
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")
    with open(os.path.join(REPO, STATIC_JSON), encoding="utf-8") as f:
        traffic = json.load(f).get("kv_traffic") or []
    if traffic:  # the decoding table in one sentence
        by_g = {}
        for r in traffic:
            by_g.setdefault(r["G"], []).append(r["reads_of_cache"])
        cells = ", ".join(f"G={g}: {min(v):.3f}–{max(v):.3f}" if min(v) != max(v)
                          else f"G={g}: {v[0]:.3f}" for g, v in sorted(by_g.items()))
        dims = "/".join(str(d) for d in sorted({r["D"] for r in traffic}))
        return (text + "\n\n**Decoding** (Tq=1 against 8192 cached keys, D=" + dims + "): K/V "
                "bytes read per generated token, in reads of the cache — " + cells
                + f" (target 1.00 ± 5 %). Every configuration: [`{full}`]({full}).")
    return text + f"\n\nEvery configuration: [`{full}`]({full})."


CUDA_STATIC = ("bench/results/static_cute_sm90.json", "bench/results/static_cute_bwd_sm90.json")
#: Far-tile targets (sm_90, bf16, non-matrix instructions per 1,024 MACs per warp) per kernel and
#: head dim; a band loop's target is 2.5 times its kernel's far figure.
CUDA_FAR_TARGETS = {"forward": {64: 2.0, 128: 1.7}, "dK/dV": {64: 1.6, 128: 1.3},
                    "dQ": {64: 1.8, 128: 1.5}}


def _cuda_static_rows():
    """(kernel, D, tile, regs, spill bytes, far, band, LDL+STL in the loops, HMMA only) per bf16
    unit and kernel; far / band: the per-iteration figure (the loop body with the next tile's
    loads, i.e. the longest path) of the worse far loop and of the band loop."""
    rows = []
    for path in CUDA_STATIC:
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            doc = json.load(f)
        for unit in doc["rows"]:
            if unit["dtype"] != "bf16":
                continue
            kernels = unit.get("kernels") or [{"kernel": "fwd_kernel", "ptxas": unit["ptxas"],
                                               "loops": unit["loops"]}]
            for k in kernels:
                name = {"fwd_kernel": "forward", "dq_kernel": "dQ", "dkdv_kernel": "dK/dV"}[
                    k["kernel"]]
                alias = {"far-low": "far_lo", "far-high": "far_hi"}
                loops = {alias.get(lp["label"], lp["label"]): lp for lp in k["loops"]}
                per_iter = lambda lp: lp["paths"]["longest"]["non_matrix_per_kmac"]  # noqa: E731
                far = max(per_iter(loops[x]) for x in ("far_lo", "far_hi"))
                band = per_iter(loops["band"])
                spill = k["ptxas"]["spill_stores"] + k["ptxas"]["spill_loads"]
                local = sum(lp["spill_ld"] + lp["spill_st"] for lp in k["loops"])
                hmma = all(lp["wgmma"] == 0 and lp["mma_sync"] == lp["matrix"] for lp in k["loops"])
                tile = f"{unit['BLOCK_M']}×{unit['BLOCK_N']}, {unit['num_warps']} w"
                rows.append((name, unit["D"], tile, k["ptxas"]["registers"], spill, far, band,
                             local, hmma, doc))
    order = {"forward": 0, "dK/dV": 1, "dQ": 2}
    return sorted(rows, key=lambda r: (order[r[0]], r[1]))


def static_cuda_block() -> str:
    missing = [p for p in CUDA_STATIC if not os.path.exists(os.path.join(REPO, p))]
    if missing:
        return ("The static profile of the CUDA kernels has not been generated: `python "
                "bench/static_profile_cute.py --arch 90` (and `--direction bwd`) writes "
                + ", ".join(f"`{p}`" for p in missing) + ".")
    rows = _cuda_static_rows()
    docs = {id(r[-1]): r[-1] for r in rows}.values()
    src = "; ".join(f"`{d['command']}` — {d['date_utc']}, commit `{d['git_commit'][:10]}`"
                    for d in docs)
    versions = next(iter(docs))["versions"]
    out = [f"{src}; {versions.get('nvcc', '')}, CUTLASS {versions.get('cutlass', '4.2.0')}.", "",
           "| kernel | D | tile | regs | spill (B) | far tiles | far target | band tiles | band "
           "target | spill in a hot loop |",
           "|---|---:|---|---:|---:|---:|---|---:|---|---|"]
    for name, D, tile, regs, spill, far, band, local, hmma, _ in rows:
        ft = CUDA_FAR_TARGETS[name][D]
        bt = 2.5 * far
        verdict = lambda x, t: f"≤ {t:.2f}: " + ("met" if x <= t else f"missed ({x:.2f})")  # noqa: E731
        out.append(f"| {name} | {D} | {tile} | {regs} | {spill} | {far:.2f} | {verdict(far, ft)} "
                   f"| {band:.2f} | {verdict(band, bt)} | "
                   f"{'none' if local == 0 else f'{local} LDL/STL'} |")
    hmma_all = all(r[8] for r in rows)
    out += ["", "Per iteration of each hot loop (one tile, the next tile's loads included), per "
            "warp: non-matrix instructions per 1,024 MACs, sm_90, bf16 (float16 is the same "
            "within 0.05). Every MMA is " + ("`HMMA.16816`" if hmma_all else "**not** all "
            "`HMMA.16816`") + ". Every loop: [`bench/results/static_cute_sm90.md`]"
            "(bench/results/static_cute_sm90.md), [`static_cute_bwd_sm90.md`]"
            "(bench/results/static_cute_bwd_sm90.md)."]
    return "\n".join(out)


def gqa_varlen_block() -> str:
    if not os.path.exists(os.path.join(REPO, GQA_VARLEN_JSON)):
        return ("Not measured: `python -m pytest bench/bench_gqa_varlen.py --benchmark-only "
                f"--benchmark-json={GQA_VARLEN_JSON}` writes the result.")
    return _run("bench/bench_gqa_varlen.py", "--summary", GQA_VARLEN_JSON).strip("\n")


CONTEXT_PARALLEL_JSON = "bench/results/context_parallel_cpu.json"


def context_parallel_block() -> str:
    """One sentence from the context-parallel bench: the longest T, forward+backward."""
    path = os.path.join(REPO, CONTEXT_PARALLEL_JSON)
    if not os.path.exists(path):
        return ("Not measured: `python bench/bench_context_parallel.py --out "
                f"{CONTEXT_PARALLEL_JSON}` writes the result.")
    with open(path) as f:
        data = json.load(f)
    T = max(r["T"] for r in data["rows"])
    by = {r["world"]: r for r in data["rows"] if r["T"] == T and r["mode"] == "fwd+bwd"}
    c = data["case"]
    cells = "; ".join(f"{w} rank{'s' if w > 1 else ''}: {by[w]['median_ms']:.0f} ms, "
                      f"{by[w]['peak_bytes_per_rank'] / 2**20:.0f} MiB per rank"
                      for w in sorted(by))
    m = data["machine"]
    return (f"Forward+backward at T={T} (H={c['H']}, D={c['D']}, causal window "
            f"{c['window'][0]}, {c['dtype']}, one thread per rank, gloo): {cells}. "
            f"{m['cpu']}, {m['cores']} cores, torch {data['versions']['torch']}, "
            f"{data['date_utc']}; `{data['command']}` (every T: `python "
            f"bench/bench_context_parallel.py --summary {CONTEXT_PARALLEL_JSON}`).")


#: The main job's committed results: one seed (what ``./scripts/main.sh`` prints), the same
#: configuration over several seeds, and the validation-split ablations that chose it.
MAIN_JOB_MD = "docs/results/main_job.md"
MAIN_SEEDS_JSON = "docs/results/main_job_seeds.json"
DIAGNOSIS_INDEX = "docs/results/diagnosis/index.json"
STUDIES = os.path.join(REPO, "docs", "studies.md")


def _read(rel: str) -> str:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return f.read()


def main_job_block() -> str:
    if not os.path.exists(os.path.join(REPO, MAIN_JOB_MD)):
        return f"Not run: `./scripts/main.sh` writes `runs/main/results.md`; copy it to `{MAIN_JOB_MD}`."
    # the table without its footnote (the metric protocol, in docs/data_and_training.md)
    return _read(MAIN_JOB_MD).strip("\n").rsplit("\n\n", 1)[0]


def _summary() -> dict:
    return json.loads(_read(MAIN_SEEDS_JSON))


def claims_block() -> str:
    if not os.path.exists(os.path.join(REPO, MAIN_SEEDS_JSON)):
        return f"Not run: no multi-seed result of the main job is committed (`{MAIN_SEEDS_JSON}`)."
    sys.path.insert(0, REPO)
    from hdaf.training.multiseed import claims_markdown
    return claims_markdown(_summary())


def seeds_block() -> str:
    """The multi-seed table of the main job (means and intervals; comparisons)."""
    if not os.path.exists(os.path.join(REPO, MAIN_SEEDS_JSON)):
        return f"Not run: `{MAIN_SEEDS_JSON}` is not committed."
    sys.path.insert(0, REPO)
    from hdaf.training.multiseed import summary_markdown
    md = summary_markdown(_summary(), "Emotion classification, the main job's synthetic data, test split")
    return md.split("\n\n**", 1)[0].strip("\n")  # up to the every-column table


def diagnosis_block() -> str:
    """One row per validation-split ablation: Acc6 mean [95% CI] of each model it ran."""
    index = json.loads(_read(DIAGNOSIS_INDEX))
    cols = [("hdaf_aligned", "fused", "HDAF aligned"), ("hdaf_unaligned", "fused", "HDAF unaligned"),
            ("hdaf_aligned", "best", "best unimodal head"), ("hdaf_no_delta", "fused", "delta term off"),
            ("mult_aligned", "fused", "MulT")]
    lines = ["| ablation (`name`) | " + " | ".join(c[2] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for a in index["ablations"]:
        res = json.loads(_read(os.path.join(os.path.dirname(DIAGNOSIS_INDEX), a["name"] + ".json")))
        acc6 = res["columns"].index("Acc6")
        stats = {(r["run"], r["head"]): r["stats"][acc6]
                 for g in res["groups"] for r in g["rows"] if r["seeds_run"]}
        cells = []
        for run, head, _ in cols:
            suffix = ""
            if head == "best":  # the unimodal head with the highest mean, named
                cand = [(st["mean"], h) for (ru, h), st in stats.items() if ru == run and h != "fused"]
                head = max(cand)[1] if cand else None
                suffix = f" ({head})"
            st = stats.get((run, head))
            cells.append("–" if st is None or math.isnan(st["mean"]) else
                         f"{st['mean']:.1f} [{st['ci_low']:.1f}, {st['ci_high']:.1f}]{suffix}")
        lines.append(f"| {a['what']} (`{a['name']}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CHANGE_DIAGNOSIS_MD = "docs/results/change_diagnosis.md"
CHANGE_GRID_JSON = "docs/results/change_grid.json"


def change_diagnosis_block() -> str:
    """scripts/change_diagnosis.py report's table (validation splits)."""
    if not os.path.exists(os.path.join(REPO, CHANGE_DIAGNOSIS_MD)):
        return f"Not run: `python scripts/change_diagnosis.py run` then `report` writes `{CHANGE_DIAGNOSIS_MD}`."
    return _read(CHANGE_DIAGNOSIS_MD).strip("\n")


GAIN = "delta term's gain"


def change_grid_block() -> str:
    """One row per setting of the change grid: the targets' rows (means) and the claims."""
    if not os.path.exists(os.path.join(REPO, CHANGE_GRID_JSON)):
        return f"Not run: `python scripts/change_grid.py run` then `report` writes `{CHANGE_GRID_JSON}`."
    grid = json.loads(_read(CHANGE_GRID_JSON))
    short = {"HDAF aligned − MulT": "HDAF − MulT ≥ −1", "HDAF unaligned − aligned": "|unal. − al.| ≤ 2",
             "HDAF − delta term off": "delta term's gain"}
    lines = ["| setting | vision head / baseline | acoustic head / baseline | HDAF aligned / unaligned / baseline both "
             "| MulT | HDAF − MulT ≥ −1 | fused − best head > 0, p < .05 | \\|unal. − al.\\| ≤ 2 "
             "| delta term's gain | targets met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, st in grid["settings"].items():
        r = {k: (v["mean"] if v else float("nan")) for k, v in st["rows"].items()}
        cl = {}
        for c in st["claims"]:
            key = short.get(c["claim"], "best" if c["claim"].startswith("HDAF fused") else c["claim"])
            mark = "" if c["met"] is None else (" ✓" if c["met"] else " ✗")
            cl[key] = f"{c['diff']:+.1f} [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}]{mark}"
        met = sum(t["met"] for t in st["targets"])
        lines.append(
            f"| `{name}` | {r['vision head']:.1f} / {r['Change baseline: vision']:.1f} "
            f"| {r['acoustic head']:.1f} / {r['Change baseline: audio']:.1f} "
            f"| {r['HDAF aligned']:.1f} / {r['HDAF unaligned']:.1f} / {r['Change baseline: both']:.1f} "
            f"| {r['MulT']:.1f} | {cl.get('HDAF − MulT ≥ −1', '–')} | {cl.get('best', '–')} "
            f"| {cl.get('|unal. − al.| ≤ 2', '–')} | {cl.get(GAIN, '–')} | {met}/{len(st['targets'])} |")
    if grid.get("missing"):
        lines.append(f"\nNot run: {', '.join(grid['missing'])}.")
    return "\n".join(lines)


GENERATORS: Dict[str, Callable[[], str]] = {
    "cpu": cpu_block, "gpu": gpu_block, "static_sm90": static_block,
    "static_cuda_sm90": static_cuda_block,
    "gqa_varlen": gqa_varlen_block, "context_parallel": context_parallel_block,
    "main_job": main_job_block, "claims": claims_block}
STUDY_GENERATORS: Dict[str, Callable[[], str]] = {
    "diagnosis": diagnosis_block, "main_seeds": seeds_block,
    "change_diagnosis": change_diagnosis_block, "change_grid": change_grid_block}


def render(text: str, generators: Dict[str, Callable[[], str]] = GENERATORS) -> str:
    """``text`` with every marked block replaced by its generator's output."""
    found = [m.group(2) for m in BLOCK.finditer(text)]
    unknown = sorted(set(found) - set(generators))
    missing = sorted(set(generators) - set(found))
    if unknown or missing:
        raise ValueError(f"README blocks: unknown {unknown}, missing {missing} "
                         f"(markers: <!-- table:NAME --> ... <!-- /table:NAME -->)")
    made = {name: gen().strip("\n") for name, gen in generators.items()}
    return BLOCK.sub(lambda m: f"{m.group(1)}{made[m.group(2)]}\n{m.group(4)}", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 when README.md's tables differ from the generators'")
    ap.add_argument("--no-plot", action="store_true", help="do not redraw " + FIGURE)
    ap.add_argument("--readme", default=README, help="the file to update (default README.md)")
    ap.add_argument("--studies", default=STUDIES, help="the studies page (default docs/studies.md)")
    args = ap.parse_args(argv)
    stale = []
    for path, gens in ((args.readme, GENERATORS), (args.studies, STUDY_GENERATORS)):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        new = render(old, gens)
        name = os.path.relpath(path)
        if args.check:
            if new == old:
                print(f"{name}: tables match the committed results")
                continue
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(True), new.splitlines(True), f"{name} (committed)",
                f"{name} (generated)"))
            stale.append(name)
            continue
        if new != old:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
        print(f"{name}: {'updated' if new != old else 'unchanged'}")
    if stale:
        print(f"{', '.join(stale)}: tables differ from the generators': run python "
              "bench/update_readme.py", file=sys.stderr)
        return 1
    if args.check:
        return 0
    cpu = _results("cpu_*.json")
    if not args.no_plot and cpu:
        _run("bench/plot_bench.py", cpu[0], "--out", FIGURE)
        print(f"drew {FIGURE} from {cpu[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
