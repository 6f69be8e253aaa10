"""Delta attention on a GPU vs SDPA (the floor), SDPA with the materialized bias and FlexAttention.

    pytest bench/ --benchmark-only --benchmark-json=bench/results/gpu_<name>.json   # on a GPU
    python bench/report.py bench/results/gpu_<name>.json                            # the tables
    python bench/bench_delta_attention_gpu.py --precompile --quick    # fill Triton's cache first
    pytest bench/bench_delta_attention_gpu.py -m quick --benchmark-only --benchmark-json=J.json
    python bench/report_gpu.py J.json          # its tables, the headline first (J: gpu_<name>_quick)

Collected everywhere, run only where ``torch.cuda.is_available()`` (skipped otherwise).
Configurations: bf16 and fp16; B=4, H=16, Dr=64, max_distance=64 (R=129), x and w shared by the
heads; D = Dk = Dv in {64, 128}; T in {1024, 4096, 16384}; providers ``sdpa`` (no bias),
``sdpa_bias`` (SDPA given the gathered float bias), ``flex`` (FlexAttention, ``torch.compile``,
score_mod gathering P: forward only, since it refuses the backward when P requires grad),
``triton``, ``cuda``; forward and forward+backward. Sliding window: window=256 at T=16384, D=64,
``triton`` / ``cuda`` vs ``sdpa_window`` (SDPA given the boolean window mask).

The headline cases carry the ``quick`` mark (``-m quick``, what ``scripts/gpu_check.sh --quick``
runs): bf16, D in {64, 128}, T in {4096, 16384}, fwd and fwd+bwd, ``sdpa`` / ``triton`` /
``cuda`` -- 24 cases, the shortest T first, SDPA before the hdaf backends of the same shape.

Triton autotunes its block configurations on the first call of each shape, compiling every
configuration one after the other (seconds each). ``--precompile`` compiles them beforehand in
parallel processes, each running the bench's shapes with one configuration pinned
(``hdaf.kernels.delta_attention.forced_configs``). Triton keys its on-disk cache (same
``TRITON_CACHE_DIR``) by kernel source, argument specialization and options, which a pinned and an
autotuned launch of the same shape share, so the autotuner then loads the compiled kernels and
only times them. One T per (dtype, D) suffices: every bench T is a multiple of 16, which is what
the specialization sees. Configurations the autotuner prunes fail to launch there (out of
resources); that is expected and reported.

Timing: CUDA events around ``n`` back-to-back calls (``n`` sized so one round takes >= ~100 ms,
after a warm-up call), median of several rounds; ``extra_info`` holds ``ms`` (per call),
``ms_rounds``, ``iterations``, ``tflops``, ``peak_extra_bytes`` (torch.cuda.max_memory_allocated
above the level before the call) and the GPU name with the torch / triton / CUDA versions.
pytest-benchmark's own ``stats`` time whole rounds (n calls and one synchronize) on the host
clock: read ``extra_info["ms"]`` for the time of one call. bench/conftest.py adds a ``run`` block
to the JSON (command, GPU, versions, git commit, UTC date).
FLOPs follow flash-attention's benchmarks: forward 4·B·H·T²·D (the two matmuls) times the
visible fraction of (i, j) pairs, backward 2.5× that, forward+backward 3.5×; the delta bias
gather is not counted. Out of memory: the case is skipped (a missing value).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import hdaf
from hdaf import dispatch
from hdaf.reference import delta_projection, relative_buckets

from _memory import peak_extra_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU bench: needs a CUDA GPU (the CPU bench is "
                                       "bench_delta_attention.py)")

B, H, DR, MAXD = 4, 16, 64, 64
R = 2 * MAXD + 1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DS = [64, 128]
TS = [1024, 4096, 16384]
PROVIDERS = ["sdpa", "sdpa_bias", "flex", "triton", "cuda"]
WINDOW, WINDOW_T = 256, 16384
ROUND_S = 0.1  # a timed round lasts at least this long
DEVICE = "cuda"  # tests/test_bench_report.py runs the cases on "cpu" with a fake CUDA timer
# The headline (the ``quick`` mark): every combination of these values.
QUICK = dict(dtype_name=("bf16",), D=(64, 128), T=(4096, 16384), provider=("sdpa", "triton", "cuda"))


def make(T, D, dtype, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*shape, sc=1.0):
        t = (torch.randn(*shape, generator=g) * sc).to(DEVICE, dtype)
        return t.requires_grad_(requires_grad)

    return mk(B, H, T, D), mk(B, H, T, D), mk(B, H, T, D), mk(B, T, DR), mk(DR, R, sc=0.05)


@functools.lru_cache(maxsize=None)
def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def visible_fraction(T, window=None):
    if window is None or window >= T - 1:
        return 1.0
    # pairs with |j - i| <= window: T rows of 2w+1, minus the two clipped triangles
    return (T * (2 * window + 1) - window * (window + 1)) / T**2


def flops(T, D, mode, window=None):
    fwd = 4 * B * H * T * T * D * visible_fraction(T, window)
    return fwd if mode == "fwd" else 3.5 * fwd


@functools.lru_cache(maxsize=None)
def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    # one compiled graph per (dtype, D, T): raise dynamo's recompile limit above their number
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(flex_attention, dynamic=False)


def provider_fn(provider, window=None):
    """A callable ``f(q,k,v,x,w) -> out``, or a reason string when unavailable here."""
    if provider == "sdpa":
        return lambda q, k, v, x, w: F.scaled_dot_product_attention(q, k, v)
    if provider == "sdpa_window":
        def sdpa_window(q, k, v, x, w):
            pos = torch.arange(q.shape[-2], device=q.device)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=(pos[None, :] - pos[:, None]).abs() <= window)
        return sdpa_window
    if provider == "sdpa_bias":
        def sdpa_bias(q, k, v, x, w):
            T = q.shape[-2]
            P = delta_projection(x, w)  # [B,1,T,R]
            idx = relative_buckets(T, MAXD, MAXD, x.device).expand(B, 1, T, T)
            bias = torch.gather(P.transpose(-1, -2), -2, idx) - torch.gather(P, -1, idx)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=q.shape[-1] ** -0.5 * bias)
        return sdpa_bias
    if provider == "flex":
        def flex(q, k, v, x, w):
            P = delta_projection(x, w)[:, 0]  # [B,T,R]
            scale = q.shape[-1] ** -0.5

            def score_mod(score, b, h, qi, kj):
                r = torch.clamp(kj - qi, -MAXD, MAXD) + MAXD
                return score + scale * (P[b, kj, r] - P[b, qi, r])

            return _flex_fn()(q, k, v, score_mod=score_mod)
        return flex
    reason = dispatch.unavailable_reason(provider, torch.device(DEVICE))
    if reason is not None:
        return reason
    return lambda q, k, v, x, w: hdaf.delta_attention(q, k, v, x, w, max_distance=MAXD,
                                                      window=window, backend=provider)


def _round_timer(step):
    """``round_(n)``: n back-to-back calls between two CUDA events, returns ms per call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def round_(n):
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n

    return round_


