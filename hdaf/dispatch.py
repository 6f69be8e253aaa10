"""Which implementation serves a call: availability of each backend and the ``"auto"`` choice."""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional

import torch

from . import ops

BACKENDS = ("auto", "naive", "gather", "cpu", "triton", "cuda")
_FORWARD_OP = "hdaf::delta_attention_forward"


@torch._dynamo.assume_constant_result  # registration is fixed at import: fold it under compile
def _has_kernel(dispatch_key: str) -> bool:
    if ops._C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_OP, dispatch_key)


def _triton_import_error() -> Optional[str]:
    try:
        from .kernels import delta_attention as _  # noqa: F401
    except Exception as exc:  # ImportError, or triton failing to initialise
        return f"{type(exc).__name__}: {exc}"
    return None


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """``None`` when ``backend`` can run tensors on ``device``, else a sentence saying why not."""
    if backend in ("naive", "gather"):
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs CPU tensors, got tensors on {device}"
        if ops._C is None:
            return f"the compiled extension hdaf._C failed to import ({ops.EXTENSION_ERROR})"
        if not _has_kernel("CPU"):
            return "hdaf._C has no CPU kernel registered for hdaf::delta_attention_forward"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs CUDA tensors, got tensors on {device}"
        if ops._C is None:
            return f"the compiled extension hdaf._C failed to import ({ops.EXTENSION_ERROR})"
        if not _has_kernel("CUDA"):
            return ("hdaf._C was built without the CUDA extension (torch CPU build, no nvcc, "
                    "or HDAF_SKIP_CUDA_BUILD=1)")
        return None
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton needs a GPU, or the interpreter for CPU tensors "
                    "(set TRITON_INTERPRET=1 before importing triton)")
        if device.type not in ("cpu", "cuda"):
            return f"the 'triton' backend runs CUDA tensors, got tensors on {device}"
        err = _triton_import_error()
        if err is not None:
            return f"the Triton kernels failed to import ({err})"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_warned: set = set()


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a call; ``"auto"`` takes the fastest compiled one available."""
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} is not available: {reason}")
        return backend
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    reasons = []
    for name in order:
        reason = unavailable_reason(name, device)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    key = (device.type, tuple(reasons))
    if key not in _warned:
        _warned.add(key)
        warnings.warn("hdaf.delta_attention(backend='auto') falls back to the PyTorch 'gather' "
                      f"reference on {device.type} because no compiled kernel is available ("
                      + "; ".join(reasons) + ")", RuntimeWarning, stacklevel=3)
    return "gather"


def backends() -> Dict[str, object]:
    """What was compiled and what ``"auto"`` uses per device, as a dict (see ``python -m hdaf info``)."""
    cuda_ok = torch.cuda.is_available()
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": "loaded" if ops._C is not None else f"missing ({ops.EXTENSION_ERROR})",
        "cpu_kernel": _has_kernel("CPU"),
        "cuda_kernel_compiled": _has_kernel("CUDA"),
        "triton": _triton_import_error() or "importable",
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "gpu_available": cuda_ok,
        "available": {},
        "auto": {},
    }
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda_ok else [])
    for dev in devices:
        info["available"][dev.type] = [b for b in BACKENDS[1:] if unavailable_reason(b, dev) is None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info["auto"][dev.type] = resolve("auto", dev)
    return info
