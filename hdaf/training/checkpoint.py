"""Atomic checkpoints and RNG-state capture (for bitwise-reproducible ``--resume``)."""
from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch


def atomic_save(obj: Any, path: str) -> str:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} is unreadable (corrupted?): {type(exc).__name__}: {exc}") from None


def rng_state() -> Dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def state_fingerprint(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a state_dict (bitwise identity)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()
