"""Tile helpers shared by the delta-attention Triton kernels (forward and backward).

The index math of the band/far split lives here, once:

* A pair (query i, key j) falls in bucket ``r(i,j) = clamp(j − i, −L, U) + L``.
* A tile whose every pair has ``j − i <= −L`` is *far-low* (bucket 0); one whose every pair has
  ``j − i >= U`` is *far-high* (bucket R−1); any other tile is a *band* tile.
* In a far tile the bias ``P[j,e] − P[i,e]`` is a key vector minus a query vector. The launcher
  stores both pre-scaled by ``c = scale·log2(e)`` in float32 (``KCOL`` for keys, with ``−inf`` at
  padding keys and past the end of the sequence; ``QROW`` for queries, with the log-sum-exp
  folded in for the backward), so a far tile costs one coalesced vector load and one FFMA per
  element on top of plain flash attention.
* Band tiles gather ``P[j, r]`` and ``P[i, r]`` per pair.
* Only tiles that cross a window / causal edge compare offsets (``MASKED`` loops, which also
  gather, so they serve every tile kind); the launcher's ``KCOL`` masks padding keys and keys
  past the end of the sequence with ``−inf`` in every loop. Every loop is compiled for one
  (MODE, MASKED) pair: no tile pays for a branch or a select it does not need.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tile kinds (the MODE of a loop over tiles).
FAR_LO: tl.constexpr = tl.constexpr(0)  # every pair has j - i <= -L: bucket 0
BAND: tl.constexpr = tl.constexpr(1)  # pairs on both sides of a clip limit: gather
FAR_HI: tl.constexpr = tl.constexpr(2)  # every pair has j - i >= U: bucket R-1
PLAIN: tl.constexpr = tl.constexpr(3)  # no delta term at all (use_delta=False)

# Rows of the launcher's float32 row-vector arrays: the per-key KCOL [B, Hp, 3, T] (forward and
# backward) and the backward's per-query ROWS [B, H, 4, T], whose row 0 is D_i = dout_i·out_i.
# A run of kind MODE adds KCOL row run_row(MODE) and subtracts ROWS row run_row(MODE) + 1: one
# mapping serves the key side and the query side.
ROW_LO: tl.constexpr = tl.constexpr(0)  # KCOL: c·P[j, 0] (-inf at padding keys, j >= T);
#                                         ROWS: lse2_i + c·P[i, 0]
ROW_HI: tl.constexpr = tl.constexpr(1)  # the same with bucket R-1
ROW_MID: tl.constexpr = tl.constexpr(2)  # KCOL: 0, or -inf at padding keys; ROWS: lse2_i

# The interpreter (triton 3.8) computes tl.dot of bfloat16 operands wrongly; there, and only
# there, bfloat16 operands are widened to float32 first (exact: bf16 products fit in float32).
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot in float32 accumulation; IEEE (float32 inputs) disables TF32."""
    if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def run_row(MODE: tl.constexpr):
    """The row of KCOL (added to the logits) that a run of tiles of kind MODE reads; ROWS row
    run_row(MODE) + 1 is what the backward subtracts from them."""
    if MODE == FAR_LO:
        return ROW_LO
    elif MODE == FAR_HI:
        return ROW_HI
    else:
        return ROW_MID


@triton.constexpr_function
def gather_tile(block: int) -> int:
    """The tile width of a gathering loop (band or masked) in a program of tile width ``block``:
    gathering loops step through the program's aligned runs in narrower tiles, which cuts the
    registers their per-element addresses and gathered values take (no spills at 8 warps)."""
    return block // 2 if block >= 32 else block


@triton.constexpr_function
def _value(x):
    return getattr(x, "value", x)


@triton.constexpr_function
def loop_tile(block, mode, masked):
    """The loop's tile width: ``gather_tile(block)`` for band and masked loops, else ``block``
    (the same rule the launcher reports to the static profile)."""
    block, mode, masked = _value(block), _value(mode), _value(masked)
    return gather_tile(block) if (mode == _value(BAND) or masked) else block


