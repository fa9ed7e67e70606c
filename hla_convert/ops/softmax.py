"""Softmax attention, the teacher: a plain reference with an explicit [N, N] matrix."""

from __future__ import annotations

import math

import torch

from ._common import compute_dtype


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """o_i = sum_j softmax_j(q_i.k_j * scale) v_j. q, k: [B, H, N, d]; v: [B, H, N, dv]; key_mask bool [B, N]."""
    dt = compute_dtype(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v.to(dt)).to(v.dtype)
