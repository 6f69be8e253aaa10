"""Static machine-code profile of the Triton kernels for sm_90 (and sm_80), without a GPU.

What it measures: each kernel launch that ``hdaf.kernels.delta_attention`` makes for the
delta-attention forward and backward (taken from the launchers themselves, under
``capture_launches``) is compiled ahead of time for a ``GPUTarget`` at every block configuration
of its autotune list, specialised as a real launch is (``tt.divisibility`` on 16-byte multiples,
stride-1 arguments as constexprs). The cubin is disassembled with the wheel's ``nvdisasm`` and
its hot loops (innermost backward branches before the final ``EXIT`` that contain a matrix
instruction, labelled with the launch's ``loop_kinds``) are counted: static instructions per
iteration per warp, by class, and the non-matrix instructions per 1,024 MACs per warp
(``(body - matrix) / (MACs per iteration / num_warps / 1024)``). Per kernel: registers and spills
(ptxas log) and shared memory. This is a static count, nothing is timed: every instruction
of a loop body counts, including a masked path that a forward branch skips in most iterations
(reported apart as ``skippable``). Integer counts include the uniform-datapath forms (UIADD3...).

Shape (scenario "train"): B=4, H=16, T=4096, L=U=64 (R=129), P shared by the heads, no padding
mask, no window, scale = D**-0.5, bf16 and fp16, D = Dk = Dv in {64, 128}. Two more scenarios
compile the launches users meet elsewhere (bf16, the same L, U, P and D):

* ``decode_g1/g4/g8``: one decoding step, B=4, H=32 query heads over H/G key/value heads,
  Tq=1 against Tk=8192 cached keys, planned for a 132-multiprocessor GPU (H100/H200), so the
  split-key rule is the one such a GPU gets. For each, the K/V bytes the launch reads per
  generated token, against one read of the cache (target: 1.00 ± 5 %), counted from its grid:
  every program reads every key tile of its key range once (no window, no padding here).
* ``varlen``: a packed batch of sequences of 4096, 2048, 1024 and 1000 tokens (self-attention),
  H=16 over 4 key/value heads, forward and backward.

    python bench/static_profile.py                 # sm_90 and sm_80, every configuration
    python bench/static_profile.py --quick         # first configuration, bf16, D=64, sm_90
    python bench/static_profile.py --scenarios train --kernels fwd   # the training forward
    python bench/static_profile.py --arch 90 --jobs 2 --dump-sass /tmp/sass
    python bench/static_profile.py --report bench/results/static_sm90.json   # markdown only

Writes ``bench/results/static_sm<arch>.json`` and ``.md`` (``--out-dir``). A configuration that
fails to compile is an error row, not a crash. ``TRITON_INTERPRET`` is unset: compiles need the
real compiler; no GPU is needed or used.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(B=4, H=16, T=4096, L=64, U=64)
#: The launch shapes profiled, by scenario (see the module docstring).
SCENARIOS = {
    "train": dict(SHAPE, Hkv=16, Tq=4096),
    "decode_g1": dict(B=4, H=32, Hkv=32, T=8192, Tq=1, L=64, U=64),
    "decode_g4": dict(B=4, H=32, Hkv=8, T=8192, Tq=1, L=64, U=64),
    "decode_g8": dict(B=4, H=32, Hkv=4, T=8192, Tq=1, L=64, U=64),
    "varlen": dict(lengths=(4096, 2048, 1024, 1000), H=16, Hkv=4, L=64, U=64),
}
#: Multiprocessors the decoding launches are planned for (H100 SXM / H200).
MULTIPROCESSORS = 132
#: K/V bytes per generated token over one read of the cache: 1 ± this.
KV_TRAFFIC_TOLERANCE = 0.05
KINDS = ("fwd", "dkdv", "dq")
KERNEL_NAMES = {"fwd": "forward (fwd)", "dkdv": "dK/dV (dkdv)", "dq": "dQ (dq)"}
#: sm_90, bf16: (far tiles, band tiles) non-matrix instructions per 1,024 MACs per warp.
TARGETS = {"fwd": (2.4, 4.0), "dkdv": (1.6, 3.5), "dq": (1.8, 4.0)}
MAX_SPILL_BYTES = 64

# ----------------------------------------------------------------------------------------------
# SASS: parsing, loops, classes
# ----------------------------------------------------------------------------------------------

CLASSES = ("wgmma", "mma_sync", "ex2", "mufu", "fp32", "convert", "integer", "global", "shared",
           "local", "barrier", "other")
MATRIX = ("wgmma", "mma_sync")
_OPS = {
    "wgmma": {"HGMMA", "WGMMA", "QGMMA", "IGMMA", "BGMMA"},
    "mma_sync": {"HMMA", "IMMA", "DMMA", "BMMA"},
    "fp32": {"FADD", "FMUL", "FFMA", "FMNMX", "FMNMX3", "FSEL", "FSET", "FSETP", "FCHK",
             "FSWZADD", "FRND", "FADD2", "FMUL2", "FFMA2"},
    "convert": {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP"},
    # uniform-datapath forms (UIADD3, ULOP3, ...) are matched with their U stripped
    "integer": {"IMAD", "IADD3", "IADD", "IMUL", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA",
                "ISETP", "IMNMX", "SEL", "IABS", "POPC", "FLO", "BREV", "PRMT", "BMSK", "SGXT",
                "VIADD", "VIMNMX", "IDP", "PLOP3"},
    "global": {"LDG", "STG", "LDGSTS", "RED", "REDG", "ATOM", "ATOMG", "LD", "ST", "UTMALDG",
               "UTMASTG", "UTMAREDG", "UTMAPF", "UBLKCP", "UBLKRED", "UBLKPF"},
    "shared": {"LDS", "STS", "LDSM", "STSM", "ATOMS"},
    "local": {"LDL", "STL"},
    "barrier": {"BAR", "SYNCS", "WARPGROUP", "WARPSYNC", "DEPBAR", "LDGDEPBAR", "MEMBAR", "FENCE",
                "ERRBAR", "ARRIVES"},
}

# "/*01d0*/  @!P0 BRA `(.L_x_1) ;": address, optional predicate, opcode with modifiers, operands
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:(@!?U?P[T0-9]+)\s+)?"
                    r"([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^([.$\w]+):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")
_SECTION = re.compile(r"^//-+ \.text\.(\S+)")


@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. "MUFU.EX2", "HGMMA.64x64x16.F32.BF16"
    operands: str
    pred: str = ""

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def target(self) -> Optional[str]:
        m = _TARGET.search(self.operands)
        return m.group(1) if m else None


def parse_sass(text: str) -> Tuple[List[Instr], Dict[str, int]]:
    """Instructions and label addresses of the first function of an ``nvdisasm`` listing
    (``-c``, with or without ``-gi``: comment lines are skipped)."""
    instrs: List[Instr] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []  # labels waiting for the address of the next instruction
    sections = 0
    for line in text.splitlines():
        if _SECTION.match(line):
            sections += 1
            if sections > 1:
                break  # one kernel per cubin; later sections would reuse addresses
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending.clear()
            instrs.append(Instr(addr, m.group(3), m.group(4).strip(), m.group(2) or ""))
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
    return instrs, labels


def classify(opcode: str) -> str:
    """The class of one SASS opcode (one of CLASSES)."""
    parts = opcode.split(".")
    base = parts[0]
    if base == "MUFU":
        return "ex2" if parts[1:2] == ["EX2"] else "mufu"
    for cls, ops in _OPS.items():
        if base in ops:
            return cls
    if base.startswith("U") and base[1:] in _OPS["integer"]:
        return "integer"
    return "other"


def find_loops(instrs: Sequence[Instr], labels: Dict[str, int]) -> List[Tuple[int, int]]:
    """Hot loops as (first, last) addresses, in address order: backward branches (``BRA`` to an
    address at or before itself) placed before the last ``EXIT`` — after it sit the
    self-branch tail and out-of-line retry paths that jump back into the body — whose body holds
    a matrix instruction (which drops barrier spin-waits) and that hold no other such loop (the
    dK/dV kernel's walk over the query heads of a group holds the tile loops; it is not hot)."""
    exits = [i.addr for i in instrs if i.base == "EXIT"]
    last_exit = max(exits) if exits else float("inf")
    loops = set()
    for i in instrs:
        if i.base == "BRA" and i.target in labels and labels[i.target] <= i.addr < last_exit:
            loops.add((labels[i.target], i.addr))
    matrix_at = [i.addr for i in instrs if classify(i.opcode) in MATRIX]
    with_matrix = [lp for lp in loops if any(lp[0] <= a <= lp[1] for a in matrix_at)]
    return sorted(lp for lp in with_matrix
                  if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in with_matrix))