@triton.jit
def band_bias(pq_base, pk_base, spt, offs_i, offs_j, d, TI, TJ, L, U):
    """float32 tile of P[j, r] − P[i, r] (unscaled), r = clamp(d, −L, U) + L, gathered per pair.

    offs_i (query rows, counted from pq_base) and offs_j (key rows, counted from pk_base) are
    broadcast to the tile's orientation ([M,1] and [1,N], or the transpose), and d = j − i is
    the pairs' offset, so one helper serves the forward/dQ tiles and the transposed dK/dV
    tiles. P's bucket stride is 1 (the launcher makes P contiguous). Rows past the end (TI
    queries, TJ keys) read the last row instead of being masked: their probabilities are 0
    anyway (KCOL is −inf at such keys, the backward's row vectors +inf at such queries), and a
    clamp per row vector is cheaper than a mask per element."""
    r = tl.minimum(tl.maximum(d, -L), U) + L
    gk = tl.load(pk_base + tl.minimum(offs_j, TJ - 1) * spt + r)
    gq = tl.load(pq_base + tl.minimum(offs_i, TI - 1) * spt + r)
    return gk.to(tl.float32) - gq.to(tl.float32)


@triton.jit
def window_mask(t, d, lo, hi):
    """-inf where the offset d = j − i lies outside [lo, hi]."""
    return tl.where((d >= lo) & (d <= hi), t, float("-inf"))


@triton.jit
def sequence(CU_Q, CU_K, off_b, T, TQ, OFF, VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """(q_start, k_start, T, TQ, QOFF, QROW) of batch element off_b: the first query row and key
    row in the tensors, its key and query counts — from cu_seqlens for a packed batch (VARLEN),
    else rows 0 and the launch's T, TQ — and where its queries stand:

    * QOFF: query i's position relative to key 0 is QOFF + i (every offset ``d = j − i`` of the
      kernels is ``j − (QOFF + i)``). End-aligned queries: ``T − TQ``; a block at global
      positions (BLOCK): ``OFF = q_start − k_start``, any sign, past the keys too.
    * QROW: the row of P holding query 0's own row of P (query i's is QROW + i). End-aligned:
      the query's key position, ``T − TQ``; a block: its query rows follow its T key rows in
      one array (the launcher concatenates P_k and P_q), ``T``.

    Tile bounds and offsets use QOFF; only the gathers of the queries' P rows use QROW."""
    if VARLEN:
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        TQ = tl.load(CU_Q + off_b + 1) - q_start
        T = tl.load(CU_K + off_b + 1) - k_start
        return q_start.to(tl.int64), k_start.to(tl.int64), T, TQ, T - TQ, T - TQ
    elif BLOCK:
        return 0, 0, T, TQ, OFF, T
    else:
        return 0, 0, T, TQ, T - TQ, T - TQ


@triton.jit
def key_span(KV, off_b, T, HAS_PAD: tl.constexpr):
    """[kv_lo, kv_hi): the span of the batch element's non-padding keys ([0, T) without a mask)."""
    if HAS_PAD:
        kv_lo = tl.load(KV + off_b * 2)
        kv_hi = tl.load(KV + off_b * 2 + 1)
    else:
        kv_lo = 0
        kv_hi = T
    return kv_lo, kv_hi


@triton.jit
def split_runs(start, end, first_band, first_far, BLOCK: tl.constexpr):
    """Split [start, end) (start a multiple of BLOCK) into the block-aligned runs
    [start, a) far, [a, b) band, [b, end) far: the band starts at the first block whose start is
    >= first_band, the second far run at the first block start >= first_far."""
    a = tl.maximum((tl.maximum(first_band, 0) + BLOCK - 1) // BLOCK * BLOCK, start)
    a = tl.minimum(a, end)
    b = tl.maximum((tl.maximum(first_far, 0) + BLOCK - 1) // BLOCK * BLOCK, a)
    b = tl.minimum(b, end)
    return a, b
