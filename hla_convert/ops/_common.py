"""Helpers shared by the reference ops: dtype promotion, key masks, and the Hadamard pieces
(feature checks, Kronecker features, the state tensor, explicit weights) that the bidirectional,
hybrid and causal forms all build on (here, so that hadamard -> causal_hadamard -> hybrid is one-way)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def key_weights(key_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """bool [B, N] (True = keep) -> [B, 1, N, 1] of 0/1 in like's dtype, or None."""
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be bool [B, N] (True = keep), got {key_mask.dtype}")
    if key_mask.dim() != 2 or key_mask.shape[0] != like.shape[0] or key_mask.shape[1] != like.shape[2]:
        raise ValueError(f"key_mask must be [B, N] = {[like.shape[0], like.shape[2]]}, got {list(key_mask.shape)}")
    return key_mask[:, None, :, None].to(like.dtype)


def chunk_size(n: int, per_token: int, budget: int = 1 << 24) -> int:
    """Tokens per chunk so that a [B*H, chunk, per_token] temporary stays under `budget` elements."""
    return max(1, min(n, budget // max(1, per_token)))


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


def hadamard_weights(q_feats: Sequence[torch.Tensor], k_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Explicit A = S^1 (.) ... (.) S^F: [B, H, N, N]."""
    dt = compute_dtype(*q_feats, *k_feats)
    a = None
    for qf, kf in zip(q_feats, k_feats):
        s = qf.to(dt) @ kf.to(dt).transpose(-1, -2)
        a = s if a is None else a * s
    return a