def loop_counts(instrs: Sequence[Instr], labels: Dict[str, int],
                loop: Tuple[int, int]) -> Dict[str, int]:
    """Instructions of one loop body [first, last] by class, its total, matrix and spill ld/st,
    and how many of them a forward branch inside the body can jump over (``skippable``: a
    masked path, say, that most iterations do not run; a branch out of the loop is an exit)."""
    body = [i for i in instrs if loop[0] <= i.addr <= loop[1]]
    counts = Counter(classify(i.opcode) for i in body)
    out = {c: counts.get(c, 0) for c in CLASSES}
    out["instructions"] = len(body)
    out["matrix"] = sum(out[c] for c in MATRIX)
    out["spill_ld"] = sum(1 for i in body if i.base == "LDL")
    out["spill_st"] = sum(1 for i in body if i.base == "STL")
    jumps = [(i.addr, labels[i.target]) for i in body if i.base == "BRA" and i.target in labels]
    jumps = [(a, t) for a, t in jumps if a < t <= loop[1]]
    out["skippable"] = sum(1 for i in body if any(a < i.addr < t for a, t in jumps))
    return out


def macs_per_iteration(kind: str, block_m: int, block_n: int, dk: int, dv: int) -> int:
    """Multiply-accumulates of one loop iteration (one tile) of a program."""
    if kind == "fwd":  # S = Q·Kᵀ, O += P·V
        return block_m * block_n * (dk + dv)
    if kind == "dkdv":  # S, dV += Pᵀ·dO, dP = dO·Vᵀ, dK += dSᵀ·Q
        return 2 * block_m * block_n * (dk + dv)
    if kind == "dq":  # S, dP = dO·Vᵀ, dQ += dS·K
        return block_m * block_n * (2 * dk + dv)
    raise ValueError(f"no MAC formula for kernel kind {kind!r}")