def _run_case(benchmark, provider, dtype_name, D, T, mode, window=None):
    fn = provider_fn(provider, window)
    if isinstance(fn, str):
        pytest.skip(fn)
    if provider == "flex" and mode != "fwd":
        pytest.skip("n/a: FlexAttention refuses the backward when P requires grad (its score_mod "
                    "indexes P twice)")
    dtype = DTYPES[dtype_name]
    try:
        inputs = make(T, D, dtype, requires_grad=(mode == "fwd+bwd"))
        dout = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    fn(*inputs)
            else:
                torch.autograd.grad(fn(*inputs), inputs, dout, allow_unused=True)

        step()  # warm-up: compile, autotune, allocator
        torch.cuda.synchronize()
        peak = peak_extra_bytes(step, DEVICE)
        ms_rounds = []
        round_ = _round_timer(step)
        first = round_(1)
        n = max(1, min(10000, math.ceil(ROUND_S * 1e3 / max(first, 1e-3))))
        rounds = 3 if first * n > 500 else 7

        def timed_round():
            ms_rounds.append(round_(n))

        benchmark.pedantic(timed_round, rounds=rounds, iterations=1, warmup_rounds=0)
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")
    ms = sorted(ms_rounds)[len(ms_rounds) // 2]
    benchmark.extra_info.update(
        provider=provider, T=T, D=D, mode=mode, window=window, device=DEVICE, dtype=str(dtype),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=_triton_version(),
        cuda=torch.version.cuda, B=B, H=H, R=R,
        ms=ms, ms_rounds=ms_rounds, iterations=n, tflops=flops(T, D, mode, window) / ms / 1e9,
        peak_extra_bytes=peak)


def is_quick(dtype_name, D, mode, provider, T):
    return (dtype_name in QUICK["dtype_name"] and D in QUICK["D"] and T in QUICK["T"]
            and provider in QUICK["provider"])


def cases():
    """Every (dtype_name, D, mode, provider, T), in the order they run: per dtype and D the
    shortest T first, per shape fwd then fwd+bwd, SDPA first (so a run cut short still has the
    floor of every hdaf time it measured)."""
    for dtype_name, D, T, mode, provider in itertools.product(DTYPES, DS, TS, ("fwd", "fwd+bwd"),
                                                              PROVIDERS):
        yield dtype_name, D, mode, provider, T


def _params():
    return [pytest.param(*c, id=f"{c[0]}-D{c[1]}-{c[2]}-{c[3]}-T{c[4]}",
                         marks=[pytest.mark.quick] if is_quick(*c) else [])
            for c in cases()]


@pytest.mark.parametrize("dtype_name,D,mode,provider,T", _params())
def bench_delta_attention_gpu(benchmark, dtype_name, D, mode, provider, T):
    benchmark.group = f"gpu {dtype_name} D={D} {mode} T={T}"
    _run_case(benchmark, provider, dtype_name, D, T, mode)


@pytest.mark.parametrize("provider", ["sdpa_window", "triton", "cuda"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def bench_delta_attention_gpu_window(benchmark, dtype_name, mode, provider):
    benchmark.group = f"gpu {dtype_name} D=64 window={WINDOW} {mode} T={WINDOW_T}"
    _run_case(benchmark, provider, dtype_name, 64, WINDOW_T, mode, window=WINDOW)


# ---------------------------------------------------------------------------------------------
# --precompile: Triton's autotuning configurations compiled in parallel processes
# ---------------------------------------------------------------------------------------------

def _short_error(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _precompile_job(job):
    """Run the bench's Triton call once with the configurations of ``job`` pinned, which compiles
    them into Triton's on-disk cache. Returns (job, seconds, None or the error)."""
    dtype_name, D, T, fwd, dkdv, dq = job
    from hdaf.kernels import delta_attention as K

    t0 = time.time()
    backward = dkdv is not None
    inputs = make(T, D, DTYPES[dtype_name], requires_grad=backward)
    err = None
    for fwd_cfg in (fwd, K.autotune_shapes("fwd")[-1]):  # the smallest forward if fwd cannot run
        try:
            with K.forced_configs(fwd=fwd_cfg, dkdv=dkdv, dq=dq):
                if backward:
                    out = hdaf.delta_attention(*inputs, max_distance=MAXD, backend="triton")
                    torch.autograd.grad(out, inputs, torch.ones_like(out))
                else:
                    with torch.no_grad():
                        hdaf.delta_attention(*inputs, max_distance=MAXD, backend="triton")
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
            break
        except Exception as exc:  # noqa: BLE001 -- out of resources is expected for some
            err = (err + "; " if err else "") + _short_error(exc)
            if not backward:
                break
    return job, time.time() - t0, err


def precompile_jobs(dtype_names, Ds, T):
    """One job per position in the longest autotuning list and per (dtype, D), over the
    configurations autotuning tries at that head dim: job i pins the i-th forward, dK/dV and dQ
    configuration (the last one of a shorter list again), so every candidate is compiled."""
    from hdaf.kernels import delta_attention as K

    jobs = []
    for dtype_name, D in itertools.product(dtype_names, Ds):
        shapes = {kind: K.autotune_shapes(kind, D) for kind in ("fwd", "dkdv", "dq")}
        n = max(len(v) for v in shapes.values())
        for i in range(n):
            fwd, dkdv, dq = (shapes[kind][min(i, len(shapes[kind]) - 1)]
                             for kind in ("fwd", "dkdv", "dq"))
            jobs.append((dtype_name, D, T, fwd, dkdv, dq))
    return jobs


def precompile(jobs, processes):
    """Run ``jobs`` in ``processes`` spawned processes (1: in this one); prints one line a job."""
    t0 = time.time()
    if processes <= 1:
        results = map(_precompile_job, jobs)
    else:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(processes)
        results = pool.imap_unordered(_precompile_job, jobs)
    failed = 0
    for (dtype_name, D, T, fwd, dkdv, dq), secs, err in results:
        failed += err is not None
        print(f"{'ok  ' if err is None else 'fail'} {dtype_name} D={D} T={T} fwd={fwd} dkdv={dkdv} "
              f"dq={dq}: {secs:.1f} s" + (f" -- {err}" if err else ""), flush=True)
    if processes > 1:
        pool.close()
        pool.join()
    print(f"precompiled {len(jobs)} pinned runs in {time.time() - t0:.1f} s with {processes} "
          f"processes; {failed} could not run (configurations the autotuner prunes fail to "
          f"launch: expected)", flush=True)
    return failed


def main(argv=None):
    ap = argparse.ArgumentParser(description="Compile Triton's autotuning configurations for the "
                                 "GPU bench's shapes into the on-disk cache, in parallel.")
    ap.add_argument("--precompile", action="store_true", required=True)
    ap.add_argument("--quick", action="store_true", help="only the headline shapes (-m quick)")
    ap.add_argument("--processes", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--list", action="store_true", help="print the jobs and exit")
    args = ap.parse_args(argv)
    dtypes = QUICK["dtype_name"] if args.quick else tuple(DTYPES)
    Ds = QUICK["D"] if args.quick else tuple(DS)
    # one T suffices: every bench T is a multiple of 16, so all compile to the same kernels
    jobs = precompile_jobs(dtypes, Ds, min(t for t in (QUICK["T"] if args.quick else TS)))
    if args.list:
        for j in jobs:
            print(*j)
        print(f"{len(jobs)} jobs")
        return 0
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to compile for", file=sys.stderr)
        return 2
    precompile(jobs, min(args.processes, len(jobs)))
    return 0  # a configuration that cannot run is not an error: the autotuner skips it too


if __name__ == "__main__":
    sys.exit(main())
