"""@triton.jit helpers shared by the Hadamard, hybrid and causal kernels (_hadamard_triton.py,
_hybrid_triton.py, _causal_triton.py).

Loaded by hla_kernels._runtime.load_jitted once per mode (compiled or interpreted) before the
kernel modules, which take these helpers from sys.modules under their own mode's name. Triton
inlines every @jit call, so a helper here generates the same code as the loop written in place.

Per head, with feature factors P1, P2 [N, R], the Kronecker feature of row n is
kk[n, a1 * R + a2] = P1[n, a1] * P2[n, a2]; a block of G outer indices covers G * R state rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def slot_rows(IDX, slots, mask, HAS_IDX: tl.constexpr):
    """(rows, mask) of `slots` of a block-major order read in place (hla_kernels.block_order): the
    sequence row of each slot, IDX[slot], and the mask without padding slots (IDX = -1; their row
    is 0, masked). Without HAS_IDX a slot is its row."""
    if HAS_IDX:
        r = tl.load(IDX + slots, mask=mask, other=-1)
        return tl.maximum(r, 0), mask & (r >= 0)
    else:
        return slots, mask


@triton.jit
def rsum(x, axis: tl.constexpr):
    """tl.sum without triton.language.standard: its @jit helpers are compiled or interpreted
    according to TRITON_INTERPRET when triton itself was imported, and this module must run in
    either mode whatever that was. The interpreter maps _sum_combine onto numpy's sum."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def round_emu(x, DT: tl.constexpr):
    """x (fp32) rounded to DT, kept in fp32. The interpreter truncates fp32 -> bf16 casts (the
    GPU rounds to nearest even), so under EMU bf16 rounding is done on the bits."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def store_cast(x, DT: tl.constexpr, EMU: tl.constexpr):
    """x cast to the output dtype DT, rounding to nearest also in the interpreter."""
    if EMU:
        return round_emu(x.to(tl.float32), DT).to(DT)
    else:
        return x.to(DT)


@triton.jit
def mm(a, b, acc, DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """acc + a @ b with operands rounded to DOT_DT and fp32 accumulation.

    EMU (interpreter only): numpy has no bfloat16 matmul, so round to DOT_DT and multiply in fp32.
    """
    if EMU:
        return tl.dot(round_emu(a.to(tl.float32), DOT_DT), round_emu(b.to(tl.float32), DOT_DT), acc)
    else:
        if PREC is None:
            return tl.dot(a.to(DOT_DT), b.to(DOT_DT), acc)
        else:
            return tl.dot(a.to(DOT_DT), b.to(DOT_DT), acc, input_precision=PREC)


@triton.jit
def outer_cols(P1, s1n, offs_n, nmask, o0, G: tl.constexpr):
    """[BLOCK, G] slice P1[offs_n, o0 : o0 + G] in its own dtype (zero outside the rows)."""
    offs_g = tl.arange(0, G)
    ptrs = P1 + offs_n[:, None] * s1n + (o0 + offs_g)[None, :]
    return tl.load(ptrs, mask=nmask[:, None], other=0.0)


@triton.jit
def kron(cols, last, BLOCK: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
    """Row-wise Kronecker product of cols [BLOCK, G] and last [BLOCK, R] -> [BLOCK, G * R]."""
    if G == 1:
        return tl.reshape(cols, (BLOCK,))[:, None] * last
    else:
        return tl.reshape(cols[:, :, None] * last[:, None, :], (BLOCK, G * R))


@triton.jit
def kron_dot(cols, last, BLOCK: tl.constexpr, G: tl.constexpr, R: tl.constexpr, DOT_DT: tl.constexpr, EMU: tl.constexpr):
    """_kron rounded to the dot operand dtype. Half dtypes multiply in DOT_DT (one rounding,
    the same as an fp32 product rounded once, and packed instructions); the interpreter has no
    bf16 arithmetic, so there the product is taken in fp32 and rounded."""
    if EMU:
        return round_emu(kron(cols.to(tl.float32), last.to(tl.float32), BLOCK, G, R), DOT_DT)
    elif DOT_DT == tl.float32:
        return kron(cols.to(tl.float32), last.to(tl.float32), BLOCK, G, R)
    else:
        return kron(cols.to(DOT_DT), last.to(DOT_DT), BLOCK, G, R)


@triton.jit
def kron_grads(dkk, cols, last, BLOCK: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
    """Back through _kron: dkk [BLOCK, G * R] -> (dcols [BLOCK, G], dlast [BLOCK, R])."""
    if G == 1:
        dcols = tl.reshape(rsum(dkk * last, axis=1), (BLOCK, 1))
        dlast = tl.reshape(cols, (BLOCK,))[:, None] * dkk
    else:
        d3 = tl.reshape(dkk, (BLOCK, G, R))
        dcols = rsum(d3 * last[:, None, :], axis=2)
        dlast = rsum(d3 * cols[:, :, None], axis=1)
    return dcols, dlast


@triton.jit
def kron_readout(p1, s1n, offs_m, mmask, last, t_ptr, acc,
                 R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                 DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """acc + kk_q T [BLOCK_M, DV] fp32 for one state T [R*R, DV] at t_ptr; the query rows' first
    factor read G columns at a time from p1 (row stride s1n), the second factor `last` [BLOCK_M, R].

    The next step's query columns are loaded a step ahead, always: the variant that loads them
    in-step gave wrong outputs at N >= 8192 on an H100 with Triton 3.6 (bf16, BLOCK_M 128, G 2,
    4 warps; right in the interpreter and at N = 1000), cause unknown; benchmarks/RESULTS.md, run 4.
    """
    BLOCK_A: tl.constexpr = G * R
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    cols = outer_cols(p1, s1n, offs_m, mmask, 0, G)
    for o0 in range(0, R, G):
        cols_nxt = outer_cols(p1, s1n, offs_m, mmask & (o0 + G < R), o0 + G, G)
        qq = kron_dot(cols, last, BLOCK_M, G, R, DOT_DT, EMU)
        rows = o0 * R + offs_ab
        t = tl.load(t_ptr + rows[:, None] * DV + offs_c[None, :])
        acc = mm(qq, t, acc, DOT_DT, PREC, EMU)
        cols = cols_nxt
    return acc


@triton.jit
def z_rowsum(first, last, z_ptr, R: tl.constexpr, SMALL_PREC: tl.constexpr, EMU: tl.constexpr):
    """kk_q . z [BLOCK_M] fp32 = rowsum(first * (last Z^T)) for Z [R, R] (row-major) at z_ptr;
    first, last: the query factors [BLOCK_M, R] (first already fp32 or cast here)."""
    offs_r = tl.arange(0, R)
    zmat = tl.load(z_ptr + offs_r[:, None] * R + offs_r[None, :])  # Z[a1, a2]
    if EMU:
        zq = tl.dot(last.to(tl.float32), tl.trans(zmat))
    else:
        zq = tl.dot(last.to(tl.float32), tl.trans(zmat), input_precision=SMALL_PREC)
    return rsum(first.to(tl.float32) * zq, axis=1)


@triton.jit
def kron_dq_loop(p1, s1n, offs_m, mmask, do, last, t_ptr, e1_ptr, e2, num_do,
                 R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, PREFETCH: tl.constexpr,
                 DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """E = dO T^T [BLOCK_M, R*R] for one state T [R*R, DV] at t_ptr, pulled back through the
    Kronecker product G outer indices at a time: the E1 columns stored fp32 at e1_ptr (row
    pointers [BLOCK_M, 1]; column o0 + g), returns (e2 + E2 [BLOCK_M, R], num_do + sum_a kk_q[a]
    E[a] [BLOCK_M]). do: dO [BLOCK_M, DV] (in the dot dtype); last: the query's second factor, fp32.
    PREFETCH: the next step's query columns a step ahead."""
    BLOCK_A: tl.constexpr = G * R
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    offs_g = tl.arange(0, G)
    cols = outer_cols(p1, s1n, offs_m, mmask, 0, G).to(tl.float32)
    for o0 in range(0, R, G):
        if PREFETCH:
            cols_nxt = outer_cols(p1, s1n, offs_m, mmask & (o0 + G < R), o0 + G, G).to(tl.float32)
        else:
            cols = outer_cols(p1, s1n, offs_m, mmask, o0, G).to(tl.float32)
        rows = o0 * R + offs_ab
        t = tl.load(t_ptr + rows[:, None] * DV + offs_c[None, :])
        e = mm(do, tl.trans(t), tl.full((BLOCK_M, BLOCK_A), 0.0, tl.float32), DOT_DT, PREC, EMU)
        e1, de2 = kron_grads(e, cols, last, BLOCK_M, G, R)
        e2 += de2
        num_do += rsum(e1 * cols, axis=1)
        tl.store(e1_ptr + (o0 + offs_g)[None, :], e1, mask=mmask[:, None])
        if PREFETCH:
            cols = cols_nxt
    return e2, num_do


