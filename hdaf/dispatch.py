"""Which implementation serves a call: availability of each backend and the ``"auto"`` choice."""
from __future__ import annotations

import math
import os
import warnings
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from . import ops

BACKENDS = ("auto", "naive", "gather", "cpu", "triton", "cuda")
_FORWARD_OP = "hdaf::delta_attention_forward"

# What a call may need beyond self-attention with one key/value head per query head
# (docs/delta_attention.md, "Backends"), and which backends compute it. The CUDA kernels take
# no global positions (their op refuses them too, csrc/delta_attention_checks.cpp); Triton's
# packed batches need its varlen op, hdaf::triton_delta_attention_varlen_forward.
FEATURES = {
    "gqa": "grouped-query heads (fewer key/value heads than query heads)",
    "tq<tk": "a query block shorter than the keys (Tq < Tk)",
    "varlen": "packed variable-length batches (delta_attention_varlen)",
    "offsets": "query and key blocks at global positions (context-parallel attention, "
               "hdaf.distributed)",
}
SUPPORTS = {
    "naive": frozenset(FEATURES), "gather": frozenset(FEATURES), "cpu": frozenset(FEATURES),
    "triton": frozenset(FEATURES), "cuda": frozenset({"gqa", "tq<tk", "varlen"}),
}
_TRITON_VARLEN_OP = "triton_delta_attention_varlen_forward"
#: Backends whose kernels have a plain path, compiled without the delta term: a call without it
#: (``x`` and ``w`` None) hands them a ``P`` with no bucket column, and they read no ``P`` at
#: all. The others compute such a call with one zero bucket (``P = 0``): the same result.
PLAIN_PATH = frozenset({"triton"})
_TRITON_BLOCK_OP = "triton_delta_attention_block_forward"


@torch._dynamo.assume_constant_result  # registration is fixed at import: fold it under compile
def _has_kernel(dispatch_key: str) -> bool:
    if ops._C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_OP, dispatch_key)


@torch._dynamo.assume_constant_result
def _has_triton_varlen() -> bool:
    return hasattr(torch.ops.hdaf, _TRITON_VARLEN_OP)


@torch._dynamo.assume_constant_result
def _has_triton_block() -> bool:
    return hasattr(torch.ops.hdaf, _TRITON_BLOCK_OP)


def feature_reason(backend: str, features: Mapping[str, str]) -> Optional[str]:
    """``None`` when ``backend`` computes every feature of the call (``{tag: what the call has}``,
    tags of :data:`FEATURES`), else a sentence naming the feature and the backend to use."""
    for tag, what in features.items():
        if tag not in SUPPORTS[backend]:
            return (f"backend={backend!r} does not support {FEATURES[tag]}, got {what}; use "
                    "backend='triton' for CUDA tensors (or 'cpu' for CPU tensors)")
    if backend == "triton" and "varlen" in features and not _has_triton_varlen():
        return (f"backend='triton' has no packed-batch kernels yet (no op hdaf::{_TRITON_VARLEN_OP}"
                " is registered); use backend='cpu' for CPU tensors, or 'gather' (the PyTorch "
                "reference) for CUDA tensors")
    if backend == "triton" and "offsets" in features and not _has_triton_block():
        return (f"backend='triton' has no kernels for global positions yet (no op hdaf::"
                f"{_TRITON_BLOCK_OP} is registered); use backend='cpu' for CPU tensors, or "
                "'gather' (the PyTorch reference) for CUDA tensors")
    return None


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


# ---- backend="auto" on a GPU: the backend measured faster -------------------------------------
# Times in ms, (forward, forward+backward), per (device type, dtype, head dim). Measured on an
# H100 80GB on 2026-11-24 with torch 2.11.0+cu130 and triton 3.6.0, for the kernels of that date
# (before the far/band rewrite of the Triton kernels); bf16, B=4, H=16, Dk=Dv=64, Dr=64,
# max_distance=64, T=4096 (docs/verification.md). Not re-measured since. Other dtypes and head
# dims use the nearest measured configuration. The CUDA kernels (csrc/cuda, CuTe) have not been
# measured on a GPU: with no entry they rank last, so `auto` keeps choosing Triton where both
# run. To update from a GPU bench run:
# `python bench/report.py bench/results/gpu_<name>.json --auto-table`.
AUTO_MEASUREMENTS: Dict[Tuple[str, torch.dtype, int], Dict[str, Tuple[float, float]]] = {
    ("cuda", torch.bfloat16, 64): {"triton": (2.0, 9.5)},
}
# What each GPU kernel takes: (dtypes, largest head dim, the head dims it has kernels for or
# None for all up to the largest). Triton has no float64 (tl.dot) and tiles whole head rows of
# at most 128 (kernels/delta_attention.py MAX_HEAD_DIM); the CUDA kernels are tensor-core
# kernels for float16 / bfloat16 with Dk == Dv in {64, 128} (csrc/delta_attention_checks.cpp).
GPU_LIMITS: Dict[str, Tuple[Tuple[torch.dtype, ...], int, Optional[Tuple[int, ...]]]] = {
    "triton": ((torch.float16, torch.bfloat16, torch.float32), 128, None),
    "cuda": ((torch.float16, torch.bfloat16), 128, (64, 128)),
}


