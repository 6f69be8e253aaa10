#!/usr/bin/env python3
"""A small sweep of the GPU backends, forward + backward, for ``compute-sanitizer --tool memcheck``.

    python scripts/gpu_sanitizer_sweep.py                                   # cuda + triton on the GPU
    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/gpu_sanitizer_sweep.py
    python scripts/gpu_sanitizer_sweep.py --list                            # the cases, nothing run
    python scripts/gpu_sanitizer_sweep.py --device cpu --backends cpu       # dry run without a GPU
    python scripts/gpu_sanitizer_sweep.py --quick --triton-configs SPEC     # gpu_check.sh --quick

Cases (``scripts/gpu_check.sh`` runs it plain, then under memcheck): head dims 16–128 with
Dk != Dv, T in {1, 7, 63, 100, 300} (none a multiple of any tile size above 1), shared and
per-head x and w, asymmetric max_distance, windows, causal, key padding, fully masked rows and a
fully padded batch; float16, bfloat16, float32 and float64. Triton has no float64 (it runs
float32 instead); the ``cuda`` kernels are float16 / bfloat16 with Dk == Dv in {64, 128}, so a
``cuda`` run takes bfloat16 for float32 / float64 and the kernel head dim at or above max(Dk, Dv). Every output and gradient is compared with the float64
``gather`` reference on the same rounded inputs (loose tolerances: memory errors are the target
here; tests/ holds the accuracy rules). Exit status 1 on any failure or mismatch.
Only the public API is used (``hdaf.delta_attention(..., backend=...)``).

``--quick`` (``scripts/gpu_check.sh --quick`` runs it under memcheck only): three cases, each on
both backends -- causal + key padding (T=100, D=64, bfloat16), window + causal with Dk != Dv
(T=63, float16), fully masked rows with padding (T=300, Dk=128, Dv=40, float32).
``--triton-configs`` pins one Triton block configuration per kernel
(``hdaf.kernels.delta_attention.forced_configs``), so each case compiles three kernels instead of
every autotuning candidate.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

# name -> (make kwargs, delta_attention kwargs, key-padding lengths as a function of T, or None)
CONFIGS = {
    "shared_sym": (dict(R=7), dict(), None),
    "headx_asym_window": (dict(R=8, per_head_x=True), dict(max_distance=(2, 5), window=5), None),
    "headw_causal_pad": (dict(R=5, per_head_w=True), dict(causal=True),
                         lambda T: [T, max(1, T - 3)]),
    "headxw_window_lr_causal": (dict(R=9, per_head_x=True, per_head_w=True),
                                dict(max_distance=4, window=(3, 6), causal=True), None),
    # offsets 0..R-1, i sees j >= i: the padded tail of batch 1 leaves rows with no visible key
    "paper_pad_masked_rows": (dict(R=9, per_head_w=True),
                              dict(max_distance=(0, 8), window=(0, 8)), lambda T: [T, max(1, T // 2)]),
    "fully_padded_batch": (dict(R=7, per_head_x=True), dict(window=(2, 1)), lambda T: [0, T]),
    "long_window_pad": (dict(R=11), dict(max_distance=5, window=70), lambda T: [T, max(1, T - 20)]),
}
TS = (1, 7, 63, 100, 300)
DIMS = ((16, 16), (32, 24), (64, 64), (128, 128), (24, 128), (128, 40), (16, 72))
DTYPES = ("float16", "bfloat16", "float32", "float64")
# (config, T, (Dk, Dv), dtype name): the --quick sweep
QUICK_CASES = (
    ("headw_causal_pad", 100, (64, 64), "bfloat16"),
    ("headxw_window_lr_causal", 63, (32, 24), "float16"),
    ("paper_pad_masked_rows", 300, (128, 40), "float32"),
)
TOL = {"float64": 1e-8, "float32": 1e-2, "float16": 3e-2, "bfloat16": 1e-1}  # x max(1, |ref|)


def cases():
    """(config, T, (Dk, Dv), dtype name): every config at every T, dims and dtypes cycled."""
    for i, (config, T) in enumerate(itertools.product(CONFIGS, TS)):
        yield config, T, DIMS[i % len(DIMS)], DTYPES[i % len(DTYPES)]


def parse_triton_configs(spec):
    """``"fwd=64,32,4,2 dkdv=32,64,4,2 dq=64,32,4,2"`` -> forced_configs() keyword arguments."""
    out = {}
    for part in spec.replace(";", " ").split():
        kind, _, cfg = part.partition("=")
        nums = tuple(int(n) for n in cfg.split(",")) if cfg else ()
        if kind not in ("fwd", "dkdv", "dq") or len(nums) != 4:
            raise ValueError(f"--triton-configs: cannot read {part!r} (want e.g. fwd=64,32,4,2)")
        out[kind] = nums
    return out


def make_inputs(T, Dk, Dv, R, dtype, device, per_head_x=False, per_head_w=False, pad=None,
                B=2, H=3, Dr=5, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    q, k, v = rnd(B, H, T, Dk), rnd(B, H, T, Dk), rnd(B, H, T, Dv)
    x = rnd(B, H, T, Dr) if per_head_x else rnd(B, T, Dr)
    w = rnd(H, Dr, R) if per_head_w else rnd(Dr, R)
    mask = None
    if pad is not None:
        mask = (torch.arange(T)[None, :] >= torch.tensor(pad)[:, None]).to(device)
    return (q, k, v, x, w), mask


def run(backend, tensors, mask, kw, dout):
    import torch

    import hdaf

    ins = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = hdaf.delta_attention(*ins, key_padding_mask=mask, backend=backend, **kw)
    grads = torch.autograd.grad(out, ins, dout.to(out.dtype))
    return [out.detach()] + [g.detach() for g in grads]


def check_case(backend, config, T, dims, dtype_name, device):
    """None when the case passes, else a sentence saying what went wrong."""
    import torch

    dtype = getattr(torch, dtype_name)
    mk, kw, pad = CONFIGS[config]
    tensors, mask = make_inputs(T, *dims, dtype=dtype, device=device,
                                pad=pad(T) if pad else None, **mk)
    dout = torch.randn(2, 3, T, dims[1], generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(device, dtype)
    got = run(backend, tensors, mask, kw, dout)
    if device == "cuda":
        torch.cuda.synchronize()
    ref = run("gather", [t.double() for t in tensors], mask, kw, dout.double())
    for name, r, c in zip(("out", "dq", "dk", "dv", "dx", "dw"), ref, got):
        if c.shape != r.shape or c.dtype != dtype:
            return f"{name}: got {tuple(c.shape)} {c.dtype}, want {tuple(r.shape)} {dtype}"
        if not torch.isfinite(c).all():
            return f"{name}: non-finite values"
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err = (c.double() - r).abs().max().item() / scale if r.numel() else 0.0
        if err > TOL[dtype_name]:
            return f"{name}: max error {err:.2e} x max(1,|ref|) > {TOL[dtype_name]:.0e}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backends", default=None,
                    help="comma-separated; default 'cuda,triton' on cuda, 'cpu' on cpu")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--max-cases", type=int, default=None, help="run only the first N cases")
    ap.add_argument("--quick", action="store_true",
                    help=f"only the {len(QUICK_CASES)} cases of QUICK_CASES (module doc)")
    ap.add_argument("--triton-configs", default=None, metavar="SPEC",
                    help='pin Triton block configurations, e.g. "fwd=64,32,4,2 dkdv=32,64,4,2 '
                         'dq=64,32,4,2" (BLOCK_M,BLOCK_N,num_warps,num_stages per kernel)')
    args = ap.parse_args(argv)
    backends = (args.backends or ("cuda,triton" if args.device == "cuda" else "cpu")).split(",")
    forced = parse_triton_configs(args.triton_configs) if args.triton_configs else {}
    todo = list(QUICK_CASES if args.quick else cases())[: args.max_cases]
    runs = []
    for (config, T, dims, dt), backend in itertools.product(todo, backends):
        if backend == "triton" and dt == "float64":
            dt = "float32"  # Triton has no float64
        if backend == "cuda":  # the CUDA kernels' dtypes and head dims
            dt = dt if dt in ("float16", "bfloat16") else "bfloat16"
            dims = (64, 64) if max(dims) <= 64 else (128, 128)
        runs.append((backend, config, T, dims, dt))
    if args.list:
        for r in runs:
            print("{} {} T={} Dk={} Dv={} {}".format(r[0], r[4], r[2], *r[3], r[1]))
        print(f"{len(runs)} runs" + (f"; Triton configurations pinned: {forced}" if forced else ""))
        return 0

    import contextlib

    import torch

    import hdaf

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a dry run", file=sys.stderr)
        return 2
    info = hdaf.backends()
    print(f"hdaf backends: {info['available']}, torch {info['torch']}", flush=True)
    pinned = contextlib.nullcontext  # a context manager per run: forced_configs' is single-use
    if forced:
        from hdaf.kernels import delta_attention as K

        pinned = lambda: K.forced_configs(**forced)  # noqa: E731
        print(f"Triton configurations pinned: {forced}", flush=True)
    failures = 0
    t0 = time.time()
    for backend, config, T, dims, dt in runs:
        label = "{:6s} {:8s} T={:<4d} Dk={:<3d} Dv={:<3d} {}".format(backend, dt, T, *dims, config)
        try:
            with pinned() if backend == "triton" else contextlib.nullcontext():
                problem = check_case(backend, config, T, dims, dt, args.device)
        except Exception as exc:  # report every case, then fail
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        failures += problem is not None
        print(("FAIL " if problem else "ok   ") + label + (f"  -- {problem}" if problem else ""),
              flush=True)
    print(f"{len(runs)} runs, {failures} failed, {time.time() - t0:.1f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
