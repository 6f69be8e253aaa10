"""Delta attention vs torch SDPA (the floor) and the materialized-bias references.

    pytest bench/ --benchmark-only                       # everything available here
    pytest bench/ --benchmark-only -k "fwd and 1024"     # a slice
    pytest bench/ --benchmark-only --benchmark-json=bench/results.json && python bench/report.py bench/results.json

Shapes: B=2, H=8, Dk=Dv=64, Dr=64, R=129 (max_distance 64), float32 on CPU (float16 on GPU).
Providers: sdpa (no bias: the floor), sdpa_bias (SDPA given the gathered float bias), naive,
gather, cpu (C++ kernel), flex (FlexAttention + torch.compile, forward only: it has no CPU
backward), triton and cuda (GPU only). Each case records peak extra memory in extra_info;
out-of-memory becomes a skipped case, not a crash.

On a GPU this file is skipped: bench_delta_attention_gpu.py holds the GPU configurations (larger
shapes, many calls per timed round). ``extra_info`` also records the torch version and the shape,
which ``python bench/report.py --readme`` prints under the README's table.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import hdaf
from hdaf import dispatch
from hdaf.reference import delta_projection, relative_buckets

from _memory import peak_extra_bytes

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="on a GPU, bench_delta_attention_gpu.py runs instead")

B, H, D, DR, MAXD = 2, 8, 64, 64, 64
R = 2 * MAXD + 1
TS = [128, 256, 512, 1024, 2048, 4096]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
PROVIDERS = ["sdpa", "sdpa_bias", "naive", "gather", "cpu", "flex", "triton", "cuda"]
NAIVE_MAX_T = 1024  # the [B,T,T,Dr] difference tensor: 2 GiB at T=1024


def make(T, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, DTYPE).requires_grad_(requires_grad)  # noqa: E731
    q, k, v = mk(B, H, T, D), mk(B, H, T, D), mk(B, H, T, D)
    x = mk(B, T, DR)
    w = (torch.randn(DR, R, generator=g) * 0.05).to(DEVICE, DTYPE).requires_grad_(requires_grad)
    return q, k, v, x, w


def gathered_bias(x, w, T):
    P = delta_projection(x, w)  # [B,1,T,R]
    idx = relative_buckets(T, MAXD, MAXD, x.device).expand(B, 1, T, T)
    return torch.gather(P.transpose(-1, -2), -2, idx) - torch.gather(P, -1, idx)


@functools.lru_cache(maxsize=None)
def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def provider_fn(provider, window=None):
    """A callable ``f(q,k,v,x,w) -> out`` or a reason string when unavailable here."""
    dev = torch.device(DEVICE)
    if provider == "sdpa":
        if window is None:
            return lambda q, k, v, x, w: F.scaled_dot_product_attention(q, k, v)
        def sdpa_window(q, k, v, x, w):  # the equivalent boolean window mask
            T = q.shape[-2]
            pos = torch.arange(T, device=q.device)
            d = pos[None, :] - pos[:, None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=d.abs() <= window)
        return sdpa_window
    if provider == "sdpa_bias":
        scale = D ** -0.5
        return lambda q, k, v, x, w: F.scaled_dot_product_attention(
            q, k, v, attn_mask=scale * gathered_bias(x, w, q.shape[-2]))
    if provider == "flex":
        if DEVICE != "cpu" and DEVICE != "cuda":
            return "no flex here"
        def flex(q, k, v, x, w):
            T = q.shape[-2]
            P = delta_projection(x, w)[:, 0]  # [B,T,R]
            scale = D ** -0.5

            def score_mod(score, b, h, qi, kj):
                r = torch.clamp(kj - qi, -MAXD, MAXD) + MAXD
                return score + scale * (P[b, kj, r] - P[b, qi, r])

            return _flex_fn()(q, k, v, score_mod=score_mod)
        return flex
    reason = dispatch.unavailable_reason(provider, dev)
    if reason is not None:
        return reason
    return lambda q, k, v, x, w: hdaf.delta_attention(q, k, v, x, w, max_distance=MAXD,
                                                      window=window, backend=provider)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _run_case(benchmark, provider, T, mode, window=None):
    fn = provider_fn(provider, window)
    if isinstance(fn, str):
        pytest.skip(fn)
    if provider == "naive" and T > NAIVE_MAX_T:
        pytest.skip(f"naive materializes [B,T,T,Dr]: skipped above T={NAIVE_MAX_T}")
    if provider == "flex" and mode != "fwd":
        pytest.skip("FlexAttention has no CPU backward" if DEVICE == "cpu" else "fwd only")
    inputs = make(T, requires_grad=(mode == "fwd+bwd"))
    dout = torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(*inputs)
        else:
            out = fn(*inputs)
            torch.autograd.grad(out, inputs, dout, allow_unused=True)
        _sync()

    try:
        step()  # warm-up (and compile, for flex)
        peak = peak_extra_bytes(step, DEVICE)
        benchmark.extra_info.update(provider=provider, T=T, mode=mode, window=window,
                                    device=DEVICE, dtype=str(DTYPE), threads=torch.get_num_threads(),
                                    peak_extra_bytes=peak, torch=torch.__version__, B=B, H=H,
                                    head_dim=D, R=R)
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    except torch.OutOfMemoryError as exc:
        pytest.skip(f"out of memory: {exc}")


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def bench_delta_attention(benchmark, provider, T, mode):
    benchmark.group = f"delta_attention {mode} T={T}"
    _run_case(benchmark, provider, T, mode)


@pytest.mark.parametrize("provider", ["sdpa", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def bench_delta_attention_window64(benchmark, provider, mode):
    benchmark.group = f"delta_attention window=64 {mode} T=4096"
    _run_case(benchmark, provider, 4096, mode, window=64)
