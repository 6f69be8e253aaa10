"""Static machine-code profile of the CuTe forward and backward (csrc/cuda) for sm_90 (and
sm_80), without a GPU.

Each instantiation unit ``csrc/cuda/fwd_*.cu`` is compiled by nvcc to a cubin with
setup.py's CUDA flags (``-O3 --expt-relaxed-constexpr -lineinfo``) and the CuTe headers of the
``nvidia-cutlass`` package (or ``CUTLASS_INCLUDE_DIR``), ``ptxas -v`` giving registers and spills.
The cubin is disassembled with ``nvdisasm`` (Triton's wheel) and its hot loop, the key-tile
loop, found and counted by ``bench/static_profile.py``'s parser, the method used for the Triton
kernels: instructions per iteration per warp by class, and non-matrix instructions per 1,024
MACs per warp, ``(instructions - matrix) / (kBlockM * kBlockN * 2D / warps / 1024)``.

The kernel's loop body holds every tile kind behind forward branches (far-low, band and
far-high logits, the edge mask, the load of the next K tile), so one iteration runs a path
through it, not all of it. Three figures per unit: the whole body (every path; what the Triton
report calls the loop), and the shortest and longest paths from the loop head to its back edge
through the body's forward branches (predicated instructions count as issued). A far tile
without a mask runs at least the shortest path: if that misses a target, the far tiles do.
Nothing is timed.

The backward units ``bwd_*.cu`` (``--direction bwd``) hold three kernels each; the dQ and
the dK/dV kernel are profiled separately, each from its own section of the cubin and its own
``ptxas -v`` entry. Each walks its tiles in four loops, each compiled for one tile kind
(csrc/cuda/flash_bwd.cuh marks them ``// hot loop: <kind>``): masked, far-low, band, far-high;
a loop is named by the source line of its back edge (``nvdisasm -gi``). MACs per iteration:
``BM·BN·3D`` in the dQ kernel (S, dP, dQ), ``BM·BN·4D`` in the dK/dV kernel (S, dP, dV, dK).
The band and masked loops gather their tile's bias in an inner loop of ``BM·BN / threads``
iterations per thread, not unrolled: their path figures count its body that many times. The
shortest path of a loop skips every forward branch it can (the load of the next tile, where the
loop holds one); the longest takes them. Every iteration but the last of a walk loads the next
tile, so the verdicts are on the longest path, the figure an iteration issues (targets, sm_90
bf16: far loops as FAR_TARGETS_BWD, band loops at most 2.5 times the kernel's larger far
figure); the shortest path is reported beside it.

    python bench/static_profile_cute.py                # sm_90, the four forward units
    python bench/static_profile_cute.py --arch 90 80
    python bench/static_profile_cute.py --direction bwd   # the four backward units
    python bench/static_profile_cute.py --report bench/results/static_cute_sm90.json

Writes ``bench/results/static_cute_sm<arch>.json`` and ``.md``, or ``static_cute_bwd_sm<arch>``
for the backward (``--out-dir``).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "static_profile", os.path.join(REPO, "bench", "static_profile.py"))
sp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("static_profile", sp)  # dataclasses look their module up there
_spec.loader.exec_module(sp)

UNITS_GLOB = os.path.join(REPO, "csrc", "cuda", "fwd_*.cu")
BWD_UNITS_GLOB = os.path.join(REPO, "csrc", "cuda", "bwd_*.cu")
_DEFINE = re.compile(
    r"^HDAF_(?:CUTE_)?DEFINE_(FWD|BWD)\((\w+), ([\w:]+), (\d+), (\d+), (\d+), (\d+)\)", re.M)
#: The backward's kernels with a hot loop: (name in the mangled symbol, static_profile MAC kind).
BWD_KERNELS = (("dq_kernel", "dq"), ("dkdv_kernel", "dkdv"))
DTYPES = {"__nv_bfloat16": "bf16", "__half": "fp16"}
#: The forward's key-tile loops, in source (and address) order: the unmasked far-low, band and
#: far-high runs, then the masked tiles.
FWD_LOOPS = ("far_lo", "band", "far_hi", "masked")
#: The sm_90 bf16 forward targets for far tiles (D=64, D=128), per 1,024 MACs per warp; the band
#: loop's target is BAND_FACTOR times the far loops' figure.
FAR_TARGETS = {64: 2.0, 128: 1.7}
#: The backward's sm_90 bf16 targets for its far loops (shortest path), per 1,024 MACs per warp;
#: a band loop's target is BAND_FACTOR times its kernel's (larger) far figure.
FAR_TARGETS_BWD = {"dq_kernel": {64: 1.8, 128: 1.5}, "dkdv_kernel": {64: 1.6, 128: 1.3}}
BAND_FACTOR = 2.5
BWD_SOURCE = os.path.join(REPO, "csrc", "cuda", "flash_bwd.cuh")
_HOT_MARK = re.compile(r"// hot loop: ([\w-]+)")
_GATHER_MARK = "// bias gather"
_LINE = re.compile(r'"([^"]+)", line (\d+)')


def unit_config(path: str) -> dict:
    """Direction, dtype, head dim and tile configuration of one instantiation unit, from its
    HDAF_CUTE_DEFINE_FWD / _BWD line."""
    with open(path) as f:
        m = _DEFINE.search(f.read())
    if m is None:
        raise ValueError(f"{path}: no HDAF_CUTE_DEFINE_FWD / _BWD line")
    cfg = dict(unit=os.path.basename(path), dtype=DTYPES[m[2]], D=int(m[4]), BLOCK_M=int(m[5]),
               BLOCK_N=int(m[6]), num_warps=int(m[7]))
    if m[1] == "BWD":
        cfg["direction"] = "bwd"
    return cfg


def split_functions(text: str) -> Dict[str, str]:
    """An nvdisasm listing cut into its functions' sections: mangled name -> listing (which
    static_profile.parse_sass reads as its first function)."""
    out: Dict[str, List[str]] = {}
    name = None
    for line in text.splitlines():
        m = sp._SECTION.match(line)
        if m:
            name = m.group(1)
            out[name] = []
        if name is not None:
            out[name].append(line)
    return {k: "\n".join(v) + "\n" for k, v in out.items()}


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)'")


def parse_ptxas_entries(log: str) -> Dict[str, Optional[dict]]:
    """Per kernel (mangled name) the registers and spills of a ``ptxas -v`` log."""
    marks = [(m.start(), m.group(1)) for m in _PTXAS_ENTRY.finditer(log)]
    return {name: sp.parse_ptxas_log(log[start:(marks[n + 1][0] if n + 1 < len(marks) else None)])
            for n, (start, name) in enumerate(marks)}


def path_spans(instrs: Sequence, labels: Dict[str, int],
               loop: Tuple[int, int]) -> Optional[dict]:
    """Shortest and longest paths (non-matrix and matrix instructions) from the first instruction
    of a loop body to its back edge, through its forward branches; a branch out of the body ends
    that path (it leaves the loop). None when no path reaches the back edge."""
    body = [i for i in instrs if loop[0] <= i.addr <= loop[1]]
    at = {i.addr: n for n, i in enumerate(body)}
    # Walk backwards: best[n] = (min non-matrix, its matrix, max non-matrix, its matrix) from n.
    best: List[Optional[Tuple[int, int, int, int]]] = [None] * (len(body) + 1)
    for n in range(len(body) - 1, -1, -1):
        i = body[n]
        is_matrix = sp.classify(i.opcode) in sp.MATRIX
        here = (0 if is_matrix else 1, 1 if is_matrix else 0)
        if n == len(body) - 1:
            best[n] = (here[0], here[1], here[0], here[1])
            continue
        succ = []
        if i.base == "BRA":
            t = labels.get(i.target)
            if t is not None and i.addr < t <= loop[1]:
                succ.append(at[t])
            if i.pred:
                succ.append(n + 1)
        elif i.base != "EXIT":
            succ.append(n + 1)
        reach = [best[s] for s in succ if best[s] is not None]
        if not reach:
            continue
        lo = min(reach, key=lambda r: (r[0], -r[1]))
        hi = max(reach, key=lambda r: (r[2], r[3]))
        best[n] = (here[0] + lo[0], here[1] + lo[1], here[0] + hi[2], here[1] + hi[3])
    if best[0] is None:
        return None
    return dict(shortest=dict(non_matrix=best[0][0], matrix=best[0][1]),
                longest=dict(non_matrix=best[0][2], matrix=best[0][3]))


def profile_unit_sass(text: str, cfg: dict, kind: str = "fwd",
                      loop_kinds: Optional[Sequence[str]] = None) -> List[dict]:
    """The hot loops of one kernel's SASS with the whole-body and per-path figures; kind is
    static_profile's MAC formula (fwd, dq, dkdv); loop_kinds names the loops when as many are
    found (else loop0, loop1, ...)."""
    config = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    rows = sp.profile_sass(text, kind, config, cfg["D"], cfg["D"], loop_kinds=loop_kinds)
    instrs, labels = sp.parse_sass(text)
    kmacs_per_warp = None
    for row in rows:
        loop = (int(row["first"], 16), int(row["last"], 16))
        kmacs_per_warp = row["macs"] / cfg["num_warps"] / 1024
        spans = path_spans(instrs, labels, loop)
        if spans is not None:
            for name, s in spans.items():
                s["non_matrix_per_kmac"] = round(s["non_matrix"] / kmacs_per_warp, 3)
        row["paths"] = spans
    return rows


def hot_loop_lines(source: str = BWD_SOURCE) -> Dict[int, str]:
    """Source line -> tile kind of the loops marked ``// hot loop: <kind>``, and "gather" for the
    band and masked tiles' bias gather (``// bias gather``)."""
    with open(source) as f:
        out = {}
        for n, line in enumerate(f, 1):
            m = _HOT_MARK.search(line)
            if m:
                out[n] = m.group(1)
            elif _GATHER_MARK in line:
                out[n] = "gather"
        return out


