"""What could stand in for the far part: the attention error of the hybrid with its stage-1 HLA
against block-pooled summaries of the same far keys, on a teacher's own attention, per layer.

    python benchmarks/fidelity/far_part.py INPUTS_DIR STAGE1_CHECKPOINT --out far_part.json \
        [--model benchmarks/fidelity/models-deep/wan] [--files 4] [--threads 2] [--split [--train-balance]]

INPUTS_DIR: a run.py input set's held-out folder (as window_mass.py takes). STAGE1_CHECKPOINT: a
stage-1 checkpoint of a 4 x 8-tile Wan conversion of that model (`stage1-checkpoints/wan-shipped-
tile2x-seed*.safetensors` under benchmarks/fidelity/results/: the taylor feature projections and
log_beta of every layer after 600 steps of attention transfer). The teacher runs each input with its
self-attention recorded; then for each layer, against the exact softmax output o = softmax(s) v
(s = q k^T / sqrt(d)), the relative error ||o' - o|| / ||o|| of:

- hla: the hybrid as a converted layer computes it (`model.layers.HLAAttention.student` with the
  checkpoint's features: the 4 x 8 tile through all frames exact, HLA outside, one normaliser);
- window only: the far part dropped (the tile's softmax renormalised);
- pooled blocks: the far keys summarised per 64-token block (2 x 4 x 8) by their mean key and value,
  each block weighted n_b exp(q . k_mean / sqrt(d)) in the same normaliser (training-free, as the
  compressed branch of block-sparse methods);
- pooled blocks + variance: the same with the block's logit variance added (exp(mean + var / 2),
  the second cumulant, computed from the exact logits);
- exact block mass, pooled values: each block's true softmax mass, its keys' mean value (the best
  any block-pooled value can do).

And where the HLA far part's own error is (--split; the HLA weights made explicit, [N, N] a head):
- hla, exact far mass: its far weights rescaled per query to the true far softmax mass (what is
  left is the distribution of its weight over the far keys);
- hla, exact mass per far block: rescaled per query and 64-token block to each block's true mass
  (what is left is the distribution within blocks);
- exact far weights, hla's far mass: the true far softmax weights scaled to the mass HLA gives
  them (what is left is HLA's far mass alone);
- hla, best balance per query: the far part's weight beta scaled per query by the best of 2^(-4..4)
  (an oracle: what a query-dependent balance could buy at most);
- hla, balance linear in q: that scale as exp(w . q + b), w and b fitted per head by least squares
  to the oracle's log scales (d + 1 numbers a head: a learnable query-dependent balance).

--train-balance: per-query balances trained against the exact output (Adam on the layer's squared
error, as stage 1 trains, the features fixed) on the first half of the files and measured on the
rest: b alone (a refit of beta), exp(w . q + b), and exp(w . [q, log(HLA far mass / window mass)] + b),
beside HLA as trained and the oracle on the same held-out files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from window_mass import KEY_BLOCK, block_ids, load_teacher, membership, record_attention, teacher_args  # noqa: E402

WINDOW = (0, 4, 8)  # the 4 x 8 tile: the checkpoint's window on the 16 x 16 x 16 grid (8 KEY_BLOCKs make its tube)


def hla_layer(proj: torch.Tensor, log_beta: torch.Tensor, grid: tuple[int, int, int]):
    """The library's hybrid attention layer (model.layers.HLAAttention: taylor map, F = 2, r = proj's
    width + 1, the WINDOW tile) with a stage-1 checkpoint's proj [H, d, r-1] and log_beta [H], on grid."""
    from hla_convert.model.config import HLAConfig
    from hla_convert.model.layers import HLAAttention

    heads, d, r1 = proj.shape
    config = HLAConfig(kind="hybrid", far="hadamard", factors=2, feature_dim=r1 + 1, feature_map="taylor", window=list(WINDOW))
    layer = HLAAttention(config, heads, d)
    layer.load_state_dict({"proj": proj, "log_beta": log_beta})
    layer.grid = grid
    return layer


