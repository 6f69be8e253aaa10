"""The ``backend="auto"`` rule (hdaf/dispatch.py), on any machine: backend availability is
simulated, so the GPU choices are tested without a GPU."""
from __future__ import annotations

import pytest
import torch

import hdaf
from hdaf import dispatch

CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU
LOW = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture
def available(monkeypatch):
    """Call with the backends to simulate as available; the others report a reason."""
    monkeypatch.setattr(dispatch, "_warned", set())

    def simulate(*names):
        monkeypatch.setattr(dispatch, "unavailable_reason",
                            lambda b, dev: None if b in names else f"{b} simulated as missing")
    return simulate


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_auto_on_cuda_takes_triton_measured_faster(available, dtype):
    available("triton", "cuda", "naive", "gather")
    assert dispatch.resolve("auto", CUDA, dtype, 64) == "triton"
    assert dispatch.resolve("auto", CUDA) == "triton"  # dtype unknown: the measured choice


def test_auto_on_cuda_takes_cuda_without_triton_where_it_has_kernels(available):
    """The CUDA kernels are float16 / bfloat16 with head dims 64 and 128: auto takes them when
    Triton is missing, and falls back to gather (saying why) for float32 / float64 or another
    head dim."""
    available("cuda")
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            assert dispatch.resolve("auto", CUDA, dtype, d) == "cuda"
    for dtype, d, why in ((torch.float32, 64, "no torch.float32 kernel"),
                          (torch.float64, 64, "no torch.float64 kernel"),
                          (torch.bfloat16, 96, r"no kernel for head dim 96 \(has \(64, 128\)\)")):
        with pytest.warns(RuntimeWarning, match=f"cuda: {why}"):
            assert dispatch.resolve("auto", CUDA, dtype, d) == "gather"


def test_auto_on_cuda_falls_back_to_gather_and_says_why(available):
    available()
    with pytest.warns(RuntimeWarning, match=r"falls back.*gather.*triton simulated as missing.*"
                                            r"cuda simulated as missing"):
        assert dispatch.resolve("auto", CUDA, torch.bfloat16, 64) == "gather"
    available("triton", "cuda")
    with pytest.warns(RuntimeWarning, match=r"triton: head dim 160 > 128; cuda: head dim 160 > 128"):
        assert dispatch.resolve("auto", CUDA, torch.float16, 160) == "gather"


def test_auto_follows_the_measurement_table(available, monkeypatch):
    """The rule is the table: were cuda measured faster, auto would take it."""
    available("triton", "cuda")
    key = ("cuda", torch.bfloat16, 64)
    assert dispatch.AUTO_MEASUREMENTS[key] == {"triton": (2.0, 9.5)}  # cuda not measured: last
    assert dispatch.resolve("auto", CUDA, torch.bfloat16, 64) == "triton"
    monkeypatch.setitem(dispatch.AUTO_MEASUREMENTS, key, {"triton": (2.0, 9.5), "cuda": (1.0, 5.0)})
    assert dispatch.resolve("auto", CUDA, torch.bfloat16, 64) == "cuda"
    # another dtype / head dim without its own row uses the nearest measured configuration
    monkeypatch.setitem(dispatch.AUTO_MEASUREMENTS, ("cuda", torch.float16, 128),
                        {"triton": (1.0, 4.0), "cuda": (3.0, 9.0)})
    assert dispatch.resolve("auto", CUDA, torch.float16, 96) == "triton"
    assert dispatch.resolve("auto", CUDA, torch.bfloat16, 64) == "cuda"


def test_auto_on_cpu_is_the_cpp_kernel():
    assert dispatch.auto_candidates("cpu", torch.float32, 160) == (["cpu"], [])
    assert dispatch.resolve("auto", torch.device("cpu"), torch.float64, 160) == "cpu"


def test_gpu_limits_match_the_kernels():
    """GPU_LIMITS' head dim is the one the CUDA op's own checks enforce (run here through the
    test hook of csrc/delta_attention_checks.cpp)."""
    limit = dispatch.GPU_LIMITS["cuda"][1]
    assert dispatch.GPU_LIMITS["triton"][1] == limit
    for d, ok in ((limit, True), (limit + 1, False)):
        q = torch.zeros(1, 1, 3, d, dtype=torch.bfloat16)
        P = torch.zeros(1, 1, 3, 1, dtype=torch.bfloat16)
        call = lambda: torch.ops.hdaf._check_forward_args(q, q, q, P, None, 0, 0, -1, -1, 1.0,  # noqa: E731
                                                          "cuda")
        if ok:
            call()
        else:
            with pytest.raises(RuntimeError, match=f"head dims up to {limit}"):
                call()


def test_callers_pass_dtype_and_head_dim(monkeypatch):
    seen = []
    real = dispatch.resolve

    def spy(backend, device, dtype=None, head_dim=None, features=None):
        seen.append((backend, device.type, dtype, head_dim))
        return real(backend, device, dtype, head_dim, features)

    monkeypatch.setattr(dispatch, "resolve", spy)
    monkeypatch.setattr(hdaf.nn.delta_attention, "resolve", spy)
    q = torch.randn(1, 2, 5, 8)
    v = torch.randn(1, 2, 5, 12)
    hdaf.delta_attention(q, q, v, torch.randn(1, 5, 3), torch.randn(3, 7))
    assert seen[-1] == ("auto", "cpu", torch.float32, 12)
    layer = hdaf.DeltaAttention(embed_dim=16, num_heads=2, max_distance=2).double()
    layer(torch.randn(1, 5, 16, dtype=torch.float64))
    assert ("auto", "cpu", torch.float64, 8) in seen


def test_backends_report_auto_per_dtype_on_cuda(available, monkeypatch):
    available("triton", "cuda", "cpu", "naive", "gather")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = hdaf.backends()
    assert info["auto"]["cpu"] == "cpu"
    assert info["auto"]["cuda"] == {"float16": "triton", "bfloat16": "triton",
                                    "float32": "triton", "float64": "gather"}
