"""Host side of the chunked (block-)causal Hadamard linear attention kernels, F = 2.

Same contract as `hla_convert.ops.hadamard_attention(..., causal=True, block_size=bs)`
(ops/causal_hadamard.py): with p(t) = t // bs,

    a_tj = [p_j <= p_t] (q1_t . k1_j)(q2_t . k2_j) w_j,   o_t = sum_j a_tj v_j / (sum_j a_tj + eps)

Forward: one sequential prefix-state pass over the keys writes, per slot, the state its tiles
read (T and Z of the earlier chunks, or of everything through a causal block), then one readout
kernel: each query tile contracts its slot's state and, in token mode, adds the exact masked
products with the keys from its chunk's start to its block's end. Backward: the same prefix pass
in reverse over the queries gives each slot the gradient of its keys' state contributions; then
a dq kernel and a dk/dv kernel, each with its intra tiles in token mode. Extra memory: O(N / max(C, bs) * R^2 * dv) per head.

Chunking: token mode when bs <= the chunk C (bs = 1 included): one state per chunk (the earlier
chunks) and the exact masked intra products with the keys from the chunk's start to the query's
block end; block mode when bs > C: one state per causal block (through its end), no intra part,
and a tile whose rows straddle a block boundary contracts both blocks' states, each for its own
rows. Any block size runs: 1,560 (one 480p Wan latent frame) needs no power-of-two factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from . import _runtime as rt
from . import hadamard as hk
from ._runtime import cdiv, empty, rowmajor, s3


# Every launch setting, in one table per mode (a sweep's result is applied by editing GPU_CONFIG;
# benchmarks/bench_causal.py --sweep times candidates against it). C: the chunk (token mode up to
# it). Per kernel: G outer feature indices per step (G x r Kronecker rows at once), BLOCK_M x
# BLOCK_N query x key tiles (readout, dq, dkdv) or BLOCK_N tokens x BLOCK_DV value columns per
# step of the sequential prefix passes (state_fwd over the keys, state_bwd over the queries, each
# with the normaliser's state), num_warps, num_stages. GPU values: the fastest correct setting per
# kernel of bench_causal.py's sweep on an H100 (2026-11-25, Triton 3.6: token-causal N = 32,760
# 2.93 / 10.61 -> 1.43 / 5.72 ms forward / forward+backward; benchmarks/RESULTS.md). An sm_90
# compile with Triton 3.9 (benchmarks/causal_resource_usage.py) shows dkdv at 4 warps spilling
# 312 bytes of stack; it still timed fastest on the H100.
GPU_CONFIG = {
    "C": 256,
    "state_fwd": {"G": 4, "BLOCK_N": 64, "BLOCK_DV": 64, "num_warps": 4, "num_stages": 2},
    "state_bwd": {"G": 4, "BLOCK_N": 64, "BLOCK_DV": 128, "num_warps": 8, "num_stages": 2},
    "readout": {"G": 2, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "dq": {"G": 2, "BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    "dkdv": {"G": 2, "BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
}
INTERP_CONFIG = {
    "C": 16,
    "state_fwd": {"G": 2, "BLOCK_N": 8, "BLOCK_DV": 2},
    "state_bwd": {"G": 2, "BLOCK_N": 8, "BLOCK_DV": 2},
    "readout": {"G": 2, "BLOCK_M": 8, "BLOCK_N": 8},
    "dq": {"G": 2, "BLOCK_M": 8, "BLOCK_N": 8},
    "dkdv": {"G": 2, "BLOCK_M": 8, "BLOCK_N": 8},
}
KERNELS = ("state_fwd", "state_bwd", "readout", "dq", "dkdv")


def _kernels(interp: bool) -> ModuleType:
    """The causal kernel module for `interp`."""
    return rt.load_jitted("_causal_triton", interp)


def _config(interp: bool) -> dict:
    return dict(INTERP_CONFIG if interp else GPU_CONFIG)


def _launch(cfg: dict, kernel: str, interp: bool) -> dict:
    """num_warps / num_stages of one kernel (the interpreter takes none)."""
    k = cfg[kernel]
    return {} if interp else {"num_warps": k["num_warps"], "num_stages": k["num_stages"]}


def plan(n: int, block_size: int, interp: bool) -> tuple[int, bool] | str:
    """(chunk C, token_mode) for this block size, or the reason there is none.

    Token mode for block sizes up to the chunk (per-chunk states and intra tiles, the intra keys
    running to the query's block end), block mode above it (one state per causal block, no intra
    part): any block size >= 1 runs.
    """
    c0 = _config(interp)["C"]
    if block_size < 1:
        return f"block_size = {block_size}: need >= 1"
    return c0, block_size <= c0


def unsupported_reason(q_feats: Sequence[torch.Tensor], k_feats: Sequence[torch.Tensor], v: torch.Tensor, block_size: int = 1) -> str | None:
    reason = hk.unsupported_reason(q_feats, k_feats, v)
    if reason is not None:
        return reason
    p = plan(v.shape[2], block_size, rt.interpreting())
    return p if isinstance(p, str) else None


def supports(q_feats: Sequence[torch.Tensor], k_feats: Sequence[torch.Tensor], v: torch.Tensor, block_size: int = 1) -> bool:
    return unsupported_reason(q_feats, k_feats, v, block_size) is None


def _prefix_states(mod, p1, p2, x, w, wz, chunk, block_size, token_mode, reverse, out_dtype, interp, dot, cfg):
    """([slots, B*H, R*R, DV] in out_dtype, [slots, B*H, R*R] fp32): per slot (chunk or causal
    block), the state and the normaliser state its tiles read (see _prefix_state_kernel).

    Forward (reverse False): the keys' states, w = wz = key mask; backward (reverse True): the
    gradients of those states, from the queries with x = dO, w = 1 / den and wz = -delta / den.
    w, wz: (tensor, (batch, head, token) strides) or None.
    """
    b, h, n, r = p1.shape
    dv = x.shape[-1]
    kernel = "state_bwd" if reverse else "state_fwd"
    k = cfg[kernel]
    g = min(k["G"], r)
    bdv = min(k["BLOCK_DV"], dv)
    seg = chunk if token_mode else block_size
    nslots = cdiv(n, seg)
    out = torch.empty((nslots, b * h, r * r, dv), dtype=out_dtype, device=x.device)
    zout = torch.empty((nslots, b * h, r * r), dtype=torch.float32, device=x.device)
    wt, ws = w if w is not None else (x, (0, 0, 0))
    wzt, wzs = wz if wz is not None else (x, (0, 0, 0))
    mod._prefix_state_kernel[(r // g, b * h, dv // bdv)](
        p1, p2, x, wt, wzt, out, zout,
        *s3(p1), *s3(p2), *s3(x), *ws, *wzs,
        h, n, seg, nslots,
        R=r, DV=dv, G=g, BLOCK_N=min(k["BLOCK_N"], chunk), BLOCK_DV=bdv, HAS_W=w is not None, HAS_WZ=wz is not None,
        STORE_BEFORE=token_mode, REVERSE=reverse, DOT_DT=dot[0], PREC=dot[1], EMU=dot[2], **_launch(cfg, kernel, interp),
    )
    return out, zout


def _common(q1, v, block_size):
    interp = v.device.type != "cuda"
    p = plan(v.shape[2], block_size, interp)
    assert not isinstance(p, str), p
    chunk, token_mode = p
    return interp, chunk, token_mode, _config(interp)


def _tiles(cfg: dict, kernel: str, chunk: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a tile kernel, at most the chunk (a token-mode tile lies in one chunk)."""
    k = cfg[kernel]
    return min(k["BLOCK_M"], chunk), min(k["BLOCK_N"], chunk)


