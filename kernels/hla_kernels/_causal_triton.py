"""Triton kernels for chunked (block-)causal Hadamard linear attention, F = 2.

Loaded by `hla_kernels.causal` through importlib, once per mode (compiled or interpreted), after
_triton_common.py of the same mode, whose @jit helpers these kernels call (see _hadamard_triton.py
for the Kronecker-in-registers scheme, _triton_common.py for the EMU rounding).

Per head, tokens in chunks of C; p(t) = t // bs the causal time (bs = 1: token-level causal).
The states the tiles read are indexed by slot, in one of two modes:
  token mode (bs <= C): slot c = the state of every chunk before chunk c; a query tile of chunk c
      reads it and adds the exact masked [BLOCK_M, BLOCK_N] products (p_j <= p_i) with the keys
      from its chunk's start to its last query's block end (past the chunk's end when bs does not
      divide C: at most bs - 1 keys more);
  block mode (bs > C): slot p = the state through the end of causal block p; no intra part. A
      tile (<= C rows, so at most two blocks) whose rows straddle a block boundary contracts both
      blocks' states, each with its own rows.
Any block size runs; a chunk never has to align with the blocks.

Kernels:
  _prefix_state_kernel
                   Tsel and Zsel in one sequential pass per (row block, head, column block); in
                   reverse over the queries for the backward's per-slot state gradients
  _readout_kernel  O = (kk_q Tsel + sum_intra a_ij v_j) / (kk_q zsel + sum_intra a_ij + eps)
                   and den, with a_ij = (q1_i.k1_j)(q2_i.k2_j) w_j
  _dq_kernel       dQ1 = [E1 | written per column block] + [z and intra terms], dQ2
  _dkdv_kernel     dK1, dK2, dV from the per-chunk dT, dz (inter) and the intra tiles
with g_i = dO_i / den_i and e_i = -(dO_i . O_i) / den_i the gradients of the numerator and the
denominator, precomputed on the host.
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl

# the shared @jit helpers of the same mode (hla_kernels._runtime.load_jitted loads them first)
_c = sys.modules[__name__.replace("_causal_triton", "_triton_common")]
_rsum = _c.rsum
_mm = _c.mm
_store_cast = _c.store_cast
_outer_cols = _c.outer_cols
_kron_dot = _c.kron_dot
_kron_grads = _c.kron_grads
_kron_readout = _c.kron_readout
_z_rowsum = _c.z_rowsum


@triton.jit
def _intra_weights(
    q1, q2, k1, k2, offs_m, offs_n, w, BS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """(a, s1, s2, keep) for a query tile x key tile: s_f = q_f k_f^T [M, N] fp32, keep = p_j <= p_i
    and w_j (0/1 key weights incl. the sequence end), a = s1 s2 keep."""
    zero = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    s1 = _mm(q1, tl.trans(k1), zero, DOT_DT, PREC, EMU)
    s2 = _mm(q2, tl.trans(k2), zero, DOT_DT, PREC, EMU)
    keep = tl.where((offs_n[None, :] // BS) <= (offs_m[:, None] // BS), 1.0, 0.0) * w[None, :]
    return s1 * s2 * keep, s1, s2, keep


@triton.jit
def _readout_state(
    p1, s1n, offs_m, mmask, rsel, first, last, t_ptr, z_ptr, acc, den,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, SELECT: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr,
):
    """(acc + kk_q T, den + q1 . (Z q2)) for one state slot (T [R*R, DV] at t_ptr, Z [R, R] at
    z_ptr); SELECT: only the rows where rsel holds (their q2 rows are zeroed for the others)."""
    if SELECT:
        last = tl.where(rsel[:, None], last, 0.0)
    # the query columns a step ahead (the N >= 8192 workaround, see _triton_common.kron_readout)
    acc = _kron_readout(p1, s1n, offs_m, mmask, last, t_ptr, acc, R, DV, G, BLOCK_M, DOT_DT, PREC, EMU)
    den += _z_rowsum(first, last, z_ptr, R, SMALL_PREC, EMU)
    return acc, den


@triton.jit
def _readout_kernel(
    Q1, Q2, K1, K2, V, W, T, Z, Out, Den,
    s1b, s1h, s1n, s2b, s2h, s2n, sk1b, sk1h, sk1n, sk2b, sk2h, sk2n, svb, svh, svn, swb, swn,
    sob, soh, son,
    BH, H, N, C, BS, eps,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTRA: tl.constexpr, HAS_W: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    BLOCK_A: tl.constexpr = G * R
    A: tl.constexpr = R * R
    m0 = pid_m * BLOCK_M
    c = m0 // C

    offs_m = m0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    p1 = Q1 + b * s1b + h * s1h
    first = tl.load(p1 + offs_m[:, None] * s1n + offs_r[None, :], mask=mmask[:, None], other=0.0)
    last = tl.load(Q2 + b * s2b + h * s2h + offs_m[:, None] * s2n + offs_r[None, :], mask=mmask[:, None], other=0.0)
    acc = tl.full((BLOCK_M, DV), 0.0, tl.float32)
    den = tl.full((BLOCK_M,), 0.0, tl.float32)
    if INTRA:
        acc, den = _readout_state(
            p1, s1n, offs_m, mmask, mmask, first, last, T + (c * BH + bh) * A * DV, Z + (c * BH + bh) * A, acc, den,
            R, DV, G, BLOCK_M, False, DOT_DT, PREC, SMALL_PREC, EMU,
        )
    else:
        s0 = m0 // BS
        acc, den = _readout_state(
            p1, s1n, offs_m, mmask, offs_m // BS == s0, first, last, T + (s0 * BH + bh) * A * DV, Z + (s0 * BH + bh) * A,
            acc, den, R, DV, G, BLOCK_M, True, DOT_DT, PREC, SMALL_PREC, EMU,
        )
        s1 = (tl.minimum(m0 + BLOCK_M, N) - 1) // BS
        if s1 != s0:  # a block boundary inside the tile: its later rows read the next block's state
            acc, den = _readout_state(
                p1, s1n, offs_m, mmask, offs_m // BS == s1, first, last, T + (s1 * BH + bh) * A * DV, Z + (s1 * BH + bh) * A,
                acc, den, R, DV, G, BLOCK_M, True, DOT_DT, PREC, SMALL_PREC, EMU,
            )

    if INTRA:
        # keys from the own chunk's start up to the last query's block end (past the chunk's end
        # when bs does not divide C)
        hi = tl.minimum((m0 + BLOCK_M - 1) // BS * BS + BS, N)
        for n0 in range(c * C, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            k1 = tl.load(K1 + b * sk1b + h * sk1h + offs_n[:, None] * sk1n + offs_r[None, :], mask=nmask[:, None], other=0.0)
            k2 = tl.load(K2 + b * sk2b + h * sk2h + offs_n[:, None] * sk2n + offs_r[None, :], mask=nmask[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_c[None, :], mask=nmask[:, None], other=0.0)
            if HAS_W:
                w = tl.load(W + b * swb + offs_n * swn, mask=nmask, other=0.0)
            else:
                w = tl.where(nmask, 1.0, 0.0)
            a, s1, s2, keep = _intra_weights(first, last, k1, k2, offs_m, offs_n, w, BS, BLOCK_M, BLOCK_N, DOT_DT, PREC, EMU)
            den += _rsum(a, axis=1)
            acc = _mm(a, v, acc, DOT_DT, PREC, EMU)

    den = den + eps
    out = acc / den[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_c[None, :], _store_cast(out, Out.dtype.element_ty, EMU), mask=mmask[:, None])
    tl.store(Den + bh * N + offs_m, den, mask=mmask)


@triton.jit
def _dq_state(
    p1, s1n, offs_m, mmask, rsel, do, rden, e, firstf, lastf, t_ptr, z_ptr, dq1a, dq1, dq2,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, SELECT: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr,
):
    """The state terms of dQ for one slot: E1 written to dq1a [N, R] per column block, the rest
    returned in (dq1, dq2); SELECT: only the rows where rsel holds (written and accumulated)."""
    BLOCK_A: tl.constexpr = G * R
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    offs_g = tl.arange(0, G)
    smask = mmask
    if SELECT:
        rden = tl.where(rsel, rden, 0.0)
        e = tl.where(rsel, e, 0.0)
        smask = mmask & rsel
    for o0 in range(0, R, G):
        cols = _outer_cols(p1, s1n, offs_m, mmask, o0, G).to(tl.float32)
        rows = o0 * R + offs_ab
        t = tl.load(t_ptr + rows[:, None] * DV + offs_c[None, :])
        ee = _mm(do, tl.trans(t), tl.full((BLOCK_M, BLOCK_A), 0.0, tl.float32), DOT_DT, PREC, EMU) * rden[:, None]
        e1, de2 = _kron_grads(ee, cols, lastf, BLOCK_M, G, R)
        dq2 += de2
        tl.store(dq1a + offs_m[:, None] * R + (o0 + offs_g)[None, :], e1, mask=smask[:, None])
    zmat = tl.load(z_ptr + offs_r[:, None] * R + offs_r[None, :])
    if EMU:
        zq1 = tl.dot(lastf, tl.trans(zmat))
        zq2 = tl.dot(firstf, zmat)
    else:
        zq1 = tl.dot(lastf, tl.trans(zmat), input_precision=SMALL_PREC)
        zq2 = tl.dot(firstf, zmat, input_precision=SMALL_PREC)
    dq1 += e[:, None] * zq1
    dq2 += e[:, None] * zq2
    return dq1, dq2


@triton.jit
def _dq_kernel(
    Q1, Q2, K1, K2, V, W, T, Z, dO, Wb, dQ1a, dQ1b, dQ2,
    s1b, s1h, s1n, s2b, s2h, s2n, sk1b, sk1h, sk1n, sk2b, sk2h, sk2n, svb, svh, svn, swb, swn,
    sdob, sdoh, sdon,
    BH, H, N, C, BS,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTRA: tl.constexpr, HAS_W: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr,
):
    """dQ1a [BH, N, R] fp32: the state term, one column block per step; dQ1b [BH, N, R] fp32: the
    normaliser and intra terms; dQ2 [BH, N, R] fp32: all of it. The host adds dQ1a + dQ1b."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    BLOCK_A: tl.constexpr = G * R
    A: tl.constexpr = R * R
    m0 = pid_m * BLOCK_M
    c = m0 // C

    offs_m = m0 + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    offs_g = tl.arange(0, G)
    p1 = Q1 + b * s1b + h * s1h
    first = tl.load(p1 + offs_m[:, None] * s1n + offs_r[None, :], mask=mmask[:, None], other=0.0)
    last = tl.load(Q2 + b * s2b + h * s2h + offs_m[:, None] * s2n + offs_r[None, :], mask=mmask[:, None], other=0.0)
    rden = tl.load(Wb + bh * N + offs_m, mask=mmask, other=0.0)  # 1 / den
    e = tl.load(Wb + (BH + bh) * N + offs_m, mask=mmask, other=0.0)  # -delta / den
    # the numerator's gradient is g = dO / den: 1 / den is applied to the products' rows, so no
    # fp32 copy of the dO tile stays live
    do = tl.load(dO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_c[None, :], mask=mmask[:, None], other=0.0)

    lastf = last.to(tl.float32)
    firstf = first.to(tl.float32)
    dq1 = tl.full((BLOCK_M, R), 0.0, tl.float32)
    dq2 = tl.full((BLOCK_M, R), 0.0, tl.float32)
    dq1a = dQ1a + bh * N * R
    if INTRA:
        dq1, dq2 = _dq_state(
            p1, s1n, offs_m, mmask, mmask, do, rden, e, firstf, lastf, T + (c * BH + bh) * A * DV, Z + (c * BH + bh) * A,
            dq1a, dq1, dq2, R, DV, G, BLOCK_M, False, DOT_DT, PREC, SMALL_PREC, EMU,
        )
    else:
        s0 = m0 // BS
        dq1, dq2 = _dq_state(
            p1, s1n, offs_m, mmask, offs_m // BS == s0, do, rden, e, firstf, lastf, T + (s0 * BH + bh) * A * DV,
            Z + (s0 * BH + bh) * A, dq1a, dq1, dq2, R, DV, G, BLOCK_M, True, DOT_DT, PREC, SMALL_PREC, EMU,
        )
        s1 = (tl.minimum(m0 + BLOCK_M, N) - 1) // BS
        if s1 != s0:
            dq1, dq2 = _dq_state(
                p1, s1n, offs_m, mmask, offs_m // BS == s1, do, rden, e, firstf, lastf, T + (s1 * BH + bh) * A * DV,
                Z + (s1 * BH + bh) * A, dq1a, dq1, dq2, R, DV, G, BLOCK_M, True, DOT_DT, PREC, SMALL_PREC, EMU,
            )

    if INTRA:
        hi = tl.minimum((m0 + BLOCK_M - 1) // BS * BS + BS, N)
        for n0 in range(c * C, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            k1 = tl.load(K1 + b * sk1b + h * sk1h + offs_n[:, None] * sk1n + offs_r[None, :], mask=nmask[:, None], other=0.0)
            k2 = tl.load(K2 + b * sk2b + h * sk2h + offs_n[:, None] * sk2n + offs_r[None, :], mask=nmask[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_c[None, :], mask=nmask[:, None], other=0.0)
            if HAS_W:
                w = tl.load(W + b * swb + offs_n * swn, mask=nmask, other=0.0)
            else:
                w = tl.where(nmask, 1.0, 0.0)
            a, s1, s2, keep = _intra_weights(first, last, k1, k2, offs_m, offs_n, w, BS, BLOCK_M, BLOCK_N, DOT_DT, PREC, EMU)
            da = _mm(do, tl.trans(v), tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), DOT_DT, PREC, EMU) * rden[:, None] + e[:, None]
            da = da * keep
            dq1 = _mm(da * s2, k1, dq1, DOT_DT, PREC, EMU)
            dq2 = _mm(da * s1, k2, dq2, DOT_DT, PREC, EMU)

    base = bh * N * R + offs_m[:, None] * R + offs_r[None, :]
    tl.store(dQ1b + base, dq1, mask=mmask[:, None])
    tl.store(dQ2 + base, dq2, mask=mmask[:, None])


@triton.jit
def _dkdv_state(
    pk1, sk1n, offs_n, nmask, rsel, k2f, v, w, t_ptr, z_ptr, dk1a, dv_acc, dk2,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, SELECT: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """The state-gradient terms of a key tile for one slot (dT [R*R, DV] at t_ptr, dz [R*R] at
    z_ptr): dV += kk dT, dkk = V dT^T + dz pulled back through the Kronecker product (dK1a written
    per column block, weighted by w; dK2 returned); SELECT: only the keys where rsel holds."""
    BLOCK_A: tl.constexpr = G * R
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    offs_g = tl.arange(0, G)
    k2s = k2f
    smask = nmask
    if SELECT:
        k2s = tl.where(rsel[:, None], k2f, 0.0)
        smask = nmask & rsel
    for o0 in range(0, R, G):
        cols = _outer_cols(pk1, sk1n, offs_n, nmask, o0, G).to(tl.float32)
        kk = _kron_dot(cols, k2s, BLOCK_N, G, R, DOT_DT, EMU)
        rows = o0 * R + offs_ab
        t = tl.load(t_ptr + rows[:, None] * DV + offs_c[None, :])
        z = tl.load(z_ptr + rows)
        dv_acc = _mm(kk, t, dv_acc, DOT_DT, PREC, EMU)
        dkk = _mm(v, tl.trans(t), tl.full((BLOCK_N, BLOCK_A), 0.0, tl.float32) + z[None, :], DOT_DT, PREC, EMU)
        if SELECT:
            dkk = tl.where(rsel[:, None], dkk, 0.0)
        dcols, dl = _kron_grads(dkk, cols, k2f, BLOCK_N, G, R)
        dk2 += dl
        tl.store(dk1a + offs_n[:, None] * R + (o0 + offs_g)[None, :], dcols * w[:, None], mask=smask[:, None])
    return dv_acc, dk2


@triton.jit
def _dkdv_kernel(
    Q1, Q2, K1, K2, V, W, dT, dZ, dO, Wb, dK1a, dK1b, dK2, dV,
    s1b, s1h, s1n, s2b, s2h, s2n, sk1b, sk1h, sk1n, sk2b, sk2h, sk2n, svb, svh, svn, swb, swn,
    sdob, sdoh, sdon,
    BH, H, N, C, BS,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTRA: tl.constexpr, HAS_W: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Key tile (BLOCK_N keys of chunk c): dV = w (kk dT_c + intra A^T g), dkk = w (V dT_c^T + dz_c)
    pulled back through the Kronecker product (dK1a per column block, dK2), and the intra
    gradients dK1b, dK2 from dS_f = dA (.) s_other. All outputs [BH, N, .] fp32."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    BLOCK_A: tl.constexpr = G * R
    A: tl.constexpr = R * R
    n0 = pid_n * BLOCK_N
    c = n0 // C

    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    offs_g = tl.arange(0, G)
    pk1 = K1 + b * sk1b + h * sk1h
    k1 = tl.load(pk1 + offs_n[:, None] * sk1n + offs_r[None, :], mask=nmask[:, None], other=0.0)
    k2 = tl.load(K2 + b * sk2b + h * sk2h + offs_n[:, None] * sk2n + offs_r[None, :], mask=nmask[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_c[None, :], mask=nmask[:, None], other=0.0)
    if HAS_W:
        w = tl.load(W + b * swb + offs_n * swn, mask=nmask, other=0.0)
    else:
        w = tl.where(nmask, 1.0, 0.0)
    k2f = k2.to(tl.float32)

    dv_acc = tl.full((BLOCK_N, DV), 0.0, tl.float32)
    dk2 = tl.full((BLOCK_N, R), 0.0, tl.float32)
    dk1a = dK1a + bh * N * R
    if INTRA:
        dv_acc, dk2 = _dkdv_state(
            pk1, sk1n, offs_n, nmask, nmask, k2f, v, w, dT + (c * BH + bh) * A * DV, dZ + (c * BH + bh) * A,
            dk1a, dv_acc, dk2, R, DV, G, BLOCK_N, False, DOT_DT, PREC, EMU,
        )
    else:
        s0 = n0 // BS
        dv_acc, dk2 = _dkdv_state(
            pk1, sk1n, offs_n, nmask, offs_n // BS == s0, k2f, v, w, dT + (s0 * BH + bh) * A * DV, dZ + (s0 * BH + bh) * A,
            dk1a, dv_acc, dk2, R, DV, G, BLOCK_N, True, DOT_DT, PREC, EMU,
        )
        s1 = (tl.minimum(n0 + BLOCK_N, N) - 1) // BS
        if s1 != s0:  # a block boundary inside the tile: its later keys read the next block's gradients
            dv_acc, dk2 = _dkdv_state(
                pk1, sk1n, offs_n, nmask, offs_n // BS == s1, k2f, v, w, dT + (s1 * BH + bh) * A * DV, dZ + (s1 * BH + bh) * A,
                dk1a, dv_acc, dk2, R, DV, G, BLOCK_N, True, DOT_DT, PREC, EMU,
            )
    # the inter terms carry the key weight here; the intra ones carry it in `keep`
    dv_acc = dv_acc * w[:, None]
    dk2 = dk2 * w[:, None]
    dk1 = tl.full((BLOCK_N, R), 0.0, tl.float32)

    if INTRA:
        # queries of the own chunk from the first key's block start; tiles start on BLOCK_M
        lo = (n0 // BS * BS) // BLOCK_M * BLOCK_M
        hi = tl.minimum((c + 1) * C, N)
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mmask = offs_m < hi
            q1 = tl.load(Q1 + b * s1b + h * s1h + offs_m[:, None] * s1n + offs_r[None, :], mask=mmask[:, None], other=0.0)
            q2 = tl.load(Q2 + b * s2b + h * s2h + offs_m[:, None] * s2n + offs_r[None, :], mask=mmask[:, None], other=0.0)
            rden = tl.load(Wb + bh * N + offs_m, mask=mmask, other=0.0)
            e = tl.load(Wb + (BH + bh) * N + offs_m, mask=mmask, other=0.0)
            do = tl.load(dO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_c[None, :], mask=mmask[:, None], other=0.0)
            a, s1, s2, keep = _intra_weights(q1, q2, k1, k2, offs_m, offs_n, w, BS, BLOCK_M, BLOCK_N, DOT_DT, PREC, EMU)  # [M, N]
            # g = dO / den enters through the rows of a and of dO v^T (no fp32 copy of the dO tile)
            dv_acc = _mm(tl.trans(a * rden[:, None]), do, dv_acc, DOT_DT, PREC, EMU)
            da = _mm(do, tl.trans(v), tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), DOT_DT, PREC, EMU) * rden[:, None] + e[:, None]
            da = da * keep
            dk1 = _mm(tl.trans(da * s2), q1, dk1, DOT_DT, PREC, EMU)
            dk2 = _mm(tl.trans(da * s1), q2, dk2, DOT_DT, PREC, EMU)

    base = bh * N * R + offs_n[:, None] * R + offs_r[None, :]
    tl.store(dK1b + base, dk1, mask=nmask[:, None])
    tl.store(dK2 + base, dk2, mask=nmask[:, None])
    tl.store(dV + bh * N * DV + offs_n[:, None] * DV + offs_c[None, :], dv_acc, mask=nmask[:, None])


@triton.jit
def _prefix_state_kernel(
    P1, P2, X, W, WZ, Out, ZOut,
    s1b, s1h, s1n, s2b, s2h, s2n, sxb, sxh, sxn, swb, swh, swn, swzb, swzh, swzn,
    H, N, SEG, n_seg,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_W: tl.constexpr, HAS_WZ: tl.constexpr, STORE_BEFORE: tl.constexpr, REVERSE: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """The states the chunks read, in one sequential pass per (row block, head, column block),
    and the normaliser's: ZOut[s, bh, rows] = zacc [G, R] fp32, zacc[g, j] summing
    wz_n P1[n, o0 + g] P2[n, j] from the same loaded features (written by the column block 0
    programs; a separate pass would load them again).

    acc runs over segments of SEG tokens (the chunk in token mode, the causal block in block mode),
    in order or REVERSE; segment s writes slot s. STORE_BEFORE (token mode): the slot gets acc
    before the segment's tokens are added (forward: the earlier chunks; reverse: the later ones);
    else after (block mode: through the block's end; reverse: from the block's start on).
    Out[s, bh, rows, cols] = acc in Out's dtype; acc[a, :] sums kk[n, a] w_n X[n, :].
    """
    pid_a = tl.program_id(0)
    bh = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_bh = tl.num_programs(1)
    b = bh // H
    h = bh % H
    BLOCK_A: tl.constexpr = G * R
    A: tl.constexpr = R * R
    o0 = pid_a * G
    offs_r = tl.arange(0, R)
    offs_c = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    p1 = P1 + b * s1b + h * s1h
    p2 = P2 + b * s2b + h * s2h
    x_ptr = X + b * sxb + h * sxh
    w_ptr = W + b * swb + h * swh
    wz_ptr = WZ + b * swzb + h * swzh
    acc = tl.full((BLOCK_A, BLOCK_DV), 0.0, tl.float32)
    zacc = tl.full((G, R), 0.0, tl.float32)
    zoffs = (o0 + tl.arange(0, G))[:, None] * R + offs_r[None, :]
    zstore = (tl.full((G, R), 0, tl.int32) + pid_d) == 0
    for i in range(0, n_seg):
        if REVERSE:
            s = n_seg - 1 - i
        else:
            s = i
        lo = s * SEG
        hi = tl.minimum(lo + SEG, N)
        if STORE_BEFORE:
            tl.store(Out + ((s * n_bh + bh) * A + offs_a)[:, None] * DV + offs_c[None, :], _store_cast(acc, Out.dtype.element_ty, EMU))
            tl.store(ZOut + (s * n_bh + bh) * A + zoffs, zacc, mask=zstore)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            last = tl.load(p2 + offs_n[:, None] * s2n + offs_r[None, :], mask=nmask[:, None], other=0.0)
            cols = _outer_cols(p1, s1n, offs_n, nmask, o0, G)
            if HAS_W:
                w = tl.load(w_ptr + offs_n * swn, mask=nmask, other=0.0)
                kk = _kron_dot(cols.to(tl.float32) * w[:, None], last, BLOCK_N, G, R, DOT_DT, EMU)
            else:
                kk = _kron_dot(cols, last, BLOCK_N, G, R, DOT_DT, EMU)
            x = tl.load(x_ptr + offs_n[:, None] * sxn + offs_c[None, :], mask=nmask[:, None], other=0.0)
            acc = _mm(tl.trans(kk), x, acc, DOT_DT, PREC, EMU)
            zc = cols.to(tl.float32)
            if HAS_WZ:
                zc = zc * tl.load(wz_ptr + offs_n * swzn, mask=nmask, other=0.0)[:, None]
            zacc += _rsum(zc[:, :, None] * last.to(tl.float32)[:, None, :], axis=0)
        if not STORE_BEFORE:
            tl.store(Out + ((s * n_bh + bh) * A + offs_a)[:, None] * DV + offs_c[None, :], _store_cast(acc, Out.dtype.element_ty, EMU))
            tl.store(ZOut + (s * n_bh + bh) * A + zoffs, zacc, mask=zstore)
