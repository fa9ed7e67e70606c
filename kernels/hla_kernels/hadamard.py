"""Host side of the Hadamard linear attention kernels: checks, launches, autograd.

Same contract as `hla_convert.ops.hadamard_attention` (HLA-MATH.md section 1) for F = 2:

    a_ij = (q1_i . k1_j) (q2_i . k2_j),   o_i = sum_j a_ij v_j / (sum_j a_ij + eps)

computed as T = sum_j kron(k1_j, k2_j) (x) v_j  [R*R, dv] and Z = sum_j k1_j k2_j^T [R, R]
(z = vec Z = sum_j kron(k1_j, k2_j)), o_i = kron(q1_i, q2_i) T / (q1_i^T Z q2_i + eps).
Forward: state pass, Z pass, readout pass. Backward: dq pass (from T, Z), dT pass (a state pass
over the queries), dZ pass, dk/dv pass. Extra memory: T, Z, their gradients and per-split
partials, O(R*R*dv) per head; O(N) per head for den and the backward's row weights; an fp32
dq1 scratch, O(N*R). Never O(N * R * R). docs/kernels.md has the design and the numbers.

The jitted kernels live in `_hadamard_triton.py` and are loaded per mode: compiled for CUDA
tensors, interpreted (TRITON_INTERPRET=1) for CPU tensors, decided when called, so importing
this package never fixes the mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from . import _runtime as rt
from ._runtime import cdiv, empty, interpreting, launch_extra, rowmajor, s3

# Launch parameters per kernel; `G` is the number of outer Kronecker indices per block (the
# block of state rows is G * r; "auto" = 256 // r). GPU values were picked from the sweeps in
# benchmarks/bench_hla.py on an H100 (benchmarks/RESULTS.md) for bf16, r = 32, dv = 128, and
# then went through the checks; a sweep alone only times (one 1%-faster pick was wrong, run 4).
GPU_CONFIG: dict[str, dict] = {
    "state": {"BLOCK_N": 64, "G": "auto", "num_warps": 8, "num_stages": 3, "TRANS_ACC": False, "PREFETCH": True, "min_blocks": 8},
    "dstate": {"BLOCK_N": 64, "G": "auto", "num_warps": 8, "num_stages": 3, "TRANS_ACC": False, "PREFETCH": False, "min_blocks": 8},
    "zstate": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "min_blocks": 4, "per_sm": 1},
    "readout": {"BLOCK_M": 128, "G": 2, "num_warps": 4, "num_stages": 3},
    "dq": {"BLOCK_M": 128, "G": 2, "num_warps": 8, "num_stages": 3, "PREFETCH": False},
    "dkdv": {"BLOCK_N": 128, "G": 4, "num_warps": 8, "num_stages": 3, "PREFETCH": False},
}
# fp32 operands take twice the registers and shared memory: smaller tiles, fewer stages
# (the fp32 path is for exactness, not speed; 3xTF32 dots).
GPU_CONFIG_FP32: dict[str, dict] = {
    "state": {"BLOCK_N": 32, "G": "auto64", "num_warps": 4, "num_stages": 2},
    "dstate": {"BLOCK_N": 32, "G": "auto64", "num_warps": 4, "num_stages": 2},
    "readout": {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 2},
    "dq": {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 2},
    "dkdv": {"BLOCK_N": 64, "G": 1, "num_warps": 4, "num_stages": 2},
}
# r = 64: the larger feature tiles need registers (these avoid spills in ptxas -v).
GPU_CONFIG_R64: dict[str, dict] = {
    "state": {"BLOCK_N": 32},
    "dstate": {"BLOCK_N": 32, "G": 2},
    "readout": {"num_warps": 8},
    "dkdv": {"G": 1},
}
# Interpreter: tiny blocks so the tests' short sequences cover several blocks and a split state.
INTERP_CONFIG: dict[str, dict] = {
    "state": {"BLOCK_N": 8, "G": 2, "split_rows": 16},
    "dstate": {"BLOCK_N": 8, "G": 1, "split_rows": 24},
    "zstate": {"BLOCK_N": 8, "split_rows": 16},
    "readout": {"BLOCK_M": 16, "G": 2},
    "dq": {"BLOCK_M": 16, "G": 1},
    "dkdv": {"BLOCK_N": 16, "G": 2},
}


def kernels(interp: bool) -> ModuleType:
    """The Hadamard kernel module, jitted for `interp`."""
    return rt.load_jitted("_hadamard_triton", interp)


def unsupported_reason(q_feats: Sequence[torch.Tensor], k_feats: Sequence[torch.Tensor], v: torch.Tensor) -> str | None:
    """Why the kernels cannot take these inputs, or None when they can."""
    if not rt.triton_available():
        return "triton is not installed"
    if len(q_feats) != len(k_feats):
        return f"{len(q_feats)} query factors but {len(k_feats)} key factors"
    if len(q_feats) != 2:
        return f"order F = {len(q_feats)}: only F = 2 has a kernel"
    tensors = [*q_feats, *k_feats, v]
    dev = v.device
    if any(t.device != dev for t in tensors):
        return "inputs on different devices"
    interp = interpreting()
    if dev.type == "cuda":
        if interp:
            return "TRITON_INTERPRET is set: CUDA tensors go to the reference"
        if rt.major_capability(dev.index) < 8:
            return "needs compute capability 8.0 or newer (bf16 tensor cores)"
    elif not (dev.type == "cpu" and interp):
        return f"device {dev.type} (CPU only under TRITON_INTERPRET=1)"
    if any(t.dtype not in rt.DTYPES for t in tensors):
        return f"dtypes {[str(t.dtype) for t in tensors]}: need float32, bfloat16 or float16"
    if v.dim() != 4 or any(t.dim() != 4 for t in tensors):
        return "tensors must be [B, H, N, r] and [B, H, N, dv]"
    b, h, n, dv = v.shape
    r = q_feats[0].shape[-1]
    if any(tuple(t.shape) != (b, h, n, r) for t in tensors[:-1]):
        return f"feature shapes {[list(t.shape) for t in tensors[:-1]]} do not match [B, H, N, r] = {[b, h, n, r]}"
    lo = 2 if interp else 16
    if not (rt.pow2(r) and lo <= r <= 64):
        return f"r = {r}: need a power of two in [{lo}, 64]"
    if not (rt.pow2(dv) and lo <= dv <= 128):
        return f"dv = {dv}: need a power of two in [{lo}, 128]"
    if n < 1:
        return "empty sequence"
    return None


def supports(q_feats: Sequence[torch.Tensor], k_feats: Sequence[torch.Tensor], v: torch.Tensor) -> bool:
    """True when `hadamard_attention` here can run these inputs (else use the reference)."""
    return unsupported_reason(q_feats, k_feats, v) is None


def kernel_config(name: str, r: int, interp: bool, fp32: bool = False) -> dict:
    if interp:
        cfg = dict(INTERP_CONFIG[name])
    else:
        cfg = dict(GPU_CONFIG[name])
        if r >= 64:
            cfg.update(GPU_CONFIG_R64.get(name, {}))
        if fp32:
            cfg.update(GPU_CONFIG_FP32.get(name, {}))
    if cfg.get("G") == "auto":  # 256 state rows per program: halves the re-reads of X vs 128
        cfg["G"] = max(1, 256 // r)
    elif cfg.get("G") == "auto64":
        cfg["G"] = max(1, 64 // r)
    if "G" in cfg:
        cfg["G"] = min(cfg["G"], r)
    return cfg


def _splits(n: int, block_n: int, programs: int, device: torch.device, cfg: dict, interp: bool) -> int:
    """How many programs share the sum over tokens of one state block.

    Enough that the grid fills the GPU in whole waves (`per_sm` programs resident per SM), never
    so many that a program gets fewer than `min_blocks` token blocks.
    """
    n_blocks = cdiv(n, block_n)
    if interp:
        return max(1, cdiv(n, cfg["split_rows"]))
    slots = _sm_count(device) * cfg.get("per_sm", 1)  # programs resident at once
    most = max(1, n_blocks // cfg.get("min_blocks", 8))
    best, best_score = 1, -1.0
    for s in range(1, min(most, 64) + 1):
        p = programs * s
        waves = cdiv(p, slots)
        # fraction of SM time doing work, minus a small charge for each extra partial to sum
        score = p / (waves * slots) - 0.01 * s / cfg.get("per_sm", 1)
        if score > best_score:
            best, best_score = s, score
    return best


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _state(mod, p1, p2, x, w, interp, dot, name="state"):
    """T [BH, R*R, DV] fp32: T[a] = sum_n kk[n, a] w_n x_n (state_parts summed)."""
    tpart = state_parts(mod, p1, p2, x, w, interp, dot, name)
    return tpart[0] if tpart.shape[0] == 1 else tpart.sum(0)


def state_parts(mod, p1, p2, x, w, interp, dot, name="state", per=None, idx=None):
    """[splits, BH, R*R, DV] fp32: the state of each split of the rows.

    p1, p2: factors [B, H, N, R]; x: rows [B, H, N, DV]; w: None (all ones) or
    (tensor, (stride_b, stride_h, stride_n)). `name` picks the launch config ("state" for the
    forward, "dstate" for the backward's dT). per: rows per split (the hybrid's window blocks);
    None: as many splits as fill the GPU (_splits). idx: int32 [S] or None: sum over S slots,
    slot s being row idx[s] of p1, p2, x, w (-1: padding, adds nothing) instead of over the N rows.
    """
    b, h, n, r = p1.shape
    if idx is not None:
        n = idx.numel()
    dv = x.shape[-1]
    cfg = kernel_config(name, r, interp, rt.is_fp32(dot))
    block_n, g = cfg["BLOCK_N"], cfg["G"]
    n_a = r // g
    bh = b * h
    if per is None:
        splits = _splits(n, block_n, n_a * bh, x.device, cfg, interp)
        per = cdiv(cdiv(n, block_n), splits) * block_n
    splits = cdiv(n, per)
    tpart = torch.empty((splits, bh, r * r, dv), dtype=torch.float32, device=x.device)
    wt, ws = w if w is not None else (x, (0, 0, 0))
    mod._state_kernel[(n_a, bh, splits)](
        p1, p2, x, wt, tpart, idx if idx is not None else p1,
        *s3(p1), *s3(p2), *s3(x), *ws,
        h, n, per,
        R=r, DV=dv, G=g, BLOCK_N=block_n, HAS_W=w is not None, TRANS_ACC=cfg.get("TRANS_ACC", False),
        PREFETCH=cfg.get("PREFETCH", True), HAS_IDX=idx is not None,
        DOT_DT=dot[0], PREC=dot[1], EMU=dot[2], **launch_extra(cfg, interp),
    )
    return tpart


def _zstate(mod, p1, p2, w, interp):
    """Z [BH, R*R] fp32 (row-major [R, R]): Z[a1, a2] = sum_n w_n p1[n, a1] p2[n, a2]."""
    zpart = zstate_parts(mod, p1, p2, w, interp)
    return zpart[0] if zpart.shape[0] == 1 else zpart.sum(0)


def zstate_parts(mod, p1, p2, w, interp, per=None, idx=None):
    """[splits, BH, R*R] fp32: Z of each split of the rows (per, idx: as in state_parts)."""
    b, h, n, r = p1.shape
    if idx is not None:
        n = idx.numel()
    cfg = kernel_config("zstate", r, interp)
    block_n = cfg["BLOCK_N"]
    bh = b * h
    if per is None:
        splits = _splits(n, block_n, bh, p1.device, cfg, interp)
        per = cdiv(cdiv(n, block_n), splits) * block_n
    splits = cdiv(n, per)
    zpart = torch.empty((splits, bh, r * r), dtype=torch.float32, device=p1.device)
    wt, ws = w if w is not None else (p1, (0, 0, 0))
    mod._zstate_kernel[(bh, splits)](
        p1, p2, wt, zpart, idx if idx is not None else p1,
        *s3(p1), *s3(p2), *ws,
        h, n, per,
        R=r, BLOCK_N=block_n, HAS_W=w is not None, HAS_IDX=idx is not None, EMU=interp, **launch_extra(cfg, interp),
    )
    return zpart


def _readout(mod, q1, q2, t_dot, z, out_dtype, eps, interp, dot):
    """O [B, H, N, DV] in out_dtype and den [B*H, N] fp32 from the state."""
    b, h, n, r = q1.shape
    dv = t_dot.shape[-1]
    out = empty((b, h, n, dv), out_dtype, q1.device)
    den = empty((b * h, n), torch.float32, q1.device)
    cfg = kernel_config("readout", r, interp, rt.is_fp32(dot))
    mod._readout_kernel[(cdiv(n, cfg["BLOCK_M"]), b * h)](
        q1, q2, t_dot, z, out, den,
        *s3(q1), *s3(q2), *s3(out),
        h, n, float(eps),
        R=r, DV=dv, G=cfg["G"], BLOCK_M=cfg["BLOCK_M"],
        DOT_DT=dot[0], PREC=dot[1], SMALL_PREC=None if interp else "tf32x3", EMU=dot[2],
        **launch_extra(cfg, interp),
    )
    return out, den


def _dq(mod, q1, q2, t_dot, z, do, den, interp, dot):
    """(dQ1 fp32, dQ2, wb [2, B*H, N] = [1 / den, -delta / den]) from the state and dO."""
    b, h, n, r = q1.shape
    dv = do.shape[-1]
    dev = q1.device
    # dQ1 doubles as fp32 scratch inside the kernel (see _dq_kernel)
    dq1 = empty((b, h, n, r), torch.float32, dev)
    dq2 = empty(q2.shape, q2.dtype, dev)
    wb = empty((2, b * h, n), torch.float32, dev)
    cfg = kernel_config("dq", r, interp, rt.is_fp32(dot))
    mod._dq_kernel[(cdiv(n, cfg["BLOCK_M"]), b * h)](
        q1, q2, t_dot, z, do, den, wb, dq1, dq2,
        *s3(q1), *s3(q2), *s3(do), *s3(dq2),
        h, n,
        R=r, DV=dv, G=cfg["G"], BLOCK_M=cfg["BLOCK_M"], PREFETCH=cfg.get("PREFETCH", False),
        DOT_DT=dot[0], PREC=dot[1], SMALL_PREC=None if interp else "tf32x3", EMU=dot[2],
        **launch_extra(cfg, interp),
    )
    return dq1, dq2, wb


def _dkdv(mod, k1, k2, v, wmask, dt_dot, dz, interp, dot):
    """(dK1, dK2, dV) from dT, dz."""
    b, h, n, r = k1.shape
    dv = v.shape[-1]
    dev = v.device
    dk1 = empty(k1.shape, k1.dtype, dev)
    dk2 = empty(k2.shape, k2.dtype, dev)
    dvv = empty(v.shape, v.dtype, dev)
    ws = (0, 0, 0) if wmask is None else (wmask.stride(0), 0, wmask.stride(1))
    cfg = kernel_config("dkdv", r, interp, rt.is_fp32(dot))
    mod._dkdv_kernel[(cdiv(n, cfg["BLOCK_N"]), b * h)](
        k1, k2, v, wmask if wmask is not None else v, dt_dot, dz, dk1, dk2, dvv,
        *s3(k1), *s3(k2), *s3(v), *ws,
        *s3(dk1), *s3(dk2), *s3(dvv),
        h, n,
        R=r, DV=dv, G=cfg["G"], BLOCK_N=cfg["BLOCK_N"], HAS_W=wmask is not None,
        PREFETCH=cfg.get("PREFETCH", False), DOT_DT=dot[0], PREC=dot[1], EMU=dot[2], **launch_extra(cfg, interp),
    )
    return dk1, dk2, dvv


def _forward(q1, q2, k1, k2, v, wmask, eps):
    interp = v.device.type != "cuda"
    mod = kernels(interp)
    dot = rt.dot_setup((q1, q2, k1, k2, v), interp)
    w = None if wmask is None else (wmask, (wmask.stride(0), 0, wmask.stride(1)))
    t = _state(mod, k1, k2, v, w, interp, dot)
    z = _zstate(mod, k1, k2, w, interp)
    t_dot = rt.to_dot(t, dot)
    out, den = _readout(mod, q1, q2, t_dot, z, v.dtype, eps, interp, dot)
    return out, den, t_dot, z


def _backward(q1, q2, k1, k2, v, wmask, den, t_dot, z, do):
    interp = v.device.type != "cuda"
    mod = kernels(interp)
    dot = rt.dot_setup((q1, q2, k1, k2, v), interp)
    b, h, n, r = q1.shape
    do = rowmajor(do)
    dq1, dq2, wb = _dq(mod, q1, q2, t_dot, z, do, den, interp, dot)
    # dT = sum_i kron(q_i) (x) dO_i / den_i,  dZ = sum_i kron(q_i) (-delta_i / den_i)
    rows = (h * n, n, 1)
    dt = _state(mod, q1, q2, do, (wb[0], rows), interp, dot, name="dstate")
    dz = _zstate(mod, q1, q2, (wb[1], rows), interp)
    dk1, dk2, dvv = _dkdv(mod, k1, k2, v, wmask, rt.to_dot(dt, dot), dz, interp, dot)
    return dq1.to(q1.dtype), dq2, dk1, dk2, dvv


# The kernels as torch.library custom ops, so torch.compile sees one opaque op per call (forward
# and backward) instead of graph-breaking on the Python launch code. The forward returns what the
# backward needs (den, T, Z) as extra outputs: a custom op's autograd formula may only save inputs
# and outputs.
@torch.library.custom_op("hla_kernels::hadamard_f2_forward", mutates_args=())
def _forward_op(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
    wmask: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q1, q2, k1, k2, v, wmask, eps)


@_forward_op.register_fake
def _(q1, q2, k1, k2, v, wmask, eps):
    b, h, n, r = q1.shape
    dv = v.shape[-1]
    # T in the dot operand dtype (rt.to_dot): bf16 when every input is half, else fp32
    t_dtype = torch.bfloat16 if all(t.dtype in rt.HALF for t in (q1, q2, k1, k2, v)) else torch.float32
    return (
        v.new_empty((b, h, n, dv)),
        v.new_empty((b * h, n), dtype=torch.float32),
        v.new_empty((b * h, r * r, dv), dtype=t_dtype),
        v.new_empty((b * h, r * r), dtype=torch.float32),
    )


@torch.library.custom_op("hla_kernels::hadamard_f2_backward", mutates_args=())
def _backward_op(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
    wmask: torch.Tensor | None, den: torch.Tensor, t_dot: torch.Tensor, z: torch.Tensor, do: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(q1, q2, k1, k2, v, wmask, den, t_dot, z, do)


@_backward_op.register_fake
def _(q1, q2, k1, k2, v, wmask, den, t_dot, z, do):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q1, q2, k1, k2, v))


def _setup_context(ctx, inputs, output):
    q1, q2, k1, k2, v, wmask, _eps = inputs
    _out, den, t_dot, z = output
    ctx.mark_non_differentiable(den, t_dot, z)
    rt.no_zero_grads(ctx)
    ctx.save_for_backward(q1, q2, k1, k2, v, wmask, den, t_dot, z)


def _backward_formula(ctx, do, *_unused):
    q1, q2, k1, k2, v, wmask, den, t_dot, z = ctx.saved_tensors
    grads = _backward_op(q1, q2, k1, k2, v, wmask, den, t_dot, z, do.contiguous())
    need = ctx.needs_input_grad
    return (*(g if need[i] else None for i, g in enumerate(grads)), None, None)


_forward_op.register_autograd(_backward_formula, setup_context=_setup_context)


def hadamard_attention(
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Bidirectional Hadamard linear attention on Triton kernels; differentiable.

    q_feats, k_feats: 2 tensors each, [B, H, N, r] (feature maps already applied). v: [B, H, N, dv].
    key_mask: bool [B, N], True = keep. Returns [B, H, N, dv] in v's dtype; fp32 accumulation.
    Raises ValueError when `supports` would say False.
    """
    reason = unsupported_reason(q_feats, k_feats, v)
    if reason is not None:
        raise ValueError(f"hla_kernels.hadamard_attention: {reason}")
    wmask = rt.mask_weights(key_mask, v)
    q1, q2 = (rowmajor(t) for t in q_feats)
    k1, k2 = (rowmajor(t) for t in k_feats)
    return _forward_op(q1, q2, k1, k2, rowmajor(v), wmask, float(eps))[0]
