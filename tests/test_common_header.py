"""The __host__ __device__ index math (csrc/include/hdaf/delta_common.h), compiled into the CPU
extension, against the PyTorch reference. The CUDA kernels compile the same header."""
import itertools

import pytest
import torch

from hdaf.reference import relative_buckets, visibility

ops = torch.ops.hdaf


@pytest.mark.parametrize("T,L,U", [(1, 0, 0), (7, 3, 3), (9, 0, 4), (12, 5, 0), (30, 2, 7)])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (0, 0), (2, 5), (-1, 0), (40, -1)])
def test_buckets_and_band_match_reference(T, L, U, wl, wr):
    r, vis = ops._common_buckets(T, L, U, wl, wr)
    assert torch.equal(r, relative_buckets(T, L, U, "cpu"))
    lo = -(T - 1) if wl < 0 else -wl
    hi = (T - 1) if wr < 0 else wr
    assert torch.equal(vis, visibility(T, lo, hi, None, "cpu")[0, 0])


@pytest.mark.parametrize("T,block", [(1, 4), (10, 3), (64, 16), (65, 16)])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (0, 0), (3, 1), (-1, 0), (0, 5)])
def test_band_ranges_cover_exactly_the_visible_blocks(T, block, wl, wr):
    _, vis = ops._common_buckets(T, 0, 0, wl, wr)
    ranges = ops._common_band_ranges(T, block, wl, wr)
    for b, (kb, ke, qb, qe) in enumerate(ranges.tolist()):
        rows = slice(b * block, min(T, (b + 1) * block))
        cols = vis[rows].any(0).nonzero().flatten()  # keys seen by these queries
        if len(cols):
            assert kb == cols.min().item() and ke == cols.max().item() + 1
        seen_by = vis[:, rows].any(1).nonzero().flatten()  # queries that see these keys
        if len(seen_by):
            assert qb == seen_by.min().item() and qe == seen_by.max().item() + 1


@pytest.mark.parametrize("block", [1, 3, 8, 64])
def test_online_softmax_lse_matches_logsumexp(block):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 20, generator=g, dtype=torch.float64) * 30
    visible = torch.rand(6, 20, generator=g) > 0.4
    visible[2] = False  # a fully masked row
    visible[3] = False
    visible[3, 19] = True  # only the last block sees anything
    got = ops._common_online_lse(scores, visible, block)
    ref = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    assert got[2] == float("-inf")
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
