"""Hybrid attention: exact softmax inside a local window of the latent token grid, HLA weights
outside it, one normaliser (HLA-MATH.md section 4).

Per head, with s_ij = q_i.k_j * scale, W(i) the window of query i, K the kept (unmasked) keys,
a_ij = prod_f phi_f(q_i).phi_f(k_j) the far part's weights (F = 1 for the linear far kind),
beta = exp(log_beta) and one shift c_i per query:

    num_i = sum_{j in W(i) & K} exp(s_ij - c_i) v_j  +  beta e^{-c_i} sum_{j in K \\ W(i)} a_ij v_j
    den_i = sum_{j in W(i) & K} exp(s_ij - c_i)      +  beta e^{-c_i} sum_{j in K \\ W(i)} a_ij
    o_i   = num_i / (den_i + eps)

One scale: the HLA weights stand in for exp(s_ij), so the softmax part's shift multiplies them too.
The shift is c_i = max(m_i, -SHIFT_FLOOR), m_i the largest s_ij over the window's kept keys. Any
common shift of both parts gives the same o_i (up to eps); m_i makes the window's largest weight 1,
so den_i >= 1 and eps is negligible (a window covering everything is softmax), and the floor keeps
e^{-c_i} <= e^{SHIFT_FLOOR} finite in float32 when every window logit is very negative (a window
with no kept key has m_i = -inf).

The window, on the latent grid (T, Hg, Wg) of video tokens (row-major t, h, w after patching):
the grid is tiled into blocks of `window` = (wt, wh, ww) tokens (0 or more than the extent = the
whole extent; edge blocks may be smaller). All queries of a block share one key window: the block
widened by `halo` tokens on each side, clipped to the grid.

Text tokens (joint text+video attention; `text_len` tokens before or after the video tokens):
text keys are inside every query's window (few, global context: exact softmax), and text queries
attend to every key with exact softmax (their window is everything, no far part).

Masked keys (key_mask False) count in neither part.

`hybrid_attention_naive` builds the [N, N] window-membership mask from grid coordinates (the
float64 reference). `hybrid_attention` is the block form a kernel can follow: for each block,
gather its queries and window keys (padded, with a validity mask), exact softmax over the window,
and the far part from states, T_rest(block) = T_all - T_window(block), T = sum_j kron_f phi_f(k_j)
(x) [v_j, 1]. Cost O(N |W| d + N r^F dv); never an N x N matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from ._common import compute_dtype, key_weights
from ._common import hadamard_state, kronecker_features

SHIFT_FLOOR = 30.0
# elements of the largest per-chunk temporary (logits or window states), as ops/_common.chunk_size
_BLOCK_BUDGET = 1 << 24

Grid = tuple[int, int, int]


def _as_list(feats: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [feats] if isinstance(feats, torch.Tensor) else list(feats)


def _triple(name: str, value: Sequence[int], minimum: int) -> tuple[int, int, int]:
    t = tuple(int(x) for x in value)
    if len(t) != 3 or any(x < minimum for x in t):
        raise ValueError(f"{name} must be 3 integers >= {minimum} (frames, height, width), got {value!r}")
    return t  # type: ignore[return-value]


def effective_window(grid: Grid, window: Sequence[int]) -> tuple[int, int, int]:
    """The block size per axis: 0 or more than the grid's extent = the whole extent."""
    return tuple(e if w == 0 or w > e else w for e, w in zip(grid, window))  # type: ignore[return-value]


