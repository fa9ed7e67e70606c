"""Host side of the hybrid attention kernels: checks, launches, autograd.

Same contract as `hla_convert.ops.hybrid_attention` (HLA-MATH.md section 4) for windows without a
halo: boxes `window = (wt, wh, ww)` (0 or more than an axis: all of it) laid over the grid from its
origin, edge boxes clipped where a side does not divide its axis — whole latent frames (the default
`(1, 0, 0)`, a token's own frame) or spatial tiles through some or all frames (`(0, 4, 4)`) — the
Hadamard far kind with F = 2, text tokens first or last, key padding masks. Anything else goes to
the reference (`supports` says why not).

The kernels see each window as L consecutive slots. Whole frames that divide the frame count are
that already (slot = row). Any other box is made so by a block-major order of the video tokens
(each block's L slots in grid order, the clipped slots of an edge box as padding): the window
softmax and the far part's sums over keys do not depend on the order of tokens, so the result is
the same (block_order.py). With TILE_READS = "index" the kernels read and write every tensor in
place through each slot's row (block_order.slot_rows; padding slots are -1, masked), so the order
costs one int32 index load per tile and no copies. TILE_READS = "gather" (the default until the
index path is timed on a GPU) reorders copies instead: one gather of q, k, v and the features (a
feature tensor given for both factors once) and one of the output a call, and gathers again in
the backward.

Forward: the Hadamard module's state kernels with one split per window block give T_window(blk)
and Z_window(blk) in one launch each; T_rest = T_all - T_window (torch, fp32, then the dot dtype);
one fused kernel per query tile reads the far part out of T_rest as the online softmax's initial
accumulator and runs flash attention over the block's keys and the text keys (_hybrid_triton.py
has the algebra). Backward: a dq kernel (window softmax + far part, also the row weights and the
per-row d log_beta), the state kernels again for dT_rest(blk) over each block's queries, and a
dk/dv kernel (window softmax + far part with dT_eff = sum_b dT_rest(b) - dT_rest(blk)). With
WINDOW_DQ = "atomic" the dq kernel does only the far part and the dk/dv kernel adds the window's
dq with atomics from the logits it recomputes anyway.

Extra memory per head: the per-block states T_rest, dT_rest (NB x R^2 x dv, fp32 while summed),
O(N) row statistics; never an N x N matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import torch

from . import _runtime as rt
from . import hadamard as hk
from ._runtime import cdiv, empty, rowmajor, s3
from .block_order import _blocked_once, _blocks, _box, _permutes, _volume, block_index, block_mask, from_blocks, slot_rows, to_blocks  # noqa: F401 (block_index: API)

# How the kernels reach the tokens of windows that are not whole frames (block_order.py): "index"
# reads and writes them in place through each slot's row; "gather" reorders copies of q, k, v, the
# features and the output (one gather each way). Both are tested against the float64 reference in
# the interpreter; "gather" is the default because it is the one run and timed on a GPU
# (benchmarks/RESULTS.md 2026-12-07): "index" becomes it once `pytest -m gpu` and
# `benchmarks/bench_hybrid.py --tile-reads index,gather` (side by side) have passed and timed it.
TILE_READS = "gather"
# Where the backward takes the window part of dq: "pass" — the dq kernel's own pass over each
# query tile's keys (a second recomputation of the logits; deterministic); "atomic" — the dk/dv
# kernel adds each (key tile, query tile) share into an fp32 buffer with atomics, from the logits
# it recomputes anyway (FlashAttention-2's one pass: 5 matmuls a tile pair instead of 7; the sums'
# order, and so the last bits of dq, vary from run to run). Both are tested against the float64
# reference in the interpreter; "pass" stays the default until the two are timed on a GPU.
WINDOW_DQ = "pass"
# Which key (query) blocks of a window the kernels mask: "unmasked" — only those that need it (the
# partial last block, and every block where a key mask or padding slots can drop a key;
# _hybrid_triton.py, "Masks"), as flash attention does; "masked" — every block, as the kernels did
# before 2026-12-07 (late night). Equal in the interpreter to the last bit (tests/kernel/test_hybrid_kernels.py).
# "masked" stays the default until `pytest -m gpu` and `benchmarks/bench_hybrid.py --full-blocks
# unmasked,masked` (side by side, lent_gpu.sh kernels) have passed and timed "unmasked" on a GPU.
FULL_BLOCKS = "masked"
SHIFT_FLOOR = 30.0  # = hla_convert.ops.hybrid.SHIFT_FLOOR (kept equal by a test)
_LOG2E = 1.0 / math.log(2.0)

# Launch parameters, from the sweep in benchmarks/bench_hybrid.py on an H100 (benchmarks/RESULTS.md)
# for bf16, head dim 128, r = 32 and 64. The forward avoids BLOCK_M 128 with 8 warps: 4 % faster
# at r = 32, but on Triton 3.6 it returned NaN outputs at r = 64 (and failed the r = 32 GPU test
# with text tokens) while every 4-warp config was right; cause not found. G = 64 // r keeps the
# far part's state rows per step at 64.
GPU_CONFIG: dict[str, dict] = {
    "fwd": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
}
GPU_CONFIG_FP32: dict[str, dict] = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    "dq": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
}
# Interpreter: tiles smaller than a block, so tiles end inside blocks and text ranges.
INTERP_CONFIG: dict[str, dict] = {
    "fwd": {"BLOCK_M": 4, "BLOCK_N": 4},
    "dq": {"BLOCK_M": 4, "BLOCK_N": 4},
    "dkdv": {"BLOCK_M": 4, "BLOCK_N": 4},
}


def _kernels(interp: bool) -> ModuleType:
    """The hybrid kernel module for `interp`."""
    return rt.load_jitted("_hybrid_triton", interp)


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_feats: Sequence[torch.Tensor], k_feats: Sequence[torch.Tensor],
    grid: Sequence[int], window: Sequence[int], halo: Sequence[int] = (0, 0, 0), text_len: int = 0,
) -> str | None:
    """Why `hybrid_attention` here cannot take these inputs, or None when it can."""
    if len(q_feats) != 2 or len(k_feats) != 2:
        return f"far part with {len(q_feats)} factors: only the Hadamard far kind with F = 2 has a kernel"
    why = hk.unsupported_reason(q_feats, k_feats, v)
    if why is not None:
        return why
    if any(t.device != v.device for t in (q, k)):
        return "inputs on different devices"
    if q.dtype not in rt.DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of float32, bfloat16, float16"
    if any(f.dtype != v.dtype for f in (*q_feats, *k_feats)):
        return "features and v in different dtypes"
    if q.dim() != 4 or k.shape != q.shape or q.shape[:3] != v.shape[:3]:
        return f"q, k must be [B, H, N, d] and v [B, H, N, dv] alike, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
    d = q.shape[-1]
    lo = 2 if rt.interpreting() else 16
    if not (rt.pow2(d) and lo <= d <= 128):
        return f"head dim {d}: need a power of two in [{lo}, 128]"
    box = _box(grid, window, halo)
    if isinstance(box, str):
        return box
    if _volume(grid) + int(text_len) != q.shape[2]:
        return f"grid {tuple(grid)} + {text_len} text tokens != N = {q.shape[2]}"
    return None


def supports(q, k, v, q_feats, k_feats, grid, window, halo=(0, 0, 0), text_len=0) -> bool:
    """True when `hybrid_attention` here can run these inputs (else use the reference)."""
    return unsupported_reason(q, k, v, q_feats, k_feats, grid, window, halo, text_len) is None


def _config(name: str, interp: bool, fp32: bool) -> dict:
    if interp:
        return dict(INTERP_CONFIG[name])
    return dict((GPU_CONFIG_FP32 if fp32 else GPU_CONFIG)[name])


def _g(r: int, fp32: bool, interp: bool) -> int:
    if interp:
        return max(1, min(r, 2))
    return max(1, (32 if fp32 else 64) // r)


def _rest(parts: torch.Tensor) -> torch.Tensor:
    """sum over blocks minus each block, in place: [NB, ...] -> [NB, ...]."""
    total = parts.sum(0, keepdim=True)
    return parts.neg_().add_(total)


class _Layout:
    """The kernels' slots: text_len text slots and NB blocks of L = big video slots (v0, t0: where
    the video and the text slots start; vid: the video slots). n: the sequence's rows. idx: None
    (slot = row: whole frames) or int32 [ns], each slot's row (-1: padding; block_order.slot_rows)."""

    def __init__(self, n: int, big: int, nb: int, text_len: int, text_first: bool, idx: torch.Tensor | None = None):
        self.n, self.big, self.nb, self.tl, self.idx = n, big, nb, text_len, idx
        self.ns = text_len + big * nb
        self.v0 = text_len if text_first else 0
        self.t0 = 0 if text_first else big * nb
        self.vid = slice(self.v0, self.v0 + big * nb)

    def video(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x's video rows in slot order for the state kernels: the slice (slot = row), or all of
        x when the kernels read the slots through idx."""
        return x if self.idx is not None else x.narrow(dim, self.v0, self.big * self.nb)

    def video_idx(self) -> torch.Tensor | None:
        return None if self.idx is None else self.idx[self.vid]

    def kernel_args(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(IDX, HAS_IDX) of the launches: the index, or `placeholder` (any tensor; unread) without one."""
        return (self.idx, True) if self.idx is not None else (placeholder, False)


def _common(q, v, q1):
    interp = v.device.type != "cuda"
    fp32 = q.dtype == torch.float32
    dot = rt.dot_setup((q1, v), interp)
    qk_prec = None if (interp or not fp32) else "tf32x3"
    small_prec = None if interp else "tf32x3"
    return interp, fp32, dot, qk_prec, small_prec


def _forward(q, k, v, q1, q2, k1, k2, beta, kmask, scale, lay: _Layout, eps):
    interp, fp32, dot, qk_prec, small_prec = _common(q, v, q1)
    hmod, mod = hk.kernels(interp), _kernels(interp)
    b, h, n, d = q.shape
    dv, r = v.shape[-1], q1.shape[-1]
    vx, vi = lay.video, lay.video_idx()
    w = None if kmask is None else (vx(kmask, 1), (kmask.stride(0), 0, kmask.stride(1)))
    t_rest = rt.to_dot(_rest(hk.state_parts(hmod, vx(k1, 2), vx(k2, 2), vx(v, 2), w, interp, dot, "state", per=lay.big, idx=vi)), dot)
    z_rest = _rest(hk.zstate_parts(hmod, vx(k1, 2), vx(k2, 2), w, interp, per=lay.big, idx=vi))
    out = empty((b, h, n, dv), v.dtype, v.device)
    mst = empty((b * h, n), torch.float32, v.device)
    dst = empty((b * h, n), torch.float32, v.device)
    cfg = _config("fwd", interp, fp32)
    km = kmask if kmask is not None else q
    grid = (cdiv(max(lay.big, lay.tl), cfg["BLOCK_M"]), lay.nb + (1 if lay.tl else 0), b * h)
    idx, has_idx = lay.kernel_args(q)
    mod._hyb_fwd_kernel[grid](
        q, k, v, q1, q2, t_rest, z_rest, km, beta, out, mst, dst, idx,
        *s3(q), *s3(k), *s3(v), *s3(q1), *s3(q2), *s3(out), n,
        h, n, lay.ns, lay.big, lay.nb, lay.v0, lay.t0, lay.tl, float(scale * _LOG2E), float(eps),
        float(-SHIFT_FLOOR * _LOG2E), float(math.exp(SHIFT_FLOOR)),
        D=d, DV=dv, R=r, G=cfg.get("G", _g(r, fp32, interp)), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_KM=kmask is not None, HAS_IDX=has_idx, **_pads(has_idx), DOT_DT=dot[0], PREC=dot[1], SMALL_PREC=small_prec, EMU=dot[2], QK_PREC=qk_prec,
        **rt.launch_extra(cfg, interp),
    )
    return out, mst, dst, t_rest, z_rest


def _pads(has_idx: bool) -> dict[str, bool]:
    """The kernels' PAD_V / PAD_T: may a video (text) slot range hold a slot to drop, beyond the key
    mask (padding: only video slots, only read through the index) or mask every block anyway."""
    if FULL_BLOCKS not in ("unmasked", "masked"):
        raise ValueError(f"hla_kernels.hybrid.FULL_BLOCKS must be 'unmasked' or 'masked', got {FULL_BLOCKS!r}")
    masked = FULL_BLOCKS == "masked"
    return {"PAD_V": bool(has_idx) or masked, "PAD_T": masked}


def _backward(q, k, v, q1, q2, k1, k2, beta, kmask, scale, lay: _Layout, out, mst, dst, t_rest, z_rest, do):
    interp, fp32, dot, qk_prec, small_prec = _common(q, v, q1)
    hmod, mod = hk.kernels(interp), _kernels(interp)
    b, h, n, d = q.shape
    dv, r = v.shape[-1], q1.shape[-1]
    if WINDOW_DQ not in ("pass", "atomic"):
        raise ValueError(f"hla_kernels.hybrid.WINDOW_DQ must be 'pass' or 'atomic', got {WINDOW_DQ!r}")
    atomic = WINDOW_DQ == "atomic"
    do = rowmajor(do)
    delta = (do.float() * out.float()).sum(-1).reshape(b * h, n)
    # atomic: the window part of dq is summed in fp32 by the dk/dv kernel (padding rows untouched)
    dq = torch.zeros((b, h, n, d), dtype=torch.float32, device=q.device) if atomic else empty(q.shape, q.dtype, q.device)
    dq1 = empty((b, h, n, r), torch.float32, q.device)
    dq2 = empty(q2.shape, q2.dtype, q.device)
    wb = torch.zeros((2, b * h, n), dtype=torch.float32, device=q.device)
    dbeta = empty((b * h, n), torch.float32, q.device)
    km = kmask if kmask is not None else q
    nblk = lay.nb + (1 if lay.tl else 0)
    cfg = _config("dq", interp, fp32)
    idx, has_idx = lay.kernel_args(q)
    mod._hyb_dq_kernel[(cdiv(max(lay.big, lay.tl), cfg["BLOCK_M"]), nblk, b * h)](
        q, k, v, q1, q2, t_rest, z_rest, km, beta, do, mst, dst, delta, idx,
        dq, dq1, dq2, wb, dbeta,
        *s3(q), *s3(k), *s3(v), *s3(q1), *s3(q2), *s3(do), *s3(dq), *s3(dq2), n,
        h, n, lay.ns, lay.big, lay.nb, lay.v0, lay.t0, lay.tl, float(scale * _LOG2E), float(scale),
        D=d, DV=dv, R=r, G=cfg.get("G", _g(r, fp32, interp)), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_KM=kmask is not None, HAS_IDX=has_idx, **_pads(has_idx), DOT_DT=dot[0], PREC=dot[1], SMALL_PREC=small_prec, EMU=dot[2], QK_PREC=qk_prec,
        WINDOW_DQ=not atomic, **rt.launch_extra(cfg, interp),
    )
    # dT_rest(blk) = sum over the block's queries of kk_q (x) w dO, dZ_rest with -w delta
    rows = (h * n, n, 1)
    vx, vi = lay.video, lay.video_idx()
    q1v, q2v = vx(q1, 2), vx(q2, 2)
    dt_eff = rt.to_dot(_rest(hk.state_parts(hmod, q1v, q2v, vx(do, 2), (vx(wb[0], 1), rows), interp, dot, "dstate", per=lay.big, idx=vi)), dot)
    dz_eff = _rest(hk.zstate_parts(hmod, q1v, q2v, (vx(wb[1], 1), rows), interp, per=lay.big, idx=vi))
    dk = empty(k.shape, k.dtype, k.device)
    dvv = empty(v.shape, v.dtype, v.device)
    dk1 = empty(k1.shape, k1.dtype, k.device)
    dk2 = empty(k2.shape, k2.dtype, k.device)
    cfg = _config("dkdv", interp, fp32)
    mod._hyb_dkdv_kernel[(cdiv(max(lay.big, lay.tl), cfg["BLOCK_N"]), nblk, b * h)](
        q, k, v, k1, k2, do, mst, dst, delta, dt_eff, dz_eff, km, idx,
        dk, dvv, dk1, dk2, dq,
        *s3(q), *s3(k), *s3(v), *s3(k1), *s3(k2), *s3(do),
        *s3(dk), *s3(dvv), *s3(dk1), *s3(dk2), *s3(dq), n,
        h, n, lay.ns, lay.big, lay.nb, lay.v0, lay.t0, lay.tl, float(scale * _LOG2E), float(scale),
        D=d, DV=dv, R=r, G=cfg.get("G", _g(r, fp32, interp)), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_KM=kmask is not None, HAS_IDX=has_idx, **_pads(has_idx), DOT_DT=dot[0], PREC=dot[1], EMU=dot[2], QK_PREC=qk_prec,
        ATOMIC_DQ=atomic, **rt.launch_extra(cfg, interp),
    )
    if atomic:
        dq = dq.mul_(scale).to(q.dtype)
    dlog_beta = dbeta.view(b, h, n).sum((0, 2))
    return dq, dk, dvv, dq1.to(q1.dtype), dq2, dk1, dk2, dlog_beta


# torch.compile: the kernels as torch.library custom ops (one opaque op each way, as in
# hadamard.py). The layout travels as ints and the slot index (None for whole frames); the forward
# returns what the backward needs.
@torch.library.custom_op("hla_kernels::hybrid_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor,
    k2: torch.Tensor, log_beta: torch.Tensor, kmask: torch.Tensor | None, idx: torch.Tensor | None, scale: float,
    big: int, nb: int, text_len: int, text_first: bool, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    beta = log_beta.detach().float().exp().contiguous()
    lay = _Layout(q.shape[2], big, nb, text_len, text_first, idx)
    return _forward(q, k, v, q1, q2, k1, k2, beta, kmask, scale, lay, eps)


@_forward_op.register_fake
def _(q, k, v, q1, q2, k1, k2, log_beta, kmask, idx, scale, big, nb, text_len, text_first, eps):
    b, h, n, _ = q.shape
    dv, r = v.shape[-1], q1.shape[-1]
    t_dtype = torch.bfloat16 if all(t.dtype in rt.HALF for t in (q1, v)) else torch.float32  # rt.dot_setup
    f32 = torch.float32
    return (
        v.new_empty((b, h, n, dv)),
        v.new_empty((b * h, n), dtype=f32),
        v.new_empty((b * h, n), dtype=f32),
        v.new_empty((nb, b * h, r * r, dv), dtype=t_dtype),
        v.new_empty((nb, b * h, r * r), dtype=f32),
    )


@torch.library.custom_op("hla_kernels::hybrid_backward", mutates_args=())
def _backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor,
    k2: torch.Tensor, log_beta: torch.Tensor, kmask: torch.Tensor | None, idx: torch.Tensor | None, scale: float,
    big: int, nb: int, text_len: int, text_first: bool, out: torch.Tensor, mst: torch.Tensor, dst: torch.Tensor,
    t_rest: torch.Tensor, z_rest: torch.Tensor, do: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    beta = log_beta.detach().float().exp().contiguous()
    lay = _Layout(q.shape[2], big, nb, text_len, text_first, idx)
    grads = _backward(q, k, v, q1, q2, k1, k2, beta, kmask, scale, lay, out, mst, dst, t_rest, z_rest, do)
    return (*grads[:7], grads[7].to(log_beta.dtype))


@_backward_op.register_fake
def _(q, k, v, q1, q2, k1, k2, log_beta, kmask, idx, scale, big, nb, text_len, text_first, out, mst, dst, t_rest, z_rest, do):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, q1, q2, k1, k2, log_beta))


