"""How much of a teacher's own softmax attention each window shape holds exactly: what is left for
the far part (HLA) to approximate, before any training.

    python benchmarks/fidelity/window_mass.py INPUTS_DIR --out window_mass.json \
        [--model benchmarks/fidelity/models-deep/wan] [--files 4] [--threads 2]

INPUTS_DIR: a run.py input set's held-out folder (`--inputs-dir`'s `<arch>-seed.../heldout/`, one
safetensors file of model inputs per batch). For each of the first --files files the teacher runs
its forward with every self-attention call recorded (q, k, v after the model's norms and rotary
embedding); then, per layer, sample and head, the softmax P = softmax(q k^T / sqrt(d)) [N, N] and,
for each window W (a query's exactly attended keys):

- mass: sum_{j in W(i)} P_ij, averaged over the queries: the share the window holds exactly;
- far share: ||sum_{j not in W(i)} P_ij v_j|| / ||sum_j P_ij v_j|| over all queries: the part of the
  attention output the far part must supply.

Static windows are the library's own (`ops.hybrid.window_mask`, tiles through all frames and the
own frame, as the recipes' windows on the deep benchmark's 16 x 16 x 16 grid). Dynamic windows
choose, for each query block (the 4 x 8 tile through all frames: the default's), the top-k key
blocks of 2 x 4 x 8 tokens by the mean-pooled score q_block . k_block (as block-sparse methods
like SLA choose them) or by the true summed mass (the oracle: the best any block choice of that
size can do). Mean over every (layer, sample, head); "worst layer" is the lowest layer mean.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_models as bm  # noqa: E402

# the deep benchmark's token windows: (frames, height, width), 0 = the whole extent
STATIC = {
    "own frame (256 keys)": (1, 0, 0),
    "4 x 4 tile through all frames (256)": (0, 4, 4),
    "4 x 8 tile (512): wan2.1-t2v-1.3b-fast there": (0, 4, 8),
    "8 x 8 tile (1024): wan2.1-t2v-1.3b there": (0, 8, 8),
}
QUERY_BLOCK = (0, 4, 8)
KEY_BLOCK = (2, 4, 8)  # 64 tokens


def block_ids(grid: tuple[int, int, int], box: tuple[int, int, int]) -> torch.Tensor:
    """[N] the block of each video token (row-major t, h, w) for boxes that divide the grid."""
    t, h, w = torch.meshgrid(*(torch.arange(e) for e in grid), indexing="ij")
    bt, bh, bw = (e if b == 0 else b for e, b in zip(grid, box))
    nh, nw = grid[1] // bh, grid[2] // bw
    return ((t // bt) * nh * nw + (h // bh) * nw + w // bw).reshape(-1)


@functools.lru_cache(maxsize=8)
def membership(grid: tuple[int, int, int], box: tuple[int, int, int]) -> torch.Tensor:
    """bool [N, N]: key j in query i's window of `box` tokens (the library's window_mask, no halo, no
    text), built once per (grid, box) rather than per layer and head."""
    from hla_convert.ops.hybrid import window_mask

    return window_mask(grid, box, (0, 0, 0), 0, True)


def windows(grid: tuple[int, int, int], q: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each window's [N, N] membership (query i sees key j exactly) for one head: q, k [N, d], p [N, N]."""
    out = {name: membership(grid, box) for name, box in STATIC.items()}
    qb, kb = block_ids(grid, QUERY_BLOCK), block_ids(grid, KEY_BLOCK)
    oq, ok = F.one_hot(qb).to(p.dtype), F.one_hot(kb).to(p.dtype)  # [N, nqb], [N, nkb]
    pooled = ((oq.T @ q) / oq.sum(0)[:, None]) @ ((ok.T @ k) / ok.sum(0)[:, None]).T  # [nqb, nkb]
    mass = oq.T @ p @ ok  # [nqb, nkb]: each query block's attention to each key block
    for n in (8, 16):
        for how, score in (("pooled score", pooled), ("oracle", mass)):
            chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(n, -1).indices, True)
            out[f"top-{n} key blocks of 64 by {how} ({64 * n})"] = chosen[qb][:, kb]
    return out