def errors(q, k, v, proj, log_beta, grid, split: bool = False, parts: dict | None = None) -> dict[str, float]:
    """Each stand-in's relative error against the exact softmax: q, k, v [B, H, N, d], proj [H, d, r-1];
    split: also the HLA far part's error taken apart (module docstring); parts (with split): filled
    with what a per-query balance acts on (balance_rows)."""
    scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-1, -2)) * scale
    o = torch.softmax(s, -1) @ v

    def rel(x):
        return _rel(x, o)

    layer = hla_layer(proj, log_beta, grid)
    with torch.no_grad():
        out = {"hla": rel(layer.student(q, k, v, None, scale))}
    inside = membership(grid, WINDOW)
    sw = s.masked_fill(~inside, float("-inf"))
    c = sw.amax(-1, keepdim=True)
    pw = torch.exp(sw - c)
    num, den = pw @ v, pw.sum(-1, keepdim=True)
    out["window only"] = rel(num / den)
    onehot = F.one_hot(block_ids(grid, KEY_BLOCK)).to(q.dtype)  # [N, nb]
    size = onehot.sum(0)  # [nb]
    far = ((inside.to(q.dtype) @ onehot) == 0).to(q.dtype)  # [N, nb]: the block is outside the query's tile
    kbar, vbar = (onehot.T @ k) / size[:, None], (onehot.T @ v) / size[:, None]
    sbar = (q @ kbar.transpose(-1, -2)) * scale  # [B, H, N, nb]
    mean_s = (s @ onehot) / size
    var_s = ((s * s) @ onehot) / size - mean_s**2
    for name, weight in (
        ("pooled blocks", size * torch.exp(sbar - c)),
        ("pooled blocks + variance", size * torch.exp(sbar + var_s / 2 - c)),
        ("exact block mass, pooled values", torch.exp(s - c) @ onehot),
    ):
        wf = weight * far
        out[name] = rel((num + wf @ vbar) / (den + wf.sum(-1, keepdim=True)))
    if split:
        out.update(_hla_split(layer, q, k, v, o, s, inside, c, num, den, onehot, scale, rel, parts))
    return out


def _hla_split(layer, q, k, v, o, s, inside, c, num, den, onehot, scale, rel, parts=None) -> dict[str, float]:
    """The HLA far part's error taken apart: its explicit far weights beta e^-c a_ij (as
    ops.hybrid.hybrid_attention_naive forms them, c the window's max clamped as there) against the
    exact ones e^(s_ij - c), outside the tile."""
    from hla_convert.ops._common import hadamard_weights
    from hla_convert.ops.hybrid import SHIFT_FLOOR

    with torch.no_grad():
        cc = c.clamp_min(-SHIFT_FLOOR)  # the shift the layer uses (c is the window max)
        shift = torch.exp(cc - c)  # num, den were formed with c: bring them to cc
        num_c, den_c = num / shift, den / shift
        a = hadamard_weights(layer.features(q, scale), layer.features(k, scale))
        far = ~inside
        w_hla = (layer.log_beta.exp()[None, :, None, None] * torch.exp(-cc)) * a.masked_fill(~far, 0.0)
        w_ex = torch.exp(s - cc).masked_fill(~far, 0.0)
        m_hla, m_ex = w_hla.sum(-1, keepdim=True), w_ex.sum(-1, keepdim=True)
        out = {"hla (its weights made explicit)": rel((num_c + w_hla @ v) / (den_c + m_hla + layer.config.eps))}

        def with_far(w):  # the far part given as explicit weights
            return rel((num_c + w @ v) / (den_c + w.sum(-1, keepdim=True)))

        out["hla, exact far mass"] = with_far(w_hla * (m_ex / m_hla.clamp_min(1e-30)))
        b_hla, b_ex = w_hla @ onehot, w_ex @ onehot  # [B, H, N, nb] mass per key block
        out["hla, exact mass per far block"] = with_far(w_hla * ((b_ex / b_hla.clamp_min(1e-30)) @ onehot.T))
        out["exact far weights, hla's far mass"] = with_far(w_ex * (m_hla / m_ex.clamp_min(1e-30)))
        # a balance per query instead of per head: beta_i = beta * lambda_i, the best lambda_i of each
        # query (_best_balance), and lambda_i = exp(w . q_i + b) fitted per head to those by least
        # squares (d + 1 numbers a head: what a learned query-dependent balance could reach here)
        p = {"q": q, "num": num_c, "den": den_c, "far": w_hla @ v, "mass": m_hla, "o": o}
        best = _best_balance(p)  # [B, H, N, 1]
        out["hla, best balance per query"] = rel(_with_balance(p, best))
        x = torch.cat([q, torch.ones_like(q[..., :1])], -1)  # [B, H, N, d + 1]
        xh, yh = x.transpose(0, 1).flatten(1, 2), best.log().transpose(0, 1).flatten(1, 2)  # per head
        coef = torch.linalg.lstsq(xh, yh).solution  # [H, d + 1, 1]
        out["hla, balance linear in q"] = rel(_with_balance(p, torch.exp((x.transpose(0, 1) @ coef[:, None]).transpose(0, 1))))
    if parts is not None:  # [B, H, N, .] each: the window's part, HLA's far part, the exact output
        parts.update(p)
    return out


def _with_balance(p, lam):
    """The hybrid's output with HLA's far part weighted lam (a number, or [B, H, N, 1] per query)."""
    return (p["num"] + lam * p["far"]) / (p["den"] + lam * p["mass"])


