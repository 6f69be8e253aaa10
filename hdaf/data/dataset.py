"""Torch side: a list-backed ``Dataset``, the padding ``collate``, a resumable sharded sampler."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .mosei import MODALITIES


class SegmentDataset(torch.utils.data.Dataset):
    """Samples as produced by :func:`hdaf.data.load_csd_folder` / :func:`hdaf.data.pkl.load_pkl`."""

    def __init__(self, samples: Sequence[dict]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]

    def dims(self) -> Dict[str, int]:
        s = self.samples[0]
        return {m: int(s[m].shape[1]) for m in MODALITIES}


def collate(samples: List[dict]) -> dict:
    """Pad each modality to the batch's longest sequence; masks are ``True`` at padding."""
    batch = {}
    B = len(samples)
    for m in MODALITIES:
        T = max(int(s[m].shape[0]) for s in samples)
        D = int(samples[0][m].shape[1])
        x = torch.zeros(B, T, D, dtype=torch.float32)
        mask = torch.ones(B, T, dtype=torch.bool)
        for i, s in enumerate(samples):
            n = s[m].shape[0]
            x[i, :n] = torch.from_numpy(np.ascontiguousarray(s[m], dtype=np.float32))
            mask[i, :n] = torch.from_numpy(np.asarray(s[m + "_mask"], dtype=bool))
        batch[m], batch[m + "_mask"] = x, mask
    batch["labels"] = torch.from_numpy(np.stack([np.asarray(s["labels"], np.float32) for s in samples]))
    batch["ids"] = [s["id"] for s in samples]
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


class ResumableSampler(torch.utils.data.Sampler):
    """Epoch-seeded shuffling, sharded over ranks, that can start mid-epoch.

    The order of epoch ``e`` is a permutation drawn from ``torch.Generator().manual_seed(seed + e)``
    (so it does not depend on any global RNG); it is padded by wrapping to a multiple of
    ``world_size`` and rank ``r`` takes positions ``r, r + world_size, …`` (as
    ``DistributedSampler``).  ``set_epoch(e, start_batch=b)`` skips the first ``b`` batches: the
    data-order state saved in checkpoints is just ``(epoch, batches done)``.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = -(-self.n // self.world_size)
        total = per_rank * self.world_size
        if total > len(order) and order:
            order = order + order[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def batches(self) -> List[List[int]]:
        idx = self._indices()
        out = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out = out[:-1]
        return out

    def num_batches(self) -> int:
        return len(self.batches())

    def __iter__(self):
        for b in self.batches()[self.start_batch:]:
            yield b

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start_batch)


def make_loader(dataset: SegmentDataset, sampler: Optional[ResumableSampler] = None,
                batch_size: int = 32, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A loader yielding padded batches; with ``sampler`` its batches, else in order."""
    # A private generator: creating the loader's iterator must not draw from the global RNG,
    # or a resumed run (which creates it mid-epoch) would shift every later random draw.
    gen = torch.Generator().manual_seed(0)
    if sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                           num_workers=num_workers, generator=gen)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       collate_fn=collate, num_workers=num_workers, generator=gen)
