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

from ._common import _check_feats, chunk_size, hadamard_state, hadamard_weights, kronecker_features  # noqa: F401 - re-exported
from .causal_hadamard import hadamard_causal, hadamard_causal_naive


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
        return hadamard_causal(q_feats, k_feats, v, key_mask, eps, chunk_size, block_size)
    if chunk_size is not None or block_size != 1:
        raise ValueError("chunk_size and block_size apply to causal=True only")
    _check_feats(q_feats, k_feats, v)
    state = hadamard_state(k_feats, v, key_mask)
    return hadamard_readout(q_feats, state, eps).to(v.dtype)


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
        return hadamard_causal_naive(q_feats, k_feats, v, key_mask, eps, block_size)
    _check_feats(q_feats, k_feats, v)
    a = hadamard_weights(q_feats, k_feats)
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype)
    num = a @ v.to(a.dtype)
    return (num / (a.sum(-1, keepdim=True) + eps)).to(v.dtype)
