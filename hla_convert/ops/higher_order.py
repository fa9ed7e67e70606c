"""Second-order linear attention (Zhang, Qin, Wang, Gu), bidirectional: HLA-MATH.md section 2.

    A = (Q K^T)(Q K^T)^T = Q (K^T K) Q^T, applied to V:
    o_i = q_i^T S^K C^QV / (q_i^T S^K m^Q + eps)
    S^K = sum_j k_j k_j^T, C^QV = sum_j q_j v_j^T, m^Q = sum_j q_j

Every token j appears on the key side twice (its k_j in S^K, its q_j and v_j in C^QV and m^Q), so a
masked token is left out of all three sums. The normaliser sum_l a_il is >= 0 whenever q and k are
nonnegative features: the layer feeds positive feature maps, never raw q/k.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, key_weights
from .causal import higher_order_causal, higher_order_causal_naive


def higher_order_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    *,
    causal: bool = False,
    decay: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    block_size: int = 1,
) -> torch.Tensor:
    """Efficient form. q, k: [B, H, N, r]; v: [B, H, N, dv]; key_mask bool [B, N] (True = keep).

    causal=True: the masked (block-)causal form of ops/causal.py, chunk-parallel (chunk_size
    tokens, default 64; block_size tokens per causal block, 1 = token-level; decay gamma in (0, 1],
    a float or [H]). decay and chunk_size mean nothing bidirectionally and are refused there.

    Three passes over the tokens: S^K and C^QV are GEMMs in the inputs' own dtype (float32
    accumulation inside; no float32 copy of v), the small [r, dv + 1] product
    W = S^K [C^QV | m^Q] is formed in float32 (float64 for float64 inputs), and one readout GEMM
    q W gives numerator and normaliser together.

    normalize=False returns q_i^T S^K C^QV / N^2 (kept tokens), the unnormalised operator scaled to
    stay O(1) in N.
    """
    if causal:
        return higher_order_causal(q, k, v, key_mask, normalize, eps, decay, chunk_size, block_size)
    if decay is not None or chunk_size is not None or block_size != 1:
        raise ValueError("decay, chunk_size and block_size apply to causal=True only")
    dt = compute_dtype(q, k, v)
    w = key_weights(key_mask, v)
    kk, qq, vv = (k, q, v) if w is None else (k * w.to(k.dtype), q * w.to(q.dtype), v * w)
    s_k = (kk.transpose(-1, -2) @ kk).to(dt)  # [B, H, r, r]
    c_qv = (qq.transpose(-1, -2) @ vv.to(qq.dtype)).to(dt)  # [B, H, r, dv]
    m_q = qq.to(dt).sum(dim=2).unsqueeze(-1)  # [B, H, r, 1]
    wmat = s_k @ torch.cat([c_qv, m_q], dim=-1)  # [B, H, r, dv + 1]
    nd = q.to(dt) @ wmat  # [B, H, N, dv + 1]
    if normalize:
        out = nd[..., :-1] / (nd[..., -1:] + eps)
    else:
        n = v.shape[2] if w is None else w.to(dt).sum(dim=2, keepdim=True)
        out = nd[..., :-1] / (n * n)
    return out.to(v.dtype)


def higher_order_weights(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit A = (Q K_m^T)(Q_m K_m^T)^T with masked tokens zeroed on the key side: [B, H, N, N]."""
    dt = compute_dtype(q, k)
    q, k = q.to(dt), k.to(dt)
    w = key_weights(key_mask, q)
    qm, km = (q, k) if w is None else (q * w, k * w)
    return (q @ km.transpose(-1, -2)) @ (qm @ km.transpose(-1, -2)).transpose(-1, -2)


def higher_order_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    *,
    causal: bool = False,
    decay: float | torch.Tensor | None = None,
    block_size: int = 1,
) -> torch.Tensor:
    """Quadratic reference with the explicit [N, N] second-order weights. Same contract as above."""
    if causal:
        return higher_order_causal_naive(q, k, v, key_mask, normalize, eps, decay, block_size)
    dt = compute_dtype(q, k, v)
    a = higher_order_weights(q, k, key_mask)
    num = a @ v.to(dt)
    if normalize:
        out = num / (a.sum(-1, keepdim=True) + eps)
    else:
        n = v.shape[2] if key_mask is None else key_mask.sum(-1).to(dt)[:, None, None, None]
        out = num / (n * n)
    return out.to(v.dtype)
