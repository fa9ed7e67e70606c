"""Hadamard Linear Attention (HLA), HLA-MATH.md section 1.

    a_ij = prod_f phi_f(q_i) . phi_f(k_j)
    o_i  = sum_j a_ij v_j / (sum_j a_ij + eps)

`hadamard_attention` is the efficient state-tensor form: T = sum_j (x)_f phi_f(k_j) (x) [v_j, 1]
of shape [B, H, r**F, dv + 1], then each query contracts it with its own Kronecker feature. The
Kronecker features are formed chunk by chunk over tokens, so no [N, r**F] matrix is ever held.
`hadamard_attention_naive` builds the explicit [N, N] weights; it exists for the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import chunk_size, compute_dtype, key_weights


def _check_feats(q_feats: Sequence[torch.Tensor], k_feats: Sequence[torch.Tensor], v: torch.Tensor) -> None:
    if len(q_feats) != len(k_feats) or len(q_feats) < 1:
        raise ValueError(f"q_feats and k_feats must be equally long non-empty lists, got {len(q_feats)} and {len(k_feats)}")
    for i, (qf, kf) in enumerate(zip(q_feats, k_feats)):
        if qf.dim() != 4 or kf.dim() != 4:
            raise ValueError(f"factor {i}: features must be [B, H, N, r], got {list(qf.shape)} and {list(kf.shape)}")
        if qf.shape[:2] != v.shape[:2] or kf.shape[:3] != v.shape[:3] or qf.shape[-1] != kf.shape[-1]:
            raise ValueError(
                f"factor {i}: q features {list(qf.shape)}, k features {list(kf.shape)} do not fit v {list(v.shape)}"
            )


def kronecker_features(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-wise Kronecker product: F tensors [..., r_f] -> [..., prod r_f] (first factor outermost)."""
    out = feats[0]
    for f in feats[1:]:
        out = (out.unsqueeze(-1) * f.unsqueeze(-2)).flatten(-2)
    return out


def hadamard_state(k_feats: Sequence[torch.Tensor], v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T = sum_j kron_f(phi_f(k_j)) (x) [v_j, 1]: [B, H, prod r_f, dv + 1] in the compute dtype."""
    dt = compute_dtype(v, *k_feats)
    b, h, n, dv = v.shape
    width = 1
    for kf in k_feats:
        width *= kf.shape[-1]
    v1 = torch.cat([v.to(dt), torch.ones(b, h, n, 1, dtype=dt, device=v.device)], dim=-1)
    w = key_weights(key_mask, v1)
    if w is not None:
        v1 = v1 * w
    state = torch.zeros(b, h, width, dv + 1, dtype=dt, device=v.device)
    step = chunk_size(n, b * h * width)
    for s in range(0, n, step):
        kk = kronecker_features([kf[:, :, s : s + step].to(dt) for kf in k_feats])
        state += kk.transpose(-1, -2) @ v1[:, :, s : s + step]
    return state


def hadamard_readout(q_feats: Sequence[torch.Tensor], state: torch.Tensor, eps: float) -> torch.Tensor:
    """o_i = (kron_f phi_f(q_i)) T[:, :dv] / (kron_f phi_f(q_i)) T[:, dv] + eps): [B, H, N, dv]."""
    dt = state.dtype
    n = q_feats[0].shape[2]
    bh = q_feats[0].shape[0] * q_feats[0].shape[1]
    outs = []
    step = chunk_size(n, bh * state.shape[-2])
    for s in range(0, n, step):
        qq = kronecker_features([qf[:, :, s : s + step].to(dt) for qf in q_feats])
        num = qq @ state
        outs.append(num[..., :-1] / (num[..., -1:] + eps))
    return torch.cat(outs, dim=2)


def hadamard_attention(
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    causal: bool = False,
    chunk_size: int | None = None,
    block_size: int = 1,
) -> torch.Tensor:
    """Bidirectional Hadamard linear attention, efficient form.

    q_feats, k_feats: F tensors [B, H, N, r] (the feature maps already applied).
    v: [B, H, N, dv]. key_mask: bool [B, N], True = keep. Returns [B, H, N, dv] in v's dtype,
    accumulated in float32 (float64 when any input is float64).

    causal=True: the (block-)causal form of ops/causal_hadamard.py, chunked (chunk_size tokens,
    block_size tokens per causal block; 1 = token-level causal).
    """
    if causal:
        from .causal_hadamard import hadamard_causal  # imported here: it builds on this module

        return hadamard_causal(q_feats, k_feats, v, key_mask, eps, chunk_size, block_size)
    if chunk_size is not None or block_size != 1:
        raise ValueError("chunk_size and block_size apply to causal=True only")
    _check_feats(q_feats, k_feats, v)
    state = hadamard_state(k_feats, v, key_mask)
    return hadamard_readout(q_feats, state, eps).to(v.dtype)


def hadamard_weights(q_feats: Sequence[torch.Tensor], k_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Explicit A = S^1 (.) ... (.) S^F: [B, H, N, N]."""
    dt = compute_dtype(*q_feats, *k_feats)
    a = None
    for qf, kf in zip(q_feats, k_feats):
        s = qf.to(dt) @ kf.to(dt).transpose(-1, -2)
        a = s if a is None else a * s
    return a


def hadamard_attention_naive(
    q_feats: Sequence[torch.Tensor],
    k_feats: Sequence[torch.Tensor],
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    causal: bool = False,
    block_size: int = 1,
) -> torch.Tensor:
    """Quadratic reference: explicit [N, N] Hadamard weights. Same contract as hadamard_attention."""
    if causal:
        from .causal_hadamard import hadamard_causal_naive  # imported here: it builds on this module

        return hadamard_causal_naive(q_feats, k_feats, v, key_mask, eps, block_size)
    _check_feats(q_feats, k_feats, v)
    a = hadamard_weights(q_feats, k_feats)
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype)
    num = a @ v.to(a.dtype)
    return (num / (a.sum(-1, keepdim=True) + eps)).to(v.dtype)
