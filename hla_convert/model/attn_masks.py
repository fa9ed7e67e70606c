"""What an SDPA call's attention mask means to a converted layer: key padding, (block-)causal, or
refused. The seam (surgery.HLAProcessor) reads each converted call's mask through
`attention_mask_structure`; the result picks the bidirectional or the causal form (docs/causal.md).
"""

from __future__ import annotations

import weakref

import torch


def key_mask_from_attn_mask(attn_mask: torch.Tensor | None, batch: int, n_keys: int) -> torch.Tensor | None:
    """An SDPA mask (bool keep-mask or additive float) -> bool key padding mask [B, Nk], or None.

    Only masks that are the same for every query that keeps any key (key padding, including
    outer-product masks) have a linear-attention meaning; anything else raises.
    """
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dtype == torch.bool:
        keep = m
    else:
        keep = m > -1e4
        if bool((m[keep].abs() > 1e-6).any()):
            raise RuntimeError("converted attention got an additive attention bias; only key padding masks are supported")
    keep = keep.expand(batch if keep.shape[0] == 1 else keep.shape[0], keep.shape[1], keep.shape[2], n_keys)
    keys = keep.any(dim=2).any(dim=1)  # [B, Nk]
    rows_used = keep.any(dim=-1, keepdim=True)
    if bool(((keep != keys[:, None, None, :]) & rows_used).any()):
        raise _NotKeyPadding(
            "converted attention got a mask that differs between queries; only key padding masks are supported",
            (keep, keys, rows_used),
        )
    if bool(keys.all()):
        return None
    return keys


def attention_mask_structure(
    attn_mask: torch.Tensor | None, batch: int, n_queries: int, n_keys: int, is_causal: bool = False
) -> tuple[torch.Tensor | None, int | None]:
    """An SDPA call's mask -> (bool key padding mask [B, Nk] or None, causal block size or None).

    Key padding (the same keys for every query that keeps any) gives (keys, None). A block-causal
    mask, query t keeps the keys j with j // s <= t // s (s tokens per block: SkyReels-V2's
    diffusion-forcing frame blocks; s = 1 is token-level causal, also is_causal=True), possibly
    with key padding on top, gives (keys, s). Anything else raises one line.
    """
    if is_causal:
        if attn_mask is not None or n_queries != n_keys:
            raise RuntimeError("converted attention got is_causal=True with a mask or a different number of queries and keys; not supported")
        return None, 1
    if attn_mask is None:
        return None, None
    # Every block of a forward passes the same mask object: read its structure once, not per layer
    # (an [N, N] scan and temporaries). Eager only; a compiled graph traces the scan.
    key = (batch, n_queries, n_keys)
    cached = None if torch.compiler.is_compiling() else _MASK_CACHE.get("last")
    if cached is not None and cached[0]() is attn_mask and cached[1] == attn_mask._version and cached[2] == key:
        return cached[3]
    result = _mask_structure(attn_mask, batch, n_queries, n_keys)
    if not torch.compiler.is_compiling():
        _MASK_CACHE["last"] = (weakref.ref(attn_mask), attn_mask._version, key, result)
    return result


_MASK_CACHE: dict[str, tuple] = {}


def _mask_structure(attn_mask: torch.Tensor, batch: int, n_queries: int, n_keys: int) -> tuple[torch.Tensor | None, int | None]:
    try:
        return key_mask_from_attn_mask(attn_mask, batch, n_keys), None
    except _NotKeyPadding as err:
        keep, keys, rows_used = err.parts
    if n_queries == n_keys and n_queries > 1:
        differs = (keep != keep[:, :, :1, :]).any(-1).any(1).any(0)  # [Nq]: rows unlike query 0's
        block = int(differs.float().argmax())  # the first block ends where the first row changes
        if block > 0:
            p = torch.arange(n_keys, device=keep.device) // block
            expected = (p[None, :] <= p[:, None])[None, None] & keys[:, None, None, :]
            if not bool(((keep != expected) & rows_used).any()):
                return (None if bool(keys.all()) else keys), block
    raise RuntimeError(
        "converted attention got a mask that differs between queries and is not block-causal; "
        "only key padding and (block-)causal masks are supported"
    )


class _NotKeyPadding(RuntimeError):
    """key_mask_from_attn_mask's refusal of a per-query mask, with the parts a caller can reuse."""

    def __init__(self, message: str, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        super().__init__(message)
        self.parts = parts


__all__ = ["attention_mask_structure", "key_mask_from_attn_mask"]
