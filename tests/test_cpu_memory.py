"""The CPU kernel's extra memory is O(B·H·T·R + B·H·T), never O(T²)."""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, hdaf
    sys.path.insert(0, "bench")
    from _memory import peak_extra_bytes
    T = 16384
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, 16, generator=g).requires_grad_() for _ in range(3))
    x = torch.randn(1, T, 8, generator=g).requires_grad_()
    w = (torch.randn(8, 33, generator=g) * 0.1).requires_grad_()
    dout = torch.randn(1, 1, T, 16, generator=g)
    def step():
        out = hdaf.delta_attention(q, k, v, x, w, backend="cpu")
        grads = torch.autograd.grad(out, (q, k, v, x, w), dout)
        assert all(torch.isfinite(t).all() for t in grads)
    peak = peak_extra_bytes(step, "cpu")
    print(json.dumps({"peak": peak, "txt": T * T * 4}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_forward_backward_at_T16384_stays_far_below_one_TxT_tensor(tmp_path):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert data["peak"] is not None
    # One T×T float32 tensor is 1 GiB here; the kernel needs a few MiB (q, k, v, P, dP rows).
    assert data["peak"] < data["txt"] / 16, data
