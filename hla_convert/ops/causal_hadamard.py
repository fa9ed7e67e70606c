"""Causal and block-causal Hadamard linear attention (HLA-MATH.md section 1, the causal variant).

Token t has the time p(t) = t // block_size; a query sees the keys whose time is <= its own
(block_size = 1: token-level causal; tokens per frame block: block-causal video, the tokens of one
block see each other and every earlier block). Kept keys only (key_mask bool [B, N]).

    a_tj = [p_j <= p_t] prod_f phi_f(q_t).phi_f(k_j)
    o_t  = sum_j a_tj v_j / (sum_j a_tj + eps)

Three forms, equal up to rounding:
- `hadamard_causal_naive`: the explicit masked [N, N] weights (the float64 reference);
- `hadamard_causal_prefix`: prefix states T_p = T_{p-1} + sum_{p(j) = p} kron_f phi_f(k_j) (x)
  [v_j, 1], each query reads the state of its own time (the streaming recurrence);
- `hadamard_causal`: chunked, whole blocks per chunk: the exact masked quadratic form inside the
  chunk, plus the chunk's queries against the state of all earlier chunks. O(N c r F + N r^F dv).

`hadamard_stream_step` is the streaming API: (new block's tokens, state) -> (outputs, new state),
state [B, H, r^F, dv + 1] whatever the number of blocks before.

`hybrid_block_causal` is the hybrid kind's block-causal form (section 4 with W(i) = the query's own
block and the far part restricted to earlier blocks): exact softmax inside the current block, the
HLA state of the earlier blocks outside, one normaliser.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import compute_dtype, key_weights
from ._common import _check_feats, hadamard_weights, kronecker_features
from .hybrid import SHIFT_FLOOR, check_qkv_beta

DEFAULT_CHUNK = 128


def _block(block_size: int) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1 (tokens per causal block), got {block_size!r}")
    return block_size


def _v1(v: torch.Tensor, key_mask: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor:
    """[v, 1] with masked tokens zeroed: [B, H, N, dv + 1] in dt."""
    v1 = torch.cat([v.to(dt), torch.ones_like(v[..., :1], dtype=dt)], dim=-1)
    w = key_weights(key_mask, v1)
    return v1 if w is None else v1 * w


def _causal_mask(n: int, block_size: int, device) -> torch.Tensor:
    p = torch.arange(n, device=device) // block_size
    return p[None, :] <= p[:, None]


def hadamard_causal_naive(
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    block_size: int = 1,
) -> torch.Tensor:
    """Quadratic reference: explicit [N, N] Hadamard weights under the (block-)causal mask."""
    _check_feats(q_feats, k_feats, v)
    a = hadamard_weights(q_feats, k_feats)
    a = a * _causal_mask(v.shape[2], _block(block_size), v.device).to(a.dtype)
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype)
    num = a @ v.to(a.dtype)
    return (num / (a.sum(-1, keepdim=True) + eps)).to(v.dtype)


def hadamard_stream_step(
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of new tokens -> (outputs [B, H, n, dv], new state [B, H, r^F, dv + 1]).

    The new tokens see each other and everything the state holds. state None = the first block.
    The state stays in float32 (float64 for float64 inputs). Feeding a sequence block by block gives
    hadamard_attention(..., causal=True, block_size=n) of the whole sequence.
    """
    _check_feats(q_feats, k_feats, v)
    dt = compute_dtype(v, *k_feats) if state is None else state.dtype
    v1 = _v1(v, key_mask, dt)
    kk = kronecker_features([f.to(dt) for f in k_feats])
    new = kk.transpose(-1, -2) @ v1
    state = new if state is None else state + new
    nd = kronecker_features([f.to(dt) for f in q_feats]) @ state
    return (nd[..., :-1] / (nd[..., -1:] + eps)).to(v.dtype), state


def hadamard_causal_prefix(
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    block_size: int = 1,
) -> torch.Tensor:
    """Prefix-state form: the streaming recurrence over the blocks (N / block_size steps)."""
    bs = _block(block_size)
    state, outs = None, []
    for t0 in range(0, v.shape[2], bs):
        sl = slice(t0, t0 + bs)
        km = None if key_mask is None else key_mask[:, sl]
        out, state = hadamard_stream_step([f[:, :, sl] for f in q_feats], [f[:, :, sl] for f in k_feats], v[:, :, sl], state, km, eps)
        outs.append(out)
    return torch.cat(outs, dim=2)


