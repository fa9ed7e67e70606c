"""benchmarks/fidelity/window_mass.py and far_part.py: the windows and far-part stand-ins they
compare are what they say."""

from __future__ import annotations

import torch

from helpers import fidelity_module


def test_windows_hold_their_keys_and_the_oracle_holds_the_most_mass():
    """On an 8 x 16 x 16 grid (2,048 tokens, 32 key blocks): each static window is the library's
    (every query sees its own token, and the window's size in keys); each top-n block choice gives
    every query n x 64 keys; the oracle choice (top blocks by true mass) holds at least the
    pooled-score choice's mass."""
    wm = fidelity_module("window_mass")
    grid, n = (8, 16, 16), 2048
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    p = torch.softmax(q @ k.T, -1)
    wins = wm.windows(grid, q, k, p)
    sizes = {"own frame (256 keys)": 256, "4 x 4 tile through all frames (256)": 128,
             "4 x 8 tile (512): wan2.1-t2v-1.3b-fast there": 256, "8 x 8 tile (1024): wan2.1-t2v-1.3b there": 512}  # fmt: skip
    for name, keys in sizes.items():
        assert wins[name].diagonal().all() and (wins[name].sum(-1) == keys).all(), name
    for top in (8, 16):
        chosen = {how: wins[f"top-{top} key blocks of 64 by {how} ({64 * top})"] for how in ("pooled score", "oracle")}
        for w in chosen.values():
            assert (w.sum(-1) == 64 * top).all()
        mass = {how: (p * w).sum() for how, w in chosen.items()}
        assert mass["oracle"] >= mass["pooled score"] - 1e-5


def _far_part_errors(seed: int, log_beta: float, split: bool = False) -> dict[str, float]:
    """far_part.errors on an 8 x 16 x 16 grid, one head of 16 dims, values alike within each
    64-token key block, random taylor projections."""
    fp = fidelity_module("far_part")
    wm = fidelity_module("window_mass")
    grid, n, d = (8, 16, 16), 2048, 16
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, n, d, generator=g), torch.randn(1, 1, n, d, generator=g)
    blocks = wm.block_ids(grid, fp.KEY_BLOCK)
    v = torch.randn(int(blocks.max()) + 1, 8, generator=g)[blocks][None, None]  # [1, 1, N, 8], alike within a block
    proj = torch.randn(1, d, 7, generator=g) * 0.1
    return fp.errors(q, k, v, proj, torch.full((1,), log_beta), grid, split=split)


def test_far_part_stand_ins_are_exact_where_they_must_be():
    """With every 64-token key block's values alike, the block's true mass with its mean value is the
    exact softmax; HLA with beta -> 0 is the window alone; dropping the far part costs something."""
    errs = _far_part_errors(1, -60.0)
    assert errs["exact block mass, pooled values"] < 1e-5
    assert abs(errs["hla"] - errs["window only"]) < 1e-5
    assert errs["window only"] > 1e-2


def test_far_part_split_rows_are_the_layer_and_exact_where_they_must_be():
    """far_part.errors(split=True): the HLA weights made explicit give the layer's own output; with
    values alike within each 64-token key block, HLA's weights rescaled to every far block's true
    mass are exact (only the mass per block matters); the best balance per query is never worse
    than the head's one (a balance of 1 is among those tried)."""
    errs = _far_part_errors(2, 0.0, split=True)
    assert abs(errs["hla (its weights made explicit)"] - errs["hla"]) < 1e-5
    assert errs["hla, exact mass per far block"] < 1e-5 < errs["hla"]
    assert errs["hla, best balance per query"] <= errs["hla"] + 1e-7


def test_a_trained_per_query_balance_finds_one_that_is_linear_in_q():
    """far_part.balance_rows: where the exact output is the window part plus HLA's far part at a
    balance exp(w . q + b), the balance trained on some inputs finds it on others; one balance a
    head (b only) cannot, and the oracle per query is never worse than HLA as trained."""
    fp = fidelity_module("far_part")
    g = torch.Generator().manual_seed(3)
    w0, b0 = torch.tensor([[0.8], [-0.5], [0.3], [0.0]]), 0.4

    def parts():
        q = torch.randn(1, 2, 256, 4, generator=g)
        p = {"q": q, "num": torch.randn(1, 2, 256, 8, generator=g), "far": torch.randn(1, 2, 256, 8, generator=g),
             "den": torch.rand(1, 2, 256, 1, generator=g) + 0.5, "mass": torch.rand(1, 2, 256, 1, generator=g) + 0.5}
        p["o"] = fp._with_balance(p, torch.exp(q @ w0 + b0))
        return p

    rows = fp.balance_rows([parts(), parts()], [parts()], steps=300)
    hla = rows["held-out inputs: hla as trained"]
    assert rows["held-out inputs: balance linear in q, trained"] < 0.1 * hla
    assert rows["held-out inputs: balance refit per head (b only)"] > 0.3 * hla
    assert rows["held-out inputs: best balance per query (oracle)"] <= hla


def test_far_part_split_rows_do_not_depend_on_the_order_of_the_inputs():
    """Two heads, two inputs: every row is the same with the inputs swapped (each head's balance
    fitted and applied to that head; the least-squares fit once broadcast its heads against the batch)."""
    fp = fidelity_module("far_part")
    grid, n, d = (8, 16, 16), 2048, 16
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, n, d, generator=g) for _ in range(3))
    proj, log_beta = torch.randn(2, d, 7, generator=g) * 0.1, torch.tensor([0.3, -0.5])
    a = fp.errors(q, k, v, proj, log_beta, grid, split=True)
    b = fp.errors(q.flip(0), k.flip(0), v.flip(0), proj, log_beta, grid, split=True)
    assert a.keys() == b.keys() and all(abs(a[key] - b[key]) < 1e-5 for key in a), {key: (a[key], b[key]) for key in a}
