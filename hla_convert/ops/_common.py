"""Helpers shared by the reference ops: dtype promotion and key masks."""

from __future__ import annotations

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