def non_matrix_per_kmac(instructions: int, matrix: int, macs: int, num_warps: int) -> float:
    """Non-matrix instructions per 1,024 MACs per warp."""
    return (instructions - matrix) / (macs / num_warps / 1024)


def label_loops(loops: Sequence, loop_kinds: Optional[Sequence[str]]) -> List[str]:
    """The launch's loop names when they match the loops found, else loop0, loop1, ..."""
    if loop_kinds and len(loop_kinds) == len(loops):
        return list(loop_kinds)
    return [f"loop{i}" for i in range(len(loops))]


def profile_sass(text: str, kind: str, config: Dict[str, int], dk: int, dv: int,
                 loop_kinds: Optional[Sequence[str]] = None,
                 loop_tiles: Optional[Sequence[Tuple[int, int]]] = None) -> List[dict]:
    """Per hot loop: its label, address range, class counts and non-matrix per 1,024 MACs.
    ``loop_tiles`` gives each loop's own (BLOCK_M, BLOCK_N) when it differs from the program's
    (the kernels' gathering loops step in narrower tiles); MACs are counted from it."""
    instrs, labels = parse_sass(text)
    loops = find_loops(instrs, labels)
    if not loop_tiles or len(loop_tiles) != len(loops):
        loop_tiles = [(config["BLOCK_M"], config["BLOCK_N"])] * len(loops)
    rows = []
    for name, lp, (bm, bn) in zip(label_loops(loops, loop_kinds), loops, loop_tiles):
        macs = macs_per_iteration(kind, bm, bn, dk, dv)
        c = loop_counts(instrs, labels, lp)
        per_kmac = [round(non_matrix_per_kmac(n, c["matrix"], macs, config["num_warps"]), 3)
                    for n in (c["instructions"], c["instructions"] - c["skippable"])]
        rows.append(dict(label=name, first=f"0x{lp[0]:04x}", last=f"0x{lp[1]:04x}", **c,
                         tile=[bm, bn], macs=macs, non_matrix_per_kmac=per_kmac[0],
                         non_matrix_per_kmac_no_skippable=per_kmac[1]))
    return rows


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")


def parse_ptxas_log(text: str) -> Optional[dict]:
    """registers, stack, spill_stores, spill_loads (bytes) from a ``ptxas -v`` log."""
    regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
    if not (regs and spill):
        return None
    return dict(registers=int(regs.group(1)), stack=int(spill.group(1)),
                spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)))


# ----------------------------------------------------------------------------------------------
# Launches and compiles (torch / triton imported here only: the parsers above need neither)
# ----------------------------------------------------------------------------------------------

_CAPTURED: dict = {}


def _kernels():
    """The launchers of this checkout (not of an installed ``hdaf``: the profile, its commit and
    its kernel digest must describe the same sources)."""
    if sys.path[:1] != [REPO]:
        sys.path.insert(0, REPO)
    from hdaf.kernels import delta_attention as K
    if not os.path.realpath(K.__file__).startswith(os.path.realpath(REPO) + os.sep):
        raise ImportError(f"hdaf was imported from {K.__file__} before the profile could put "
                          f"{REPO} first on sys.path")
    return K


def _entry_points(delta: bool):
    """(forward, backward, extra keyword arguments) to call for the profiled path: the ops
    themselves, called through their Python body (the dispatcher is not needed to record
    launches); without the delta term, the ops' use_delta=False if they take it, else the
    launcher functions behind them (None when neither does)."""
    import inspect
    K = _kernels()
    fwd, bwd = (getattr(op, "_init_fn", op) for op in (K.triton_delta_attention_forward,
                                                         K.triton_delta_attention_backward))
    if delta:
        return fwd, bwd, {}
    for f, b in ((fwd, bwd), (getattr(K, "_forward", None), getattr(K, "_backward", None))):
        try:
            if f and b and all("use_delta" in inspect.signature(x).parameters for x in (f, b)):
                return f, b, {"use_delta": False}
        except (TypeError, ValueError):
            pass
    return None


def has_no_delta_path() -> bool:
    """Whether the launcher offers the path without the delta bias (use_delta=False)."""
    return _entry_points(False) is not None


def _varlen_entry_points():
    K = _kernels()
    return tuple(getattr(op, "_init_fn", op) for op in (K.triton_delta_attention_varlen_forward,
                                                         K.triton_delta_attention_varlen_backward))