def label_bwd_loops(text: str, rows: List[dict], marks: Dict[int, str], trips: int) -> None:
    """Names each hot loop of a backward kernel by the source line of its back edge (the last
    line record before it), and scales its path figures by the bias gather it holds (an inner
    loop whose back edge is on a ``// bias gather`` line): its body counts ``trips`` times, not
    once."""
    instrs, labels = sp.parse_sass(text)
    # Per instruction, the marked flash_bwd.cuh lines among the line records in force (the
    # inlined function's line, then each "inlined at" line out to the kernel's; a record holds
    # until the next one).
    mark_at: Dict[int, List[str]] = {}
    chain: List[str] = []
    fresh = True
    for line in text.splitlines():
        if line.lstrip().startswith("//##"):
            if fresh:
                chain, fresh = [], False
            chain += [marks[int(n)] for f, n in _LINE.findall(line)
                      if f.endswith("flash_bwd.cuh") and int(n) in marks]
            continue
        m = sp._INSTR.match(line)
        if m:
            mark_at[int(m.group(1), 16)] = chain
            fresh = True
    for row in rows:
        first, last = int(row["first"], 16), int(row["last"], 16)
        hot = [k for k in mark_at.get(last, []) if k != "gather"]
        row["label"] = hot[0] if hot else row["label"]
        inner = [(labels[i.target], i.addr) for i in instrs
                 if i.base == "BRA" and i.target in labels
                 and first < labels[i.target] <= i.addr < last
                 and "gather" in mark_at.get(i.addr, [])]
        body = sum(1 for i in instrs for a, b in inner if a <= i.addr <= b
                   and sp.classify(i.opcode) not in sp.MATRIX)
        row["inner_loop"] = dict(non_matrix=body, iterations=trips) if inner else None
        paths = row.get("paths")
        if inner and paths:
            kmacs = row["macs"] / row["num_warps_"] / 1024
            for s in paths.values():
                s["non_matrix"] += (trips - 1) * body
                s["non_matrix_per_kmac"] = round(s["non_matrix"] / kmacs, 3)
        row.pop("num_warps_", None)


