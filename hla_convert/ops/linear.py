"""First-order linear attention, the baseline with the same state size as HLA.

    o_i = phi(q_i)^T sum_j phi(k_j) [v_j, 1]^T   then divide by the last channel.

phi maps to r**F positive features, so its state [r**F, dv + 1] is exactly Hadamard HLA's.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, key_weights


def linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Efficient form. q_feat, k_feat: [B, H, N, m] (positive features); v: [B, H, N, dv]; key_mask bool [B, N]."""
    dt = compute_dtype(q_feat, k_feat, v)
    b, h, n, _ = v.shape
    v1 = torch.cat([v.to(dt), torch.ones(b, h, n, 1, dtype=dt, device=v.device)], dim=-1)
    w = key_weights(key_mask, v1)
    if w is not None:
        v1 = v1 * w
    state = k_feat.to(dt).transpose(-1, -2) @ v1
    num = q_feat.to(dt) @ state
    return (num[..., :-1] / (num[..., -1:] + eps)).to(v.dtype)


def linear_attention_naive(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Quadratic reference: explicit [N, N] weights phi(q_i).phi(k_j)."""
    dt = compute_dtype(q_feat, k_feat, v)
    a = q_feat.to(dt) @ k_feat.to(dt).transpose(-1, -2)
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(dt)
    return ((a @ v.to(dt)) / (a.sum(-1, keepdim=True) + eps)).to(v.dtype)



