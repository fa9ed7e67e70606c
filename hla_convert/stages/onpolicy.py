"""Stage 3: on-policy trajectory distillation.

Stages 1 and 2 train on teacher-made inputs (calibration latents noised from data, or the
teacher's own trajectories). At sampling time the student walks its own trajectory, and its
errors compound along it (exposure bias): at equal denoiser drift a model can sample worse.
Stage 3 trains where the student actually goes. Per input of a step:

1. the input's conditioning (everything but hidden_states and timestep: text embeddings, and
   whatever else the architecture's item carries), a fresh noise tensor of the latents' shape and
   a stop index k uniform in [0, stage3.sampling_steps), both drawn from a generator seeded by
   (calibration.seed, step, position in the step): a pure function, so a resumed run is exact;
2. the STUDENT samples from that noise for k steps with the model's scheduler (no_grad, the same
   loop as the drift check's sampling, stages.drift.sampler_points), reaching (x_k, t_k);
3. the teacher's prediction there (teacher mode, no_grad) is the target of the student's (with
   gradients): loss ||student - teacher||^2 / ||teacher||^2, as in stage 2.

stage3.onpolicy_share < 1: each input is taken from the student's trajectory (steps 1-3) with that
probability (drawn per (step, position) from its own seeded generator: a resume draws the same),
else it is the calibration input as stage 2 saw it, the teacher's prediction there the target. On
the deep fidelity benchmark stage 3 on trajectories alone fitted them and forgot the teacher's
inputs (drift there 0.17 -> 0.26, docs/comparison.md); the calibration share keeps them in the loss.

One k per input: the item's B samples share the scheduler's step. Cost per input: k student
forwards without gradients (on average (sampling_steps - 1) / 2), one teacher forward, one student
forward + backward; stage 2's step is the last two alone. Under several processes every process
samples the whole step's trajectories (the same everywhere), then trains its share of them.

What trains is what stage 2 trained: the HLA parameters, and the LoRA adapters stage 2 added (on
the model now), at stage3.lr x stage2.lora_lr / stage2.lr (the ratio stage 2 used), with stage
2's gradient_checkpointing setting for the student's backward; after stage2.train "full", every
weight of the converted blocks at stage3.lr (each teacher forward then swaps the host copy of the
original weights in and out, model.full_tuning: two host-device copies of those blocks a step).
The loop
(schedule, batches, checkpoints, resume, the multi-process step) is distill_loop._run_stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model.full_tuning import base_store, full_tuning_parameters
from ..model.lora import has_lora, lora_parameters
from ..model.modes import attention_mode, forward, set_attention_mode
from ..recipe import Recipe, RecipeError
from .distill_loop import Progress, _run_stage, student_matches
from .drift import noise_shape, sampler_points

NO_SCHEDULER = (
    "must be 0 for a model without a scheduler (a bare transformer): stage 3 samples with the pipeline's "
    "scheduler; give the pipeline folder or Hub ID instead, or set stage3.steps: 0"
)


def check_stage3_scheduler(recipe: Recipe, scheduler_known: bool) -> None:
    """Refuse (RecipeError naming stage3.steps) a recipe with stage 3 on when the model has no scheduler."""
    if recipe.stage3.steps > 0 and not scheduler_known:
        raise RecipeError("stage3.steps", NO_SCHEDULER)


def trajectory_draw(
    recipe: Recipe, step: int, position: int, item: dict[str, Any], shape: tuple[int, ...] | None = None
) -> tuple[int, torch.Tensor]:
    """(k, noise) for the `position`-th input of stage 3's step `step`: k uniform in
    [0, stage3.sampling_steps), noise float32 of item["hidden_states"]'s shape [B, C, F, H, W], on
    its device. Seeded by (calibration.seed, step, position) alone, on a CPU generator, so a
    resumed run (and any device) draws the same."""
    g = _draw_generator(recipe, 33, step, position)
    k = int(torch.randint(recipe.stage3.sampling_steps, (1,), generator=g))
    hs = item["hidden_states"]
    noise = torch.randn(hs.shape if shape is None else shape, generator=g, dtype=torch.float32).to(hs.device)
    return k, noise


def onpolicy_pick(recipe: Recipe, step: int, position: int) -> bool:
    """Whether the `position`-th input of stage 3's step `step` comes from the student's trajectory
    (probability stage3.onpolicy_share; always at 1) rather than being the calibration input as is.
    Seeded by (calibration.seed, step, position) alone, apart from trajectory_draw's generator."""
    share = recipe.stage3.onpolicy_share
    if share >= 1.0:
        return True
    return float(torch.rand((), generator=_draw_generator(recipe, 77, step, position))) < share


