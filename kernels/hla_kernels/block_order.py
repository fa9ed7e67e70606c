"""The block-major token order of the hybrid kernels' windows (used by hybrid.py).

The kernels see each window as L consecutive slots. A box `(wt, wh, ww)` of the latent grid
(T, Hg, Wg) that is not whole frames dividing the frame count is made so by a block-major order of
the video tokens: each block's L slots in grid order, the clipped slots of an edge box as padding.
`slot_rows` gives each slot's sequence row (-1 for padding) and the kernels read and write the
tokens in place through it (hybrid.TILE_READS = "index"). The other way (TILE_READS = "gather",
the default until the first is timed on a GPU) reorders the tensors themselves: `to_blocks` /
`from_blocks` do and undo it, each one gather forward and one backward (the inverse permutation,
not autograd's scatter-add), padding slots copies of the first video token, masked by
`block_mask`. The orders are built once per (grid, box, text) on the host and cached; under
torch.compile they are constants of the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch


def _volume(sides: Sequence[int]) -> int:
    return int(sides[0]) * int(sides[1]) * int(sides[2])


def _box(grid: Sequence[int], window: Sequence[int], halo: Sequence[int]) -> tuple[int, int, int] | str:
    """The window's box (wt, wh, ww) on the grid (0 or more than an axis: all of it), or why the
    kernel cannot run it."""
    if any(int(x) != 0 for x in halo):
        return f"halo {tuple(halo)}: the kernel has no overlapping windows"
    g, w = [int(x) for x in grid], [int(x) for x in window]
    return tuple([e if b == 0 or b > e else b for e, b in zip(g, w)])  # type: ignore[return-value]


def _blocks(grid: Sequence[int], box: Sequence[int]) -> tuple[int, int]:
    """(L slots per block, NB blocks): the box's tokens, and the boxes that cover the grid (edge
    boxes clipped where a side does not divide its axis, their missing slots padding)."""
    n = [-(-int(e) // int(w)) for e, w in zip(grid, box)]
    return _volume(box), n[0] * n[1] * n[2]


def _permutes(grid: Sequence[int], box: Sequence[int]) -> bool:
    """Whether the kernels need the tokens reordered: any box but whole frames that divide the grid."""
    return int(box[1]) != int(grid[1]) or int(box[2]) != int(grid[2]) or int(grid[0]) % int(box[0]) != 0


@lru_cache(maxsize=64)
def _index_cpu(grid: tuple[int, int, int], box: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    axes = []
    for e, w in zip(grid, box):
        pos = torch.arange(-(-e // w))[:, None] * w + torch.arange(w)[None, :]  # [boxes, w] positions on the axis
        axes.append((pos, pos < e))
    (pt, vt), (ph, vh), (pw, vw) = axes
    # block-major: (box t, box h, box w, then t, h, w inside the box)
    idx = (pt[:, None, None, :, None, None] * grid[1] + ph[None, :, None, None, :, None]) * grid[2] + pw[None, None, :, None, None, :]
    ok = vt[:, None, None, :, None, None] & vh[None, :, None, None, :, None] & vw[None, None, :, None, None, :]
    idx, ok = idx.reshape(-1), ok.reshape(-1)
    slot_of = torch.empty(grid[0] * grid[1] * grid[2], dtype=torch.long)
    slot_of[idx[ok]] = ok.nonzero().squeeze(-1)
    return idx.masked_fill(~ok, 0), ok, slot_of


def block_index(grid: Sequence[int], box: Sequence[int], device: torch.device | str = "cpu"):
    """The block-major order of the video tokens for window boxes `box` on `grid`.

    Returns idx [NB * L] (the video token in each slot; 0 in padding slots), ok [NB * L] (False in
    padding slots: the clipped part of an edge box) and slot_of [T * Hg * Wg] (each token's slot).
    """
    return tuple(t.to(device) for t in _index_cpu(tuple(int(e) for e in grid), tuple(int(w) for w in box)))


@lru_cache(maxsize=64)
def _seq_index_cpu(grid: tuple[int, int, int], box: tuple[int, int, int], text_len: int, text_first: bool):
    """block_index over the whole sequence (text tokens where they are): gather [text_len + NB * L]
    (the sequence position in each blocked slot), scatter [text_len + T * Hg * Wg] (each position's
    blocked slot), pad [P] (the blocked slots of clipped padding, which copy the first video token)
    and rows (gather as int32 with -1 in the padding slots: what the kernels read in place by)."""
    idx, ok, slot_of = _index_cpu(grid, box)
    text = torch.arange(text_len)
    if text_first:
        gather, scatter, pad = torch.cat([text, text_len + idx]), torch.cat([text, text_len + slot_of]), text_len + (~ok).nonzero().squeeze(-1)
    else:
        gather, scatter, pad = torch.cat([idx, slot_of.numel() + text]), torch.cat([slot_of, idx.numel() + text]), (~ok).nonzero().squeeze(-1)
    return gather, scatter, pad, gather.index_fill(0, pad, -1).to(torch.int32)


@lru_cache(maxsize=64)
def _seq_index(grid, box, text_len, text_first, device):
    return tuple(t.to(device) for t in _seq_index_cpu(grid, box, text_len, text_first))


# torch.compile: the order is a pure function of its (int) arguments, built eagerly once at trace time
# and baked into the graph (its nonzero and boolean indexing would break graphs); the marker sits on
# a plain function, as dynamo sees through an lru_cache wrapper (hla_convert.ops.hybrid does the same)
@torch.compiler.assume_constant_result
def _cached_seq_index(grid, box, text_len, text_first, device):
    return _seq_index(grid, box, text_len, text_first, device)


def _seq_indices(grid, box, text_len, text_first, device) -> tuple[torch.Tensor, ...]:
    """(gather, scatter, pad, rows) of _seq_index_cpu on `device`, cached (a graph constant under compile)."""
    return _cached_seq_index(tuple(int(e) for e in grid), tuple(int(w) for w in box), int(text_len), bool(text_first), torch.device(device))


def slot_rows(grid: Sequence[int], box: Sequence[int], text_len: int, text_first: bool, device) -> torch.Tensor:
    """int32 [text_len + NB * L]: the sequence row of each slot of the block-major order (text
    slots: their own rows; padding slots of clipped edge boxes: -1), for the kernels to read the
    tokens in place instead of gathered copies. Cached; a graph constant under torch.compile."""
    return _seq_indices(grid, box, text_len, text_first, device)[3]


class _Reorder(torch.autograd.Function):
    """x.index_select(dim, fwd) for a permutation of the sequence (plus padding slots that copy
    position `src`, when `pad_in_out`), whose backward is a gather too: g.index_select(dim, back)
    instead of autograd's scatter-add (index_add into zeros, atomics over the whole tensor).
    to_blocks: the padding slots' gradients are added to `src`; from_blocks: the dropped padding
    slots get zero gradient."""

    @staticmethod
    def forward(ctx, x, fwd, back, pad, src: int, dim: int, pad_in_out: bool):
        ctx.save_for_backward(back, pad)
        ctx.src, ctx.dim, ctx.pad_in_out = src, dim, pad_in_out
        return x.index_select(dim, fwd)

    @staticmethod
    def backward(ctx, g):
        back, pad = ctx.saved_tensors
        dim = ctx.dim
        gx = g.index_select(dim, back)
        if pad.numel():
            if ctx.pad_in_out:  # the forward copied `src` into the padding slots
                gx.narrow(dim, ctx.src, 1).add_(g.index_select(dim, pad).sum(dim, keepdim=True))
            else:  # the forward dropped the padding slots: the gather put src's gradient there
                gx.index_fill_(dim, pad, 0)
        return gx, None, None, None, None, None, None


def _reorder(x: torch.Tensor, grid, box, text_len: int, text_first: bool, dim: int, into_blocks: bool) -> torch.Tensor:
    gather, scatter, pad, _ = _seq_indices(grid, box, text_len, text_first, x.device)
    src = int(text_len) if text_first else 0  # the first video token: what the padding slots copy
    fwd, back = (gather, scatter) if into_blocks else (scatter, gather)
    return _Reorder.apply(x, fwd, back, pad, src, dim, into_blocks)


def to_blocks(x: torch.Tensor, grid: Sequence[int], box: Sequence[int], text_len: int, text_first: bool, dim: int = 2) -> torch.Tensor:
    """x with its video tokens (`dim`, after or before text_len text tokens) in block-major order:
    block by block, each block's L slots in grid order, padding slots (copies of the first video
    token: mask them) where an edge box is clipped. Length text_len + NB * L. One gather, and one
    in the backward (_Reorder)."""
    return _reorder(x, grid, box, text_len, text_first, dim, True)


def from_blocks(x: torch.Tensor, grid: Sequence[int], box: Sequence[int], text_len: int, text_first: bool, dim: int = 2) -> torch.Tensor:
    """The inverse of to_blocks (padding slots dropped)."""
    return _reorder(x, grid, box, text_len, text_first, dim, False)


def block_mask(key_mask: torch.Tensor | None, b: int, grid: Sequence[int], box: Sequence[int], text_len: int, text_first: bool, device) -> torch.Tensor | None:
    """The key mask [B, text_len + NB * L] of the block-major order: the user's (True = keep)
    moved with its tokens, padding slots False; None when there is neither."""
    pad = _seq_indices(grid, box, text_len, text_first, device)[2]
    if key_mask is None:
        if not pad.numel():  # no edge box clipped: no padding
            return None
        key_mask = torch.ones(b, text_len + _volume(grid), dtype=torch.bool, device=device)
    return to_blocks(key_mask.to(device), grid, box, text_len, text_first, dim=1).index_fill(1, pad, False)


def _blocked_once(feats: Sequence[torch.Tensor], blocked) -> list[torch.Tensor]:
    """The features in block-major order, a tensor given twice gathered once (the taylor map's
    factors are one tensor: [phi, phi])."""
    out: list[torch.Tensor] = []
    for i, f in enumerate(feats):
        same = [out[j] for j in range(i) if feats[j] is f]
        out.append(same[0] if same else blocked(f))
    return out