def capture(dtype_name: str, D: int, delta: bool = True, scenario: str = "train") -> list:
    """The kernel launches of one call at a scenario's shape: forward and backward ("train",
    "varlen"), or one decoding forward ("decode_*")."""
    key = (dtype_name, D, delta, scenario)
    if key in _CAPTURED:
        return _CAPTURED[key]
    import torch
    K = _kernels()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    sc = SCENARIOS[scenario]
    H, Hkv, L, U = sc["H"], sc["Hkv"], sc["L"], sc["U"]
    R = L + U + 1
    scale = D ** -0.5
    # CPU tensors from torch.empty are 64-byte aligned, as the specialisation needs
    with K.capture_launches(multiprocessors=MULTIPROCESSORS) as launches:
        if scenario == "varlen":
            if not delta:
                raise LookupError("the varlen scenario is profiled with the delta term only")
            lens = torch.tensor((0,) + tuple(sc["lengths"]))
            cu = lens.cumsum(0).to(torch.int32)
            total, longest = int(cu[-1]), max(sc["lengths"])
            q, do, out = (torch.empty(total, H, D, dtype=dtype) for _ in range(3))
            k, v = (torch.empty(total, Hkv, D, dtype=dtype) for _ in range(2))
            P = torch.empty(total, 1, R, dtype=dtype)
            lse = torch.empty(H, total, dtype=torch.float32)
            forward, backward = _varlen_entry_points()
            forward(q, k, v, P, cu, cu, longest, longest, L, U, -1, -1, scale)
            backward(do, q, k, v, P, cu, cu, longest, longest, out, lse, L, U, -1, -1, scale)
        else:
            B, T, Tq = sc["B"], sc["T"], sc["Tq"]
            q, do, out = (torch.empty(B, H, Tq, D, dtype=dtype) for _ in range(3))
            k, v = (torch.empty(B, Hkv, T, D, dtype=dtype) for _ in range(2))
            P = torch.empty(B, 1, T, R, dtype=dtype)
            lse = torch.empty(B, H, Tq, dtype=torch.float32)
            entry = _entry_points(delta)
            if entry is None:
                raise LookupError("the launcher has no path without the delta term")
            forward, backward, extra = entry
            forward(q, k, v, P, None, L, U, -1, -1, scale, **extra)
            if not scenario.startswith("decode"):
                backward(do, q, k, v, P, None, out, lse, L, U, -1, -1, scale, **extra)
    _CAPTURED[key] = [ln for ln in launches if ln.kind in KINDS]
    return _CAPTURED[key]