def _best_balance(p) -> torch.Tensor:
    """Each query's best far-part weight among 2^(-4..4) against the exact output: [B, H, N, 1]."""
    lams = torch.exp2(torch.linspace(-4, 4, 33, dtype=p["o"].dtype))
    errs = torch.stack([(_with_balance(p, lam) - p["o"]).norm(dim=-1) for lam in lams])
    return lams[errs.argmin(0)][..., None]


def _rel(x, o) -> float:
    return float((x - o).norm() / o.norm())


BALANCES = {  # the inputs x of a per-query balance beta_i = beta * exp(w . x_i + b), w and b per head
    "balance refit per head (b only)": lambda p: p["q"][..., :0],
    "balance linear in q, trained": lambda p: p["q"],
    "balance linear in q and log(HLA far mass / window mass), trained": lambda p: torch.cat([p["q"], (p["mass"] / p["den"]).log()], -1),
}


def balance_rows(train: list[dict], held: list[dict], steps: int = 200) -> dict[str, float]:
    """Per-query balances trained (Adam, full batch, the summed squared error of the layer's
    attention output, as stage 1 trains) on `train`'s parts and measured on `held`'s (other inputs);
    beside them HLA as trained and the per-query oracle on the same held-out parts."""
    out = {"held-out inputs: hla as trained": sum(_rel(_with_balance(p, 1.0), p["o"]) for p in held) / len(held)}
    out["held-out inputs: best balance per query (oracle)"] = sum(_rel(_with_balance(p, _best_balance(p)), p["o"]) for p in held) / len(held)
    norm = sum(float(p["o"].pow(2).sum()) for p in train)
    for name, inputs in BALANCES.items():
        xs = [inputs(p) for p in train]
        heads, width = xs[0].shape[1], xs[0].shape[-1]
        w = torch.zeros(heads, width, 1, requires_grad=True)
        b = torch.zeros(heads, 1, 1, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.02)
        for _ in range(steps):
            opt.zero_grad()
            loss = sum((_with_balance(p, torch.exp(x @ w + b)) - p["o"]).pow(2).sum() for p, x in zip(train, xs)) / norm
            loss.backward()
            opt.step()
        with torch.no_grad():
            out[f"held-out inputs: {name}"] = sum(_rel(_with_balance(p, torch.exp(inputs(p) @ w + b)), p["o"]) for p in held) / len(held)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = teacher_args(__doc__, ("stage1", "a 4 x 8-tile Wan stage-1 checkpoint of the same model"))
    ap.add_argument("--split", action="store_true", help="also take the HLA far part's error apart (explicit [N, N] weights: ~4x the time)")
    ap.add_argument("--train-balance", action="store_true",
                    help="with --split: per-query balances trained on the first half of the files, measured on the rest")
    args = ap.parse_args(argv)
    if args.train_balance and not args.split:
        ap.error("--train-balance needs --split")
    from safetensors.torch import load_file

    loaded = load_teacher(args, "far_part.py")
    if loaded is None:
        return 2
    arch, model, grid, files = loaded
    params = load_file(str(args.stage1))
    if args.train_balance and len(files) < 2:
        print("far_part.py: --train-balance needs --files 2 or more (half to train on, half to measure)", file=sys.stderr)
        return 2
    per: dict[str, dict[int, list[float]]] = {}
    kept: dict[int, list[dict]] = {}
    start = time.time()
    for f in files:
        for layer, (q, k, v) in enumerate(record_attention(model, arch, load_file(str(f)), grid)):
            proj = params[f"param.blocks.{layer}.attn1.hla.proj"].float()
            log_beta = params[f"param.blocks.{layer}.attn1.hla.log_beta"].float()
            parts = {} if args.train_balance else None
            for name, e in errors(q, k, v, proj, log_beta, grid, split=args.split, parts=parts).items():
                per.setdefault(name, {}).setdefault(layer, []).append(e)
            if parts is not None:
                kept.setdefault(layer, []).append(parts)
        print(f"{f.name}: {time.time() - start:.0f} s", file=sys.stderr)
    for layer, parts in kept.items():
        half = len(parts) // 2
        for name, e in balance_rows(parts[:half], parts[half:]).items():
            per.setdefault(name, {})[layer] = [e]
    if kept:
        print(f"balances trained: {time.time() - start:.0f} s", file=sys.stderr)
    rows = []
    for name, layers in per.items():
        means = {layer: sum(v) / len(v) for layer, v in layers.items()}
        rows.append({"far part": name, "mean": sum(means.values()) / len(means), "worst_layer": max(means.values()), "layers": means})
        print(f"{name:66s} attention rel err {rows[-1]['mean']:.4f}  worst layer {rows[-1]['worst_layer']:.4f}")
    doc = {"model": str(args.model), "stage1": str(args.stage1), "inputs": [str(f) for f in files], "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