def _measured_ms(backend: str, device_type: str, dtype: Optional[torch.dtype],
                 head_dim: Optional[int]) -> Tuple[float, float]:
    """(fwd+bwd, fwd) ms of ``backend`` in the measured configuration nearest to the call."""
    def distance(key):
        dev, dt, d = key
        return (dev != device_type, dtype is not None and dt != dtype,
                0 if head_dim is None else abs(math.log2(max(head_dim, 1) / d)))

    inf = (math.inf, math.inf)
    if not AUTO_MEASUREMENTS:
        return inf
    nearest = AUTO_MEASUREMENTS[min(AUTO_MEASUREMENTS, key=distance)]
    fwd, fwd_bwd = nearest.get(backend, inf)
    return fwd_bwd, fwd


def auto_candidates(device_type: str, dtype: Optional[torch.dtype] = None,
                    head_dim: Optional[int] = None,
                    features: Tuple[str, ...] = ()) -> Tuple[List[str], List[str]]:
    """The compiled backends ``"auto"`` tries for a call, fastest first, and why others are out.

    CPU: the C++ kernel. CUDA: those of :data:`GPU_LIMITS` that take ``dtype`` and ``head_dim``
    (``max(Dk, Dv)``; None: any) and compute every one of ``features`` (tags of
    :data:`FEATURES`), ordered by measured forward+backward time (:data:`AUTO_MEASUREMENTS`).
    """
    if device_type == "cpu":
        return ["cpu"], []
    if device_type != "cuda":
        return [], [f"no compiled kernel for {device_type} tensors"]
    fits, excluded = [], []
    for name, (dtypes, max_head_dim, head_dims) in GPU_LIMITS.items():
        lacking = [f for f in features if f not in SUPPORTS[name]]
        if lacking:
            excluded.append(f"{name}: lacks {'; '.join(FEATURES[f] for f in lacking)}")
        elif dtype is not None and dtype not in dtypes:
            excluded.append(f"{name}: no {dtype} kernel")
        elif head_dim is not None and head_dim > max_head_dim:
            excluded.append(f"{name}: head dim {head_dim} > {max_head_dim}")
        elif head_dim is not None and head_dims is not None and head_dim not in head_dims:
            excluded.append(f"{name}: no kernel for head dim {head_dim} (has {head_dims})")
        else:
            fits.append(name)
    fits.sort(key=lambda name: _measured_ms(name, device_type, dtype, head_dim))
    return fits, excluded


_warned: set = set()


def resolve(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
            head_dim: Optional[int] = None, features: Mapping[str, str] = None) -> str:
    """The concrete backend for a call. ``"auto"`` takes the first available of
    :func:`auto_candidates` for (device, dtype, head dim, features), else "gather" with a
    one-time warning. ``features``: ``{tag: what the call has}`` for the tags of
    :data:`FEATURES` the call needs; an explicit backend lacking one raises NotImplementedError."""
    features = features or {}
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} is not available: {reason}")
        reason = feature_reason(backend, features)
        if reason is not None:
            raise NotImplementedError(reason)
        return backend
    order, reasons = auto_candidates(device.type, dtype, head_dim, tuple(features))
    for name in order:
        reason = unavailable_reason(name, device) or feature_reason(name, features)
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
    """What was compiled and what ``"auto"`` uses per device (per dtype on CUDA), as a dict (see
    ``python -m hdaf info``)."""
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
            if dev.type == "cuda":  # the choice depends on the dtype there (head dim 64 here)
                info["auto"]["cuda"] = {str(dt).replace("torch.", ""): resolve("auto", dev, dt, 64)
                                        for dt in (torch.float16, torch.bfloat16, torch.float32,
                                                   torch.float64)}
            else:
                info["auto"][dev.type] = resolve("auto", dev)
    return info
