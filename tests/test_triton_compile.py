"""The Triton kernels compile to sm_80 and sm_90 machine code, without a GPU.

The interpreter (tests/test_triton.py) runs the kernels' Python, not Triton's compiler: a kernel
that interprets fine can still fail to lower (a branch yielding two types, a layout the backend
refuses). This compiles each kernel ahead of time for both architectures — the float16 path with a
padding mask, a causal window and Dk != Dv, the float32 (IEEE) path, and the bfloat16 path
without the delta term, a packed batch with grouped heads, and a decoding forward split over
the keys — through ``triton.compile`` with a ``GPUTarget``, from the arguments
the launchers pass (``capture_launches``), specialised as a real launch specialises them; in a
child process, since this test process runs the interpreter. On a GPU the compiled kernels also run in tests/test_triton.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (e.g. the CPU build of torch)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent('''
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    from hdaf.kernels import delta_attention as K

    def compile_launch(ln, cfg, cap):
        # specialised from the captured arguments exactly as JITFunction.run specialises them
        bm, bn, warps, stages = cfg
        target = GPUTarget("cuda", cap, 32)
        backend = make_backend(target)
        kern = ln.kernel
        binder = create_function_from_signature(kern.signature, kern.params, backend)
        kw = dict(ln.kwargs, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        bound, spec, opts = binder(*ln.args, **kw)
        options, sig, constexprs, attrs = kern._pack_args(backend, kw, bound, spec, opts)
        return triton.compile(ASTSource(kern, sig, constexprs, attrs), target=target,
                              options=options.__dict__)

    def capture(dtype, pad, dk, dv, use_delta):
        B, H, T, L, U = 2, 2, 256, 3, 5
        g = torch.Generator().manual_seed(0)
        q = torch.empty(B, H, T, dk, dtype=dtype)
        k = torch.empty_like(q)
        v = torch.empty(B, H, T, dv, dtype=dtype)
        P = torch.empty(B, 1, T, L + U + 1, dtype=dtype)
        mask = torch.rand(B, T, generator=g) < 0.2 if pad else None
        lse = torch.empty(B, H, T)
        with K.capture_launches() as launches:
            K._forward(q, k, v, P, mask, L, U, 40, 0, dk ** -0.5, use_delta=use_delta)
            K._backward(v, q, k, v, P, mask, v, lse, L, U, 40, 0, dk ** -0.5,
                        use_delta=use_delta)
        return launches

    def capture_grouped_varlen():
        # a packed batch with grouped heads (H=4 over Hkv=2), bfloat16
        cu = torch.tensor([0, 5, 200], dtype=torch.int32)
        q = torch.empty(200, 4, 64, dtype=torch.bfloat16)
        k = torch.empty(200, 2, 64, dtype=torch.bfloat16)
        P = torch.empty(200, 1, 9, dtype=torch.bfloat16)
        lse = torch.empty(4, 200)
        with K.capture_launches() as launches:
            K._varlen_forward(q, k, k, P, cu, cu, 195, 195, 4, 4, -1, -1, 0.125)
            K._varlen_backward(q, q, k, k, P, cu, cu, 195, 195, q, lse, 4, 4, -1, -1, 0.125)
        return launches

    def capture_decode():
        # one query over 4096 keys, grouped heads, the forward split into 8 key ranges
        q = torch.empty(1, 8, 1, 128, dtype=torch.bfloat16)
        k = torch.empty(1, 2, 4096, 128, dtype=torch.bfloat16)
        P = torch.empty(1, 1, 4096, 9, dtype=torch.bfloat16)
        with K.capture_launches() as launches, K.forced_configs(splits=8):
            K._forward(q, k, k, P, None, 4, 4, -1, 0, 0.088)
        assert launches[0].kwargs["SPLIT"], "the decode forward was not split"
        return launches

    cases = [capture(*c) for c in ((torch.float16, True, 64, 32, True),
                                   (torch.float32, False, 32, 16, True),
                                   (torch.bfloat16, False, 64, 64, False))]
    for launches, (dtype, use_delta) in zip(cases + [capture_grouped_varlen(), capture_decode()],
                                            ((torch.float16, True), (torch.float32, True),
                                             (torch.bfloat16, False), (torch.bfloat16, True),
                                             (torch.bfloat16, True))):
        for ln in launches:
            cfg = ln.configs[0]
            for cap in (80, 90):
                compiled = compile_launch(ln, cfg, cap)
                assert compiled.asm["cubin"], (ln.kind, cap, dtype)
                print("COMPILED", ln.kind, cap, dtype, cfg, use_delta, compiled.metadata.shared)
''')



@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile and run in "
                                                      "tests/test_triton.py")
def test_kernels_compile_for_sm80_and_sm90_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    compiled = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    assert len(compiled) == (3 * 4 + 1) * 2, res.stdout