def _draw_generator(recipe: Recipe, stream: int, step: int, position: int) -> torch.Generator:
    """A CPU generator seeded by (calibration.seed, stream, step, position) alone: one stream per
    kind of draw (33 trajectory_draw, 77 onpolicy_pick), so that neither shifts the other."""
    seed = ((recipe.calibration.seed * 1_000_003 + stream) * 2_147_483_647 + step) * 4_099 + position
    return torch.Generator().manual_seed(seed % (2**63))


@torch.no_grad()
def student_point(model: nn.Module, item: dict[str, Any], scheduler: Any, steps: int, noise: torch.Tensor, k: int) -> dict[str, Any]:
    """The model input at step k of the student's `steps`-step sampler from `noise` with `item`'s
    conditioning: item with hidden_states = x_k (scaled as the scheduler feeds it), timestep = t_k [B].
    Runs k student forwards; the model's modes are put back after."""
    with attention_mode(model, "student"):
        for i, (_, point) in enumerate(sampler_points(model, item, scheduler, steps, noise)):
            if i == k:
                return point
    raise ValueError(f"stop index {k} is past the sampler's {steps} steps")


def onpolicy_distillation(
    model: nn.Module,
    inputs: Sequence[dict[str, Any]],
    recipe: Recipe,
    scheduler: Any,
    work_dir: str | Path,
    resume: bool = False,
    progress: Progress | None = None,
    parallel: Any = None,
) -> dict[str, Any]:
    """Stage 3 (see the module docstring) on the calibration inputs' conditioning, with `scheduler`
    (the pipeline's, model.pipeline_loading.load_scheduler). Returns the summary of the other stages
    (attention_transfer) plus "sampling_steps", "scheduler", "sampler_forwards" (student forwards
    without gradients run by this call) and "lora" (the adapter parameters trained, 0 without);
    stage3.steps 0 returns {"skipped": ...}. Raises RecipeError (stage3.steps) when stage 3 is on
    and `scheduler` is None, DistillError on a non-finite loss."""
    spec = recipe.stage3
    check_stage3_scheduler(recipe, scheduler is not None)
    s2 = recipe.stage2
    if s2.train == "full" and base_store(model) is not None and spec.steps > 0:
        # what stage 2 trained: every weight of the converted blocks, at stage3.lr; the teacher
        # forward swaps the host copy of the originals in and out (model.full_tuning) each step
        extra = full_tuning_parameters(model)
        extra_lr = None
    else:
        extra = lora_parameters(model) if has_lora(model) and spec.steps > 0 else {}
        extra_lr = spec.lr * (s2.lora_lr / s2.lr) if extra and s2.lora_lr is not None else None
    sampler_forwards = 0
    counts = {"onpolicy_inputs": 0, "calibration_inputs": 0}

    def prepare(step: int, position: int, item: dict[str, Any]) -> dict[str, Any]:
        nonlocal sampler_forwards
        if not onpolicy_pick(recipe, step, position):
            counts["calibration_inputs"] += 1
            return item
        counts["onpolicy_inputs"] += 1
        k, noise = trajectory_draw(recipe, step, position, item, noise_shape(model, item["hidden_states"]))
        sampler_forwards += k
        return student_point(model, item, scheduler, spec.sampling_steps, noise, k)

    def step_loss(item: dict[str, Any], scale: float, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[float, dict[str, float]]:
        set_attention_mode(model, "teacher")
        with torch.no_grad():
            target = forward(model, item).detach()
        return student_matches(model, item, target, scale, reduce), {}

    # the student's backward is stage 2's: its memory setting too (the sampler runs without gradients)
    checkpointing = s2.gradient_checkpointing and getattr(model, "_supports_gradient_checkpointing", False)
    was = bool(getattr(model, "is_gradient_checkpointing", False))
    if checkpointing and not was:
        model.enable_gradient_checkpointing()
    try:
        summary = _run_stage("stage3", model, inputs, recipe, work_dir, resume, progress, step_loss, extra, extra_lr, parallel, prepare)
    finally:
        if checkpointing and not was:
            model.disable_gradient_checkpointing()
    if "skipped" not in summary:
        summary.update(
            sampling_steps=spec.sampling_steps,
            scheduler=type(scheduler).__name__,
            sampler_forwards=sampler_forwards,
            onpolicy_share=spec.onpolicy_share,
            **counts,
            lora=0 if s2.train == "full" else sum(p.numel() for p in extra.values()),
            full=sum(p.numel() for p in extra.values()) if s2.train == "full" else 0,
        )
    return summary


__all__ = ["NO_SCHEDULER", "check_stage3_scheduler", "onpolicy_distillation", "onpolicy_pick", "student_point", "trajectory_draw"]
