"""The drift report of a two-expert pipeline (model.experts): one report per expert (drift.measure_drift
on the held-out inputs that expert serves) and the whole-pipeline sampling check.

The report (drift_report.json of a two-expert output folder):

    {"passed", "failures" (each prefixed "EXPERT: " or "pipeline: "), "boundary_timestep",
     "experts": {"transformer": <a one-model drift report>, "transformer_2": ...},
     "pipeline": {"steps", "rel_l2", "psnr_db", "peak", "scheduler", "prompt"} or null,
     "thresholds", "table": every expert's rows, metric prefixed "EXPERT: ", then the pipeline's}

The pipeline check runs the real pipeline (its text encoder, scheduler, guidance, both experts) for
validation.sampling_steps steps from the same seeded noise, once with every expert in teacher mode
and once in student mode, output_type "latent", and compares the final latents as drift's
sampling check does (relative L2, PSNR over the teacher's range) against the same thresholds
(validation.max_latent_rel_l2, validation.min_latent_psnr). An image-to-video pipeline (Wan2.2 I2V
A14B) gets the image of the held-out split's first trajectory run (stages.calibration_images: the
first file of calibration.images, or its synthetic image), the same in both modes and on every
`validate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from ..model.modes import attention_mode
from ..recipe import Recipe
from .calibration_images import image_conditioned, image_kwargs, read_images
from .calibration_sources import HELDOUT_PROMPTS, _call_kwargs
from .drift import psnr_db, within


@torch.no_grad()
def pipeline_check(pipe: Any, experts: dict[str, nn.Module], recipe: Recipe) -> dict[str, Any] | None:
    """Final latents of the whole pipeline, all experts teacher vs all student (see the module
    docstring); None when validation.sampling_steps is 0."""
    val, cal = recipe.validation, recipe.calibration
    if val.sampling_steps <= 0:
        return None
    prompt = cal.prompts[-1] if cal.prompts else HELDOUT_PROMPTS[0]
    images = read_images(cal.images) if cal.images is not None and image_conditioned(pipe) else None
    image = image_kwargs(pipe, recipe, "heldout", 0, images)  # {} for a text-to-video pipeline
    finals = {}
    for mode in ("teacher", "student"):
        kwargs = _call_kwargs(
            pipe, prompt=prompt, num_inference_steps=val.sampling_steps, height=cal.height, width=cal.width,
            num_frames=cal.frames, max_sequence_length=cal.text_len, output_type="latent",
            generator=torch.Generator(device="cpu").manual_seed(cal.seed * 1_000_003 + 99), **image,
        )  # fmt: skip
        with contextlib.ExitStack() as modes:
            for net in experts.values():
                modes.enter_context(attention_mode(net, mode))
            out = pipe(**kwargs)
        latents = out.frames if hasattr(out, "frames") else out[0]
        finals[mode] = latents.detach().float().cpu()
    t, s = finals["teacher"], finals["student"]
    mse = float((s - t).pow(2).mean())
    peak = float(t.max() - t.min())
    return {
        "steps": val.sampling_steps,
        "rel_l2": float((s - t).norm() / t.norm().clamp_min(1e-12)),
        "psnr_db": psnr_db(mse, peak),
        "peak": peak,
        "scheduler": type(pipe.scheduler).__name__,
        "prompt": prompt,
    }


def experts_report(reports: dict[str, dict[str, Any]], pipeline: dict[str, Any] | None, recipe: Recipe, boundary: float) -> dict[str, Any]:
    """The two-expert drift report (module docstring) from each expert's drift report dict."""
    val = dataclasses.asdict(recipe.validation)
    table, failures = [], []
    for name, report in reports.items():
        table += [{**row, "metric": f"{name}: {row['metric']}"} for row in report.get("table") or []]
        failures += [f"{name}: {f}" for f in report.get("failures") or []]
    if pipeline is not None:
        for label, key, value, higher in (
            ("final latent rel L2", "max_latent_rel_l2", pipeline["rel_l2"], False),
            ("final latent PSNR dB", "min_latent_psnr", pipeline["psnr_db"], True),
        ):
            thr = val.get(key)
            ok = None if thr is None else within(value, thr, higher)
            table.append({"metric": f"pipeline: {label} ({pipeline['steps']} steps, all experts)", "value": value, "threshold": thr, "ok": ok})
            if ok is False:
                failures.append(f"pipeline: {label} {value:.4g} {'<' if higher else '>'} {thr} (validation.{key}) after {pipeline['steps']} sampling steps")
    return {
        "format": 1,
        "passed": not failures,
        "failures": failures,
        "boundary_timestep": boundary,
        "experts": reports,
        "pipeline": pipeline,
        "thresholds": val,
        "table": table,
    }


__all__ = ["experts_report", "pipeline_check"]
