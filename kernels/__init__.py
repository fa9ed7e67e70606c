"""Triton kernels for hla-convert, installed as `hla_kernels` (see pyproject.toml).

    hadamard_attention(q_feats, k_feats, v, key_mask=None, eps=1e-6)
        bidirectional Hadamard linear attention, F = 2, forward and backward; same contract as
        hla_convert.ops.hadamard_attention.
    supports(q_feats, k_feats, v) -> bool
        whether hadamard_attention here takes these inputs; callers fall back to the reference.
    unsupported_reason(q_feats, k_feats, v) -> str | None
        the reason behind supports() == False.

Kernels run on CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (read when called).
"""

from .hadamard import hadamard_attention, supports, unsupported_reason

__all__ = ["hadamard_attention", "supports", "unsupported_reason"]
