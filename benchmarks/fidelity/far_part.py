"""What could stand in for the far part: the attention error of the hybrid with its stage-1 HLA
against block-pooled summaries of the same far keys, on a teacher's own attention, per layer.

    python benchmarks/fidelity/far_part.py INPUTS_DIR STAGE1_CHECKPOINT --out far_part.json \
        [--model benchmarks/fidelity/models-deep/wan] [--files 4] [--threads 2]

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


def errors(q, k, v, proj, log_beta, grid) -> dict[str, float]:
    """Each stand-in's relative error against the exact softmax: q, k, v [B, H, N, d], proj [H, d, r-1]."""
    scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-1, -2)) * scale
    o = torch.softmax(s, -1) @ v

    def rel(x):
        return float((x - o).norm() / o.norm())

    with torch.no_grad():
        out = {"hla": rel(hla_layer(proj, log_beta, grid).student(q, k, v, None, scale))}
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
    return out


def main(argv: list[str] | None = None) -> int:
    args = teacher_args(__doc__, ("stage1", "a 4 x 8-tile Wan stage-1 checkpoint of the same model")).parse_args(argv)
    from safetensors.torch import load_file

    loaded = load_teacher(args, "far_part.py")
    if loaded is None:
        return 2
    arch, model, grid, files = loaded
    params = load_file(str(args.stage1))
    per: dict[str, dict[int, list[float]]] = {}
    start = time.time()
    for f in files:
        for layer, (q, k, v) in enumerate(record_attention(model, arch, load_file(str(f)), grid)):
            proj = params[f"param.blocks.{layer}.attn1.hla.proj"].float()
            log_beta = params[f"param.blocks.{layer}.attn1.hla.log_beta"].float()
            for name, e in errors(q, k, v, proj, log_beta, grid).items():
                per.setdefault(name, {}).setdefault(layer, []).append(e)
        print(f"{f.name}: {time.time() - start:.0f} s", file=sys.stderr)
    rows = []
    for name, layers in per.items():
        means = {layer: sum(v) / len(v) for layer, v in layers.items()}
        rows.append({"far part": name, "mean": sum(means.values()) / len(means), "worst_layer": max(means.values()), "layers": means})
        print(f"{name:34s} attention rel err {rows[-1]['mean']:.4f}  worst layer {rows[-1]['worst_layer']:.4f}")
    doc = {"model": str(args.model), "stage1": str(args.stage1), "inputs": [str(f) for f in files], "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