def _cutlass_include() -> str:
    cands = [os.environ["CUTLASS_INCLUDE_DIR"]] if os.environ.get("CUTLASS_INCLUDE_DIR") else []
    spec = importlib.util.find_spec("cutlass_library")
    cands += [os.path.join(loc, "source", "include")
              for loc in ((spec.submodule_search_locations or []) if spec else [])]
    for d in cands:
        if os.path.isfile(os.path.join(d, "cute", "tensor.hpp")):
            return d
    raise SystemExit("the CuTe headers were not found: pip install nvidia-cutlass, or set "
                     f"CUTLASS_INCLUDE_DIR (looked in: {cands or 'nothing'})")


def _nvcc() -> str:
    for cand in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), shutil.which("nvcc")):
        if cand and os.path.isfile(cand):
            return cand
    raise SystemExit("nvcc not found: put it on PATH or set CUDA_HOME")


def compile_unit(path: str, arch: int, cutlass: str, dump_sass: Optional[str]) -> dict:
    cfg = unit_config(path)
    row = dict(cfg, arch=arch)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "unit.cubin")
        cmd = [_nvcc(), "-cubin", f"-arch=sm_{arch}", "-O3", "--expt-relaxed-constexpr",
               "-lineinfo", "-Xptxas", "-v", f"-I{os.path.join(REPO, 'csrc', 'include')}",
               f"-I{cutlass}", path, "-o", cubin]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            row["error"] = proc.stderr.strip()[-2000:]
            return row
        log = proc.stderr + proc.stdout
        with open(cubin, "rb") as f:
            text = sp.disassemble(f.read())
    row["compile_s"] = round(time.time() - t0, 1)
    if dump_sass:
        os.makedirs(dump_sass, exist_ok=True)
        with open(os.path.join(dump_sass, f"{cfg['unit']}.sm_{arch}.sass"), "w") as f:
            f.write(text)
    functions, usage = split_functions(text), parse_ptxas_entries(log)
    if cfg.get("direction") != "bwd":
        # the unit also holds the split-key combine kernel (no MMA, no hot loop)
        names = [n for n in functions if "fwd_kernel" in n]
        if len(names) != 1:
            row["error"] = f"{len(names)} functions named fwd_kernel"
            return row
        row["ptxas"] = usage.get(names[0])
        row["loops"] = profile_unit_sass(functions[names[0]], cfg, "fwd", FWD_LOOPS)
        return row
    row["kernels"] = []
    for kernel, kind in BWD_KERNELS:
        names = [n for n in functions if kernel in n]
        if len(names) != 1:
            row["kernels"].append(dict(kernel=kernel, error=f"{len(names)} functions named so"))
            continue
        loops = profile_unit_sass(functions[names[0]], cfg, kind)
        for lp in loops:
            lp["num_warps_"] = cfg["num_warps"]
        label_bwd_loops(functions[names[0]], loops, hot_loop_lines(),
                        cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"]))
        row["kernels"].append(dict(kernel=kernel, kind=kind, ptxas=usage.get(names[0]),
                                   loops=loops))
    return row


def provenance(argv: Sequence[str], cutlass: str) -> dict:
    nvcc = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout
    nvcc = [line.strip() for line in nvcc.splitlines() if "release" in line]
    version = ""
    ver_h = os.path.join(cutlass, "cutlass", "version.h")
    if os.path.isfile(ver_h):
        with open(ver_h) as f:
            parts = dict(re.findall(r"#define CUTLASS_(MAJOR|MINOR|PATCH) (\d+)", f.read()))
        version = ".".join(parts.get(k, "?") for k in ("MAJOR", "MINOR", "PATCH"))
    return dict(
        command="python bench/static_profile_cute.py " + " ".join(argv),
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=dict(platform=platform.platform(), cores=os.cpu_count()),
        versions=dict(python=platform.python_version(), nvcc=nvcc[-1] if nvcc else "",
                      cutlass=version),
        git_commit=sp._git("rev-parse", "HEAD"),
        sources_modified=bool(sp._git("status", "--porcelain", "--", "csrc/cuda")),
    )


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def fwd_verdicts(row: dict, arch: int) -> Dict[str, Tuple[Optional[float], str]]:
    """Per loop label of one forward unit: (target, verdict) from the whole-body figure (each
    loop runs one tile kind, so its whole body is what a tile of that kind issues, the next
    tile's prefetch included). Far loops: FAR_TARGETS (sm_90 bf16 only); band: BAND_FACTOR times
    the larger far figure; a hot loop must not spill and must issue only HMMA.16816."""
    out: Dict[str, Tuple[Optional[float], str]] = {}
    far_target = FAR_TARGETS.get(row["D"]) if (arch == 90 and row["dtype"] == "bf16") else None
    loops = {lp["label"]: lp for lp in row.get("loops") or []}
    far = [loops[k]["non_matrix_per_kmac"] for k in ("far_lo", "far_hi") if k in loops]
    for label, lp in loops.items():
        target = None
        if far_target is not None:
            if label in ("far_lo", "far_hi"):
                target = far_target
            elif label == "band" and far:
                target = round(BAND_FACTOR * max(far), 2)
        x = lp["non_matrix_per_kmac"]
        issues = []
        if lp.get("spill_ld") or lp.get("spill_st"):
            issues.append(f"{lp['spill_ld']} LDL / {lp['spill_st']} STL in the loop")
        if target is None:
            verdict = "; ".join(issues) or "–"
        elif x <= target and not issues:
            verdict = "met"
        else:
            verdict = "missed" + (f" by {x - target:.2f}" if x > target else "") + \
                ("" if not issues else ": " + "; ".join(issues))
        out[label] = (target, verdict)
    return out


def render_markdown(doc: dict) -> str:
    arch = doc["arch"]
    lines = [f"# CuTe forward, static profile, sm_{arch}", "",
             f"`{doc['command']}` ({doc['date_utc']}, commit {doc['git_commit'][:10]}"
             f"{', csrc/cuda modified' if doc.get('sources_modified') else ''}; "
             f"{doc['versions']['nvcc']}, CUTLASS {doc['versions']['cutlass']}). "
             "The forward kernel's key-tile loops, one per tile kind (unmasked far-low, band, "
             "far-high, then the masked tiles), per iteration (one key tile) per warp; "
             "non-matrix instructions per 1,024 MACs per warp for the whole loop body and for "
             "the shortest and longest paths through it (the body's one forward branch skips "
             "the next tile's prefetch at the last tile). Registers and spills are the kernel's "
             "(ptxas -v), LDL/STL the loop's. Nothing is timed.", "",
             "| unit | tile (M×N, warps) | regs | spill (B) | loop | body instr. | HMMA "
             "| LDL/STL | whole body | shortest path | longest path | target | verdict |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        tile = f"{r['BLOCK_M']}×{r['BLOCK_N']}, {r['num_warps']} w"
        if r.get("error"):
            lines.append(f"| {r['unit']} | {tile} | compile error | | | | | | | | | | |")
            continue
        p = r.get("ptxas") or {}
        spill = p.get("spill_stores", 0) + p.get("spill_loads", 0) if p else None
        verdicts = fwd_verdicts(r, arch)
        for lp in r.get("loops") or []:
            paths = lp.get("paths") or {}
            short = (paths.get("shortest") or {}).get("non_matrix_per_kmac")
            long_ = (paths.get("longest") or {}).get("non_matrix_per_kmac")
            target, verdict = verdicts.get(lp["label"], (None, "–"))
            lines.append(
                f"| {r['unit']} | {tile} | {p.get('registers', '–')} | "
                f"{'–' if spill is None else spill} | {lp['label']} | {lp['instructions']} | "
                f"{lp['matrix']} | {lp.get('spill_ld', 0)}/{lp.get('spill_st', 0)} | "
                f"{_fmt(lp['non_matrix_per_kmac'])} | {_fmt(short)} | {_fmt(long_)} | "
                f"{'–' if target is None else f'≤ {target}'} | {verdict} |")
    return "\n".join(lines) + "\n"


def bwd_issued(lp: dict) -> Optional[float]:
    """The figure one iteration of a backward hot loop issues, per 1,024 MACs per warp: its
    longest path (the load of the next tile taken, as every iteration but a walk's last takes
    it; the bias gather counted as often as it runs)."""
    return ((lp.get("paths") or {}).get("longest") or {}).get("non_matrix_per_kmac")


def _bwd_targets(arch: int, r: dict, k: dict) -> Dict[str, Optional[float]]:
    """Target per loop label of one kernel (sm_90 bf16 only): far loops FAR_TARGETS_BWD, the
    band loop BAND_FACTOR times the kernel's larger far figure (bwd_issued)."""
    if arch != 90 or r["dtype"] != "bf16":
        return {}
    far = FAR_TARGETS_BWD.get(k["kernel"], {}).get(r["D"])
    got = [bwd_issued(lp)
           for lp in k.get("loops") or [] if lp["label"] in ("far-low", "far-high")]
    got = [g for g in got if g is not None]
    out = {"far-low": far, "far-high": far}
    if got:
        out["band"] = round(BAND_FACTOR * max(got), 2)
    return out


def render_markdown_bwd(doc: dict) -> str:
    arch = doc["arch"]
    lines = [f"# CUDA backward, static profile, sm_{arch}", "",
             f"`{doc['command']}` ({doc['date_utc']}, commit {doc['git_commit'][:10]}"
             f"{', csrc/cuda modified' if doc.get('sources_modified') else ''}; "
             f"{doc['versions']['nvcc']}, CUTLASS {doc['versions']['cutlass']}). "
             "Hot loops, one per tile kind (csrc/cuda/flash_bwd.cuh, `// hot loop:`): the dQ "
             "kernel's key-tile loops (S, dP, dQ per tile) and the dK/dV kernel's query-tile "
             "loops (S, dP, dV, dK), per iteration per warp; non-matrix instructions per 1,024 "
             "MACs per warp for the whole loop body and for the shortest and longest paths "
             "through it (the shortest skipping every forward branch it can, the load of the "
             "next tile included where the loop branches around it). Band and masked loops "
             "include their bias gather, an inner loop counted as many times as it runs. "
             "Verdicts are on the longest path, what an iteration issues (every iteration but a "
             "walk's last loads the next tile); targets: sm_90 bf16, far loops as the issue sets "
             "them, band loops 2.5 times the kernel's larger far figure. Nothing is timed.", "",
             "| unit | kernel | loop | tile (M×N, warps) | regs | spill (B) | LDL/STL in loop "
             "| body instr. | HMMA | whole body | shortest path | longest path | target "
             "| verdict |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        tile = f"{r['BLOCK_M']}×{r['BLOCK_N']}, {r['num_warps']} w"
        if r.get("error"):
            lines.append(f"| {r['unit']} | | | {tile} | compile error | | | | | | | | | |")
            continue
        for k in r.get("kernels") or []:
            if k.get("error"):
                lines.append(f"| {r['unit']} | {k['kernel']} | | {tile} | {k['error']} "
                             "| | | | | | | | | |")
                continue
            p = k.get("ptxas") or {}
            spill = p.get("spill_stores", 0) + p.get("spill_loads", 0) if p else None
            targets = _bwd_targets(arch, r, k)
            for lp in k.get("loops") or []:
                paths = lp.get("paths") or {}
                short = (paths.get("shortest") or {}).get("non_matrix_per_kmac")
                long_ = (paths.get("longest") or {}).get("non_matrix_per_kmac")
                target = targets.get(lp["label"])
                verdict = "–"
                if target is not None and long_ is not None:
                    verdict = "met" if long_ <= target else f"missed by {long_ - target:.2f}"
                lines.append(
                    f"| {r['unit']} | {k['kernel']} | {lp['label']} | {tile} | "
                    f"{p.get('registers', '–')} | {'–' if spill is None else spill} | "
                    f"{lp['spill_ld']}/{lp['spill_st']} | {lp['instructions']} | {lp['matrix']} | "
                    f"{_fmt(lp['non_matrix_per_kmac'])} | {_fmt(short)} | {_fmt(long_)} | "
                    f"{'–' if target is None else f'≤ {target}'} | {verdict} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", choices=(80, 90), default=[90])
    p.add_argument("--direction", choices=("fwd", "bwd"), default="fwd",
                   help="the forward units (default) or the backward units")
    p.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--dump-sass", metavar="DIR", help="also write each unit's SASS there")
    p.add_argument("--report", metavar="JSON", help="print the markdown of a written JSON only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            doc = json.load(f)
        bwd = any("kernels" in r for r in doc["rows"])
        print((render_markdown_bwd if bwd else render_markdown)(doc), end="")
        return 0
    cutlass = _cutlass_include()
    meta = provenance(argv, cutlass)
    bwd = args.direction == "bwd"
    units = sorted(glob.glob(BWD_UNITS_GLOB if bwd else UNITS_GLOB))
    os.makedirs(args.out_dir, exist_ok=True)
    for arch in args.arch:
        t0 = time.time()
        rows = [compile_unit(u, arch, cutlass, args.dump_sass) for u in units]
        doc = dict(arch=arch, **meta, wall_s=round(time.time() - t0, 1), rows=rows)
        base = os.path.join(args.out_dir, f"static_cute_{'bwd_' if bwd else ''}sm{arch}")
        with open(base + ".json", "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        with open(base + ".md", "w") as f:
            f.write((render_markdown_bwd if bwd else render_markdown)(doc))
        print(f"wrote {base}.json and .md ({doc['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
