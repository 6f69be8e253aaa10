"""Shared test helpers: inputs for the operator, dtype-tied tolerances, one device helper."""
from __future__ import annotations

import glob
import os

import torch

# Triton's interpreter must be switched on before triton.language is first imported, and
# `import hdaf` imports it (through torch._dynamo): without a GPU, the Triton tests run the
# kernels on CPU tensors under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import hdaf  # noqa: E402,F401

# Tolerances tied to dtype (absolute and relative), for outputs and gradients of O(1) size.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype = None):
    dtype = dtype or got.dtype
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got.to(ref.dtype), ref, msg=lambda m: f"{name}: {m}", **TOL[dtype])


def make_inputs(B=2, H=3, T=7, Dk=8, Dv=None, Dr=5, R=7, per_head_x=False, per_head_w=False,
                dtype=torch.float64, device="cpu", pad_lengths=None, seed=0, requires_grad=True):
    """Random operator inputs. pad_lengths: per-batch count of real tokens (rest padded)."""
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or Dk

    def rnd(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    q, k, v = rnd(B, H, T, Dk), rnd(B, H, T, Dk), rnd(B, H, T, Dv)
    x = rnd(B, H, T, Dr) if per_head_x else rnd(B, T, Dr)
    w = rnd(H, Dr, R) if per_head_w else rnd(Dr, R)
    mask = None
    if pad_lengths is not None:
        pos = torch.arange(T)
        mask = (pos[None, :] >= torch.tensor(pad_lengths)[:, None]).to(device)
    return q, k, v, x, w, mask


def grads(out: torch.Tensor, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, dout.to(out.device), allow_unused=False)


GRAD_NAMES = ("q", "k", "v", "x", "w")


def device_for_tests() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_include_dir():
    """A folder holding the CUDA runtime headers the host emulations of csrc/cuda/host_emulation
    include, or None."""
    cands = [os.path.join(os.environ[e], "include") for e in ("CUDA_HOME", "CUDA_PATH")
             if os.environ.get(e)]
    try:
        import nvidia  # NVIDIA's pip wheels (torch's CUDA builds depend on them)
        for root in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    cands += ["/usr/local/cuda/include"] + sorted(glob.glob("/usr/local/cuda-*/include"))
    need = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "mma.h", os.path.join("crt", "host_defines.h"))
    for d in cands:
        if all(os.path.exists(os.path.join(d, f)) for f in need):
            return d
    return None


# ---------------------------------------------------------------------------------------------
# The short GPU check: `pytest -m quick` (scripts/gpu_check.sh --quick)
# ---------------------------------------------------------------------------------------------

# A fixed selection of the GPU tests: both backends against the float64 reference, forward and
# every gradient, float32 / float16 / bfloat16 (and float64 for `cuda`), with padding, causal,
# windows, per-head x / w, Dk != Dv, fully masked rows and batches, head dim 128, T = 8192.
# `file::test id`; each gets the `quick` mark (pytest.ini) when collected.
QUICK_GPU_TESTS = (
    "test_cuda.py::test_cuda_kernels_registered",
    "test_cuda.py::test_cuda_matches_naive[300-headw_causal_pad-d64-float16]",
    "test_cuda.py::test_cuda_matches_naive[300-headw_causal_pad-d64-bfloat16]",
    "test_cuda.py::test_cuda_matches_naive[300-headx_asym_window-d128-float16]",
    "test_cuda.py::test_cuda_matches_naive[300-perhead_window_lr_causal-d128-bfloat16]",
    "test_cuda.py::test_cuda_matches_naive[63-paper_pad-d64-float16]",
    "test_cuda.py::test_cuda_matches_naive[63-fully_masked_batch-d64-bfloat16]",
    "test_cuda.py::test_cuda_refuses_float32_and_float64_naming_the_backends[float32]",
    "test_cuda.py::test_cuda_lse_and_fully_masked_rows[bfloat16]",
    "test_cuda.py::test_cuda_grouped_heads_and_short_queries_match_naive[mqa_decode-bfloat16]",
    "test_cuda.py::test_cuda_grouped_heads_and_short_queries_match_naive[gqa_tq37_window-float16]",
    "test_cuda.py::test_cuda_varlen_matches_naive[bfloat16]",
    "test_cuda.py::test_cuda_large_T_smoke_and_determinism[bfloat16]",
    # Triton: T=1000, causal, padding, per-head x, Dk=64 != Dv=32 (float32, float16, bfloat16);
    # window (100, 60), a fully padded batch element, per-head w, D=128 (bfloat16)
    "test_triton.py::test_gpu_matches_naive[T1000_causal_pad_phx_dkdv-dtype0]",
    "test_triton.py::test_gpu_matches_naive[T1000_causal_pad_phx_dkdv-dtype1]",
    "test_triton.py::test_gpu_matches_naive[T1000_causal_pad_phx_dkdv-dtype2]",
    "test_triton.py::test_gpu_matches_naive[T1000_window_allpad_phw-dtype2]",
)


def pytest_collection_modifyitems(config, items):
    quick = set(QUICK_GPU_TESTS)
    for item in items:
        if f"{item.path.name}::{item.name}" in quick:
            item.add_marker(pytest.mark.quick)


def parse_triton_configs(spec: str) -> dict:
    """``"fwd=64,32,4,2 dkdv=32,64,4,2 dq=64,32,4,2"`` -> forced_configs() keyword arguments:
    (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel kind; kinds left out stay autotuned."""
    out = {}
    for part in spec.replace(";", " ").split():
        kind, _, cfg = part.partition("=")
        nums = tuple(int(n) for n in cfg.split(","))
        if kind not in ("fwd", "dkdv", "dq") or len(nums) != 4:
            raise ValueError(f"HDAF_TRITON_CONFIGS: cannot read {part!r} (want e.g. fwd=64,32,4,2)")
        out[kind] = nums
    return out


@pytest.fixture(autouse=True)
def _triton_configs_from_environment():
    """With HDAF_TRITON_CONFIGS set, every test runs the Triton kernels with those block
    configurations instead of autotuning (gpu_check.sh --quick: each test shape then compiles
    one configuration per kernel instead of every autotuning candidate)."""
    spec = os.environ.get("HDAF_TRITON_CONFIGS")
    if not spec:
        yield
        return
    from hdaf.kernels import delta_attention as K

    with K.forced_configs(**parse_triton_configs(spec)):
        yield
