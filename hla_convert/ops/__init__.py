"""The attention math as plain functions: efficient forms beside naive quadratic references.

No nn.Module and no diffusers here. Shapes: q/k features [B, H, N, r], v [B, H, N, dv],
key_mask bool [B, N] with True = keep.
"""

from .causal import HigherOrderState, block_causal_mask, higher_order_stream_step
from .causal_hadamard import hadamard_stream_step, hybrid_block_causal, hybrid_stream_step
from .hadamard import hadamard_attention, hadamard_attention_naive, hadamard_weights, kronecker_features
from .hybrid import hybrid_attention, hybrid_attention_naive, window_mask
from .higher_order import higher_order_attention, higher_order_attention_naive, higher_order_weights
from .linear import linear_attention, linear_attention_naive
from .softmax import softmax_attention

__all__ = [
    "HigherOrderState",
    "block_causal_mask",
    "hadamard_stream_step",
    "higher_order_stream_step",
    "hadamard_attention",
    "hadamard_attention_naive",
    "hadamard_weights",
    "higher_order_attention",
    "higher_order_attention_naive",
    "higher_order_weights",
    "hybrid_attention",
    "hybrid_block_causal",
    "hybrid_stream_step",
    "hybrid_attention_naive",
    "kronecker_features",
    "linear_attention",
    "linear_attention_naive",
    "softmax_attention",
    "window_mask",
]
