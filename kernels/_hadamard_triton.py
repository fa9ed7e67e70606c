"""Triton kernels for bidirectional Hadamard linear attention, F = 2 (HLA-MATH.md section 1).

Loaded by `hla_kernels.hadamard` through importlib, once per mode (compiled or interpreted), so
that TRITON_INTERPRET is read when the kernels are needed rather than when a module is imported.

Per head, with feature factors P1, P2 [N, R] (keys or queries), the Kronecker feature of row n is
kk[n, a1 * R + a2] = P1[n, a1] * P2[n, a2]. A block of G consecutive outer indices a1 covers
BLOCK_A = G * R rows of the state; its [rows, BLOCK_A] slice of kk is built in registers from a
[rows, G] slice of P1 and the [rows, R] tile of P2 and goes straight into tl.dot. No [N, R * R]
tensor exists anywhere.

Kernels:
  _state_kernel    T[a, :] = sum_n kk[n, a] w_n X[n, :],  z[a] = sum_n kk[n, a] w_n u_n
                   (forward: X = V, w = key mask, u = 1; backward: X = dO, w = 1 / den,
                   u = -delta; the sum over n is split over programs, partials summed on the host)
  _readout_kernel  O = (kk_q T) / (kk_q z + eps), also saves den
  _dq_kernel       dP1, dP2 of the queries from T, z, dO, den; writes [1 / den, -delta]
  _dkdv_kernel     dP1, dP2 of the keys and dV from dT, dz, V
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rsum(x, axis: tl.constexpr):
    """tl.sum without triton.language.standard: its @jit helpers are compiled or interpreted
    according to TRITON_INTERPRET when triton itself was imported, and this module must run in
    either mode whatever that was. The interpreter maps _sum_combine onto numpy's sum."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _mm(a, b, acc, DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """acc + a @ b with operands rounded to DOT_DT and fp32 accumulation.

    EMU (interpreter only): numpy has no bfloat16 matmul, so round to DOT_DT and multiply in fp32.
    """
    if EMU:
        return tl.dot(a.to(DOT_DT).to(tl.float32), b.to(DOT_DT).to(tl.float32), acc)
    else:
        if PREC is None:
            return tl.dot(a.to(DOT_DT), b.to(DOT_DT), acc)
        else:
            return tl.dot(a.to(DOT_DT), b.to(DOT_DT), acc, input_precision=PREC)


@triton.jit
def _outer_cols(P1, s1n, offs_n, nmask, o0, G: tl.constexpr):
    """[BLOCK, G] slice P1[offs_n, o0 : o0 + G] in fp32 (zero outside the rows)."""
    offs_g = tl.arange(0, G)
    ptrs = P1 + offs_n[:, None] * s1n + (o0 + offs_g)[None, :]
    return tl.load(ptrs, mask=nmask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _kron(cols, last, BLOCK: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
    """Row-wise Kronecker product of cols [BLOCK, G] and last [BLOCK, R] -> [BLOCK, G * R]."""
    if G == 1:
        return tl.reshape(cols, (BLOCK,))[:, None] * last
    else:
        return tl.reshape(cols[:, :, None] * last[:, None, :], (BLOCK, G * R))


@triton.jit
def _kron_grads(dkk, cols, last, BLOCK: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
    """Back through _kron: dkk [BLOCK, G * R] -> (dcols [BLOCK, G], dlast [BLOCK, R])."""
    if G == 1:
        dcols = tl.reshape(_rsum(dkk * last, axis=1), (BLOCK, 1))
        dlast = tl.reshape(cols, (BLOCK,))[:, None] * dkk
    else:
        d3 = tl.reshape(dkk, (BLOCK, G, R))
        dcols = _rsum(d3 * last[:, None, :], axis=2)
        dlast = _rsum(d3 * cols[:, :, None], axis=1)
    return dcols, dlast


@triton.jit
def _state_kernel(
    P1, P2, X, W, U, Tpart, Zpart,
    s1b, s1h, s1n, s2b, s2h, s2n, sxb, sxh, sxn, swb, swh, swn, sub, suh, sun,
    H, N, n_per_split,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_W: tl.constexpr, HAS_U: tl.constexpr, TRANS_ACC: tl.constexpr, Z_ELEM: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Partial state of one (outer block, head, split): Tpart[split, bh, a, :], Zpart[split, bh, a].

    TRANS_ACC: accumulate T^T = X^T kk (kk as the smem operand) instead of T = kk^T X.
    Z_ELEM: accumulate z elementwise over [BLOCK_N, BLOCK_A] and reduce once at the end,
    instead of a cross-row reduction every step.
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
    if Z_ELEM:
        zacc = tl.full((BLOCK_N, BLOCK_A), 0.0, tl.float32)
    else:
        zacc = tl.full((BLOCK_A,), 0.0, tl.float32)
    n_start = sp * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_end
        last = tl.load(p2 + offs_n[:, None] * s2n + offs_r[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
        cols = _outer_cols(p1, s1n, offs_n, nmask, o0, G)
        if HAS_W:
            w = tl.load(W + b * swb + h * swh + offs_n * swn, mask=nmask, other=0.0).to(tl.float32)
            cols = cols * w[:, None]
        kk = _kron(cols, last, BLOCK_N, G, R).to(DOT_DT)
        x = tl.load(x_ptr + offs_n[:, None] * sxn + offs_c[None, :], mask=nmask[:, None], other=0.0)
        if TRANS_ACC:
            acc = _mm(tl.trans(x), kk, acc, DOT_DT, PREC, EMU)
        else:
            acc = _mm(tl.trans(kk), x, acc, DOT_DT, PREC, EMU)
        kz = kk.to(tl.float32)
        if HAS_U:
            u = tl.load(U + b * sub + h * suh + offs_n * sun, mask=nmask, other=0.0).to(tl.float32)
            kz = kz * u[:, None]
        if Z_ELEM:
            zacc += kz
        else:
            zacc += _rsum(kz, axis=0)

    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    n_rows = n_a * BLOCK_A
    base = sp * n_bh + bh
    if TRANS_ACC:
        tl.store(Tpart + (base * n_rows + offs_a)[None, :] * DV + offs_c[:, None], acc)
    else:
        tl.store(Tpart + (base * n_rows + offs_a)[:, None] * DV + offs_c[None, :], acc)
    if Z_ELEM:
        tl.store(Zpart + base * n_rows + offs_a, _rsum(zacc, axis=0))
    else:
        tl.store(Zpart + base * n_rows + offs_a, zacc)


@triton.jit
def _readout_kernel(
    Q1, Q2, T, Z, Out, Den,
    s1b, s1h, s1n, s2b, s2h, s2n, sob, soh, son,
    H, N, eps,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Out[rows] = (kk_q T) / (kk_q z + eps); Den[bh, rows] = kk_q z + eps."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    BLOCK_A: tl.constexpr = G * R
    A: tl.constexpr = R * R

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    p1 = Q1 + b * s1b + h * s1h
    last = tl.load(Q2 + b * s2b + h * s2h + offs_m[:, None] * s2n + offs_r[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
    t_ptr = T + bh * A * DV
    z_ptr = Z + bh * A

    acc = tl.full((BLOCK_M, DV), 0.0, tl.float32)
    dacc = tl.full((BLOCK_M, BLOCK_A), 0.0, tl.float32)
    for o0 in range(0, R, G):
        cols = _outer_cols(p1, s1n, offs_m, mmask, o0, G)
        qq = _kron(cols, last, BLOCK_M, G, R).to(DOT_DT)
        rows = o0 * R + offs_ab
        t = tl.load(t_ptr + rows[:, None] * DV + offs_c[None, :])
        acc = _mm(qq, t, acc, DOT_DT, PREC, EMU)
        z = tl.load(z_ptr + rows)
        dacc += qq.to(tl.float32) * z[None, :]
    den = _rsum(dacc, axis=1) + eps
    out = acc / den[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_c[None, :], out.to(Out.dtype.element_ty), mask=mmask[:, None])
    tl.store(Den + bh * N + offs_m, den, mask=mmask)


@triton.jit
def _dq_kernel(
    Q1, Q2, T, Z, dO, Den, Wb, dQ1, dQ2,
    s1b, s1h, s1n, s2b, s2h, s2n, sdob, sdoh, sdon, sg2b, sg2h, sg2n,
    H, N,
    R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Query-feature gradients.

    dkk_q = (E - delta z^T) / den with E = dO T^T and delta = dO . O. delta is not read from the
    (rounded) output: delta * den = dO . num = sum_a kk_q[a] E[a], which the loop gets for free
    from its own E. The z term is applied at the end through Z = z as [R, R]:
    dQ1 = (E1 - delta (Q2 Z^T)) / den, dQ2 = (E2 - delta (Q1 Z)) / den, where E1, E2 are E pulled
    back through the Kronecker product. E1 is built column block by column block in dQ1 (fp32)
    and corrected in place after a barrier.
    Also writes Wb[0, bh, rows] = 1 / den and Wb[1, bh, rows] = -delta for the dT pass.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    b = bh // H
    h = bh % H
    BLOCK_A: tl.constexpr = G * R
    A: tl.constexpr = R * R

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < N
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    offs_g = tl.arange(0, G)
    p1 = Q1 + b * s1b + h * s1h
    last = tl.load(Q2 + b * s2b + h * s2h + offs_m[:, None] * s2n + offs_r[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
    do = tl.load(dO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_c[None, :], mask=mmask[:, None], other=0.0).to(DOT_DT)

    t_ptr = T + bh * A * DV
    # dQ1 is an fp32 [B*H, N, R] scratch (contiguous) that ends as the gradient
    e1_ptr = dQ1 + bh * N * R + offs_m[:, None] * R
    e2 = tl.full((BLOCK_M, R), 0.0, tl.float32)
    num_do = tl.full((BLOCK_M,), 0.0, tl.float32)
    for o0 in range(0, R, G):
        cols = _outer_cols(p1, s1n, offs_m, mmask, o0, G)
        rows = o0 * R + offs_ab
        t = tl.load(t_ptr + rows[:, None] * DV + offs_c[None, :])
        e = _mm(do, tl.trans(t), tl.full((BLOCK_M, BLOCK_A), 0.0, tl.float32), DOT_DT, PREC, EMU)
        e1, de2 = _kron_grads(e, cols, last, BLOCK_M, G, R)
        e2 += de2
        num_do += _rsum(e1 * cols, axis=1)
        tl.store(e1_ptr + (o0 + offs_g)[None, :], e1, mask=mmask[:, None])

    den = tl.load(Den + bh * N + offs_m, mask=mmask, other=1.0)
    rden = 1.0 / den
    delta = num_do * rden
    tl.store(Wb + bh * N + offs_m, rden, mask=mmask)
    tl.store(Wb + (n_bh + bh) * N + offs_m, -delta, mask=mmask)

    zmat = tl.load(Z + bh * A + offs_r[:, None] * R + offs_r[None, :])  # Z[a1, a2]
    first = tl.load(p1 + offs_m[:, None] * s1n + offs_r[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
    if EMU:
        zq1 = tl.dot(last, tl.trans(zmat))
        zq2 = tl.dot(first, zmat)
    else:
        zq1 = tl.dot(last, tl.trans(zmat), input_precision=SMALL_PREC)
        zq2 = tl.dot(first, zmat, input_precision=SMALL_PREC)
    dq2 = (e2 - delta[:, None] * zq2) * rden[:, None]
    tl.store(dQ2 + b * sg2b + h * sg2h + offs_m[:, None] * sg2n + offs_r[None, :], dq2.to(dQ2.dtype.element_ty), mask=mmask[:, None])
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
    DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    """Key-feature and value gradients: dV = w kk dT, dkk = w (V dT^T + dz^T)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    BLOCK_A: tl.constexpr = G * R
    A: tl.constexpr = R * R

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    offs_g = tl.arange(0, G)
    p1 = K1 + b * s1b + h * s1h
    last = tl.load(K2 + b * s2b + h * s2h + offs_n[:, None] * s2n + offs_r[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_c[None, :], mask=nmask[:, None], other=0.0).to(DOT_DT)
    if HAS_W:
        w = tl.load(W + b * swb + h * swh + offs_n * swn, mask=nmask, other=0.0).to(tl.float32)
    else:
        w = tl.where(nmask, 1.0, 0.0)

    t_ptr = dT + bh * A * DV
    z_ptr = dZ + bh * A
    dk1_ptr = dK1 + b * sg1b + h * sg1h
    dv_acc = tl.full((BLOCK_N, DV), 0.0, tl.float32)
    dlast = tl.full((BLOCK_N, R), 0.0, tl.float32)
    for o0 in range(0, R, G):
        cols = _outer_cols(p1, s1n, offs_n, nmask, o0, G)
        kk = _kron(cols, last, BLOCK_N, G, R)
        rows = o0 * R + offs_ab
        t = tl.load(t_ptr + rows[:, None] * DV + offs_c[None, :])
        z = tl.load(z_ptr + rows)
        dv_acc = _mm(kk, t, dv_acc, DOT_DT, PREC, EMU)
        dkk = _mm(v, tl.trans(t), tl.full((BLOCK_N, BLOCK_A), 0.0, tl.float32) + z[None, :], DOT_DT, PREC, EMU)
        dcols, dl = _kron_grads(dkk, cols, last, BLOCK_N, G, R)
        dlast += dl
        tl.store(dk1_ptr + offs_n[:, None] * sg1n + (o0 + offs_g)[None, :], (dcols * w[:, None]).to(dK1.dtype.element_ty), mask=nmask[:, None])
    tl.store(dK2 + b * sg2b + h * sg2h + offs_n[:, None] * sg2n + offs_r[None, :], (dlast * w[:, None]).to(dK2.dtype.element_ty), mask=nmask[:, None])
    tl.store(dV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_c[None, :], (dv_acc * w[:, None]).to(dV.dtype.element_ty), mask=nmask[:, None])