def _forward(q1, q2, k1, k2, v, wmask, eps, block_size):
    interp, chunk, token_mode, cfg = _common(q1, v, block_size)
    mod = _kernels(interp)
    dot = rt.dot_setup((q1, q2, k1, k2, v), interp)
    b, h, n, r = q1.shape
    dv = v.shape[-1]
    bm, bn = _tiles(cfg, "readout", chunk)
    w = None if wmask is None else (wmask, (wmask.stride(0), 0, wmask.stride(1)))
    t_dtype = torch.float32 if rt.is_fp32(dot) else torch.bfloat16
    tsel, zsel = _prefix_states(mod, k1, k2, v, w, w, chunk, block_size, token_mode, False, t_dtype, interp, dot, cfg)
    out = empty((b, h, n, dv), v.dtype, v.device)
    den = empty((b * h, n), torch.float32, v.device)
    wt, wsb, wsn = (wmask, wmask.stride(0), wmask.stride(1)) if wmask is not None else (v, 0, 0)
    mod._readout_kernel[(cdiv(n, bm), b * h)](
        q1, q2, k1, k2, v, wt, tsel, zsel, out, den,
        *s3(q1), *s3(q2), *s3(k1), *s3(k2), *s3(v), wsb, wsn, *s3(out),
        b * h, h, n, chunk, block_size, float(eps),
        R=r, DV=dv, G=min(cfg["readout"]["G"], r), BLOCK_M=bm, BLOCK_N=bn, INTRA=token_mode, HAS_W=wmask is not None,
        DOT_DT=dot[0], PREC=dot[1], SMALL_PREC=None if interp else "tf32x3", EMU=dot[2], **_launch(cfg, "readout", interp),
    )
    return out, den, tsel, zsel


