"""benchmarks/fidelity/window_mass.py: the windows it compares hold what they say."""

from __future__ import annotations

import torch

from helpers import fidelity_module


def test_windows_hold_their_keys_and_the_oracle_holds_the_most_mass():
    """On an 8 x 16 x 16 grid (2,048 tokens, 32 key blocks): each static window is the library's (every query sees its
    own token, and the window's size in keys); each top-n block choice gives every query n x 64
    keys; the oracle choice (top blocks by true mass) holds at least the pooled-score choice's mass."""
    wm = fidelity_module("window_mass")
    grid, n = (8, 16, 16), 2048
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    p = torch.softmax(q @ k.T, -1)
    wins = wm.windows(grid, q, k, p)
    sizes = {"own frame (256 keys)": 256, "4 x 4 tile through all frames (256)": 128,
             "4 x 8 tile (512): wan2.1-t2v-1.3b there": 256, "8 x 8 tile (1024): wan2.1-t2v-1.3b-hq there": 512}  # fmt: skip
    for name, keys in sizes.items():
        assert wins[name].diagonal().all() and (wins[name].sum(-1) == keys).all(), name
    for top in (8, 16):
        chosen = {how: wins[f"top-{top} key blocks of 64 by {how} ({64 * top})"] for how in ("pooled score", "oracle")}
        for w in chosen.values():
            assert (w.sum(-1) == 64 * top).all()
        mass = {how: (p * w).sum() for how, w in chosen.items()}
        assert mass["oracle"] >= mass["pooled score"] - 1e-5
