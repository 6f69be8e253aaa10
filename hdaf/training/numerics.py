"""What a CPU training's floating-point results depend on besides the seed, and how to pin it.

On CPU, torch's kernels are deterministic for a given thread count and instruction set, but
both choose the order of floating-point reductions:

* **the intra-op thread count** (``torch.set_num_threads``): LayerNorm's and Linear's backward,
  for example, reduce per thread and then across threads, so one and two threads give results
  that differ in the last bits, and a training run amplifies that into different metrics;
* **the vector instruction set** that ATen, MKL and oneDNN dispatch to at run time (AVX-512 on
  one CPU, AVX2 on another): wider vectors sum in another order.

The config key ``threads`` pins the first for every training (``configs/main.yaml`` sets 1);
the environment variables :data:`ISA_ENV`, which must be set before torch is imported (so
``scripts/main.sh`` exports them), pin the second. :func:`describe` records both with the
results, so a table says under which numerics it was produced.
"""
from __future__ import annotations

import contextlib
import os
import platform
from typing import Iterator, Optional

import torch

#: Read once when torch / MKL / oneDNN / OpenBLAS (numpy, scipy) start: pin the instruction set
#: the CPU kernels use. ``scripts/main.sh`` sets each to AVX2 (Haswell) unless already set.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")
#: The values ``scripts/main.sh`` exports on an AVX2 machine (for scripts that start the main job
#: themselves, e.g. scripts/change_grid.py).
ISA_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "OPENBLAS_CORETYPE": "Haswell"}


def check_threads(threads) -> Optional[int]:
    """``None`` (leave torch's thread count alone) or a positive int; anything else is an error
    that names the ``threads`` key."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"config key 'threads' must be a positive integer or null (torch's "
                         f"default), got {threads!r}")
    return threads


@contextlib.contextmanager
def pinned_threads(threads) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (unchanged for ``None``); restore
    the previous count afterwards. Yields the count in effect."""
    threads = check_threads(threads)
    prev = torch.get_num_threads()
    if threads is not None and threads != prev:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(threads=None) -> dict:
    """The numerics a CPU run of this process has (or, with ``threads``, would have under
    :func:`pinned_threads`): thread count, the instruction set ATen dispatches to, the
    :data:`ISA_ENV` variables, torch's version and the CPU."""
    threads = check_threads(threads)
    return {"torch_threads": threads if threads is not None else torch.get_num_threads(),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{name: os.environ.get(name) for name in ISA_ENV},
            "torch": torch.__version__, "cpu": cpu_model(), "cores": os.cpu_count()}