def _backward(q1, q2, k1, k2, v, wmask, eps, block_size, out, den, tsel, zsel, do):
    interp, chunk, token_mode, cfg = _common(q1, v, block_size)
    mod = _kernels(interp)
    dot = rt.dot_setup((q1, q2, k1, k2, v), interp)
    b, h, n, r = q1.shape
    dv = v.shape[-1]
    do = rowmajor(do)
    delta = (do.float() * out.float()).sum(-1).reshape(b * h, n)
    wb = torch.stack([1.0 / den, -delta / den])  # [2, B*H, N]: the numerator's and denominator's weights
    rows = (h * n, n, 1)
    t_dtype = torch.float32 if rt.is_fp32(dot) else torch.bfloat16
    dtloc, dzloc = _prefix_states(mod, q1, q2, do, (wb[0], rows), (wb[1], rows), chunk, block_size, token_mode, True, t_dtype, interp, dot, cfg)
    f32 = dict(dtype=torch.float32, device=v.device)
    dq1a, dq1b, dq2 = (torch.zeros((b * h, n, r), **f32) for _ in range(3))
    wt, wsb, wsn = (wmask, wmask.stride(0), wmask.stride(1)) if wmask is not None else (v, 0, 0)
    common = dict(R=r, DV=dv, INTRA=token_mode, HAS_W=wmask is not None, DOT_DT=dot[0], PREC=dot[1], EMU=dot[2])
    strides = (*s3(q1), *s3(q2), *s3(k1), *s3(k2), *s3(v), wsb, wsn, *s3(do))
    bm, bn = _tiles(cfg, "dq", chunk)
    mod._dq_kernel[(cdiv(n, bm), b * h)](
        q1, q2, k1, k2, v, wt, tsel, zsel, do, wb, dq1a, dq1b, dq2, *strides,
        b * h, h, n, chunk, block_size, BLOCK_M=bm, BLOCK_N=bn, G=min(cfg["dq"]["G"], r), SMALL_PREC=None if interp else "tf32x3",
        **common, **_launch(cfg, "dq", interp),
    )
    dk1a, dk1b, dk2 = (torch.zeros((b * h, n, r), **f32) for _ in range(3))
    dvv = torch.zeros((b * h, n, dv), **f32)
    bm, bn = _tiles(cfg, "dkdv", chunk)
    mod._dkdv_kernel[(cdiv(n, bn), b * h)](
        q1, q2, k1, k2, v, wt, dtloc, dzloc, do, wb, dk1a, dk1b, dk2, dvv, *strides,
        b * h, h, n, chunk, block_size, BLOCK_M=bm, BLOCK_N=bn, G=min(cfg["dkdv"]["G"], r), **common, **_launch(cfg, "dkdv", interp),
    )

    def shaped(t, like):
        return t.view(b, h, n, -1).to(like.dtype)

    return shaped(dq1a + dq1b, q1), shaped(dq2, q2), shaped(dk1a + dk1b, k1), shaped(dk2, k2), shaped(dvv, v)


# torch.compile: the kernels as torch.library custom ops (one opaque op each way, as in
# hadamard.py). The forward returns what the backward needs (den, the per-slot states) as extra
# outputs: a custom op's autograd formula may only save inputs and outputs.
@torch.library.custom_op("hla_kernels::causal_hadamard_f2_forward", mutates_args=())
def _forward_op(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
    wmask: torch.Tensor | None, eps: float, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q1, q2, k1, k2, v, wmask, eps, block_size)


@_forward_op.register_fake
def _(q1, q2, k1, k2, v, wmask, eps, block_size):
    b, h, n, r = q1.shape
    dv = v.shape[-1]
    chunk, token_mode = plan(n, block_size, v.device.type != "cuda")
    nslots = cdiv(n, chunk if token_mode else block_size)
    # the states in the dot operand dtype (rt.dot_setup): bf16 when every input is half, else fp32
    t_dtype = torch.bfloat16 if all(t.dtype in rt.HALF for t in (q1, q2, k1, k2, v)) else torch.float32
    return (
        v.new_empty((b, h, n, dv)),
        v.new_empty((b * h, n), dtype=torch.float32),
        v.new_empty((nslots, b * h, r * r, dv), dtype=t_dtype),
        v.new_empty((nslots, b * h, r * r), dtype=torch.float32),
    )


@torch.library.custom_op("hla_kernels::causal_hadamard_f2_backward", mutates_args=())
def _backward_op(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
    wmask: torch.Tensor | None, eps: float, block_size: int, out: torch.Tensor, den: torch.Tensor,
    tsel: torch.Tensor, zsel: torch.Tensor, do: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(q1, q2, k1, k2, v, wmask, eps, block_size, out, den, tsel, zsel, do)


@_backward_op.register_fake
def _(q1, q2, k1, k2, v, wmask, eps, block_size, out, den, tsel, zsel, do):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q1, q2, k1, k2, v))


