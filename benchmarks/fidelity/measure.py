"""The fidelity benchmark's measures (run.py --measure runs them in a fresh process): a saved
conversion loaded back with load_converted, its drift and sampled videos against the teacher
(hla_convert.stages.drift.measure_drift) and its denoising loss against the true flow target.
"""

from __future__ import annotations

from pathlib import Path

import torch

import bench_data as bd
import bench_models as bm

SAMPLING_SHIFT = 1.0  # the teachers are trained with t ~ U(0, 1): no shift
# Sampled videos over this many held-out batches (2 inputs each at --calibration-batch 2), not only the
# drift report's first: that one batch is 2 videos, and on the deep tier it put one seed's rows 3-4 dB
# below the others' at the same drift (docs/comparison.md "Twelfth run"). Batch 0 is the report's own
# (same inputs, same noise).
SAMPLED_BATCHES = 8


@torch.no_grad()
def sampled_batches(model, heldout: list[dict], rec, scheduler, batches: int = SAMPLED_BATCHES) -> dict:
    """Teacher and student sampled from the same seeded noise on each of the first `batches` held-out
    batches (drift.sample_latents, the recipe's validation.sampling_steps); PSNR per batch as the drift
    report computes it (peak = that batch's teacher latent range), and their mean and median."""
    import statistics

    from hla_convert.model.modes import set_attention_mode
    from hla_convert.stages import drift

    steps = rec.validation.sampling_steps
    each, samples = [], 0
    try:
        for b, item in enumerate(heldout[:batches]):
            hs = item["hidden_states"]
            noise = drift.sampling_noise(model, hs, rec.calibration.seed, b)  # batch 0: the report's noise
            finals = {}
            for mode in ("teacher", "student"):
                set_attention_mode(model, mode)
                finals[mode] = drift.sample_latents(model, item, scheduler, steps, noise).float()
            t, s = finals["teacher"], finals["student"]
            each.append(drift.psnr_db(float((s - t).pow(2).mean()), float(t.max() - t.min())))
            samples += int(hs.shape[0])
    finally:
        set_attention_mode(model, "student")
    return {
        "steps": steps, "batches": len(each), "samples": samples, "psnr_db_each": [round(x, 3) for x in each],
        "psnr_db_mean": statistics.fmean(each) if each else None, "psnr_db_median": statistics.median(each) if each else None,
    }  # fmt: skip


@torch.no_grad()
def true_target_losses(arch: str, model, heldout: list[dict], targets: torch.Tensor, t: torch.Tensor, buckets: int) -> dict:
    """Denoising MSE against the true flow target, teacher and student, per sample -> mean and buckets."""
    from hla_convert.model.modes import forward
    from hla_convert.model.modes import set_attention_mode

    per = {"teacher": [], "student": []}
    i = 0
    try:
        for item in heldout:
            b = item["hidden_states"].shape[0]
            target = targets[i : i + b].to(item["hidden_states"].device)
            i += b
            for mode in per:
                set_attention_mode(model, mode)
                pred = bm.model_output(arch, forward(model, item)).float()
                per[mode].append((pred - target).pow(2).flatten(1).mean(1).cpu())
    finally:
        set_attention_mode(model, "student")
    teacher, student = torch.cat(per["teacher"]), torch.cat(per["student"])
    idx = (t * buckets).long().clamp(0, buckets - 1)
    out_buckets = []
    for k in range(buckets):
        sel = idx == k
        if bool(sel.any()):
            tl, sl = float(teacher[sel].mean()), float(student[sel].mean())
            out_buckets.append({"t_min": k / buckets, "t_max": (k + 1) / buckets, "samples": int(sel.sum()), "teacher": tl, "student": sl, "ratio": sl / tl})
    tl, sl = float(teacher.mean()), float(student.mean())
    return {"teacher": tl, "student": sl, "ratio": sl / tl, "buckets": out_buckets}


def measure(conv_dir: Path, arch: str, inputs: Path, device: torch.device, dtype: str) -> dict:
    """What a user of the saved folder gets: load_converted, then on the benchmark's held-out inputs
    (the recipe saved in the folder, source: folder) the drift, the sampled videos and the denoising
    loss against the true flow target."""
    import diffusers
    from safetensors.torch import load_file

    from hla_convert import load_converted
    from hla_convert.stages import calibration
    from hla_convert.stages import drift
    from hla_convert.recipe import load_recipe

    model = load_converted(conv_dir, device=str(device), dtype=dtype)
    rec = load_recipe(str(conv_dir / "recipe.yaml"))
    heldout = calibration.build_inputs(model, rec, "heldout", device=device, dtype=model.dtype)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=bd.NUM_TRAIN_TIMESTEPS, shift=SAMPLING_SHIFT)
    report = drift.measure_drift(model, heldout, rec, scheduler=scheduler).to_dict()
    tgt = load_file(str(inputs / "heldout_targets.safetensors"))
    loss = true_target_losses(arch, model, heldout, tgt["target"], tgt["t"], rec.validation.timestep_buckets)
    wide = sampled_batches(model, heldout, rec, scheduler) if rec.validation.sampling_steps > 0 else None
    return {
        "report": report,
        "loss": loss,
        "sampled_batches": wide,
        "trainable": {
            "hla": sum(p.numel() for n, p in model.named_parameters() if ".hla." in f".{n}"),
            "lora": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        },
    }
