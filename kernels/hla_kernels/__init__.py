"""Triton kernels for hla-convert, installed as `hla_kernels` (see pyproject.toml).

    hadamard_attention(q_feats, k_feats, v, key_mask=None, eps=1e-6)
        bidirectional Hadamard linear attention, F = 2, forward and backward; same contract as
        hla_convert.ops.hadamard_attention.
    supports(q_feats, k_feats, v) -> bool
        whether hadamard_attention here takes these inputs; callers fall back to the reference.
    unsupported_reason(q_feats, k_feats, v) -> str | None
        the reason behind supports() == False.

    hybrid_attention(q, k, v, q_feats, k_feats, scale, log_beta, grid, window, halo=(0, 0, 0),
                     text_len=0, text_first=True, key_mask=None, eps=1e-6)
        hybrid attention (exact softmax in window boxes of the latent grid: whole frames, spatial
        tiles, clipped edge boxes; + Hadamard HLA F = 2 outside, one normaliser), forward and
        backward; same contract as hla_convert.ops.hybrid_attention.
    hybrid_supports(...) / hybrid_unsupported_reason(...)
        the same questions for hybrid_attention (halos, far kinds other than hadamard: the reference).

    causal_hadamard_attention(q_feats, k_feats, v, key_mask=None, eps=1e-6, block_size=1)
        (block-)causal Hadamard linear attention, F = 2, chunked, forward and backward; same
        contract as hla_convert.ops.hadamard_attention(..., causal=True, block_size=...).
    causal_supports(q_feats, k_feats, v, block_size=1) / causal_unsupported_reason(...)
    causal_second_order_attention(q, k, v, key_mask=None, eps=1e-6, block_size=1)
        normalised (block-)causal 2nd-order linear attention (no decay) as two passes of the
        causal Hadamard kernel; second_order_supports(q, k, v, block_size=1).

Kernels run on CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (read when called).
"""

from .causal import causal_hadamard_attention, causal_second_order_attention, second_order_supports
from .causal import supports as causal_supports
from .causal import unsupported_reason as causal_unsupported_reason
from .hadamard import hadamard_attention, supports, unsupported_reason
from .hybrid import hybrid_attention
from .hybrid import supports as hybrid_supports
from .hybrid import unsupported_reason as hybrid_unsupported_reason

__all__ = [
    "causal_hadamard_attention",
    "causal_second_order_attention",
    "causal_supports",
    "causal_unsupported_reason",
    "hadamard_attention",
    "hybrid_attention",
    "hybrid_supports",
    "hybrid_unsupported_reason",
    "second_order_supports",
    "supports",
    "unsupported_reason",
]
