"""Forward Triton kernel of delta attention: flash-style online softmax with the delta bias.

One program owns ``BLOCK_M`` queries of one (batch, head) and walks the key tiles that the
window / causal mask and the padding span leave visible, in up to three runs: far-low, band,
far-high (``delta_attention_tiles``). Logits are kept in the log2 domain (``c = scale·log2 e``):

* far tile:  ``t_ij = c·q_i·k_j + KCOL[e, j]`` (one FFMA), and the query term ``−c·P[i, e]``,
  constant over the run, is folded into the running maximum instead of into every element;
* band tile: ``t_ij = c·(q_i·k_j + P[j, r] − P[i, r]) + KCOL[pad, j]``;
* plain (no delta term): ``t_ij = c·q_i·k_j + KCOL[pad, j]``.

``KCOL`` carries ``−inf`` at padding keys and past the end of the sequence, so those need no
mask; only tiles that cross a window / causal edge are masked. Writes ``out`` (0 for a query
with no visible key) and ``lse`` (natural log, ``−inf`` for such a query).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .delta_attention_tiles import (BAND, FAR_HI, FAR_LO, PLAIN, band_bias, dot, run_row,
                                    key_span, loop_tile, sequence, split_runs,
                                    window_mask)


@triton.jit
def _fwd_run(acc, l_i, m_i, q, qrow, k_base, v_base, p_base, pk_base, kc_base, sh_base, skt, skd,
             svt, svd, spt, offs_m, offs_pq, offs_dk, offs_dv, n_start, n_end, T, QEND, TP, L, U,
             lo, hi, qk_scale, MODE: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
             DK: tl.constexpr, DV: tl.constexpr, BLOCK_N_PROG: tl.constexpr):
    BLOCK_N: tl.constexpr = loop_tile(BLOCK_N_PROG, MODE, MASKED)
    if MODE == FAR_LO or MODE == FAR_HI:
        # the run's frame: logits without the query term -c·P[i, e]; an empty run shifts
        # nothing (a non-finite P[i, e] of a bucket the row never uses must not reach it)
        qrow = tl.where(n_start < n_end, qrow, 0.0)
        m_i = m_i + qrow
    kc = kc_base + run_row(MODE) * TP
    mask_dk = (offs_dk < DK)[:, None]
    mask_dv = (offs_dv < DV)[None, :]
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < T
        kT = tl.load(k_base + offs_n[None, :] * skt + offs_dk[:, None] * skd,
                     mask=mask_n[None, :] & mask_dk, other=0.0)
        kcol = tl.load(kc + offs_n[None, :])  # padded to TP: no mask; [1, N], or [M, N] stacked
        qk = dot(q, kT, IEEE)
        if MODE == BAND and not MASKED:  # one float32 load per pair from the shear array
            t = (qk + tl.load(sh_base + offs_n[None, :])) * qk_scale + kcol
        elif MODE == BAND:
            bias = band_bias(p_base, pk_base, spt, offs_pq[:, None], offs_n[None, :],
                             offs_n[None, :] - offs_m[:, None], QEND, T, L, U)
            t = (qk + bias) * qk_scale + kcol
        else:
            t = qk * qk_scale + kcol
        if MASKED:
            t = window_mask(t, offs_n[None, :] - offs_m[:, None], lo, hi)
        m_new = tl.maximum(m_i, tl.max(t, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(t - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_dv[None, :] * svd,
                    mask=mask_n[:, None] & mask_dv, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    if MODE == FAR_LO or MODE == FAR_HI:
        m_i = m_i - qrow
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(Q, K, V, P, PK, KCOL, SH, KV, OUT, LSE, CU_Q, CU_K, PART,
               sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
               spb, sph, spt, scb, sch, shb, shh, sob, soh, sot, sod, slb, slh, slt,
               H, G, T, TQ, TP, SW, DMIN, L, U, lo, hi, OFF, qk_scale, SPLIT_N, T_KEY, Q_KEY,
               W_KEY, HAS_PAD: tl.constexpr, USE_DELTA: tl.constexpr, VARLEN: tl.constexpr,
               BLOCK: tl.constexpr,
               SPLIT: tl.constexpr, STACK: tl.constexpr, IEEE: tl.constexpr, DK: tl.constexpr,
               DV: tl.constexpr, BLOCK_DK: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_M query rows of one (batch element or packed sequence, query head),
    or with STACK (short query blocks: decoding) of one (element, key/value head): its rows are
    then the G·TQ queries of the group's G query heads, head-major, so that each key/value tile
    is read once per key/value head rather than once per query head. The TQ queries stand at key
    positions QOFF.. (QOFF = T − TQ, the end of the keys; with BLOCK, OFF) and their own rows of
    P are rows QROW.. (``sequence``); query head h reads key/value head h // G. With SPLIT
    (decoding: few query blocks, long keys) the third grid dimension splits the keys into
    SPLIT_N-key ranges (flash-decoding): each program writes its unnormalised partial output,
    running maximum and sum to PART, and the launcher combines them."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if STACK:
        off_b = (pid_bh // (H // G)).to(tl.int64)
        off_hk = (pid_bh % (H // G)).to(tl.int64)
        first_h = off_hk * G
    else:
        off_b = (pid_bh // H).to(tl.int64)
        first_h = (pid_bh % H).to(tl.int64)
        off_hk = first_h // G
    q_start, k_start, T, TQ, QOFF, QROW = sequence(CU_Q, CU_K, off_b, T, TQ, OFF, VARLEN, BLOCK)
    QEND = QROW + TQ  # one past the last query row of P
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the program's rows
    if STACK:  # row = g·TQ + query index: every row's position lies in [QOFF, QOFF + TQ)
        n_rows = G * TQ
        offs_q = offs_r % tl.maximum(TQ, 1)
        # each row's query head (rows past the group's end read its last head's rows)
        row_h = first_h + tl.minimum(offs_r // tl.maximum(TQ, 1), G - 1)
        m0 = QOFF
        m_span = TQ
    else:  # row = query index
        n_rows = TQ
        offs_q = offs_r
        row_h = first_h
        m0 = pid_m * BLOCK_M + QOFF  # positions from here on
        m_span = BLOCK_M
    mask_m = offs_r < n_rows
    offs_m = offs_q + QOFF
    offs_pq = offs_q + QROW  # the queries' own rows of P
    k_base = K + off_b * skb + k_start * skt + off_hk * skh
    v_base = V + off_b * svb + k_start * svt + off_hk * svh
    # per-query-head bases: scalars, or per row with STACK; the runs take them as tiles' rows
    p_rows = P + off_b * spb + k_start * spt + row_h * sph
    pk_rows = PK + off_b * spb + k_start * spt + row_h * sph  # key rows: 0 at padding keys
    kc_rows = KCOL + off_b * scb + row_h * sch
    # + key index j: the shear array's S[i, j − (QOFF + i) − DMIN] (delta_attention_tiles)
    sh_base = (SH + off_b * shb + row_h * shh + offs_q * (SW - 1) - QOFF - DMIN)[:, None]
    if STACK:
        p_base = p_rows[:, None]
        pk_base = pk_rows[:, None]
        kc_base = kc_rows[:, None]
    else:
        p_base = p_rows
        pk_base = pk_rows
        kc_base = kc_rows
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = Q + off_b * sqb + (q_start + offs_q) * sqt + row_h * sqh
    q = tl.load(q_rows[:, None] + offs_dk[None, :] * sqd,
                mask=mask_m[:, None] & (offs_dk < DK)[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # key blocks meeting the band m0+lo <= j <= m0+m_span-1+hi and the non-padding span
    kv_lo, kv_hi = key_span(KV, off_b, T, HAS_PAD)
    start_n = tl.maximum(tl.maximum(m0 + lo, kv_lo), 0) // BLOCK_N * BLOCK_N
    end_n = tl.minimum(tl.minimum(m0 + m_span + hi, T), kv_hi)
    end_n = tl.where(pid_m * BLOCK_M < n_rows, end_n, start_n)  # a block past a short sequence
    if SPLIT:  # this program's share of the keys (SPLIT_N is a multiple of every tile)
        split_lo = tl.program_id(2) * SPLIT_N
        start_n = tl.maximum(start_n, split_lo)
        end_n = tl.maximum(tl.minimum(end_n, split_lo + SPLIT_N), start_n)
    # key tiles crossing the window's lower edge, then unmasked tiles, then tiles crossing its
    # upper edge (masked loops gather, so they also serve every tile kind)
    e1, e2 = split_runs(start_n, end_n, m0 + m_span - 1 + lo, m0 + hi - BLOCK_N + 2, BLOCK_N)
    if USE_DELTA:
        # the query rows of the two clipped buckets, read once for all far tiles
        qrow_lo = tl.load(p_rows + offs_pq * spt, mask=mask_m, other=0.0).to(tl.float32)
        qrow_hi = tl.load(p_rows + offs_pq * spt + (L + U), mask=mask_m,
                          other=0.0).to(tl.float32)
        qrow_lo = qrow_lo * qk_scale
        qrow_hi = qrow_hi * qk_scale
        # far-low: j - i <= -L for the whole tile; far-high: j - i >= U for the whole tile
        b1, b2 = split_runs(e1, e2, m0 - L - BLOCK_N + 2, m0 + m_span - 1 + U, BLOCK_N)
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, qrow_lo, k_base, v_base, p_base, pk_base,
                                 kc_base, sh_base, skt, skd, svt, svd, spt, offs_m, offs_pq,
                                 offs_dk, offs_dv, start_n, e1, T, QEND, TP, L, U, lo, hi,
                                 qk_scale, BAND, True, IEEE, DK, DV, BLOCK_N)
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, qrow_lo, k_base, v_base, p_base, pk_base,
                                 kc_base, sh_base, skt, skd, svt, svd, spt, offs_m, offs_pq,
                                 offs_dk, offs_dv, e1, b1, T, QEND, TP, L, U, lo, hi, qk_scale,
                                 FAR_LO, False, IEEE, DK, DV, BLOCK_N)
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, qrow_lo, k_base, v_base, p_base, pk_base,
                                 kc_base, sh_base, skt, skd, svt, svd, spt, offs_m, offs_pq,
                                 offs_dk, offs_dv, b1, b2, T, QEND, TP, L, U, lo, hi, qk_scale,
                                 BAND, False, IEEE, DK, DV, BLOCK_N)
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, qrow_hi, k_base, v_base, p_base, pk_base,
                                 kc_base, sh_base, skt, skd, svt, svd, spt, offs_m, offs_pq,
                                 offs_dk, offs_dv, b2, e2, T, QEND, TP, L, U, lo, hi, qk_scale,
                                 FAR_HI, False, IEEE, DK, DV, BLOCK_N)
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, qrow_hi, k_base, v_base, p_base, pk_base,
                                 kc_base, sh_base, skt, skd, svt, svd, spt, offs_m, offs_pq,
                                 offs_dk, offs_dv, e2, end_n, T, QEND, TP, L, U, lo, hi,
                                 qk_scale, BAND, True, IEEE, DK, DV, BLOCK_N)
    else:  # plain flash attention: no P traffic at all
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, l_i, k_base, v_base, p_base, pk_base, kc_base,
                                 sh_base, skt, skd, svt, svd, spt, offs_m, offs_pq, offs_dk,
                                 offs_dv, start_n, e1, T, QEND, TP, L, U, lo, hi, qk_scale, PLAIN,
                                 True, IEEE, DK, DV, BLOCK_N)
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, l_i, k_base, v_base, p_base, pk_base, kc_base,
                                 sh_base, skt, skd, svt, svd, spt, offs_m, offs_pq, offs_dk,
                                 offs_dv, e1, e2, T, QEND, TP, L, U, lo, hi, qk_scale, PLAIN,
                                 False, IEEE, DK, DV, BLOCK_N)
        acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, l_i, k_base, v_base, p_base, pk_base, kc_base,
                                 sh_base, skt, skd, svt, svd, spt, offs_m, offs_pq, offs_dk,
                                 offs_dv, e2, end_n, T, QEND, TP, L, U, lo, hi, qk_scale, PLAIN,
                                 True, IEEE, DK, DV, BLOCK_N)

    if SPLIT:  # PART [splits, B*H, TQ, BLOCK_DV + 2]: acc, then m (log2 domain) and l
        n_bh = tl.num_programs(1) * G if STACK else tl.num_programs(1)  # B*H
        part = (PART + ((tl.program_id(2) * n_bh + off_b * H + first_h) * TQ + offs_r)[:, None]
                * (BLOCK_DV + 2))
        tl.store(part + offs_dv[None, :], acc, mask=mask_m[:, None])
        tl.store(part + BLOCK_DV, m_i[:, None], mask=mask_m[:, None])
        tl.store(part + (BLOCK_DV + 1), l_i[:, None], mask=mask_m[:, None])
    else:
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse2 = m_i + tl.log2(tl.where(empty, 1.0, l_i))  # log2 domain
        lse = tl.where(empty, float("-inf"), lse2 * 0.6931471805599453)
        o_rows = OUT + off_b * sob + (q_start + offs_q) * sot + row_h * soh
        tl.store(o_rows[:, None] + offs_dv[None, :] * sod, out.to(OUT.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_dv < DV)[None, :])
        tl.store(LSE + off_b * slb + row_h * slh + (q_start + offs_q) * slt, lse, mask=mask_m)
