"""Triton kernels for hybrid attention: exact softmax inside a window of L consecutive tokens (whole
latent frames, or any box after hla_kernels.hybrid permutes the tokens), Hadamard HLA (F = 2) outside
it, one normaliser (HLA-MATH.md section 4; reference hla_convert.ops.hybrid).

Loaded by `hla_kernels.hybrid` through importlib, once per mode (compiled or interpreted), after
_triton_common.py of the same mode, whose @jit helpers (mm, kron_dot, kron_readout, ...) these reuse.

Layout. Per head the NS slots are TL text slots at t0 and NB * L video slots at v0, where video
block `blk` (the queries that share one key window) is the L slots v0 + blk * L + [0, L). The
window of a video query is its block's L keys plus every text key; a text query's window is all NS
keys (exact softmax, no far part). Programs run over (tile, blk, batch * head) with blk = NB for
the text queries (or keys), so no tile straddles two windows. A slot is a row of the N-row
tensors: itself (whole frames, NS = N), or with HAS_IDX the row IDX[slot] (tiles read in place;
-1 = padding of a clipped edge box, masked: _triton_common.slot_rows). Row statistics (M, Dn,
delta, the far part's row weights) are kept per row.

Masks. The window loops (_window_fwd and _window_dq over key blocks of BLOCK_N slots, _window_dkdv
over query blocks of BLOCK_M) mask only the blocks that need it, as flash attention does. A range
of slots lo..hi-1 is its full blocks (starting at lo, lo + BLOCK, ... below lo + ((hi - lo) //
BLOCK) * BLOCK) and at most one partial last block, taken in that order (one loop's order over
the range). The partial block is always masked (the bounds, padding and key masks). A full block
lies inside the range, so it runs unmasked (plain loads, no tl.where on the logits) unless
something else can drop one of its slots:
  - a key mask (HAS_KM): the key loops mask every block; _window_dkdv's blocks are query blocks,
    and the key mask there is the per-key weight km_w, applied to every block either way;
  - padding slots (IDX = -1, only with HAS_IDX, only among the video slots). They can sit anywhere
    in a block (an edge box clipped in its last axis leaves a gap in every row of the box:
    block_order._index_cpu), so only a per-block test of the loaded IDX (a reduction and a branch
    in the loop) could tell a padding-free block; there is none: with HAS_IDX a range that holds
    video slots (a video block's window; all NS slots for the text queries) is masked in every
    block (PAD = PAD_V = HAS_IDX at those calls). The text slots t0..t0+TL-1 never hold padding
    (block_order._seq_index_cpu marks only clipped video slots): their full blocks run unmasked
    with HAS_IDX too, rows read through IDX (PAD = PAD_T = False).
The launcher sets PAD_V and PAD_T (hla_kernels.hybrid.FULL_BLOCKS): "masked" makes both true, every
block masked as before the unmasked path existed, to time one against the other.
Without HAS_IDX there is no padding slot (the reordered copies of TILE_READS = "gather" mark theirs
with the key mask).

The one-scale normaliser, in log2 units (s2 = q.k * scale * log2(e), the shift c2 = c * log2(e)):

    o_i = (sum_W 2^(s2_ij - c2_i) v_j + beta 2^(-c2_i) F_i) / (sum_W 2^(s2_ij - c2_i) + beta 2^(-c2_i) Fd_i + eps)

with F_i = kron(q1_i, q2_i) T_rest(blk), Fd_i = max(kron(q1_i, q2_i) . z_rest(blk), 0). The shift
c2_i = max(max_j s2_ij, FLOOR2) is what the online softmax's running max ends at when it starts at
FLOOR2 = -30 log2(e) instead of -inf; so the far part is simply the accumulator's initial value,
beta 2^(-FLOOR2) (F_i, Fd_i), and the usual rescaling applies 2^(FLOOR2 - c2_i) to it. One
accumulator, no second pass.

Saved for the backward: M[i] = c2_i and Dn[i] = den_i + eps. With p_ij = 2^(s2_ij - c2_i) / Dn_i
and delta_i = dO_i . o_i, the window part's gradients are flash attention's (ds = p (dp - delta));
the far part's are the Hadamard kernel's with row weights w_i = beta 2^(-c2_i) / Dn_i:
dkk_q = w (dO T_rest^T - delta z_rest^T), dT_rest(blk) = sum_{i in blk} kk_q,i (x) w_i dO_i, and a
video key of block blk receives dT_eff(blk) = sum_b dT_rest(b) - dT_rest(blk) (it is in T_all and
in its own T_window). d log_beta = sum_i w_i (dO_i . F_i - delta_i Fd_i).

Kernels:
  _hyb_fwd_kernel   O, M, Dn
  _hyb_dq_kernel    dQ (window part), dQ1, dQ2 (far part), Wb = [w, -w delta], per-row d log_beta
  _hyb_dkdv_kernel  dK, dV (window part + far part's dV), dK1, dK2 (far part)
The far part's states (T_window per block, and dT_rest) come from the Hadamard module's
_state_kernel / _zstate_kernel with one split per block.
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl

# the shared @jit helpers of the same mode (hla_kernels._runtime.load_jitted loads them first)
_c = sys.modules[__name__.replace("_hybrid_triton", "_triton_common")]
_rsum = _c.rsum
_mm = _c.mm
_store_cast = _c.store_cast
_outer_cols = _c.outer_cols
_kron_dot = _c.kron_dot
_kron_grads = _c.kron_grads
_round_emu = _c.round_emu
_kron_readout = _c.kron_readout
_z_rowsum = _c.z_rowsum
_kron_dq_loop = _c.kron_dq_loop
_kron_dkdv_loop = _c.kron_dkdv_loop
_slot_rows = _c.slot_rows


@triton.jit
def _rmax(x, axis: tl.constexpr):
    """tl.max without triton.language.standard's @jit wrapper (see _triton_common.rsum)."""
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _qk(a, b, EMU: tl.constexpr, PREC: tl.constexpr):
    """a @ b^T in fp32 from operands in their own dtype (half: tensor cores; fp32: PREC)."""
    if EMU:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)))
    elif PREC is None:
        return tl.dot(a, tl.trans(b))
    else:
        return tl.dot(a, tl.trans(b), input_precision=PREC)


