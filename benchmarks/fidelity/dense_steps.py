"""Sampled videos with some denoising steps run by the teacher: what softmax at the first (or last)
k steps of a sampling run buys a converted model, measured from saved folders.

    python benchmarks/fidelity/dense_steps.py CONV_DIR [CONV_DIR ...] --out dense.jsonl \
        [--ks 0 1 2 4] [--steps 20] [--items 4] [--device cuda]

For each saved conversion (a run.py conversion folder: adapter, recipe.yaml naming its calibration
folder), loaded with `load_converted` as a user gets it, and each of the first --items held-out
inputs of its recipe: the teacher's video from seeded noise (FlowMatchEuler, shift 1, --steps steps:
the fidelity measure's sampler), then the student's from the same noise with the first k steps in
teacher mode ("first": the library's teacher steps, as `hla-convert sample --teacher-steps k` runs
them) and with the last k ("last"), for each k of --ks; PSNR and relative L2 of the
final latents against the teacher's (the measure's definitions: peak = the teacher's range). The
cost of a run is the share of steps that run softmax, k / steps: at a 2x faster student per step,
k = 2 of 20 keeps 1.8x. One JSON record per (folder, where, k), the means over the items.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))

import torch  # noqa: E402

import bench_data as bd  # noqa: E402
from measure import SAMPLING_SHIFT  # noqa: E402


def sample(model, item, scheduler, steps: int, noise: torch.Tensor, teacher_steps: set[int]) -> torch.Tensor:
    """The final latents of the measure's sampler loop with step i in teacher mode when i is in
    `teacher_steps`, else in student mode."""
    from hla_convert.model.modes import set_attention_mode
    from hla_convert.stages.drift import sampler_points

    points = sampler_points(model, item, scheduler, steps, noise)
    for i, (latents, point) in enumerate(points):
        if point is None:
            return latents.float()
        set_attention_mode(model, "teacher" if i in teacher_steps else "student")
    raise RuntimeError("the sampler ended without its final latents")


def psnr(s: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    from hla_convert.stages.drift import psnr_db

    mse = float((s - t).pow(2).mean())
    return psnr_db(mse, float(t.max() - t.min())), float((s - t).norm() / t.norm().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2, 4])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--items", type=int, default=4, help="held-out inputs (of calibration.batch_size videos each)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    from hla_convert import load_converted
    from hla_convert.model.modes import attention_mode, set_attention_mode
    from hla_convert.stages.drift import sample_latents, sampling_noise
    from hla_convert.recipe import load_recipe
    from hla_convert.stages import calibration

    device = torch.device(args.device)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=bd.NUM_TRAIN_TIMESTEPS, shift=SAMPLING_SHIFT)
    for folder in map(Path, args.folders):
        model = load_converted(folder, device=str(device))
        rec = load_recipe(str(folder / "recipe.yaml"))
        items = calibration.build_inputs(model, rec, "heldout", device=device, dtype=model.dtype)[: args.items]
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        with attention_mode(model), torch.no_grad():
            for n, item in enumerate(items):
                noise = sampling_noise(model, item["hidden_states"], rec.calibration.seed, n)
                teacher = sample(model, item, scheduler, args.steps, noise, set(range(args.steps)))
                for k in args.ks:
                    for where in ("first", "last") if k else ("first",):
                        if where == "first":  # what `sample --teacher-steps k` runs (stages.drift.sample_latents)
                            set_attention_mode(model, "student")
                            student = sample_latents(model, item, scheduler, args.steps, noise, teacher_steps=k)
                        else:
                            student = sample(model, item, scheduler, args.steps, noise, set(range(args.steps - k, args.steps)))
                        results.setdefault((where, k), []).append(psnr(student, teacher))
        with open(args.out, "a") as f:
            for (where, k), vals in results.items():
                rec_out = {
                    "folder": str(folder), "where": "none" if k == 0 else where, "teacher_steps": k, "steps": args.steps,
                    "items": len(vals), "videos": len(vals) * int(items[0]["hidden_states"].shape[0]),
                    "psnr_db": sum(v[0] for v in vals) / len(vals), "rel_l2": sum(v[1] for v in vals) / len(vals),
                    "psnr_db_each": [round(v[0], 3) for v in vals], "device": str(device),
                }  # fmt: skip
                f.write(json.dumps(rec_out) + "\n")
                print(f"{folder.name:40s} {rec_out['where']:5s} k={k:2d}: PSNR {rec_out['psnr_db']:.2f} dB, rel L2 {rec_out['rel_l2']:.4f}", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