def check_qkv_beta(q, k, v, log_beta) -> None:
    """q, k [B, H, N, d], v [B, H, N, dv], log_beta [H] (the hybrid's shapes, shared with its causal form)."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, H, N, d] and v [B, H, N, dv] alike, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if log_beta.shape != (q.shape[1],):
        raise ValueError(f"log_beta must be [H] = [{q.shape[1]}], got {list(log_beta.shape)}")


def _check(q, k, v, q_feats, k_feats, log_beta, grid, text_len, key_mask) -> None:
    check_qkv_beta(q, k, v, log_beta)
    if len(q_feats) != len(k_feats) or not q_feats:
        raise ValueError(f"q_feats and k_feats must be equally long non-empty lists, got {len(q_feats)} and {len(k_feats)}")
    for i, (qf, kf) in enumerate(zip(q_feats, k_feats)):
        if qf.shape[:3] != q.shape[:3] or kf.shape != qf.shape:
            raise ValueError(f"factor {i}: features {list(qf.shape)} / {list(kf.shape)} do not fit q {list(q.shape)}")
    t, h, w = grid
    if t * h * w + text_len != q.shape[2]:
        raise ValueError(f"grid {tuple(grid)} ({t * h * w} video tokens) + {text_len} text tokens != N = {q.shape[2]}")
    key_weights(key_mask, q)


# -- the window as a dense mask (reference) -----------------------------------------------------


def window_mask(grid: Grid, window: Sequence[int], halo: Sequence[int], text_len: int = 0, text_first: bool = True) -> torch.Tensor:
    """bool [N, N], True where key j (column) is in query i's (row) window; N = T*Hg*Wg + text_len."""
    win = effective_window(grid, window)
    coords = torch.stack(torch.meshgrid(*[torch.arange(e) for e in grid], indexing="ij"), dim=-1).reshape(-1, 3)
    start = (coords // torch.tensor(win)) * torch.tensor(win)  # [Nv, 3] the query's block origin
    lo = start - torch.tensor(halo)
    hi = start + torch.tensor(win) + torch.tensor(halo)  # exclusive
    inside = ((coords[None, :, :] >= lo[:, None, :]) & (coords[None, :, :] < hi[:, None, :])).all(-1)  # [Nv, Nv]
    nv = inside.shape[0]
    n = nv + text_len
    mask = torch.ones(n, n, dtype=torch.bool)
    vs = slice(text_len, n) if text_first else slice(0, nv)
    mask[vs, vs] = inside
    return mask


def hybrid_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feats: torch.Tensor | Sequence[torch.Tensor],
    k_feats: torch.Tensor | Sequence[torch.Tensor],
    scale: float,
    log_beta: torch.Tensor,
    grid: Grid,
    window: Sequence[int],
    halo: Sequence[int] = (0, 0, 0),
    text_len: int = 0,
    text_first: bool = True,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic reference with explicit [N, N] logits, HLA weights and window mask.

    Same contract as hybrid_attention. Returns [B, H, N, dv] in v's dtype.
    """
    q_feats, k_feats = _as_list(q_feats), _as_list(k_feats)
    grid, window, halo = _triple("grid", grid, 1), _triple("window", window, 0), _triple("halo", halo, 0)
    _check(q, k, v, q_feats, k_feats, log_beta, grid, text_len, key_mask)
    dt = compute_dtype(q, k, v, *q_feats)
    inwin = window_mask(grid, window, halo, text_len, text_first).to(q.device)[None, None]  # [1, 1, N, N]
    keep = torch.ones_like(inwin) if key_mask is None else key_mask[:, None, None, :]
    s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    a = None
    for qf, kf in zip(q_feats, k_feats):
        sf = qf.to(dt) @ kf.to(dt).transpose(-1, -2)
        a = sf if a is None else a * sf
    near = inwin & keep
    m = s.detach().masked_fill(~near, float("-inf")).amax(-1, keepdim=True)
    c = m.clamp_min(-SHIFT_FLOOR)
    w_near = torch.exp(s - c).masked_fill(~near, 0.0)
    beta = log_beta.to(dt).exp()[None, :, None, None]
    w_far = (beta * torch.exp(-c)) * a.masked_fill(~(keep & ~inwin), 0.0)
    wts = w_near + w_far
    return ((wts @ v.to(dt)) / (wts.sum(-1, keepdim=True) + eps)).to(v.dtype)


# -- the block form ----------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _blocks_cpu(grid: Grid, window: tuple[int, int, int], halo: tuple[int, int, int]):
    win = effective_window(grid, window)
    q_axes, k_axes = [], []
    for e, w, h in zip(grid, win, halo):
        nb = -(-e // w)
        start = torch.arange(nb)[:, None] * w
        qp = start + torch.arange(w)[None, :]  # [nb, w]
        kp = start - h + torch.arange(w + 2 * h)[None, :]
        q_axes.append((qp, qp < e))
        k_axes.append((kp, (kp >= 0) & (kp < e)))

    def combine(axes):
        (pt, vt), (ph, vh), (pw, vw) = axes
        idx = (pt[:, None, None, :, None, None] * grid[1] + ph[None, :, None, None, :, None]) * grid[2] + pw[None, None, :, None, None, :]
        ok = vt[:, None, None, :, None, None] & vh[None, :, None, None, :, None] & vw[None, None, :, None, None, :]
        nb = idx.shape[0] * idx.shape[1] * idx.shape[2]
        idx, ok = idx.reshape(nb, -1), ok.reshape(nb, -1)
        # drop slots that are padding in every block (a window clipped on all sides)
        used = ok.any(0)
        idx, ok = idx[:, used], ok[:, used]
        return idx.masked_fill(~ok, 0), ok

    q_idx, q_ok = combine(q_axes)
    k_idx, k_ok = combine(k_axes)
    # where each video token's output sits among the blocks' query slots (flattened [nb * Q])
    flat_ok = q_ok.reshape(-1)
    slots = flat_ok.nonzero().squeeze(-1)
    slot_of = torch.empty_like(slots)
    slot_of[q_idx.reshape(-1)[flat_ok]] = slots
    return q_idx, q_ok, k_idx, k_ok, slot_of


def window_blocks(grid: Grid, window: Sequence[int], halo: Sequence[int], device: torch.device | None = None):
    """The block tiling of the video tokens, in video-token positions 0..T*Hg*Wg-1.

    Returns q_idx [nb, Q], q_ok [nb, Q] (the block's queries; padding slots False), k_idx [nb, K],
    k_ok [nb, K] (the block's window keys), slot_of [T*Hg*Wg] (each video token's slot in the
    flattened [nb * Q] query slots). Every video token is a valid query of exactly one block.
    """
    return _cached_blocks(_triple("grid", grid, 1), _triple("window", window, 0), _triple("halo", halo, 0), torch.device(device or "cpu"))


# torch.compile: the tiling is a pure function of its (int) arguments; built eagerly once at trace
# time and baked into the graph, instead of traced (its nonzero/boolean indexing break graphs).
# The marker sits on a plain function: dynamo sees through an lru_cache wrapper and would trace.
@torch.compiler.assume_constant_result
def _cached_blocks(grid: Grid, window: tuple[int, int, int], halo: tuple[int, int, int], device: torch.device):
    return _blocks(grid, window, halo, device)


@lru_cache(maxsize=64)
def _blocks(grid: Grid, window: tuple[int, int, int], halo: tuple[int, int, int], device: torch.device):
    # one host-to-device copy per (grid, window, device), not one per layer call
    return tuple(t.to(device) for t in _blocks_cpu(grid, window, halo))


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feats: torch.Tensor | Sequence[torch.Tensor],
    k_feats: torch.Tensor | Sequence[torch.Tensor],
    scale: float,
    log_beta: torch.Tensor,
    grid: Grid,
    window: Sequence[int],
    halo: Sequence[int] = (0, 0, 0),
    text_len: int = 0,
    text_first: bool = True,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Hybrid attention, block form (see the module docstring for the definition).

    q, k: [B, H, N, d]; v: [B, H, N, dv]; q_feats, k_feats: the far part's features, F tensors
    [B, H, N, r] (hadamard) or one [B, H, N, m] (linear); scale: the softmax logit scale;
    log_beta: [H]; grid: (T, Hg, Wg) video tokens; window, halo: (frames, height, width) tokens;
    text_len tokens of text before (text_first) or after the video tokens; key_mask bool [B, N]
    (True = keep). Returns [B, H, N, dv] in v's dtype, accumulated in float32 (float64 when any
    input is float64).

    Per block of queries (all sharing one key window): gather the window's keys, exact softmax with
    the row max m_i, and the far part from T_rest = T_all - T_window(block). Blocks are processed in
    chunks so the per-block temporaries stay bounded.
    """
    q_feats, k_feats = _as_list(q_feats), _as_list(k_feats)
    grid, window, halo = _triple("grid", grid, 1), _triple("window", window, 0), _triple("halo", halo, 0)
    _check(q, k, v, q_feats, k_feats, log_beta, grid, text_len, key_mask)
    dt = compute_dtype(q, k, v, *q_feats)
    b, h, n, dv = v.shape
    nv = n - text_len
    dev = q.device
    v0 = text_len if text_first else 0  # first video token
    vid = slice(v0, v0 + nv)
    txt = slice(0, text_len) if text_first else slice(nv, n)

    keep = key_mask if key_mask is not None else torch.ones(b, n, dtype=torch.bool, device=dev)
    beta = log_beta.to(dt).exp()[None, :, None, None]  # [1, H, 1, 1]

    # The far part only ever sums video keys: text keys are inside every window.
    kf_vid = [f[:, :, vid] for f in k_feats]
    qf_vid = [f[:, :, vid] for f in q_feats]
    v_vid = v[:, :, vid]
    state_all = hadamard_state(kf_vid, v_vid, keep[:, vid])  # [B, H, R, dv + 1]
    width = state_all.shape[-2]

    q_idx, _, k_idx, k_ok, slot_of = window_blocks(grid, window, halo, dev)
    nb, nq = q_idx.shape
    nk = k_idx.shape[1]
    # window keys of each block as full-sequence positions: video keys, then every text key
    kpos = k_idx + v0
    kval = k_ok
    if text_len:
        tpos = torch.arange(txt.start, txt.stop, device=dev)
        kpos = torch.cat([kpos, tpos.expand(nb, -1)], dim=1)
        kval = torch.cat([kval, torch.ones(nb, text_len, dtype=torch.bool, device=dev)], dim=1)
    nkt = kpos.shape[1]

    qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
    v1 = torch.cat([v_vid.to(dt), torch.ones(b, h, nv, 1, dtype=dt, device=dev)], dim=-1)
    v1 = v1 * keep[:, None, vid, None].to(dt)

    per_block = b * h * max(nq * nkt, nk * width, nq * width, width * (dv + 1))
    step = max(1, min(nb, _BLOCK_BUDGET // max(1, per_block)))
    outs = []
    for s0 in range(0, nb, step):
        sl = slice(s0, min(nb, s0 + step))
        c_q, c_k = q_idx[sl], k_idx[sl]  # [nbc, Q], [nbc, K] video positions
        c_kpos, c_kval = kpos[sl], kval[sl]
        nbc = c_q.shape[0]
        # -- exact softmax over the window: logits [B, H, nbc, Q, Kt]
        qb = qd[:, :, c_q.reshape(-1) + v0].view(b, h, nbc, nq, -1)
        kb = kd[:, :, c_kpos.reshape(-1)].view(b, h, nbc, nkt, -1)
        vb = vd[:, :, c_kpos.reshape(-1)].view(b, h, nbc, nkt, dv)
        ok = c_kval[None, :, :] & keep[:, c_kpos.reshape(-1)].view(b, nbc, nkt)  # [B, nbc, Kt]
        logits = (qb @ kb.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~ok[:, None, :, None, :], float("-inf"))
        # the shift cancels between num and den (up to eps), so it carries no gradient
        c = logits.detach().amax(-1, keepdim=True).clamp_min(-SHIFT_FLOOR)  # [B, H, nbc, Q, 1]
        p = torch.exp(logits - c)
        num = p @ vb
        den = p.sum(-1, keepdim=True)
        # -- far part: T_rest = T_all - T_window(block), read out by each query's Kronecker feature
        kk = kronecker_features([f[:, :, c_k.reshape(-1)].to(dt) for f in kf_vid]).view(b, h, nbc, nk, width)
        # padding slots of the window add nothing to T_window
        vw = v1[:, :, c_k.reshape(-1)].view(b, h, nbc, nk, dv + 1) * k_ok[sl][None, None, :, :, None].to(dt)
        state_rest = state_all[:, :, None] - kk.transpose(-1, -2) @ vw  # [B, H, nbc, R, dv + 1]
        qq = kronecker_features([f[:, :, c_q.reshape(-1)].to(dt) for f in qf_vid]).view(b, h, nbc, nq, width)
        far = qq @ state_rest  # [B, H, nbc, Q, dv + 1]
        g = beta[..., None] * torch.exp(-c)
        # the far normaliser is >= 0 exactly; the subtraction can leave roundoff of either sign
        out = (num + g * far[..., :dv]) / (den + g * far[..., dv:].clamp_min(0.0) + eps)
        outs.append(out.reshape(b, h, nbc * nq, dv))
    blocked = torch.cat(outs, dim=2)  # [B, H, nb * Q, dv] in block order, padding slots included
    out_vid = blocked[:, :, slot_of]

    if not text_len:
        return out_vid.to(v.dtype)
    # text queries: exact softmax over every kept key
    lt = (qd[:, :, txt] @ kd.transpose(-1, -2)) * scale
    lt = lt.masked_fill(~keep[:, None, None, :], float("-inf"))
    ct = lt.detach().amax(-1, keepdim=True).clamp_min(-SHIFT_FLOOR)
    pt = torch.exp(lt - ct)
    out_txt = (pt @ vd) / (pt.sum(-1, keepdim=True) + eps)
    parts = [out_txt, out_vid] if text_first else [out_vid, out_txt]
    return torch.cat(parts, dim=2).to(v.dtype)