def _setup_context(ctx, inputs, output):
    q1, q2, k1, k2, v, wmask, eps, block_size = inputs
    out, den, tsel, zsel = output
    ctx.mark_non_differentiable(den, tsel, zsel)
    rt.no_zero_grads(ctx)
    ctx.save_for_backward(q1, q2, k1, k2, v, wmask, out, den, tsel, zsel)
    ctx.eps, ctx.block_size = eps, block_size


def _backward_formula(ctx, do, *_unused):
    q1, q2, k1, k2, v, wmask, out, den, tsel, zsel = ctx.saved_tensors
    grads = _backward_op(q1, q2, k1, k2, v, wmask, ctx.eps, ctx.block_size, out, den, tsel, zsel, do.contiguous())
    need = ctx.needs_input_grad
    return (*(g if need[i] else None for i, g in enumerate(grads)), None, None, None)


_forward_op.register_autograd(_backward_formula, setup_context=_setup_context)


def causal_hadamard_attention(
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    block_size: int = 1,
) -> torch.Tensor:
    """(Block-)causal Hadamard linear attention, F = 2, on Triton kernels; differentiable.

    q_feats, k_feats: 2 tensors each, [B, H, N, r]; v [B, H, N, dv]; key_mask bool [B, N] (True =
    keep); block_size tokens per causal block (1 = token-level causal). Returns [B, H, N, dv] in
    v's dtype; fp32 accumulation. Raises ValueError when `supports` would say False.
    """
    reason = unsupported_reason(q_feats, k_feats, v, block_size)
    if reason is not None:
        raise ValueError(f"hla_kernels.causal_hadamard_attention: {reason}")
    wmask = rt.mask_weights(key_mask, v)
    q1, q2 = (rowmajor(t) for t in q_feats)
    k1, k2 = (rowmajor(t) for t in k_feats)
    return _forward_op(q1, q2, k1, k2, rowmajor(v), wmask, float(eps), int(block_size))[0]


def _block_prefix(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, N, r]: row t = sum of x over the rows j with j // bs <= t // bs (block-inclusive cumsum)."""
    n = x.shape[2]
    cs = x.cumsum(2)
    last = ((torch.arange(n, device=x.device) // block_size + 1) * block_size - 1).clamp(max=n - 1)
    return cs.index_select(2, last)


def second_order_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 1) -> str | None:
    """Why causal_second_order_attention cannot take these inputs, or None."""
    ones = torch.empty_like(q)
    reason = unsupported_reason([q, ones], [k, ones], k, block_size)  # pass 1: values are the keys
    return reason or unsupported_reason([q, ones], [k, ones], v, block_size)


def second_order_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 1) -> bool:
    return second_order_unsupported_reason(q, k, v, block_size) is None


def causal_second_order_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    block_size: int = 1,
) -> torch.Tensor:
    """Normalised (block-)causal 2nd-order linear attention (ops/causal.py, no decay) on the causal
    Hadamard kernels; differentiable. q, k [B, H, N, r] (nonnegative features), v [B, H, N, dv].

    Two causal first-order passes (docs/causal.md: a_tj = [p_j <= p_t] q_t . u_j):
    u_j = S_{p(j)} q_j = sum_{p_i <= p_j} (q_j . k_i) k_i, then o_t = sum_j (q_t . u_j) v_j / den.
    Each pass is the F = 2 kernel with a constant second factor (all ones, which scales numerator
    and normaliser alike), so it does r times the work a first-order kernel would: a GPU path
    until there is one.
    """
    reason = second_order_unsupported_reason(q, k, v, block_size)
    if reason is not None:
        raise ValueError(f"hla_kernels.causal_second_order_attention: {reason}")
    r = q.shape[-1]
    ones = torch.ones_like(q)
    w = None if key_mask is None else key_mask[:, None, :, None].to(q.dtype)
    qm, km = (q, k) if w is None else (q * w, k * w)
    # pass 1: o1_j = R num_j / (R den_j + eps) with den_j = q_j . (sum of the visible k_i)
    o1 = causal_hadamard_attention([qm, ones], [km, ones], km, key_mask, eps, block_size)
    den1 = (qm.float() * _block_prefix(km.float(), block_size)).sum(-1, keepdim=True)
    u = (o1.float() * (den1 + eps / r)).to(q.dtype)  # = num_j: zero for masked j (q_j masked)
    return causal_hadamard_attention([q, ones], [u, ones], v, key_mask, eps, block_size)