@triton.jit
def _pv(p, v, acc, EMU: tl.constexpr, PREC: tl.constexpr):
    """acc + p @ v, p cast to v's dtype (flash attention's P V)."""
    if EMU:
        return tl.dot(_round_emu(p, v.dtype), v.to(tl.float32), acc)
    elif PREC is None:
        return tl.dot(p.to(v.dtype), v, acc)
    else:
        return tl.dot(p, v, acc, input_precision=PREC)


@triton.jit
def _full_rows(idx_ptr, slots, HAS_IDX: tl.constexpr):
    """The rows of `slots` of a full block without padding (in range, none is -1): IDX[slot] read
    unmasked, or the slot itself (the unmasked twin of _triton_common.slot_rows)."""
    if HAS_IDX:
        return tl.load(idx_ptr + slots)
    else:
        return slots


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_ptr, v_ptr, km_ptr, idx_ptr, n0, hi, sk, sv, qk_scale,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KM: tl.constexpr,
               HAS_IDX: tl.constexpr, MASKED: tl.constexpr, EMU: tl.constexpr, PREC: tl.constexpr):
    """One key block (slots n0..n0+BLOCK_N-1) of _window_fwd's online softmax. MASKED: keys past
    hi, padding slots and (HAS_KM) masked keys are dropped; else every key of the block counts."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, DV)
    if MASKED:
        cols, nmask = _slot_rows(idx_ptr, offs_n, offs_n < hi, HAS_IDX)
        k = tl.load(k_ptr + cols[:, None] * sk + offs_d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * sv + offs_c[None, :], mask=nmask[:, None], other=0.0)
        if HAS_KM:
            nmask = nmask & (tl.load(km_ptr + cols, mask=nmask, other=0.0) > 0)
        s = _qk(q, k, EMU, PREC) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
    else:
        cols = _full_rows(idx_ptr, offs_n, HAS_IDX)
        k = tl.load(k_ptr + cols[:, None] * sk + offs_d[None, :])
        v = tl.load(v_ptr + cols[:, None] * sv + offs_c[None, :])
        s = _qk(q, k, EMU, PREC) * qk_scale
    m_new = tl.maximum(m_i, _rmax(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + _rsum(p, 1)
    acc = _pv(p, v, acc * alpha[:, None], EMU, PREC)
    return acc, l_i, m_new


@triton.jit
def _window_fwd(acc, l_i, m_i, q, k_ptr, v_ptr, km_ptr, idx_ptr, lo, hi, sk, sv, qk_scale,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KM: tl.constexpr,
                HAS_IDX: tl.constexpr, PAD: tl.constexpr, EMU: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over the keys of slots lo..hi-1 (log2 units), continuing (acc, l_i, m_i).
    PAD: these slots may hold padding (HAS_IDX and video slots). The full key blocks run unmasked
    unless HAS_KM or PAD; the partial last block is masked (module doc, "Masks")."""
    n_full = lo
    if not (HAS_KM or PAD):  # the full blocks, unmasked
        n_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
        for n0 in range(lo, n_full, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptr, v_ptr, km_ptr, idx_ptr, n0, hi, sk, sv, qk_scale,
                                       D, DV, BLOCK_N, HAS_KM, HAS_IDX, False, EMU, PREC)
    for n0 in range(n_full, hi, BLOCK_N):  # the partial last block (every block when masked)
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptr, v_ptr, km_ptr, idx_ptr, n0, hi, sk, sv, qk_scale,
                                   D, DV, BLOCK_N, HAS_KM, HAS_IDX, True, EMU, PREC)
    return acc, l_i, m_i


