"""Triton kernels for bidirectional Hadamard linear attention, F = 2 (HLA-MATH.md section 1).

Loaded by `hla_kernels.hadamard` through importlib, once per mode (compiled or interpreted), so
that TRITON_INTERPRET is read when the kernels are needed rather than when a module is imported.

Per head, with feature factors P1, P2 [N, R] (keys or queries), the Kronecker feature of row n is
kk[n, a1 * R + a2] = P1[n, a1] * P2[n, a2]. A block of G consecutive outer indices a1 covers
BLOCK_A = G * R rows of the state; its [rows, BLOCK_A] slice of kk is built in registers from a
[rows, G] slice of P1 and the [rows, R] tile of P2 and goes straight into tl.dot. No [N, R * R]
tensor exists anywhere.

The normaliser's state z[a] = sum_n kk[n, a] is the [R, R] matrix Z = P1^T diag(w) P2, a small
GEMM of its own (_zstate_kernel, fp32): the big kernels never reduce over kk elementwise, and
the readout gets den = rowsum(Q1 * (Q2 Z^T)) from two small dots instead of an R*R-long sum.

Kernels:
  _state_kernel    T[a, :] = sum_n kk[n, a] w_n X[n, :]
                   (forward: X = V, w = key mask; backward: X = dO, w = 1 / den)
  _zstate_kernel   Z = sum_n w_n P1[n] P2[n]^T   (forward: w = mask; backward: w = -delta / den)
                   both split the sum over n across programs; partials are summed on the host
  _readout_kernel  O = (kk_q T) / (kk_q z + eps), also saves den
  _dq_kernel       dP1, dP2 of the queries from T, Z, dO, den; writes [1 / den, -delta / den]
  _dkdv_kernel     dP1, dP2 of the keys and dV from dT, dZ, V
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl


# the shared @jit helpers of the same mode (hla_kernels._runtime.load_jitted loads them first)
_c = sys.modules[__name__.replace("_hadamard_triton", "_triton_common")]
_rsum = _c.rsum
_store_cast = _c.store_cast
_mm = _c.mm
_outer_cols = _c.outer_cols
_kron_dot = _c.kron_dot
_kron_grads = _c.kron_grads
_kron_readout = _c.kron_readout
_z_rowsum = _c.z_rowsum
_kron_dq_loop = _c.kron_dq_loop
_kron_dkdv_loop = _c.kron_dkdv_loop
_slot_rows = _c.slot_rows


@triton.jit
def _state_kernel(
    P1, P2, X, W, Tpart, IDX,
    s1b, s1h, s1n, s2b, s2h, s2n, sxb, sxh, sxn, swb, swh, swn,
    H, N, n_per_split,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_W: tl.constexpr, TRANS_ACC: tl.constexpr, PREFETCH: tl.constexpr, HAS_IDX: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Partial state of one (outer block, head, split): Tpart[split, bh, a, :].

    TRANS_ACC: accumulate T^T = X^T kk (kk as the shared-memory operand) instead of T = kk^T X.
    HAS_IDX: the N summed positions are slots of a block-major order, row IDX[slot] of P1, P2, X,
    W (-1: padding, nothing added); otherwise rows.
    """
    pid_a = tl.program_id(0)
    bh = tl.program_id(1)
    sp = tl.program_id(2)
    n_a = tl.num_programs(0)
    n_bh = tl.num_programs(1)
    b = bh // H
    h = bh % H
    BLOCK_A: tl.constexpr = G * R
    o0 = pid_a * G

    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    p1 = P1 + b * s1b + h * s1h
    p2 = P2 + b * s2b + h * s2h
    x_ptr = X + b * sxb + h * sxh

    if TRANS_ACC:
        acc = tl.full((DV, BLOCK_A), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_A, DV), 0.0, tl.float32)
    n_start = sp * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    w_ptr = W + b * swb + h * swh
    # PREFETCH: the feature tiles of the next step are loaded a step ahead (registers), so their
    # L2 latency hides behind this step's MMA; Triton pipelines only the loads that feed tl.dot
    # directly (X), and these go through the Kronecker product first.
    offs_n = n_start + tl.arange(0, BLOCK_N)
    rows, nmask = _slot_rows(IDX, offs_n, offs_n < n_end, HAS_IDX)
    last = tl.load(p2 + rows[:, None] * s2n + offs_r[None, :], mask=nmask[:, None], other=0.0)
    cols = _outer_cols(p1, s1n, rows, nmask, o0, G)
    if HAS_W:
        w = tl.load(w_ptr + rows * swn, mask=nmask, other=0.0)
    else:
        w = tl.full((BLOCK_N,), 1.0, tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows, nmask = _slot_rows(IDX, offs_n, offs_n < n_end, HAS_IDX)
        if PREFETCH:
            nxt = offs_n + BLOCK_N
            rows_nxt, nmask_nxt = _slot_rows(IDX, nxt, nxt < n_end, HAS_IDX)
            last_nxt = tl.load(p2 + rows_nxt[:, None] * s2n + offs_r[None, :], mask=nmask_nxt[:, None], other=0.0)
            cols_nxt = _outer_cols(p1, s1n, rows_nxt, nmask_nxt, o0, G)
            if HAS_W:
                w_nxt = tl.load(w_ptr + rows_nxt * swn, mask=nmask_nxt, other=0.0)
            else:
                w_nxt = w
        else:
            last = tl.load(p2 + rows[:, None] * s2n + offs_r[None, :], mask=nmask[:, None], other=0.0)
            cols = _outer_cols(p1, s1n, rows, nmask, o0, G)
            if HAS_W:
                w = tl.load(w_ptr + rows * swn, mask=nmask, other=0.0)
        if HAS_W:
            kk = _kron_dot(cols.to(tl.float32) * w[:, None], last, BLOCK_N, G, R, DOT_DT, EMU)
        else:
            kk = _kron_dot(cols, last, BLOCK_N, G, R, DOT_DT, EMU)
        x = tl.load(x_ptr + rows[:, None] * sxn + offs_c[None, :], mask=nmask[:, None], other=0.0)
        if TRANS_ACC:
            acc = _mm(tl.trans(x), kk, acc, DOT_DT, PREC, EMU)
        else:
            acc = _mm(tl.trans(kk), x, acc, DOT_DT, PREC, EMU)
        if PREFETCH:
            last = last_nxt
            cols = cols_nxt
            w = w_nxt

    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    n_rows = n_a * BLOCK_A
    base = sp * n_bh + bh
    if TRANS_ACC:
        tl.store(Tpart + (base * n_rows + offs_a)[None, :] * DV + offs_c[:, None], acc)
    else:
        tl.store(Tpart + (base * n_rows + offs_a)[:, None] * DV + offs_c[None, :], acc)


@triton.jit
def _zstate_kernel(
    P1, P2, W, Zpart, IDX,
    s1b, s1h, s1n, s2b, s2h, s2n, swb, swh, swn,
    H, N, n_per_split,
    R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, HAS_IDX: tl.constexpr, EMU: tl.constexpr,
):
    """Zpart[split, bh] = sum over the split's rows of w_n P1[n] P2[n]^T, [R, R] in fp32 (ieee);
    HAS_IDX: over slots, as _state_kernel."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    n_bh = tl.num_programs(0)
    b = bh // H
    h = bh % H
    offs_r = tl.arange(0, R)
    p1 = P1 + b * s1b + h * s1h
    p2 = P2 + b * s2b + h * s2h
    acc = tl.full((R, R), 0.0, tl.float32)
    n_start = sp * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows, nmask = _slot_rows(IDX, offs_n, offs_n < n_end, HAS_IDX)
        a = tl.load(p1 + rows[:, None] * s1n + offs_r[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
        c = tl.load(p2 + rows[:, None] * s2n + offs_r[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(W + b * swb + h * swh + rows * swn, mask=nmask, other=0.0)
            a = a * w[:, None]
        if EMU:
            acc = tl.dot(tl.trans(a), c, acc)
        else:
            acc = tl.dot(tl.trans(a), c, acc, input_precision="ieee")
    tl.store(Zpart + (sp * n_bh + bh) * R * R + offs_r[:, None] * R + offs_r[None, :], acc)


@triton.jit
def _readout_kernel(
    Q1, Q2, T, Z, Out, Den,
    s1b, s1h, s1n, s2b, s2h, s2n, sob, soh, son,
    H, N, eps,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Out[rows] = (kk_q T) / den, den = kk_q z + eps = rowsum(Q1 * (Q2 Z^T)) + eps; saves den."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    A: tl.constexpr = R * R

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    p1 = Q1 + b * s1b + h * s1h
    last = tl.load(Q2 + b * s2b + h * s2h + offs_m[:, None] * s2n + offs_r[None, :], mask=mmask[:, None], other=0.0)
    t_ptr = T + bh * A * DV

    acc = tl.full((BLOCK_M, DV), 0.0, tl.float32)
    # the query columns a step ahead (the N >= 8192 workaround, see _triton_common.kron_readout)
    acc = _kron_readout(p1, s1n, offs_m, mmask, last, t_ptr, acc, R, DV, G, BLOCK_M, DOT_DT, PREC, EMU)

    first = tl.load(p1 + offs_m[:, None] * s1n + offs_r[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
    den = _z_rowsum(first, last, Z + bh * A, R, SMALL_PREC, EMU) + eps
    out = acc / den[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_c[None, :], _store_cast(out, Out.dtype.element_ty, EMU), mask=mmask[:, None])
    tl.store(Den + bh * N + offs_m, den, mask=mmask)


@triton.jit
def _dq_kernel(
    Q1, Q2, T, Z, dO, Den, Wb, dQ1, dQ2,
    s1b, s1h, s1n, s2b, s2h, s2n, sdob, sdoh, sdon, sg2b, sg2h, sg2n,
    H, N,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, PREFETCH: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Query-feature gradients.

    dkk_q = (E - delta z^T) / den with E = dO T^T and delta = dO . O. delta is not read from the
    (rounded) output: delta * den = dO . num = sum_a kk_q[a] E[a], which the loop gets for free
    from its own E. The z term is applied at the end through Z = z as [R, R]:
    dQ1 = (E1 - delta (Q2 Z^T)) / den, dQ2 = (E2 - delta (Q1 Z)) / den, where E1, E2 are E pulled
    back through the Kronecker product. E1 is built column block by column block in dQ1 (fp32)
    and corrected in place after a barrier.
    Also writes Wb[0, bh, rows] = 1 / den and Wb[1, bh, rows] = -delta / den for the dT, dZ passes.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    b = bh // H
    h = bh % H
    A: tl.constexpr = R * R

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    p1 = Q1 + b * s1b + h * s1h
    last = tl.load(Q2 + b * s2b + h * s2h + offs_m[:, None] * s2n + offs_r[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
    do = tl.load(dO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_c[None, :], mask=mmask[:, None], other=0.0)
    if not EMU:
        do = do.to(DOT_DT)  # once, not in every _mm

    t_ptr = T + bh * A * DV
    # dQ1 is an fp32 [B*H, N, R] scratch (contiguous) that ends as the gradient
    e1_ptr = dQ1 + bh * N * R + offs_m[:, None] * R
    e2 = tl.full((BLOCK_M, R), 0.0, tl.float32)
    num_do = tl.full((BLOCK_M,), 0.0, tl.float32)
    # PREFETCH: next step's query columns, a step ahead (see _state_kernel)
    e2, num_do = _kron_dq_loop(p1, s1n, offs_m, mmask, do, last, t_ptr, e1_ptr, e2, num_do, R, DV, G, BLOCK_M, PREFETCH, DOT_DT, PREC, EMU)

    den = tl.load(Den + bh * N + offs_m, mask=mmask, other=1.0)
    rden = 1.0 / den
    delta = num_do * rden
    tl.store(Wb + bh * N + offs_m, rden, mask=mmask)
    tl.store(Wb + (n_bh + bh) * N + offs_m, -delta * rden, mask=mmask)

    zmat = tl.load(Z + bh * A + offs_r[:, None] * R + offs_r[None, :])  # Z[a1, a2]
    first = tl.load(p1 + offs_m[:, None] * s1n + offs_r[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
    if EMU:
        zq1 = tl.dot(last, tl.trans(zmat))
        zq2 = tl.dot(first, zmat)
    else:
        zq1 = tl.dot(last, tl.trans(zmat), input_precision=SMALL_PREC)
        zq2 = tl.dot(first, zmat, input_precision=SMALL_PREC)
    dq2 = (e2 - delta[:, None] * zq2) * rden[:, None]
    tl.store(dQ2 + b * sg2b + h * sg2h + offs_m[:, None] * sg2n + offs_r[None, :], _store_cast(dq2, dQ2.dtype.element_ty, EMU), mask=mmask[:, None])
    tl.debug_barrier()  # the E1 columns written above by other threads of this program
    e1 = tl.load(e1_ptr + offs_r[None, :], mask=mmask[:, None], other=0.0)
    dq1 = (e1 - delta[:, None] * zq1) * rden[:, None]
    tl.store(e1_ptr + offs_r[None, :], dq1, mask=mmask[:, None])


@triton.jit
def _dkdv_kernel(
    K1, K2, V, W, dT, dZ, dK1, dK2, dV,
    s1b, s1h, s1n, s2b, s2h, s2n, svb, svh, svn, swb, swh, swn,
    sg1b, sg1h, sg1n, sg2b, sg2h, sg2n, sdvb, sdvh, sdvn,
    H, N,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr,
    PREFETCH: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Key-feature and value gradients: dV = w kk dT, dkk = w (V dT^T + dz^T)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    A: tl.constexpr = R * R

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    p1 = K1 + b * s1b + h * s1h
    last = tl.load(K2 + b * s2b + h * s2h + offs_n[:, None] * s2n + offs_r[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_c[None, :], mask=nmask[:, None], other=0.0)
    if not EMU:
        v = v.to(DOT_DT)
    if HAS_W:
        w = tl.load(W + b * swb + h * swh + offs_n * swn, mask=nmask, other=0.0).to(tl.float32)
    else:
        w = tl.where(nmask, 1.0, 0.0)

    t_ptr = dT + bh * A * DV
    z_ptr = dZ + bh * A
    dk1_ptr = dK1 + b * sg1b + h * sg1h
    dv_acc = tl.full((BLOCK_N, DV), 0.0, tl.float32)
    dlast = tl.full((BLOCK_N, R), 0.0, tl.float32)
    # PREFETCH: next step's key columns, a step ahead (see _state_kernel); w applied to dV below
    dv_acc, dlast = _kron_dkdv_loop(p1, s1n, offs_n, nmask, last, v, w, t_ptr, z_ptr, dk1_ptr, sg1n, dv_acc, dlast,
                                    R, DV, G, BLOCK_N, False, PREFETCH, DOT_DT, PREC, EMU)
    tl.store(dK2 + b * sg2b + h * sg2h + offs_n[:, None] * sg2n + offs_r[None, :], _store_cast(dlast * w[:, None], dK2.dtype.element_ty, EMU), mask=nmask[:, None])
    tl.store(dV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_c[None, :], _store_cast(dv_acc * w[:, None], dV.dtype.element_ty, EMU), mask=nmask[:, None])