@triton.jit
def kron_dkdv_loop(p1, s1n, offs_n, nmask, last, v, w, t_ptr, z_ptr, dk1_ptr, sg1n, dv_acc, dlast,
                   R: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, W_IN_KK: tl.constexpr,
                   PREFETCH: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """The state-gradient terms of a key tile for dT [R*R, DV] at t_ptr and dz [R*R] at z_ptr,
    G outer indices at a time: dv_acc + kk dT [BLOCK_N, DV], dkk = V dT^T + dz pulled back through
    the Kronecker product: dK1 columns stored (times w, cast to dk1_ptr's dtype) at dk1_ptr + row *
    sg1n + column, returns (dv_acc, dlast + dK2 unweighted [BLOCK_N, R]).
    last: the key's second factor, fp32; v [BLOCK_N, DV] in the dot dtype; w [BLOCK_N] key weights.
    W_IN_KK: kk from the weighted first factor (then dv_acc is weighted already), else the caller
    applies w to dv_acc. PREFETCH: the next step's key columns a step ahead."""
    BLOCK_A: tl.constexpr = G * R
    offs_c = tl.arange(0, DV)
    offs_ab = tl.arange(0, BLOCK_A)
    offs_g = tl.arange(0, G)
    cols = outer_cols(p1, s1n, offs_n, nmask, 0, G).to(tl.float32)
    for o0 in range(0, R, G):
        if PREFETCH:
            cols_nxt = outer_cols(p1, s1n, offs_n, nmask & (o0 + G < R), o0 + G, G).to(tl.float32)
        else:
            cols = outer_cols(p1, s1n, offs_n, nmask, o0, G).to(tl.float32)
        if W_IN_KK:
            kk = kron_dot(cols * w[:, None], last, BLOCK_N, G, R, DOT_DT, EMU)
        else:
            kk = kron_dot(cols, last, BLOCK_N, G, R, DOT_DT, EMU)
        rows = o0 * R + offs_ab
        t = tl.load(t_ptr + rows[:, None] * DV + offs_c[None, :])
        z = tl.load(z_ptr + rows)
        dv_acc = mm(kk, t, dv_acc, DOT_DT, PREC, EMU)
        dkk = mm(v, tl.trans(t), tl.full((BLOCK_N, BLOCK_A), 0.0, tl.float32) + z[None, :], DOT_DT, PREC, EMU)
        dcols, dl = kron_grads(dkk, cols, last, BLOCK_N, G, R)
        dlast += dl
        tl.store(dk1_ptr + offs_n[:, None] * sg1n + (o0 + offs_g)[None, :], store_cast(dcols * w[:, None], dk1_ptr.dtype.element_ty, EMU), mask=nmask[:, None])
        if PREFETCH:
            cols = cols_nxt
    return dv_acc, dlast