@triton.jit
def _far_readout(q1_ptr, q2_ptr, s1n, s2n, offs_m, mmask, t_ptr, z_ptr,
                 R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                 DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr):
    """(kk_q T [BLOCK_M, DV], kk_q . z [BLOCK_M]) for one block's T_rest, Z_rest (fp32 results)."""
    offs_r = tl.arange(0, R)
    last = tl.load(q2_ptr + offs_m[:, None] * s2n + offs_r[None, :], mask=mmask[:, None], other=0.0)
    acc = tl.full((BLOCK_M, DV), 0.0, tl.float32)
    acc = _kron_readout(q1_ptr, s1n, offs_m, mmask, last, t_ptr, acc, R, DV, G, BLOCK_M, DOT_DT, PREC, EMU)
    first = tl.load(q1_ptr + offs_m[:, None] * s1n + offs_r[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
    return acc, _z_rowsum(first, last, z_ptr, R, SMALL_PREC, EMU)


@triton.jit
def _hyb_fwd_kernel(
    Q, K, V, Q1, Q2, Trest, Zrest, KM, Beta, Out, Mst, Dst, IDX,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, s1b, s1h, s1n, s2b, s2h, s2n, sob, soh, son, skmb,
    H, N, NS, L, NB, v0, t0, TL, qk_scale, eps, floor2, far_init,
    D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KM: tl.constexpr, HAS_IDX: tl.constexpr, PAD_V: tl.constexpr, PAD_T: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr, QK_PREC: tl.constexpr,
):
    """One tile of BLOCK_M queries of video block `blk` (or of the text queries, blk = NB)."""
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    bh = tl.program_id(2)
    n_bh = tl.num_programs(2)
    b = bh // H
    h = bh % H
    is_video = blk < NB
    q_lo = tl.where(is_video, v0 + blk * L, t0)
    q_len = tl.where(is_video, L, TL)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows, mmask = _slot_rows(IDX, q_lo + offs_m, offs_m < q_len, HAS_IDX)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, DV)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=mmask[:, None], other=0.0)
    k_ptr = K + b * skb + h * skh
    v_ptr = V + b * svb + h * svh
    km_ptr = KM + b * skmb

    m_i = tl.full((BLOCK_M,), 0.0, tl.float32) + floor2
    if is_video:
        # the far part as the accumulator's initial value, at the shift floor2 (see the module doc)
        state = (blk * n_bh + bh).to(tl.int64)
        acc, fden = _far_readout(Q1 + b * s1b + h * s1h, Q2 + b * s2b + h * s2h, s1n, s2n, rows, mmask,
                                 Trest + state * (R * R * DV), Zrest + state * (R * R),
                                 R, DV, G, BLOCK_M, DOT_DT, PREC, SMALL_PREC, EMU)
        g0 = tl.load(Beta + h) * far_init
        acc = acc * g0
        l_i = tl.maximum(fden, 0.0) * g0
        acc, l_i, m_i = _window_fwd(acc, l_i, m_i, q, k_ptr, v_ptr, km_ptr, IDX, q_lo, q_lo + L, skn, svn, qk_scale,
                                    D, DV, BLOCK_N, HAS_KM, HAS_IDX, PAD_V, EMU, QK_PREC)
        acc, l_i, m_i = _window_fwd(acc, l_i, m_i, q, k_ptr, v_ptr, km_ptr, IDX, t0, t0 + TL, skn, svn, qk_scale,
                                    D, DV, BLOCK_N, HAS_KM, HAS_IDX, PAD_T, EMU, QK_PREC)
    else:
        acc = tl.full((BLOCK_M, DV), 0.0, tl.float32)
        l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
        acc, l_i, m_i = _window_fwd(acc, l_i, m_i, q, k_ptr, v_ptr, km_ptr, IDX, 0, NS, skn, svn, qk_scale,
                                    D, DV, BLOCK_N, HAS_KM, HAS_IDX, PAD_V, EMU, QK_PREC)
    den = l_i + eps
    out = acc / den[:, None]
    tl.store(Out + b * sob + h * soh + rows[:, None] * son + offs_c[None, :], _store_cast(out, Out.dtype.element_ty, EMU), mask=mmask[:, None])
    tl.store(Mst + bh * N + rows, m_i, mask=mmask)
    tl.store(Dst + bh * N + rows, den, mask=mmask)


