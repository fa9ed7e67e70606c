"""Forward FLOPs of one attention core per kind (what `hla-convert inspect` reports per layer)."""

from __future__ import annotations

from .config import HLAConfig


def attention_flops(
    tokens: int,
    heads: int,
    head_dim: int,
    config: HLAConfig | None,
    grid: tuple[int, int, int] | None = None,
    text_tokens: int = 0,
) -> float:
    """Forward FLOPs of one attention core over `tokens` tokens (multiply-adds counted as 2).

    hybrid needs the latent grid (frames, height, width) of the video tokens; `tokens` then counts
    them plus `text_tokens`. Without a grid the hybrid is counted as if its window were everything.
    """
    n, h, d = tokens, heads, head_dim
    if config is None or config.kind == "softmax":
        return 4.0 * n * n * d * h
    r, fac = config.feature_dim, config.factors
    if config.kind == "hybrid":
        return h * _hybrid_flops(n, d, config, grid, text_tokens)
    if config.kind == "hadamard":
        feats = 2 * 2 * n * d * r * fac
        return h * (feats + 2 * 2.0 * n * r**fac * (d + 1))
    if config.kind == "linear":
        m = r**fac
        return h * (2 * 2 * n * d * m + 2 * 2.0 * n * m * (d + 1))
    # higher_order: S^K, C^QV, q S^K, (q S^K) C^QV, plus features
    return h * (2 * 2 * n * d * r + 2.0 * n * (r * r * 2 + r * d * 2 + r * (d + 1)))


def hybrid_window(config: HLAConfig, grid: tuple[int, int, int]) -> tuple[tuple[int, int, int], int, int]:
    """The hybrid kind's window on the latent `grid` (T, Hg, Wg): (box in tokens per axis, the
    blocks that tile the grid, the video keys of a full block's window: box + halo, clipped)."""
    from ..ops.hybrid import effective_window

    box = effective_window(grid, config.window_on(grid))
    blocks, keys = 1, 1
    for e, w, hl in zip(grid, box, config.halo):
        blocks *= -(-e // w)
        keys *= min(e, w + 2 * hl)
    return box, blocks, keys


def _hybrid_flops(n: int, d: int, config: HLAConfig, grid: tuple[int, int, int] | None, text: int) -> float:
    """Per head: window softmax (logits + weighted sum) plus the far part's features, global state,
    per-block window states and readout (HLA-MATH.md section 4)."""
    if grid is None:
        return 4.0 * n * n * d
    nv = grid[0] * grid[1] * grid[2]
    _, blocks, keys = hybrid_window(config, grid)
    width = config.state_features
    maps = 2 * 2 * n * d * config.feature_dim * (config.factors if config.far == "hadamard" else 1)
    if config.far == "linear":
        maps = 2 * 2 * n * d * width
    near = 4.0 * nv * (keys + text) * d + 4.0 * text * n * d
    far = 2.0 * (d + 1) * width * (nv + blocks * keys + nv)
    return near + maps + far


__all__ = ["attention_flops", "hybrid_window"]
