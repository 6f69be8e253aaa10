"""Backward Triton kernels of delta attention (flash-attention 2's split into dK/dV and dQ passes).

* ``bwd_rows_kernel``: per query, the float32 row vectors the other two kernels read
  (``ROWS [B, H, 4, T]``, the layout ``delta_attention_tiles`` describes): ``D_i = dout_i·out_i``,
  then ``lse2_i + c·P[i, 0]``, ``lse2_i + c·P[i, R−1]`` and ``lse2_i`` (log2-domain lse, ``+inf``
  for a query with no visible key, so that ``exp2(t − lse2) = 0`` there). The clipped two turn
  a far tile's probabilities into one FFMA and one subtraction per element:
  ``p = exp2(c·q·k + KCOL[e, j] − (lse2_i + c·P[i, e]))``.
* ``bwd_dkdv_kernel``: one program per ``BLOCK_N`` keys, in the transposed orientation
  (``Sᵀ = K·Qᵀ``, ``dPᵀ = V·dOᵀ``): the key block is the matrix instructions' M dimension, and a
  key's bucket sum of ``dS`` is a row reduction inside the accumulator layout. Writes dk, dv and
  the key rows of dP (``dP[j, r(i,j)] += scale·dS_ij``).
* ``bwd_dq_kernel``: one program per ``BLOCK_M`` queries: dq and the query rows of dP
  (``dP[i, r(i,j)] −= scale·dS_ij``).

Ownership: every program writes only its own rows. Unclipped buckets never collide within a row
(each belongs to one partner), so they are plain stores; the clipped buckets 0 and R−1 are summed
in registers and stored once. The two halves of dP go into the two halves of one float32 buffer
that the launcher adds. No atomics: bitwise deterministic for a given configuration.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .delta_attention_tiles import (BAND, FAR_HI, FAR_LO, PLAIN, ROW_HI, ROW_LO, ROW_MID,
                                    band_bias, dot, key_span, loop_tile, run_row, sequence,
                                    split_runs, window_mask)

#: Columns of the far tiles' dS-sum accumulator (the narrowest matrix-instruction N).
SEL_W: tl.constexpr = tl.constexpr(16)

@triton.jit
def bwd_rows_kernel(OUT, DO, LSE, P, ROWS, CU_Q, CU_K, sob, soh, sot, sod, sdb, sdh, sdt, sdd,
                    slb, slh, slt, spb, sph, spt, H, T, TQ, TPQ, R, qk_scale, OFF,
                    USE_DELTA: tl.constexpr, VARLEN: tl.constexpr, BLOCK: tl.constexpr,
                    DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    q_start, k_start, T, TQ, QOFF, QROW = sequence(CU_Q, CU_K, off_b, T, TQ, OFF, VARLEN, BLOCK)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query indices; P rows QROW + offs_m
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < TQ
    mask = mask_m[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(OUT + off_b * sob + q_start * sot + off_h * soh + offs_m[:, None] * sot
                + offs_dv[None, :] * sod, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * sdb + q_start * sdt + off_h * sdh + offs_m[:, None] * sdt
                 + offs_dv[None, :] * sdd, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + off_b * slb + off_h * slh + (q_start + offs_m) * slt, mask=mask_m,
                  other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    rows = ROWS + pid_bh.to(tl.int64) * 4 * TPQ + offs_m
    tl.store(rows, tl.sum(o * do, 1), mask=mask_m)
    tl.store(rows + (ROW_MID + 1) * TPQ, lse2, mask=mask_m)
    if USE_DELTA:
        p_base = P + off_b * spb + k_start * spt + off_h * sph + (offs_m + QROW) * spt
        p_lo = tl.load(p_base, mask=mask_m, other=0.0).to(tl.float32)
        p_hi = tl.load(p_base + (R - 1), mask=mask_m, other=0.0).to(tl.float32)
        tl.store(rows + (ROW_LO + 1) * TPQ, lse2 + p_lo * qk_scale, mask=mask_m)
        tl.store(rows + (ROW_HI + 1) * TPQ, lse2 + p_hi * qk_scale, mask=mask_m)


@triton.jit
def bucket_selector(BLOCK: tl.constexpr, dtype: tl.constexpr):
    """[BLOCK, SEL_W] with ones in column 0: dot(dS, it) adds the tile's partner sums of dS to
    column 0 of a [rows, SEL_W] accumulator on the tensor cores, with no reduction across
    threads. (The other columns get sums of dS·0, which a NaN in dS makes NaN: they are never
    read.)"""
    cols = tl.zeros([BLOCK, SEL_W], dtype=tl.int32) + tl.arange(0, SEL_W)[None, :]
    return (cols == 0).to(dtype)


@triton.jit
def take_far_sums(acc, acc_far):
    """acc plus column 0 of the far-run accumulator, and the accumulator emptied for the next
    far run (each far run's bucket gets only its own sums)."""
    acc += tl.sum(tl.where(tl.arange(0, SEL_W)[None, :] == 0, acc_far, 0.0), 1)
    return acc, tl.zeros_like(acc_far)


@triton.jit
def _band_dP(ds, d, partner_ok, L, U, acc_lo, acc_hi, dp_ptrs, scale, AXIS: tl.constexpr,
             ENDS: tl.constexpr):
    """A band tile's share of dP: the clipped pairs summed into acc_lo / acc_hi along AXIS (the
    partner axis), the unclipped ones stored (one partner per row and bucket) at dp_ptrs + d.

    Partners past the end of the sequence (``partner_ok`` False) are no pairs: their dS is 0
    for finite inputs, but a non-finite row makes it NaN (NaN·0 in q·k), which must reach no
    bucket (the spec's non-finite rule), hence the select — in the tiles that can hold such
    partners (ENDS; the dK/dV kernel gives every query tile that crosses the end of the queries
    to its masked loops, so its unmasked band tiles skip it). Rows past the end land in the dP
    buffer's padding rows."""
    if ENDS:
        ds = tl.where(partner_ok, ds, 0.0)
    acc_lo += tl.sum(tl.where(d <= -L, ds, 0.0), AXIS)
    acc_hi += tl.sum(tl.where((d >= U) & (d > -L), ds, 0.0), AXIS)
    tl.store(dp_ptrs + d, ds * scale, mask=(d > -L) & (d < U))
    return acc_lo, acc_hi


@triton.jit
def _dkdv_run(dk, dv, acc_lo, acc_hi, k, v, kc_base, q_base, do_base, rows_base, p_base, pk_base,
              dp_base, sh_base,
              sqt, sqd, sdt, sdd, spt, offs_n, offs_dk, offs_dv, m_start, m_end, T, TP, SW, TQ,
              QOFF, QROW, TPQ, L, U, lo, hi, scale, qk_scale, MODE: tl.constexpr,
              MASKED: tl.constexpr, IEEE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              BLOCK_M_PROG: tl.constexpr):
    BLOCK_M: tl.constexpr = loop_tile(BLOCK_M_PROG, MODE, MASKED)
    R = L + U + 1
    ql_rows = rows_base + (run_row(MODE) + 1) * TPQ
    kcol = tl.load(kc_base + run_row(MODE) * TP + offs_n)  # padded to TP: no mask
    mask_dk = (offs_dk < DK)[:, None]
    mask_dv = (offs_dv < DV)[None, :]
    # offsets d = j − (QOFF + i) from query indices i; the queries' P rows start at pq_base
    offs_nq = offs_n - QOFF
    pq_base = p_base + QROW * spt
    for m0 in range(m_start, m_end, BLOCK_M):  # query indices
        offs_q = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_q < TQ
        qT = tl.load(q_base + offs_q[None, :] * sqt + offs_dk[:, None] * sqd,
                     mask=mask_m[None, :] & mask_dk, other=0.0)
        ql = tl.load(ql_rows + offs_q)  # padded to TPQ: no mask
        sT = dot(k, qT, IEEE)  # [BLOCK_N, BLOCK_M]
        if MODE == BAND and not MASKED:  # one float32 load per pair from the shear array
            bias = tl.load((sh_base + offs_q * (SW - 1))[None, :] + offs_n[:, None])
            t = (sT + bias) * qk_scale + kcol[:, None]
        elif MODE == BAND:
            bias = band_bias(pq_base, pk_base, spt, offs_q[None, :], offs_n[:, None],
                             offs_nq[:, None] - offs_q[None, :], TQ, T, L, U)
            t = (sT + bias) * qk_scale + kcol[:, None]
        else:
            t = sT * qk_scale + kcol[:, None]
        if MASKED:
            t = window_mask(t, offs_nq[:, None] - offs_q[None, :], lo, hi)
        pT = tl.exp2(t - ql[None, :])
        do = tl.load(do_base + offs_q[:, None] * sdt + offs_dv[None, :] * sdd,
                     mask=mask_m[:, None] & mask_dv, other=0.0)
        dv += dot(pT.to(do.dtype), do, IEEE)
        Di = tl.load(rows_base + offs_q)
        dpT = dot(v, tl.trans(do), IEEE)
        dsT = pT * (dpT - Di[None, :])
        dk += dot(dsT.to(qT.dtype), tl.trans(qT), IEEE)
        # a key's bucket sum of dS is a row sum of dSᵀ: within each thread's accumulator rows
        if MODE == FAR_LO:
            acc_lo += tl.sum(dsT, 1)
        elif MODE == FAR_HI:
            acc_hi += tl.sum(dsT, 1)
        elif MODE == BAND:
            acc_lo, acc_hi = _band_dP(dsT, offs_nq[:, None] - offs_q[None, :], mask_m[None, :], L,
                                      U, acc_lo, acc_hi,
                                      dp_base + offs_n[:, None] * R + L, scale, 1, MASKED)
    return dk, dv, acc_lo, acc_hi


@triton.jit
def _dkdv_head(dk, dv, k, v, off_b, off_h, q_start, k_start, Q, P, PK, KCOL, SH, DO, ROWS, DPK,
               sqh, sqb, sqt, sqd, spb, sph,
               spt, scb, sch, shb, shh, sdb, sdh, sdt, sdd, offs_n, mask_n, offs_dk, offs_dv,
               start_m, e1, b1, b2, e2, end_m, H, T, TQ, QOFF, QROW, TP, SW, DMIN, TPQ, L, U, lo,
               hi,
               scale, qk_scale,
               USE_DELTA: tl.constexpr, IEEE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query head's share of a key block: dk, dv accumulate; the key rows of its dP."""
    R = L + U + 1
    bh = off_b * H + off_h
    p_base = P + off_b * spb + k_start * spt + off_h * sph
    pk_base = PK + off_b * spb + k_start * spt + off_h * sph  # key rows: 0 at padding keys
    kc_base = KCOL + off_b * scb + off_h * sch
    # + query index i·(SW − 1) + key index j: S[i, j − (QOFF + i) − DMIN]
    sh_base = SH + off_b * shb + off_h * shh - QOFF - DMIN
    dp_base = DPK + bh * TP * R  # contiguous float32 [B*H, TP, R]
    rows_base = ROWS + bh * 4 * TPQ
    q_base = Q + off_b * sqb + q_start * sqt + off_h * sqh
    do_base = DO + off_b * sdb + q_start * sdt + off_h * sdh
    acc_lo = tl.zeros([BLOCK_N], dtype=tl.float32)  # this head's dS summed into bucket 0
    acc_hi = tl.zeros([BLOCK_N], dtype=tl.float32)  # ... into bucket R-1
    if USE_DELTA:
        dk, dv, acc_lo, acc_hi = _dkdv_run(
            dk, dv, acc_lo, acc_hi, k, v, kc_base, q_base, do_base, rows_base, p_base, pk_base,
            dp_base, sh_base, sqt, sqd, sdt, sdd, spt, offs_n, offs_dk, offs_dv, start_m,
            e1, T, TP, SW, TQ, QOFF, QROW, TPQ, L, U, lo, hi, scale, qk_scale, BAND, True,
            IEEE, DK, DV, BLOCK_M)
        dk, dv, acc_lo, acc_hi = _dkdv_run(
            dk, dv, acc_lo, acc_hi, k, v, kc_base, q_base, do_base, rows_base, p_base, pk_base,
            dp_base, sh_base, sqt, sqd, sdt, sdd, spt, offs_n, offs_dk, offs_dv, e1,
            b1, T, TP, SW, TQ, QOFF, QROW, TPQ, L, U, lo, hi, scale, qk_scale, FAR_HI, False,
            IEEE, DK, DV, BLOCK_M)
        dk, dv, acc_lo, acc_hi = _dkdv_run(
            dk, dv, acc_lo, acc_hi, k, v, kc_base, q_base, do_base, rows_base, p_base, pk_base,
            dp_base, sh_base, sqt, sqd, sdt, sdd, spt, offs_n, offs_dk, offs_dv, b1,
            b2, T, TP, SW, TQ, QOFF, QROW, TPQ, L, U, lo, hi, scale, qk_scale, BAND, False,
            IEEE, DK, DV, BLOCK_M)
        dk, dv, acc_lo, acc_hi = _dkdv_run(
            dk, dv, acc_lo, acc_hi, k, v, kc_base, q_base, do_base, rows_base, p_base, pk_base,
            dp_base, sh_base, sqt, sqd, sdt, sdd, spt, offs_n, offs_dk, offs_dv, b2,
            e2, T, TP, SW, TQ, QOFF, QROW, TPQ, L, U, lo, hi, scale, qk_scale, FAR_LO, False,
            IEEE, DK, DV, BLOCK_M)
        dk, dv, acc_lo, acc_hi = _dkdv_run(
            dk, dv, acc_lo, acc_hi, k, v, kc_base, q_base, do_base, rows_base, p_base, pk_base,
            dp_base, sh_base, sqt, sqd, sdt, sdd, spt, offs_n, offs_dk, offs_dv, e2,
            end_m, T, TP, SW, TQ, QOFF, QROW, TPQ, L, U, lo, hi, scale, qk_scale, BAND, True,
            IEEE, DK, DV, BLOCK_M)
        if R == 1:
            tl.store(dp_base + offs_n * R, (acc_lo + acc_hi) * scale, mask=mask_n)
        else:
            tl.store(dp_base + offs_n * R, acc_lo * scale, mask=mask_n)
            tl.store(dp_base + offs_n * R + (R - 1), acc_hi * scale, mask=mask_n)
    else:  # plain flash attention: no P traffic at all
        dk, dv, acc_lo, acc_hi = _dkdv_run(
            dk, dv, acc_lo, acc_hi, k, v, kc_base, q_base, do_base, rows_base, p_base, pk_base,
            dp_base, sh_base, sqt, sqd, sdt, sdd, spt, offs_n, offs_dk, offs_dv, start_m,
            e1, T, TP, SW, TQ, QOFF, QROW, TPQ, L, U, lo, hi, scale, qk_scale, PLAIN, True,
            IEEE, DK, DV, BLOCK_M)
        dk, dv, acc_lo, acc_hi = _dkdv_run(
            dk, dv, acc_lo, acc_hi, k, v, kc_base, q_base, do_base, rows_base, p_base, pk_base,
            dp_base, sh_base, sqt, sqd, sdt, sdd, spt, offs_n, offs_dk, offs_dv, e1,
            e2, T, TP, SW, TQ, QOFF, QROW, TPQ, L, U, lo, hi, scale, qk_scale, PLAIN, False,
            IEEE, DK, DV, BLOCK_M)
        dk, dv, acc_lo, acc_hi = _dkdv_run(
            dk, dv, acc_lo, acc_hi, k, v, kc_base, q_base, do_base, rows_base, p_base, pk_base,
            dp_base, sh_base, sqt, sqd, sdt, sdd, spt, offs_n, offs_dk, offs_dv, e2,
            end_m, T, TP, SW, TQ, QOFF, QROW, TPQ, L, U, lo, hi, scale, qk_scale, PLAIN, True,
            IEEE, DK, DV, BLOCK_M)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(Q, K, V, P, PK, KCOL, SH, KV, DO, ROWS, DK_OUT, DV_OUT, DPK, CU_Q, CU_K,
                    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                    spb, sph, spt, scb, sch, shb, shh, sdb, sdh, sdt, sdd,
                    sgkb, sgkh, sgkt, sgkd, sgvb, sgvh, sgvt, sgvd,
                    H, G, T, TQ, TP, SW, DMIN, TPQ, L, U, lo, hi, OFF, scale, qk_scale, T_KEY,
                    Q_KEY, W_KEY, HAS_PAD: tl.constexpr, USE_DELTA: tl.constexpr,
                    VARLEN: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
                    GROUPED: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """One program per key block of one (batch, key/value head): dk and dv, summed over the G
    query heads of the group in registers (deterministic, no copy of k/v), and the key rows of
    each query head's dP."""
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    HKV = H // G
    off_b = (pid_bg // HKV).to(tl.int64)
    off_g = (pid_bg % HKV).to(tl.int64)
    R = L + U + 1
    q_start, k_start, T, TQ, QOFF, QROW = sequence(CU_Q, CU_K, off_b, T, TQ, OFF, VARLEN, BLOCK)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < T
    mask_dk = offs_dk < DK
    mask_dv = offs_dv < DV
    k = tl.load(K + off_b * skb + k_start * skt + off_g * skh + offs_n[:, None] * skt
                + offs_dk[None, :] * skd, mask=mask_n[:, None] & mask_dk[None, :], other=0.0)
    v = tl.load(V + off_b * svb + k_start * svt + off_g * svh + offs_n[:, None] * svt
                + offs_dv[None, :] * svd, mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query tiles are walked in query-index space; n0q is the key block's start in it (query i
    # stands at position QOFF + i). Query tiles meeting the band n0-hi <= pos <= n0+BLOCK_N-1-lo;
    # none when the key block lies outside the non-padding span.
    n0q = n0 - QOFF
    kv_lo, kv_hi = key_span(KV, off_b, T, HAS_PAD)
    start_m = tl.maximum(n0q - hi, 0) // BLOCK_M * BLOCK_M
    end_m = tl.minimum(n0q + BLOCK_N - lo, TQ)
    end_m = tl.where((n0 < kv_hi) & (n0 + BLOCK_N > kv_lo) & (n0 < T), end_m, start_m)
    # ascending i, so descending j - i: query tiles crossing the window's upper edge, unmasked
    # tiles, then tiles crossing its lower edge
    e1, e2 = split_runs(start_m, end_m, n0q + BLOCK_N - 1 - hi, n0q - BLOCK_M + 2 - lo, BLOCK_M)
    e2 = tl.maximum(tl.minimum(e2, TQ // BLOCK_M * BLOCK_M), e1)  # the last tile: masked
    # far-high (j - i >= U) first, then the band, then far-low (j - i <= -L)
    b1, b2 = split_runs(e1, e2, n0q - U - BLOCK_M + 2, n0q + BLOCK_N - 1 + L, BLOCK_M)
    if GROUPED:  # the G query heads of the key/value head, summed in registers
        for hh in range(0, G):
            dk, dv = _dkdv_head(dk, dv, k, v, off_b, off_g * G + hh, q_start, k_start, Q, P, PK,
                                KCOL, SH, DO, ROWS, DPK,
                                sqh, sqb, sqt, sqd, spb, sph, spt, scb, sch, shb, shh, sdb, sdh,
                                sdt, sdd, offs_n, mask_n, offs_dk, offs_dv, start_m, e1, b1, b2,
                                e2, end_m, H, T, TQ, QOFF, QROW, TP, SW, DMIN, TPQ, L, U, lo, hi,
                                scale, qk_scale,
                                USE_DELTA, IEEE, DK, DV, BLOCK_M, BLOCK_N)
    else:
        dk, dv = _dkdv_head(dk, dv, k, v, off_b, off_g, q_start, k_start, Q, P, PK, KCOL, SH, DO,
                            ROWS, DPK, sqh, sqb, sqt,
                            sqd, spb, sph, spt, scb, sch, shb, shh, sdb, sdh, sdt, sdd, offs_n,
                            mask_n, offs_dk, offs_dv, start_m, e1, b1, b2, e2, end_m, H, T, TQ,
                            QOFF, QROW, TP, SW, DMIN, TPQ, L, U, lo, hi, scale, qk_scale, USE_DELTA,
                            IEEE, DK,
                            DV, BLOCK_M, BLOCK_N)

    # A padding key has probability 0 everywhere (KCOL is -inf there), hence dk = dv = 0.
    gk_base = DK_OUT + off_b * sgkb + k_start * sgkt + off_g * sgkh
    gv_base = DV_OUT + off_b * sgvb + k_start * sgvt + off_g * sgvh
    tl.store(gk_base + offs_n[:, None] * sgkt + offs_dk[None, :] * sgkd,
             (dk * scale).to(DK_OUT.dtype.element_ty), mask=mask_n[:, None] & mask_dk[None, :])
    tl.store(gv_base + offs_n[:, None] * sgvt + offs_dv[None, :] * sgvd,
             dv.to(DV_OUT.dtype.element_ty), mask=mask_n[:, None] & mask_dv[None, :])


@triton.jit
def _dq_run(dq, acc_lo, acc_hi, acc_far, q, do, rows_base, k_base, v_base, kc_base, p_base, pk_base,
            dp_base, sh_base,
            skt, skd, svt, svd, spt, offs_q, offs_m, offs_pq, offs_dp, offs_dk, offs_dv, n_start,
            n_end, T, QEND, TP, TPQ, L, U, lo, hi, scale, qk_scale, MODE: tl.constexpr,
            MASKED: tl.constexpr,
            IEEE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_N_PROG: tl.constexpr):
    BLOCK_N: tl.constexpr = loop_tile(BLOCK_N_PROG, MODE, MASKED)
    R = L + U + 1
    kc = kc_base + run_row(MODE) * TP
    # offs_q: the block's query indices (rows of ROWS); offs_m: their key positions
    ql = tl.load(rows_base + (run_row(MODE) + 1) * TPQ + offs_q)  # padded to TPQ: no mask
    Di = tl.load(rows_base + offs_q)
    mask_dk = (offs_dk < DK)[:, None]
    mask_dv = (offs_dv < DV)[:, None]
    sel = bucket_selector(BLOCK_N, q.dtype)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < T
        kT = tl.load(k_base + offs_n[None, :] * skt + offs_dk[:, None] * skd,
                     mask=mask_n[None, :] & mask_dk, other=0.0)
        kcol = tl.load(kc + offs_n)  # padded to TP: no mask
        s = dot(q, kT, IEEE)  # [BLOCK_M, BLOCK_N]
        if MODE == BAND and not MASKED:  # one float32 load per pair from the shear array
            t = (s + tl.load(sh_base + offs_n[None, :])) * qk_scale + kcol[None, :]
        elif MODE == BAND:
            bias = band_bias(p_base, pk_base, spt, offs_pq[:, None], offs_n[None, :],
                             offs_n[None, :] - offs_m[:, None], QEND, T, L, U)
            t = (s + bias) * qk_scale + kcol[None, :]
        else:
            t = s * qk_scale + kcol[None, :]
        if MASKED:
            t = window_mask(t, offs_n[None, :] - offs_m[:, None], lo, hi)
        p = tl.exp2(t - ql[:, None])
        vT = tl.load(v_base + offs_n[None, :] * svt + offs_dv[:, None] * svd,
                     mask=mask_n[None, :] & mask_dv, other=0.0)
        dp = dot(do, vT, IEEE)
        ds = p * (dp - Di[:, None])
        ds16 = ds.to(kT.dtype)
        dq += dot(ds16, tl.trans(kT), IEEE)
        if MODE == FAR_LO or MODE == FAR_HI:  # the row sums of dS, on the tensor cores
            acc_far += dot(ds16, sel, IEEE)
        elif MODE == BAND:
            acc_lo, acc_hi = _band_dP(ds, offs_n[None, :] - offs_m[:, None], mask_n[None, :], L, U,
                                      acc_lo, acc_hi,
                                      dp_base + offs_dp[:, None] * R + L, -scale, 1, True)
    return dq, acc_lo, acc_hi, acc_far


@triton.jit
def bwd_dq_kernel(Q, K, V, P, PK, KCOL, SH, KV, DO, ROWS, DQ_OUT, DPQ, CU_Q, CU_K,
                  sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                  spb, sph, spt, scb, sch, shb, shh, sdb, sdh, sdt, sdd, sgqb, sgqh, sgqt, sgqd,
                  H, G, T, TQ, TP, SW, DMIN, TPQ, L, U, lo, hi, OFF, scale, qk_scale, T_KEY,
                  Q_KEY, W_KEY, HAS_PAD: tl.constexpr, USE_DELTA: tl.constexpr,
                  VARLEN: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
                  DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr,
                  BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per query block of one (batch, query head): dq and the query rows of dP
    (at the queries' key positions QOFF + i; with BLOCK at their query indices i, in DPQ's own
    [B*H, TPQ, R] rows)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // G
    q_start, k_start, T, TQ, QOFF, QROW = sequence(CU_Q, CU_K, off_b, T, TQ, OFF, VARLEN, BLOCK)
    k_base = K + off_b * skb + k_start * skt + off_hk * skh
    v_base = V + off_b * svb + k_start * svt + off_hk * svh
    p_base = P + off_b * spb + k_start * spt + off_h * sph
    pk_base = PK + off_b * spb + k_start * spt + off_h * sph  # key rows: 0 at padding keys
    kc_base = KCOL + off_b * scb + off_h * sch
    R = L + U + 1
    rows_base = ROWS + pid_bh.to(tl.int64) * 4 * TPQ

    offs_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query indices
    mask_m = offs_q < TQ
    m0 = pid_m * BLOCK_M + QOFF  # positions from here on
    offs_m = offs_q + QOFF
    offs_pq = offs_q + QROW  # the queries' own rows of P
    QEND = QROW + TQ  # one past the last query row of P
    if BLOCK:  # contiguous float32 [B*H, TPQ, R], by query index
        dp_base = DPQ + pid_bh.to(tl.int64) * TPQ * R
        offs_dp = offs_q
    else:  # contiguous float32 [B*H, TP, R], by key position
        dp_base = DPQ + pid_bh.to(tl.int64) * TP * R
        offs_dp = offs_m
    # + key index j: S[i, j − (QOFF + i) − DMIN] (delta_attention_tiles)
    sh_base = (SH + off_b * shb + off_h * shh + offs_q * (SW - 1) - QOFF - DMIN)[:, None]
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dk = offs_dk < DK
    q = tl.load(Q + off_b * sqb + q_start * sqt + off_h * sqh + offs_q[:, None] * sqt
                + offs_dk[None, :] * sqd, mask=mask_m[:, None] & mask_dk[None, :], other=0.0)
    do = tl.load(DO + off_b * sdb + q_start * sdt + off_h * sdh + offs_q[:, None] * sdt
                 + offs_dv[None, :] * sdd, mask=mask_m[:, None] & (offs_dv < DV)[None, :],
                 other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M], dtype=tl.float32)  # band tiles' sums of dS into bucket 0
    acc_hi = tl.zeros([BLOCK_M], dtype=tl.float32)  # ... into bucket R-1
    acc_far = tl.zeros([BLOCK_M, SEL_W], dtype=tl.float32)  # the current far run's, column 0

    kv_lo, kv_hi = key_span(KV, off_b, T, HAS_PAD)
    start_n = tl.maximum(tl.maximum(m0 + lo, kv_lo), 0) // BLOCK_N * BLOCK_N
    end_n = tl.minimum(tl.minimum(m0 + BLOCK_M + hi, T), kv_hi)
    end_n = tl.where(pid_m * BLOCK_M < TQ, end_n, start_n)  # a block past a short sequence
    e1, e2 = split_runs(start_n, end_n, m0 + BLOCK_M - 1 + lo, m0 + hi - BLOCK_N + 2, BLOCK_N)
    if USE_DELTA:
        b1, b2 = split_runs(e1, e2, m0 - L - BLOCK_N + 2, m0 + BLOCK_M - 1 + U, BLOCK_N)
        dq, acc_lo, acc_hi, acc_far = _dq_run(
            dq, acc_lo, acc_hi, acc_far, q, do, rows_base, k_base, v_base, kc_base, p_base,
            pk_base, dp_base, sh_base, skt, skd, svt, svd, spt, offs_q, offs_m, offs_pq, offs_dp,
            offs_dk, offs_dv, start_n, e1, T, QEND, TP, TPQ, L, U, lo, hi, scale, qk_scale, BAND,
            True, IEEE, DK, DV, BLOCK_N)
        dq, acc_lo, acc_hi, acc_far = _dq_run(
            dq, acc_lo, acc_hi, acc_far, q, do, rows_base, k_base, v_base, kc_base, p_base,
            pk_base, dp_base, sh_base, skt, skd, svt, svd, spt, offs_q, offs_m, offs_pq, offs_dp,
            offs_dk, offs_dv, e1, b1, T, QEND, TP, TPQ, L, U, lo, hi, scale, qk_scale, FAR_LO,
            False, IEEE, DK, DV, BLOCK_N)
        acc_lo, acc_far = take_far_sums(acc_lo, acc_far)
        dq, acc_lo, acc_hi, acc_far = _dq_run(
            dq, acc_lo, acc_hi, acc_far, q, do, rows_base, k_base, v_base, kc_base, p_base,
            pk_base, dp_base, sh_base, skt, skd, svt, svd, spt, offs_q, offs_m, offs_pq, offs_dp,
            offs_dk, offs_dv, b1, b2, T, QEND, TP, TPQ, L, U, lo, hi, scale, qk_scale, BAND,
            False, IEEE, DK, DV, BLOCK_N)
        dq, acc_lo, acc_hi, acc_far = _dq_run(
            dq, acc_lo, acc_hi, acc_far, q, do, rows_base, k_base, v_base, kc_base, p_base,
            pk_base, dp_base, sh_base, skt, skd, svt, svd, spt, offs_q, offs_m, offs_pq, offs_dp,
            offs_dk, offs_dv, b2, e2, T, QEND, TP, TPQ, L, U, lo, hi, scale, qk_scale, FAR_HI,
            False, IEEE, DK, DV, BLOCK_N)
        acc_hi, acc_far = take_far_sums(acc_hi, acc_far)
        dq, acc_lo, acc_hi, acc_far = _dq_run(
            dq, acc_lo, acc_hi, acc_far, q, do, rows_base, k_base, v_base, kc_base, p_base,
            pk_base, dp_base, sh_base, skt, skd, svt, svd, spt, offs_q, offs_m, offs_pq, offs_dp,
            offs_dk, offs_dv, e2, end_n, T, QEND, TP, TPQ, L, U, lo, hi, scale, qk_scale, BAND,
            True, IEEE, DK, DV, BLOCK_N)
        if R == 1:
            tl.store(dp_base + offs_dp * R, -(acc_lo + acc_hi) * scale, mask=mask_m)
        else:
            tl.store(dp_base + offs_dp * R, -acc_lo * scale, mask=mask_m)
            tl.store(dp_base + offs_dp * R + (R - 1), -acc_hi * scale, mask=mask_m)
    else:  # plain flash attention: no P traffic at all
        dq, acc_lo, acc_hi, acc_far = _dq_run(
            dq, acc_lo, acc_hi, acc_far, q, do, rows_base, k_base, v_base, kc_base, p_base,
            pk_base, dp_base, sh_base, skt, skd, svt, svd, spt, offs_q, offs_m, offs_pq, offs_dp,
            offs_dk, offs_dv, start_n, e1, T, QEND, TP, TPQ, L, U, lo, hi, scale, qk_scale, PLAIN,
            True, IEEE, DK, DV, BLOCK_N)
        dq, acc_lo, acc_hi, acc_far = _dq_run(
            dq, acc_lo, acc_hi, acc_far, q, do, rows_base, k_base, v_base, kc_base, p_base,
            pk_base, dp_base, sh_base, skt, skd, svt, svd, spt, offs_q, offs_m, offs_pq, offs_dp,
            offs_dk, offs_dv, e1, e2, T, QEND, TP, TPQ, L, U, lo, hi, scale, qk_scale, PLAIN,
            False, IEEE, DK, DV, BLOCK_N)
        dq, acc_lo, acc_hi, acc_far = _dq_run(
            dq, acc_lo, acc_hi, acc_far, q, do, rows_base, k_base, v_base, kc_base, p_base,
            pk_base, dp_base, sh_base, skt, skd, svt, svd, spt, offs_q, offs_m, offs_pq, offs_dp,
            offs_dk, offs_dv, e2, end_n, T, QEND, TP, TPQ, L, U, lo, hi, scale, qk_scale, PLAIN,
            True, IEEE, DK, DV, BLOCK_N)
    gq_base = DQ_OUT + off_b * sgqb + q_start * sgqt + off_h * sgqh
    tl.store(gq_base + offs_q[:, None] * sgqt + offs_dk[None, :] * sgqd,
             (dq * scale).to(DQ_OUT.dtype.element_ty), mask=mask_m[:, None] & mask_dk[None, :])