@triton.jit
def _dq_block(dq, q, do, m_i, rden, delta, k_ptr, v_ptr, km_ptr, idx_ptr, n0, hi, sk, sv, qk_scale,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KM: tl.constexpr,
              HAS_IDX: tl.constexpr, MASKED: tl.constexpr, EMU: tl.constexpr, PREC: tl.constexpr):
    """One key block (slots n0..n0+BLOCK_N-1) of _window_dq. MASKED: keys past hi, padding slots
    and (HAS_KM) masked keys get p = 0; else every key of the block counts."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, DV)
    if MASKED:
        cols, nmask = _slot_rows(idx_ptr, offs_n, offs_n < hi, HAS_IDX)
        k = tl.load(k_ptr + cols[:, None] * sk + offs_d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * sv + offs_c[None, :], mask=nmask[:, None], other=0.0)
        if HAS_KM:
            nmask = nmask & (tl.load(km_ptr + cols, mask=nmask, other=0.0) > 0)
        s = _qk(q, k, EMU, PREC) * qk_scale
        p = tl.where(nmask[None, :], tl.math.exp2(s - m_i[:, None]), 0.0) * rden[:, None]
    else:
        cols = _full_rows(idx_ptr, offs_n, HAS_IDX)
        k = tl.load(k_ptr + cols[:, None] * sk + offs_d[None, :])
        v = tl.load(v_ptr + cols[:, None] * sv + offs_c[None, :])
        s = _qk(q, k, EMU, PREC) * qk_scale
        p = tl.math.exp2(s - m_i[:, None]) * rden[:, None]
    dp = _qk(do, v, EMU, PREC)
    ds = p * (dp - delta[:, None])
    return _pv(ds, k, dq, EMU, PREC)


@triton.jit
def _window_dq(dq, q, do, m_i, rden, delta, k_ptr, v_ptr, km_ptr, idx_ptr, lo, hi, sk, sv, qk_scale,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KM: tl.constexpr,
               HAS_IDX: tl.constexpr, PAD: tl.constexpr, EMU: tl.constexpr, PREC: tl.constexpr):
    """dq += sum_j ds_ij k_j over the keys of slots lo..hi-1, ds = p (dp - delta), p = 2^(s2 - m) / den.
    Masks as in _window_fwd: the full key blocks unmasked unless HAS_KM or PAD, the partial last
    block masked."""
    n_full = lo
    if not (HAS_KM or PAD):  # the full blocks, unmasked
        n_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
        for n0 in range(lo, n_full, BLOCK_N):
            dq = _dq_block(dq, q, do, m_i, rden, delta, k_ptr, v_ptr, km_ptr, idx_ptr, n0, hi, sk, sv, qk_scale,
                           D, DV, BLOCK_N, HAS_KM, HAS_IDX, False, EMU, PREC)
    for n0 in range(n_full, hi, BLOCK_N):  # the partial last block (every block when masked)
        dq = _dq_block(dq, q, do, m_i, rden, delta, k_ptr, v_ptr, km_ptr, idx_ptr, n0, hi, sk, sv, qk_scale,
                       D, DV, BLOCK_N, HAS_KM, HAS_IDX, True, EMU, PREC)
    return dq


@triton.jit
def _hyb_dq_kernel(
    Q, K, V, Q1, Q2, Trest, Zrest, KM, Beta, dO, Mst, Dst, Delta, IDX,
    dQ, dQ1, dQ2, Wb, Dbeta,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, s1b, s1h, s1n, s2b, s2h, s2n, sdob, sdoh, sdon,
    sdqb, sdqh, sdqn, sg2b, sg2h, sg2n, skmb,
    H, N, NS, L, NB, v0, t0, TL, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KM: tl.constexpr, HAS_IDX: tl.constexpr, PAD_V: tl.constexpr, PAD_T: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr, QK_PREC: tl.constexpr,
    WINDOW_DQ: tl.constexpr,
):
    """Query gradients of one tile: dQ from the window's softmax, dQ1 / dQ2 from the far part.
    Without WINDOW_DQ the window part is left to _hyb_dkdv_kernel (ATOMIC_DQ) and dQ is not written.

    The far part follows hla_kernels' _dq_kernel with the row weight w = beta 2^(-c2) / den in
    place of 1 / den: dkk_q = w (E - delta z^T), E = dO T_rest^T, and writes Wb[0] = w,
    Wb[1] = -w delta (zero where the clamped far normaliser had no gradient), Dbeta = w (dO . F -
    delta Fd). dQ1 is an fp32 [B*H, N, R] scratch that ends as the gradient (text rows: 0).
    """
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    bh = tl.program_id(2)
    n_bh = tl.num_programs(2)
    b = bh // H
    h = bh % H
    is_video = blk < NB
    q_lo = tl.where(is_video, v0 + blk * L, t0)
    q_len = tl.where(is_video, L, TL)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows, mmask = _slot_rows(IDX, q_lo + offs_m, offs_m < q_len, HAS_IDX)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, DV)
    offs_r = tl.arange(0, R)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=mmask[:, None], other=0.0)
    do = tl.load(dO + b * sdob + h * sdoh + rows[:, None] * sdon + offs_c[None, :], mask=mmask[:, None], other=0.0)
    m_i = tl.load(Mst + bh * N + rows, mask=mmask, other=0.0)
    rden = 1.0 / tl.load(Dst + bh * N + rows, mask=mmask, other=1.0)
    delta = tl.load(Delta + bh * N + rows, mask=mmask, other=0.0)
    k_ptr = K + b * skb + h * skh
    v_ptr = V + b * svb + h * svh
    km_ptr = KM + b * skmb

    dq = tl.full((BLOCK_M, D), 0.0, tl.float32)
    e1_ptr = dQ1 + bh * N * R + rows[:, None] * R
    if is_video:
        if WINDOW_DQ:
            dq = _window_dq(dq, q, do, m_i, rden, delta, k_ptr, v_ptr, km_ptr, IDX, q_lo, q_lo + L, skn, svn, qk_scale,
                            D, DV, BLOCK_N, HAS_KM, HAS_IDX, PAD_V, EMU, QK_PREC)
            dq = _window_dq(dq, q, do, m_i, rden, delta, k_ptr, v_ptr, km_ptr, IDX, t0, t0 + TL, skn, svn, qk_scale,
                            D, DV, BLOCK_N, HAS_KM, HAS_IDX, PAD_T, EMU, QK_PREC)
        # -- far part
        state = (blk * n_bh + bh).to(tl.int64)
        t_ptr = Trest + state * (R * R * DV)
        p1 = Q1 + b * s1b + h * s1h
        last = tl.load(Q2 + b * s2b + h * s2h + rows[:, None] * s2n + offs_r[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
        do_dot = do
        if not EMU:
            do_dot = do.to(DOT_DT)
        e2 = tl.full((BLOCK_M, R), 0.0, tl.float32)
        num_do = tl.full((BLOCK_M,), 0.0, tl.float32)
        e2, num_do = _kron_dq_loop(p1, s1n, rows, mmask, do_dot, last, t_ptr, e1_ptr, e2, num_do, R, DV, G, BLOCK_M, False,
                                   DOT_DT, PREC, EMU)
        zmat = tl.load(Zrest + state * (R * R) + offs_r[:, None] * R + offs_r[None, :])
        first = tl.load(p1 + rows[:, None] * s1n + offs_r[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
        if EMU:
            zq1 = tl.dot(last, tl.trans(zmat))
            zq2 = tl.dot(first, zmat)
        else:
            zq1 = tl.dot(last, tl.trans(zmat), input_precision=SMALL_PREC)
            zq2 = tl.dot(first, zmat, input_precision=SMALL_PREC)
        fden = _rsum(first * zq1, axis=1)
        w = tl.load(Beta + h) * tl.math.exp2(-m_i) * rden
        w = tl.where(mmask, w, 0.0)
        delta_far = tl.where(fden > 0, delta, 0.0)  # the forward clamps Fd at 0
        tl.store(Wb + bh * N + rows, w, mask=mmask)
        tl.store(Wb + (n_bh + bh) * N + rows, -w * delta_far, mask=mmask)
        tl.store(Dbeta + bh * N + rows, w * (num_do - delta_far * fden), mask=mmask)
        dq2 = w[:, None] * (e2 - delta_far[:, None] * zq2)
        tl.store(dQ2 + b * sg2b + h * sg2h + rows[:, None] * sg2n + offs_r[None, :], _store_cast(dq2, dQ2.dtype.element_ty, EMU), mask=mmask[:, None])
        tl.debug_barrier()  # the E1 columns written above by other threads of this program
        e1 = tl.load(e1_ptr + offs_r[None, :], mask=mmask[:, None], other=0.0)
        tl.store(e1_ptr + offs_r[None, :], w[:, None] * (e1 - delta_far[:, None] * zq1), mask=mmask[:, None])
    else:
        if WINDOW_DQ:
            dq = _window_dq(dq, q, do, m_i, rden, delta, k_ptr, v_ptr, km_ptr, IDX, 0, NS, skn, svn, qk_scale,
                            D, DV, BLOCK_N, HAS_KM, HAS_IDX, PAD_V, EMU, QK_PREC)
        zero_r = tl.full((BLOCK_M, R), 0.0, tl.float32)
        tl.store(e1_ptr + offs_r[None, :], zero_r, mask=mmask[:, None])
        tl.store(dQ2 + b * sg2b + h * sg2h + rows[:, None] * sg2n + offs_r[None, :], _store_cast(zero_r, dQ2.dtype.element_ty, EMU), mask=mmask[:, None])
        tl.store(Dbeta + bh * N + rows, tl.full((BLOCK_M,), 0.0, tl.float32), mask=mmask)
    if WINDOW_DQ:
        tl.store(dQ + b * sdqb + h * sdqh + rows[:, None] * sdqn + offs_d[None, :], _store_cast(dq * sm_scale, dQ.dtype.element_ty, EMU), mask=mmask[:, None])


@triton.jit
def _dkdv_block(dk, dv, k, v, km_w, q_ptr, do_ptr, m_ptr, d_ptr, delta_ptr, idx_ptr, m0, hi, sq, sdo, qk_scale,
                dqa_ptr, sdqa, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_IDX: tl.constexpr,
                MASKED: tl.constexpr, EMU: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """One query block (slots m0..m0+BLOCK_M-1) of _window_dkdv. MASKED: queries past hi and
    padding slots get p = 0 (and no dq); else every query of the block counts. km_w (per key)
    applies either way."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, DV)
    if MASKED:
        qrows, mmask = _slot_rows(idx_ptr, offs_m, offs_m < hi, HAS_IDX)
        q = tl.load(q_ptr + qrows[:, None] * sq + offs_d[None, :], mask=mmask[:, None], other=0.0)
        do = tl.load(do_ptr + qrows[:, None] * sdo + offs_c[None, :], mask=mmask[:, None], other=0.0)
        m_i = tl.load(m_ptr + qrows, mask=mmask, other=0.0)
        rden = 1.0 / tl.load(d_ptr + qrows, mask=mmask, other=1.0)
        delta = tl.load(delta_ptr + qrows, mask=mmask, other=0.0)
        st = _qk(k, q, EMU, PREC) * qk_scale
        pt = tl.math.exp2(st - m_i[None, :]) * rden[None, :]
        pt = tl.where(mmask[None, :], pt, 0.0) * km_w[:, None]
    else:
        qrows = _full_rows(idx_ptr, offs_m, HAS_IDX)
        q = tl.load(q_ptr + qrows[:, None] * sq + offs_d[None, :])
        do = tl.load(do_ptr + qrows[:, None] * sdo + offs_c[None, :])
        m_i = tl.load(m_ptr + qrows)
        rden = 1.0 / tl.load(d_ptr + qrows)
        delta = tl.load(delta_ptr + qrows)
        st = _qk(k, q, EMU, PREC) * qk_scale
        pt = tl.math.exp2(st - m_i[None, :]) * rden[None, :] * km_w[:, None]
    dv = _pv(pt, do, dv, EMU, PREC)
    dpt = _qk(v, do, EMU, PREC)
    dst = pt * (dpt - delta[None, :])
    dk = _pv(dst, q, dk, EMU, PREC)
    if ATOMIC_DQ:
        dq = _pv(tl.trans(dst), k, tl.full((BLOCK_M, D), 0.0, tl.float32), EMU, PREC)
        if MASKED:
            tl.atomic_add(dqa_ptr + qrows[:, None] * sdqa + offs_d[None, :], dq, mask=mmask[:, None], sem="relaxed")
        else:
            tl.atomic_add(dqa_ptr + qrows[:, None] * sdqa + offs_d[None, :], dq, sem="relaxed")
    return dk, dv