def _setup_context(ctx, inputs, output):
    q, k, v, q1, q2, k1, k2, log_beta, kmask, idx, scale, big, nb, text_len, text_first, _eps = inputs
    out, mst, dst, t_rest, z_rest = output
    ctx.mark_non_differentiable(mst, dst, t_rest, z_rest)
    rt.no_zero_grads(ctx)
    ctx.save_for_backward(q, k, v, q1, q2, k1, k2, log_beta, kmask, idx, out, mst, dst, t_rest, z_rest)
    ctx.layout = (scale, big, nb, text_len, text_first)


def _backward_formula(ctx, do, *_unused):
    q, k, v, q1, q2, k1, k2, log_beta, kmask, idx, out, mst, dst, t_rest, z_rest = ctx.saved_tensors
    grads = _backward_op(q, k, v, q1, q2, k1, k2, log_beta, kmask, idx, *ctx.layout, out, mst, dst, t_rest, z_rest, do.contiguous())
    need = ctx.needs_input_grad
    return (*(g if need[i] else None for i, g in enumerate(grads)), *([None] * 8))


_forward_op.register_autograd(_backward_formula, setup_context=_setup_context)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    scale: float,
    log_beta: torch.Tensor,
    grid: Sequence[int],
    window: Sequence[int],
    halo: Sequence[int] = (0, 0, 0),
    text_len: int = 0,
    text_first: bool = True,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Hybrid attention on Triton kernels, differentiable; the contract of
    hla_convert.ops.hybrid_attention with far = hadamard, F = 2, windows without a halo.

    q, k: [B, H, N, d]; v: [B, H, N, dv]; q_feats, k_feats: 2 tensors [B, H, N, r] each (feature
    maps applied, same dtype as v); log_beta: [H]; grid (T, Hg, Wg); text_len tokens before
    (text_first) or after the video tokens; key_mask bool [B, N], True = keep. Returns
    [B, H, N, dv] in v's dtype (fp32 accumulation). Raises ValueError when `supports` says False.
    """
    reason = unsupported_reason(q, k, v, q_feats, k_feats, grid, window, halo, text_len)
    if reason is not None:
        raise ValueError(f"hla_kernels.hybrid_attention: {reason}")
    if log_beta.shape != (q.shape[1],):
        raise ValueError(f"log_beta must be [H] = [{q.shape[1]}], got {list(log_beta.shape)}")
    box = _box(grid, window, halo)
    big, nb = _blocks(grid, box)
    permuted = _permutes(grid, box)
    if TILE_READS not in ("index", "gather"):
        raise ValueError(f"hla_kernels.hybrid.TILE_READS must be 'index' or 'gather', got {TILE_READS!r}")
    gathered = permuted and TILE_READS == "gather"
    idx = slot_rows(grid, box, text_len, text_first, q.device) if permuted and not gathered else None
    if gathered:  # the kernels see each window as consecutive tokens (module docstring)
        rt.mask_weights(key_mask, v)  # the user's mask checked against the tokens it was given for
        key_mask = block_mask(key_mask, q.shape[0], grid, box, text_len, text_first, q.device)
        blocked = lambda x: to_blocks(x, grid, box, text_len, text_first)  # noqa: E731
        q, k, v = blocked(q), blocked(k), blocked(v)
        q_feats, k_feats = _blocked_once(q_feats, blocked), _blocked_once(k_feats, blocked)
    kmask = rt.mask_weights(key_mask, v)
    rm = rowmajor
    q1, q2 = (rm(t) for t in q_feats)
    k1, k2 = (rm(t) for t in k_feats)
    out = _forward_op(
        rm(q), rm(k), rm(v), q1, q2, k1, k2, log_beta, kmask, idx, float(scale), int(big), int(nb), int(text_len), bool(text_first), float(eps)
    )[0]
    return from_blocks(out, grid, box, text_len, text_first) if gathered else out
