"""The Triton kernels compile to sm_80 and sm_90 machine code, without a GPU.

The interpreter (tests/test_triton.py) runs the kernels' Python, not Triton's compiler: a kernel
that interprets fine can still fail to lower (a branch yielding two types, a layout the backend
refuses). This compiles each kernel ahead of time for both architectures, for the float16 path
with a padding mask and Dk != Dv, and the float32 (IEEE) path without, through
``triton.compile`` with a ``GPUTarget`` — in a child process, since this test process runs the
interpreter. On a GPU the compiled kernels also run in tests/test_triton.py.
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
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hdaf.kernels import delta_attention as K

    CONST = ("HAS_PAD", "IEEE", "BLOCK_DK", "BLOCK_DV", "BLOCK_M", "BLOCK_N")
    PTR = ("Q", "K", "V", "P", "OUT", "DO", "DK_OUT", "DV_OUT", "DQ_OUT")

    def signature(kernel, dtype):
        sig = {}
        for n in kernel.arg_names:
            sig[n] = ("constexpr" if n in CONST else dtype if n in PTR else
                      "*fp32" if n in ("LSE", "DELTA", "DPK", "DPQ") else "*u8" if n == "PAD"
                      else "*i32" if n == "KV" else "fp32" if n in ("scale", "qk_scale")
                      else "i32")
        return sig

    for kind, kernel in (("fwd", K._fwd_kernel), ("dkdv", K._bwd_dkdv_kernel),
                         ("dq", K._bwd_dq_kernel)):
        bm, bn, warps, stages = K.autotune_shapes(kind)[0]
        for dtype, ieee, pad, bdk, bdv in (("*fp16", False, True, 64, 32),
                                           ("*fp32", True, False, 32, 16)):
            if ieee:
                bm, bn, stages = min(bm, 64), min(bn, 64), 2  # what _prune keeps for float32
            const = dict(HAS_PAD=pad, IEEE=ieee, BLOCK_DK=bdk, BLOCK_DV=bdv, BLOCK_M=bm,
                         BLOCK_N=bn)
            for cap in (80, 90):
                compiled = triton.compile(
                    ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=const),
                    target=GPUTarget("cuda", cap, 32),
                    options=dict(num_warps=warps, num_stages=stages))
                assert compiled.asm["cubin"], (kind, cap, dtype)
                print("COMPILED", kind, cap, dtype, (bm, bn, warps, stages),
                      compiled.metadata.shared)
''')


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile and run in "
                                                      "tests/test_triton.py")
def test_kernels_compile_for_sm80_and_sm90_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    compiled = [ln for ln in res.stdout.splitlines() if ln.startswith("COMPILED")]
    assert len(compiled) == 3 * 2 * 2, res.stdout
