"""Peak memory of a call: CUDA allocator statistics on GPU, the process's resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs) on CPU. Linux only for CPU."""
from __future__ import annotations

import ctypes
import gc
from typing import Callable, Optional

import torch

# glibc serves large blocks from the heap once a freed mmap raised its dynamic threshold, and
# keeps them resident: the high-water mark of a repeated call would then read ~0. A fixed
# threshold (which also turns the dynamic one off) makes every block above 64 KiB an mmap that
# is returned on free, so VmHWM - VmRSS measures the call's own peak.
try:
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
except OSError:  # not glibc: the CPU figure may then under-report
    pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object], device: str) -> Optional[int]:
    """Bytes allocated above the level before ``fn()`` at its peak (None if not measurable)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) * 1024
    except (OSError, RuntimeError):
        return None