@triton.jit
def _window_dkdv(dk, dv, k, v, km_w, q_ptr, do_ptr, m_ptr, d_ptr, delta_ptr, idx_ptr, lo, hi, sq, sdo, qk_scale,
                 dqa_ptr, sdqa, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_IDX: tl.constexpr,
                 PAD: tl.constexpr, EMU: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dk, dv of one key tile from the queries of slots lo..hi-1 whose window holds it (transposed
    tiles: s^T = k q^T [BLOCK_N, BLOCK_M]). km_w: 1 for kept keys, 0 for masked ones. With
    ATOMIC_DQ each query tile's share of dq (ds k, unscaled, fp32) is added to dqa_ptr's rows with
    atomics, from the same logits (one recomputation instead of the dq kernel's second one).
    PAD: these query slots may hold padding (HAS_IDX and video slots). The full query blocks run
    unmasked unless PAD (the key mask is km_w, per key, on every block); the partial last block is
    masked."""
    m_full = lo
    if not PAD:  # the full blocks, unmasked
        m_full = lo + ((hi - lo) // BLOCK_M) * BLOCK_M
        for m0 in range(lo, m_full, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, km_w, q_ptr, do_ptr, m_ptr, d_ptr, delta_ptr, idx_ptr, m0, hi, sq, sdo,
                                 qk_scale, dqa_ptr, sdqa, D, DV, BLOCK_M, HAS_IDX, False, EMU, PREC, ATOMIC_DQ)
    for m0 in range(m_full, hi, BLOCK_M):  # the partial last block (every block when masked)
        dk, dv = _dkdv_block(dk, dv, k, v, km_w, q_ptr, do_ptr, m_ptr, d_ptr, delta_ptr, idx_ptr, m0, hi, sq, sdo,
                             qk_scale, dqa_ptr, sdqa, D, DV, BLOCK_M, HAS_IDX, True, EMU, PREC, ATOMIC_DQ)
    return dk, dv


@triton.jit
def _hyb_dkdv_kernel(
    Q, K, V, K1, K2, dO, Mst, Dst, Delta, dTeff, dZeff, KM, IDX,
    dK, dV, dK1, dK2, dQa,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, s1b, s1h, s1n, s2b, s2h, s2n, sdob, sdoh, sdon,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sg1b, sg1h, sg1n, sg2b, sg2h, sg2n, sqab, sqah, sqan, skmb,
    H, N, NS, L, NB, v0, t0, TL, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KM: tl.constexpr, HAS_IDX: tl.constexpr, PAD_V: tl.constexpr, PAD_T: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr, QK_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """Key and value gradients of one tile of BLOCK_N keys of video block `blk` (or text, blk = NB).

    Window part: a video key is in its block's queries' windows and in every text query's; a text
    key in every query's. Far part (video keys): dV += w kk dT_eff, dkk = w (V dT_eff^T + dz_eff),
    w the key mask (hla_kernels' _dkdv_kernel, with the block's dT_eff). With ATOMIC_DQ the window
    part of dQ is added into the fp32 dQa (unscaled) as well: every (query, key) pair of a window is
    visited by exactly one key tile.
    """
    pid_n = tl.program_id(0)
    blk = tl.program_id(1)
    bh = tl.program_id(2)
    n_bh = tl.num_programs(2)
    b = bh // H
    h = bh % H
    is_video = blk < NB
    k_lo = tl.where(is_video, v0 + blk * L, t0)
    k_len = tl.where(is_video, L, TL)
    if pid_n * BLOCK_N >= k_len:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_n, nmask = _slot_rows(IDX, k_lo + offs_n, offs_n < k_len, HAS_IDX)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, DV)
    offs_r = tl.arange(0, R)
    k = tl.load(K + b * skb + h * skh + cols_n[:, None] * skn + offs_d[None, :], mask=nmask[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + cols_n[:, None] * svn + offs_c[None, :], mask=nmask[:, None], other=0.0)
    if HAS_KM:
        km_w = tl.load(KM + b * skmb + cols_n, mask=nmask, other=0.0).to(tl.float32)
    else:
        km_w = tl.where(nmask, 1.0, 0.0)
    q_ptr = Q + b * sqb + h * sqh
    do_ptr = dO + b * sdob + h * sdoh
    m_ptr = Mst + bh * N
    d_ptr = Dst + bh * N
    delta_ptr = Delta + bh * N
    dqa_ptr = dQa + b * sqab + h * sqah

    dk = tl.full((BLOCK_N, D), 0.0, tl.float32)
    dv = tl.full((BLOCK_N, DV), 0.0, tl.float32)
    if is_video:
        dk, dv = _window_dkdv(dk, dv, k, v, km_w, q_ptr, do_ptr, m_ptr, d_ptr, delta_ptr, IDX, k_lo, k_lo + L, sqn, sdon,
                              qk_scale, dqa_ptr, sqan, D, DV, BLOCK_M, HAS_IDX, PAD_V, EMU, QK_PREC, ATOMIC_DQ)
        dk, dv = _window_dkdv(dk, dv, k, v, km_w, q_ptr, do_ptr, m_ptr, d_ptr, delta_ptr, IDX, t0, t0 + TL, sqn, sdon,
                              qk_scale, dqa_ptr, sqan, D, DV, BLOCK_M, HAS_IDX, PAD_T, EMU, QK_PREC, ATOMIC_DQ)
        # -- far part
        state = (blk * n_bh + bh).to(tl.int64)
        t_ptr = dTeff + state * (R * R * DV)
        z_ptr = dZeff + state * (R * R)
        p1 = K1 + b * s1b + h * s1h
        last = tl.load(K2 + b * s2b + h * s2h + cols_n[:, None] * s2n + offs_r[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
        v_dot = v
        if not EMU:
            v_dot = v.to(DOT_DT)
        dk1_ptr = dK1 + b * sg1b + h * sg1h
        dlast = tl.full((BLOCK_N, R), 0.0, tl.float32)
        dv, dlast = _kron_dkdv_loop(p1, s1n, cols_n, nmask, last, v_dot, km_w, t_ptr, z_ptr, dk1_ptr, sg1n, dv, dlast,
                                    R, DV, G, BLOCK_N, True, False, DOT_DT, PREC, EMU)
        tl.store(dK2 + b * sg2b + h * sg2h + cols_n[:, None] * sg2n + offs_r[None, :], _store_cast(dlast * km_w[:, None], dK2.dtype.element_ty, EMU), mask=nmask[:, None])
    else:
        dk, dv = _window_dkdv(dk, dv, k, v, km_w, q_ptr, do_ptr, m_ptr, d_ptr, delta_ptr, IDX, 0, NS, sqn, sdon,
                              qk_scale, dqa_ptr, sqan, D, DV, BLOCK_M, HAS_IDX, PAD_V, EMU, QK_PREC, ATOMIC_DQ)
        zero_r = tl.full((BLOCK_N, R), 0.0, tl.float32)
        tl.store(dK1 + b * sg1b + h * sg1h + cols_n[:, None] * sg1n + offs_r[None, :], _store_cast(zero_r, dK1.dtype.element_ty, EMU), mask=nmask[:, None])
        tl.store(dK2 + b * sg2b + h * sg2h + cols_n[:, None] * sg2n + offs_r[None, :], _store_cast(zero_r, dK2.dtype.element_ty, EMU), mask=nmask[:, None])
    tl.store(dK + b * sdkb + h * sdkh + cols_n[:, None] * sdkn + offs_d[None, :], _store_cast(dk * sm_scale, dK.dtype.element_ty, EMU), mask=nmask[:, None])
    tl.store(dV + b * sdvb + h * sdvh + cols_n[:, None] * sdvn + offs_c[None, :], _store_cast(dv, dV.dtype.element_ty, EMU), mask=nmask[:, None])