def hadamard_causal(
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    chunk_size: int | None = None,
    block_size: int = 1,
) -> torch.Tensor:
    """Chunked causal form. q_feats, k_feats: F tensors [B, H, N, r]; v [B, H, N, dv].

    chunk_size (default 128) is rounded up to whole blocks; N need not be a multiple of it.
    Returns [B, H, N, dv] in v's dtype, accumulated in float32 (float64 for float64 inputs).
    """
    _check_feats(q_feats, k_feats, v)
    bs = _block(block_size)
    cs = chunk_size or DEFAULT_CHUNK
    if not isinstance(cs, int) or cs < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    cs = -(-cs // bs) * bs
    dt = compute_dtype(v, *q_feats, *k_feats)
    b, h, n, dv = v.shape
    v1 = _v1(v, key_mask, dt)
    qf = [f.to(dt) for f in q_feats]
    kf = [f.to(dt) for f in k_feats]
    local = _causal_mask(cs, bs, v.device).to(dt)
    state = None
    outs = []
    for t0 in range(0, n, cs):
        sl = slice(t0, t0 + cs)
        m = local[: min(cs, n - t0), : min(cs, n - t0)]
        a = m
        for qq, kk in zip(qf, kf):
            a = a * (qq[:, :, sl] @ kk[:, :, sl].transpose(-1, -2))
        nd = a @ v1[:, :, sl]
        if state is not None:
            nd = nd + kronecker_features([qq[:, :, sl] for qq in qf]) @ state
        new = kronecker_features([kk[:, :, sl] for kk in kf]).transpose(-1, -2) @ v1[:, :, sl]
        state = new if state is None else state + new
        outs.append(nd[..., :-1] / (nd[..., -1:] + eps))
    return torch.cat(outs, dim=2).to(v.dtype)


# -- hybrid, block-causal -------------------------------------------------------------------------


def _hybrid_check(q, k, v, q_feats, k_feats, log_beta):
    check_qkv_beta(q, k, v, log_beta)
    _check_feats(q_feats, k_feats, v)


def hybrid_block_causal_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    scale: float,
    log_beta: torch.Tensor,
    block_size: int,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic reference of hybrid_block_causal with explicit [N, N] logits and masks."""
    _hybrid_check(q, k, v, q_feats, k_feats, log_beta)
    bs = _block(block_size)
    dt = compute_dtype(q, k, v, *q_feats)
    n = q.shape[2]
    p = torch.arange(n, device=q.device) // bs
    keep = torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    keep = keep[:, None, None, :]
    near = (p[None, :] == p[:, None]) & keep
    far = (p[None, :] < p[:, None]) & keep
    s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    a = hadamard_weights(q_feats, k_feats).to(dt)
    c = s.masked_fill(~near, float("-inf")).amax(-1, keepdim=True).clamp_min(-SHIFT_FLOOR)
    beta = log_beta.to(dt).exp()[None, :, None, None]
    w = torch.exp(s - c).masked_fill(~near, 0.0) + beta * torch.exp(-c) * a.masked_fill(~far, 0.0)
    return ((w @ v.to(dt)) / (w.sum(-1, keepdim=True) + eps)).to(v.dtype)


def hybrid_stream_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    scale: float,
    log_beta: torch.Tensor,
    state: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of new tokens: exact softmax among them, the HLA state of the earlier blocks.

    Returns (outputs [B, H, n, dv], new state [B, H, r^F, dv + 1]); see hybrid_block_causal.
    """
    _hybrid_check(q, k, v, q_feats, k_feats, log_beta)
    dt = compute_dtype(q, k, v, *q_feats) if state is None else state.dtype
    logits = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    # the shift cancels between num and den (up to eps), so it carries no gradient
    c = logits.detach().amax(-1, keepdim=True).clamp_min(-SHIFT_FLOOR)
    pw = torch.exp(logits - c)
    nd = torch.cat([pw @ v.to(dt), pw.sum(-1, keepdim=True)], dim=-1)
    if state is not None:
        beta = log_beta.to(dt).exp()[None, :, None, None]
        nd = nd + beta * torch.exp(-c) * (kronecker_features([f.to(dt) for f in q_feats]) @ state)
    new = kronecker_features([f.to(dt) for f in k_feats]).transpose(-1, -2) @ _v1(v, key_mask, dt)
    state = new if state is None else state + new
    return (nd[..., :-1] / (nd[..., -1:] + eps)).to(v.dtype), state


def hybrid_block_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    scale: float,
    log_beta: torch.Tensor,
    block_size: int,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Block-causal hybrid: exact softmax inside the query's own causal block, HLA for earlier blocks.

    q, k [B, H, N, d], v [B, H, N, dv]; q_feats, k_feats the far part's features (F tensors
    [B, H, N, r], or one [B, H, N, m] for a linear far kind); log_beta [H]. With c_i the window's
    shifted max (ops/hybrid.py, one scale) and T_{<b} the HLA state of the blocks before i's:

        o_i = (sum_{j in b(i)} e^{s_ij - c_i} v_j + beta e^{-c_i} phi(q_i) T_{<b}[:dv])
              / (sum_{j in b(i)} e^{s_ij - c_i} + beta e^{-c_i} phi(q_i) T_{<b}[dv] + eps)

    One pass over the blocks with a running state: the streaming form.
    """
    _hybrid_check(q, k, v, q_feats, k_feats, log_beta)
    bs = _block(block_size)
    state, outs = None, []
    for t0 in range(0, v.shape[2], bs):
        sl = slice(t0, t0 + bs)
        km = None if key_mask is None else key_mask[:, sl]
        qf, kf = [f[:, :, sl] for f in q_feats], [f[:, :, sl] for f in k_feats]
        out, state = hybrid_stream_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], qf, kf, scale, log_beta, state, km, eps)
        outs.append(out)
    return torch.cat(outs, dim=2)