def record_attention(model, arch: str, item: dict, grid: tuple[int, int, int]) -> list[tuple[torch.Tensor, ...]]:
    """One forward of the teacher on a run.py inputs item; its video self-attention calls' (q, k, v),
    [B, H, N, d] float32 each, in layer order (torch's scaled_dot_product_attention, which diffusers'
    native backend calls, recorded while the forward runs)."""
    n = grid[0] * grid[1] * grid[2]
    calls: list[tuple[torch.Tensor, ...]] = []
    sdpa = F.scaled_dot_product_attention

    def record(*a, **kw):
        q, k, v = (kw[name] if name in kw else a[i] for i, name in enumerate(("query", "key", "value")))
        if q.shape[-2] == n and k.shape[-2] == n:  # self-attention over the video (Wan: no text in it)
            calls.append((q.detach().float(), k.detach().float(), v.detach().float()))
        return sdpa(*a, **kw)

    F.scaled_dot_product_attention = record
    try:
        with torch.no_grad():
            model(**bm.model_inputs(arch, item["hidden_states"], item["timestep"], item["encoder_hidden_states"]))
    finally:
        F.scaled_dot_product_attention = sdpa
    return calls


def teacher_args(doc: str, *positional: tuple[str, str]) -> argparse.ArgumentParser:
    """The arguments of the scripts that read a teacher's own attention (this one and far_part.py):
    INPUTS (a run.py input set's held-out folder), any further positional ones, --out, --model,
    --files, --threads."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("inputs", type=Path, help="a run.py input set's heldout/ folder")
    for name, help_text in positional:
        ap.add_argument(name, type=Path, help=help_text)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=HERE / "models-deep" / "wan")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def load_teacher(args: argparse.Namespace, script: str) -> tuple | None:
    """(arch, model, latent grid, the first --files input files) for teacher_args' arguments; None,
    with the reason on stderr, when INPUTS holds no inputs."""
    torch.set_num_threads(args.threads)
    files = sorted(args.inputs.glob("*.safetensors"))[: args.files]
    if not files:
        print(f"{script}: no *.safetensors inputs in {args.inputs}", file=sys.stderr)
        return None
    arch, model, spec, _ = bm.load_model(args.model)
    return arch, model, (spec.frames, spec.height // 2, spec.width // 2), files


def main(argv: list[str] | None = None) -> int:
    args = teacher_args(__doc__).parse_args(argv)
    from safetensors.torch import load_file

    loaded = load_teacher(args, "window_mass.py")
    if loaded is None:
        return 2
    arch, model, grid, files = loaded
    sums: dict[str, dict] = {}
    start = time.time()
    for f in files:
        calls = record_attention(model, arch, load_file(str(f)), grid)
        for layer, (q, k, v) in enumerate(calls):
            for b in range(q.shape[0]):
                for h in range(q.shape[1]):
                    p = torch.softmax(q[b, h] @ k[b, h].T * q.shape[-1] ** -0.5, -1)
                    full = (p @ v[b, h]).norm()
                    for name, inside in windows(grid, q[b, h], k[b, h], p).items():
                        near = p * inside
                        r = sums.setdefault(name, {"mass": [], "far": [], "layers": {}})
                        r["mass"].append(float(near.sum(-1).mean()))
                        r["far"].append(float(((p - near) @ v[b, h]).norm() / full))
                        r["layers"].setdefault(layer, []).append(r["mass"][-1])
        print(f"{f.name}: {len(calls)} layers, {time.time() - start:.0f} s", file=sys.stderr)

    def mean(xs):
        return sum(xs) / len(xs)

    rows = [{"window": name, "mass": mean(r["mass"]), "far_share": mean(r["far"]),
             "worst_layer_mass": min(mean(v) for v in r["layers"].values()), "n": len(r["mass"])}
            for name, r in sums.items()]  # fmt: skip
    doc = {"model": str(args.model), "inputs": [str(f) for f in files], "grid": grid, "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(f"{r['window']:52s} mass {r['mass']:.3f}  far share {r['far_share']:.3f}  worst layer {r['worst_layer_mass']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