def kv_traffic(ln, config: Dict[str, int], scenario: str, elem: int) -> dict:
    """K/V bytes a decoding forward launch reads per generated token, from its grid: every
    program reads every key tile of its key range (its split, or all keys) once — true with no
    window and no padding, as in the decode scenarios. ``reads_of_cache`` is that over the
    bytes of one sequence's cache (Hkv·Tk·(Dk+Dv)·elem): 1 when each key/value head's cache is
    read once per step, G when it is read once per query head."""
    sc = SCENARIOS[scenario]
    kw = ln.kwargs
    grid = tuple(ln.grid(config))
    T, bn = kw["T"], config["BLOCK_N"]
    splits = grid[2] if len(grid) > 2 else 1
    if kw.get("SPLIT") and splits > 1:
        ranges = [min(T, (s + 1) * kw["SPLIT_N"]) - s * kw["SPLIT_N"] for s in range(splits)]
    else:
        ranges = [T]
    keys = sum(-(-n // bn) * bn for n in ranges)  # whole tiles
    row_bytes = (kw["DK"] + kw["DV"]) * elem
    per_token = grid[0] * grid[1] * keys * row_bytes / (sc["B"] * sc["Tq"])
    cache = sc["Hkv"] * T * row_bytes
    return dict(scenario=scenario, G=sc["H"] // sc["Hkv"], D=kw["DK"], config=config,
                grid=list(grid), splits=splits, stacked=bool(kw.get("STACK")),
                bytes_per_token=int(per_token), cache_bytes=int(cache),
                reads_of_cache=round(per_token / cache, 4))


def specialize(fn, args: tuple, kwargs: dict, target):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run builds them for these
    argument values, for ``target`` instead of the current device's."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    return signature, constexprs, attrs, options


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", "-gi", f.name], check=True,
                              capture_output=True, text=True).stdout


def ptxas_usage(ptx: str, arch: int) -> Optional[dict]:
    """Registers and spills from the wheel's ptxas, when the compile's own log was not seen."""
    sm = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        res = subprocess.run([_tool("ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}",
                              f.name, "-o", os.devnull], capture_output=True, text=True)
    return parse_ptxas_log(res.stderr + res.stdout)


def _config_dict(cfg) -> Dict[str, int]:
    bm, bn, warps, stages = cfg
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def compile_job(job: dict) -> dict:
    """Compile one (kernel, arch, dtype, D, config) and profile it; errors become error rows."""
    row = {k: job[k] for k in ("kernel", "arch", "dtype", "D", "delta", "config", "scenario")}
    t0 = time.time()
    try:
        row.update(_compile_and_profile(job))
    except Exception as e:  # one failing configuration must not stop the run
        msg = f"{type(e).__name__}: {e}".strip()
        lines = msg.splitlines()
        # ptxas failures carry the whole PTX: keep the head and the tail
        row["error"] = "\n".join(lines if len(lines) <= 6 else lines[:3] + ["..."] + lines[-3:])
    row["compile_s"] = round(time.time() - t0, 2)
    return row


def _compile_and_profile(job: dict) -> dict:
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    found = [x for x in capture(job["dtype"], job["D"], job["delta"], job["scenario"])
             if x.kind == job["kernel"]]
    if not found:
        raise LookupError(f"the launchers made no {job['kernel']!r} launch")
    ln = found[0]
    cfg = job["config"]
    target = GPUTarget("cuda", job["arch"], 32)
    kwargs = dict(ln.kwargs, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    signature, constexprs, attrs, options = specialize(ln.kernel, tuple(ln.args), kwargs, target)
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(ln.kernel, signature, constexprs, attrs),
                                  target=target, options=options.__dict__)
    usage = parse_ptxas_log(log.getvalue()) or ptxas_usage(compiled.asm["ptx"], job["arch"])
    sass = disassemble(compiled.asm["cubin"])
    if job.get("dump_sass"):
        os.makedirs(job["dump_sass"], exist_ok=True)
        with open(os.path.join(job["dump_sass"], job_name(job) + ".sass"), "w") as f:
            f.write(sass)
    D = job["D"]
    kinds = getattr(ln, "loop_kinds", None)
    K = _kernels()
    tiles = (K.loop_tile_shapes(job["kernel"], kinds, cfg["BLOCK_M"], cfg["BLOCK_N"])
             if kinds and hasattr(K, "loop_tile_shapes") else None)
    loops = profile_sass(sass, job["kernel"], cfg, D, D, kinds, tiles)
    return dict(**(usage or {}), shared=compiled.metadata.shared, loops=loops, error=None)


def job_name(job: dict) -> str:
    c = job["config"]
    scen = "" if job.get("scenario", "train") == "train" else f"_{job['scenario']}"
    return (f"{job['kernel']}{scen}_sm{job['arch']}_{job['dtype']}_d{job['D']}"
            f"{'' if job['delta'] else '_nodelta'}_{c['BLOCK_M']}x{c['BLOCK_N']}"
            f"_w{c['num_warps']}_s{c['num_stages']}")


def make_jobs(archs, dtypes, dims, deltas, quick: bool, dump_sass: Optional[str],
              scenarios: Sequence[str] = ("train",)):
    """One job per (scenario, arch, kernel, dtype, D, delta, config of the launch's autotune
    list), error rows for what could not be captured, and the decoding launches' K/V traffic.
    The decode and varlen scenarios are profiled in bf16 with the delta term."""
    jobs, errors, traffic = [], [], []
    for scenario in scenarios:
        for delta in deltas if scenario == "train" else [True]:
            for dtype in dtypes if scenario == "train" else ["bf16"]:
                for D in dims:
                    try:
                        launches = capture(dtype, D, delta, scenario)
                    except Exception as e:
                        for arch in archs:
                            errors.append(dict(kernel="*", arch=arch, dtype=dtype, D=D,
                                               delta=delta, scenario=scenario, config=None,
                                               error=f"capture: {type(e).__name__}: {e}"))
                        continue
                    for ln in launches:
                        configs = list(ln.configs)[:1] if quick else list(ln.configs)
                        for cfg in configs:
                            if scenario.startswith("decode") and ln.kind == "fwd":
                                traffic.append(dict(kv_traffic(ln, _config_dict(cfg), scenario,
                                                               2), dtype=dtype))
                            for arch in archs:
                                jobs.append(dict(kernel=ln.kind, arch=arch, dtype=dtype, D=D,
                                                 delta=delta, scenario=scenario,
                                                 config=_config_dict(cfg), dump_sass=dump_sass))
    return jobs, errors, traffic


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def run_jobs(jobs: List[dict], n_procs: int) -> List[dict]:
    """Compile in a pool of fresh processes (each compile takes seconds, single-threaded)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    rows = []
    ctx = mp.get_context("spawn")  # children import triton afresh, without the interpreter
    with cf.ProcessPoolExecutor(max_workers=n_procs, mp_context=ctx,
                                initializer=_worker_init) as pool:
        futures = {pool.submit(compile_job, j): j for j in jobs}
        for n, fut in enumerate(cf.as_completed(futures), 1):
            row = fut.result()
            rows.append(row)
            status = "error" if row.get("error") else f"{row['compile_s']:.1f} s"
            print(f"[{n}/{len(jobs)}] {job_name(futures[fut])}: {status}", file=sys.stderr,
                  flush=True)
    key = {job_name(j): i for i, j in enumerate(jobs)}
    return sorted(rows, key=lambda r: key.get(job_name(dict(r, dump_sass=None)), 0))


# ----------------------------------------------------------------------------------------------
# Provenance and output
# ----------------------------------------------------------------------------------------------

def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu() -> str:
    from hdaf.training.numerics import cpu_model

    return cpu_model()


def _kernels_digest() -> str:
    """sha256 of the kernel sources as they are now (the kernels may change while a run goes)."""
    import hashlib
    h = hashlib.sha256()
    folder = os.path.join(REPO, "kernels")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def provenance(argv: Sequence[str]) -> dict:
    """Where and from what the profile was made; taken when the launches are captured."""
    import torch
    import triton
    nvdisasm = subprocess.run([_tool("nvdisasm"), "--version"], capture_output=True,
                              text=True).stdout.splitlines()
    nvdisasm = [line.strip() for line in nvdisasm if "release" in line]
    return dict(
        command="python bench/static_profile.py " + " ".join(argv),
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=dict(platform=platform.platform(), cpu=_cpu(), cores=os.cpu_count()),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      triton=triton.__version__, nvdisasm=nvdisasm[-1] if nvdisasm else ""),
        git_commit=_git("rev-parse", "HEAD"),
        kernels_modified=bool(_git("status", "--porcelain", "--", "kernels")),
        kernels_sha256=_kernels_digest(),
        shape=dict(SHAPE, R=SHAPE["L"] + SHAPE["U"] + 1, P="[B,1,T,R]", padding_mask=None,
                   window=None, scale="D**-0.5"),
        scenarios={k: {n: list(x) if isinstance(x, tuple) else x for n, x in v.items()}
                   for k, v in SCENARIOS.items()},
    )


# ----------------------------------------------------------------------------------------------
# JSON -> markdown
# ----------------------------------------------------------------------------------------------

def _fmt(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}"


def _cfg(c: Optional[dict]) -> str:
    if not c:
        return "–"
    return f"{c['BLOCK_M']}×{c['BLOCK_N']}, {c['num_warps']} w, {c['num_stages']} st"


def _hot_spills(row) -> int:
    return sum(lp["spill_ld"] + lp["spill_st"] for lp in row.get("loops") or [])


def _far(row) -> Optional[float]:
    """The worst non-matrix/1,024 MACs over a row's far loops (None when none is labelled)."""
    vals = [lp["non_matrix_per_kmac"] for lp in row.get("loops") or [] if lp["label"] == "far"]
    return max(vals) if vals else None


def _band(row) -> Optional[float]:
    vals = [lp["non_matrix_per_kmac"] for lp in row.get("loops") or [] if lp["label"] == "band"]
    return max(vals) if vals else None


def best_row(rows: Sequence[dict]) -> Tuple[Optional[dict], bool]:
    """The configuration with the lowest far-loop figure among those without hot-loop spills
    (second: whether it had to come from the spilling ones)."""
    ok = [r for r in rows if not r.get("error") and _far(r) is not None]
    clean = [r for r in ok if _hot_spills(r) == 0]
    pool = clean or ok
    if not pool:
        return None, False
    return min(pool, key=_far), not clean


def _verdict(value, limit) -> str:
    if value is None:
        return "n/a"
    return "met" if value <= limit else f"missed ({value:.2f})"


def _main_rows(doc, dtype="bf16", delta=True, scenario="train"):
    return [r for r in doc["rows"] if r["dtype"] == dtype and r.get("delta", True) == delta
            and r.get("scenario", "train") == scenario]


def render_config_tables(doc, dtype="bf16", delta=True, scenario="train") -> List[str]:
    out = []
    rows = _main_rows(doc, dtype, delta, scenario)
    where = "" if scenario == "train" else f", {scenario}"
    for kind in KINDS + tuple(sorted({r["kernel"] for r in rows} - set(KINDS))):
        for D in sorted({r["D"] for r in rows if r["kernel"] == kind}):
            sel = [r for r in rows if r["kernel"] == kind and r["D"] == D]
            if not sel:
                continue
            out += [f"### {KERNEL_NAMES.get(kind, kind)}, D={D}, {dtype}"
                    f"{'' if delta else ', no delta'}{where}", "",
                    "| config | regs | spill st/ld (B) | smem (KiB) | loop | instr/iter "
                    "| skippable | matrix | spill ld/st per iter | non-matrix / 1,024 MACs "
                    "| same, skippable left out |",
                    "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
            for r in sel:
                head = f"| {_cfg(r['config'])} "
                if r.get("error"):
                    first = r["error"].splitlines()[0][:120].replace("|", "\\|")
                    out.append(head + f"| – | – | – | compile failed: {first} | | | | | | |")
                    continue
                res = (f"| {r.get('registers', '?')} | {r.get('spill_stores', '?')}/"
                       f"{r.get('spill_loads', '?')} | {r['shared'] / 1024:.0f} ")
                loops = r["loops"] or [None]
                for i, lp in enumerate(loops):
                    left = head + res if i == 0 else "| | | | "
                    if lp is None:
                        out.append(left + "| (no hot loop found) | | | | | | |")
                        continue
                    out.append(left + f"| {lp['label']} | {lp['instructions']} "
                               f"| {lp.get('skippable', '–')} | {lp['matrix']} "
                               f"| {lp['spill_ld']}/{lp['spill_st']} "
                               f"| {lp['non_matrix_per_kmac']:.2f} "
                               f"| {_fmt(lp.get('non_matrix_per_kmac_no_skippable'))} |")
            out.append("")
    return out


def render_summary(doc) -> List[str]:
    rows = _main_rows(doc)
    out = ["## Best configuration per kernel against the targets (sm_90, bf16)", "",
           "Best = lowest non-matrix instructions per 1,024 MACs per warp on the far loops "
           "(worst far loop of a configuration) among configurations with no spill load/store "
           "in a hot loop.", "",
           "| kernel | D | best config | regs | far tiles | far target | band tiles "
           "| band target |", "|---|---:|---|---:|---:|---|---:|---|"]
    for kind in KINDS:
        far_t, band_t = TARGETS[kind]
        for D in sorted({r["D"] for r in rows if r["kernel"] == kind}):
            best, spilling = best_row([r for r in rows if r["kernel"] == kind and r["D"] == D])
            if best is None:
                out.append(f"| {KERNEL_NAMES[kind]} | {D} | none compiled / no far loop | | | "
                           f"≤ {far_t}: n/a | | ≤ {band_t}: n/a |")
                continue
            far, band = _far(best), _band(best)
            note = " (all configs spill in hot loops)" if spilling else ""
            if any(lp["mma_sync"] for lp in best["loops"]):
                note += " (mma.sync)"
            out.append(f"| {KERNEL_NAMES[kind]} | {D} | {_cfg(best['config'])}{note} "
                       f"| {best.get('registers', '?')} "
                       f"| {far:.2f} | ≤ {far_t}: {_verdict(far, far_t)} "
                       f"| {'–' if band is None else f'{band:.2f}'} "
                       f"| ≤ {band_t}: {_verdict(band, band_t)} |")
    out += other_targets([r for r in doc["rows"] if r.get("delta", True)])
    errors = [r for r in doc["rows"] if r.get("error")]
    if errors:
        out += [f"{len(errors)} configuration(s) failed to compile (error rows in the JSON): "
                + ", ".join(f"{r['kernel']} {r['dtype']} D={r['D']} {_cfg(r['config'])}"
                            for r in errors[:8]) + ("…" if len(errors) > 8 else ""), ""]
    return out


def _where(row) -> str:
    """ ", <scenario>" for a row outside the training scenario."""
    scenario = row.get("scenario", "train")
    return "" if scenario == "train" else f", {scenario}"


def other_targets(rows: Sequence[dict]) -> List[str]:
    """The targets every listed configuration must meet: no mma.sync and no spill load/store in
    a hot loop, at most MAX_SPILL_BYTES spilled per kernel."""
    lines = {"mma": "| no mma.sync (HMMA) in a hot loop |",
             "loop": "| no spill load/store in a hot loop |",
             "bytes": f"| ≤ {MAX_SPILL_BYTES} spilled bytes per kernel |"}
    for kind in KINDS:
        sel = [r for r in rows if r["kernel"] == kind and not r.get("error")]
        mma = [r for r in sel if any(lp["mma_sync"] for lp in r["loops"])]
        n_mma = sum(lp["mma_sync"] for r in mma for lp in r["loops"])
        spills = [r for r in sel if _hot_spills(r)]
        worst = max((r.get("spill_stores", 0) for r in sel), default=0)
        if not sel:
            cells = dict(mma="n/a", loop="n/a", bytes="n/a")
        else:
            cells = dict(
                mma="met" if not mma else f"missed ({n_mma} HMMA in {len(mma)} configs)",
                loop="met" if not spills else
                f"missed ({len(spills)} of {len(sel)} configs, e.g. {_cfg(spills[0]['config'])} "
                f"{spills[0]['dtype']} D={spills[0]['D']}{_where(spills[0])})",
                bytes="met" if worst <= MAX_SPILL_BYTES else
                f"missed ({worst} B{_where(max(sel, key=lambda r: r.get('spill_stores', 0)))})")
        for key in lines:
            lines[key] += f" {cells[key]} |"
    head = ("| other target (every profiled configuration and dtype) | "
            + " | ".join(KERNEL_NAMES[k] for k in KINDS) + " |")
    return ["", head, "|---" * (len(KINDS) + 1) + "|", *lines.values(), ""]


def render_kv_traffic(doc) -> List[str]:
    """The decoding launches' K/V bytes per generated token against one read of the cache."""
    rows = doc.get("kv_traffic") or []
    if not rows:
        return []
    tol = KV_TRAFFIC_TOLERANCE
    out = ["## Decoding: K/V bytes read per generated token", "",
           "One decoding step (Tq=1, Tk=8192, B=4, H=32 query heads, bf16), planned for a "
           f"{MULTIPROCESSORS}-multiprocessor GPU. Bytes counted from the launch's grid: every "
           "program reads every key tile of its key range once. Cache = one sequence's K and V "
           f"(Hkv·Tk·(Dk+Dv)·2 bytes). Target: 1.00 ± {tol:.0%} reads of the cache per token.",
           "", "| G | Hkv | D | config | grid | stacked | K/V bytes per token | cache bytes "
           "| reads of the cache | target |", "|---:|---:|---:|---|---|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["D"], r["G"])):
        ratio = r["reads_of_cache"]
        ok = "met" if abs(ratio - 1) <= tol else f"missed ({ratio:.2f})"
        hkv = SCENARIOS[r["scenario"]]["Hkv"]
        out.append(f"| {r['G']} | {hkv} | {r['D']} | {_cfg(r['config'])} "
                   f"| {'×'.join(map(str, r['grid']))} | {'yes' if r['stacked'] else 'no'} "
                   f"| {r['bytes_per_token']:,} | {r['cache_bytes']:,} | {ratio:.3f} "
                   f"| 1.00 ± {tol:.0%}: {ok} |")
    return out + [""]


def render_markdown(doc: dict) -> str:
    """The results page of one JSON file (one architecture)."""
    m, v = doc["machine"], doc["versions"]
    out = [f"# Static machine-code profile, sm_{doc['arch']}", "",
           f"`{doc['command']}` — {doc['date_utc']}, {doc.get('wall_s', 0):.0f} s wall on "
           f"{m['cpu']} ({m['cores']} cores, no GPU), {m['platform']}; torch {v['torch']}, "
           f"triton {v['triton']}, {v.get('nvdisasm', '')}; commit `{doc['git_commit'][:12]}`"
           f"{' with uncommitted kernel changes' if doc.get('kernels_modified') else ''}.", "",
           "Shape (training scenario, the tables and targets below unless a section says "
           "otherwise): B=4, H=16, T=4096, L=U=64 (R=129), P [B,1,T,R], no padding mask, no "
           "window; the decoding and packed-batch scenarios are described in their sections "
           "and in `bench/static_profile.py`. "
           "Static counts per loop iteration per warp, from the SASS of an ahead-of-time "
           "compile: every instruction of the body counts, taken or not; `skippable` = those a "
           "forward branch inside the body can jump over (e.g. a masked path); `matrix` = "
           "wgmma + mma.sync; non-matrix / 1,024 MACs = (instructions − matrix) / (MACs per "
           "iteration / warps / 1024). The targets use the full body.", ""]
    if doc["arch"] == 90:
        out += render_summary(doc) + render_kv_traffic(doc)
    out += ["## Every configuration", ""] + render_config_tables(doc)
    if any(not r.get("delta", True) for r in doc["rows"]):
        out += ["## Without the delta term", ""] + render_config_tables(doc, delta=False)
    others = sorted({r.get("scenario", "train") for r in doc["rows"]} - {"train"})
    if others:
        out += ["## Decoding and packed batches (every profiled configuration)", ""]
        for scenario in others:
            out += render_config_tables(doc, scenario=scenario)
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", choices=(80, 90), default=None,
                   help="target compute capabilities (default: 90 80; --quick: 90)")
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp16"), default=None)
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="D = Dk = Dv")
    p.add_argument("--kernels", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--scenarios", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS),
                   help="launch shapes to profile (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="first configuration of each list, bf16, D=64, sm_90")
    p.add_argument("--no-delta", action="store_true",
                   help="also profile the launcher's use_delta=False path (if it has one)")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--dump-sass", metavar="DIR", help="also write each kernel's SASS there")
    p.add_argument("--report", metavar="JSON",
                   help="print the markdown of a results file (no compile)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(render_markdown(json.load(f)), end="")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real compiles
    t0 = time.time()
    meta = provenance(argv)  # before compiling: the checkout may move on during the run
    archs = args.arch or ([90] if args.quick else [90, 80])
    dtypes = args.dtypes or (["bf16"] if args.quick else ["bf16", "fp16"])
    dims = args.head_dims or ([64] if args.quick else [64, 128])
    deltas = [True]
    if args.no_delta:
        if has_no_delta_path():
            deltas.append(False)
        else:
            print("--no-delta: the launcher has no use_delta argument; skipped", file=sys.stderr)
    jobs, rows, traffic = make_jobs(archs, dtypes, dims, deltas, args.quick, args.dump_sass,
                                    args.scenarios)
    jobs = [j for j in jobs if j["kernel"] in args.kernels]
    rows += run_jobs(jobs, max(1, args.jobs))
    wall = time.time() - t0
    os.makedirs(args.out_dir, exist_ok=True)
    for arch in archs:
        doc = dict(arch=arch, **meta, wall_s=round(wall, 1),
                   rows=[r for r in rows if r["arch"] == arch], kv_traffic=traffic)
        base = os.path.join(args.out_dir, f"static_sm{arch}")
        with open(base + ".json", "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        with open(base + ".md", "w") as f:
            f.write(render_markdown(doc))
        print(f"wrote {base}.json and .md", file=sys.stderr)
    n_err = sum(1 for r in rows if r.get("error"))
    print(f"{len(rows)} rows ({n_err} errors) in {wall:.0f} s wall", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
