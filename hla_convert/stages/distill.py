"""The training stages: feature-map initialisation, attention transfer (stage 1), output distillation (stage 2);
`distil` runs them and stage 3 (on-policy trajectory distillation, hla_convert.stages.onpolicy).

One copy of the weights (docs/architecture.md). Stage 1 runs the model in mode "both": every
converted layer computes the teacher's softmax output (the target, which flows on to the next layer) and the HLA
output (the prediction) from the same q/k/v, so one teacher forward trains all layers at once.
Each layer's loss is back-propagated the moment the layer has run (`streamed_pairs`): the loss of
a layer depends only on that layer's HLA parameters and on q/k/v that carry no gradient, so the
gradient is the same as one backward of the summed loss, while only one layer's HLA graph is
alive at a time: stage 1 costs the memory of teacher inference. Stage 2 runs the model in
"teacher" mode under no_grad, then in "student" mode with gradients, and matches the outputs.

Stage 1 trains the HLA parameters only. Stage 2 trains them, and with `stage2.train: lora` also
peft LoRA adapters on base linear layers (hla_convert.model.lora), added when stage 2 starts with B = 0
so that its step 0 is the HLA-only student; the adapters are disabled in "teacher" mode, so the
teacher stays the base model. With `stage2.train: full` it trains every weight of the blocks that
hold converted modules (hla_convert.model.full_tuning): their original values are kept on the host
first, and "teacher" mode swaps them in, so the teacher is still the base model.

Stage 2's teacher (`stage2.teacher`): "cached" computes the teacher's output for every input the
loop will use once, before the first step (teacher mode, no_grad, eval mode and gradient
checkpointing as the live teacher would run), keeps it on the host and moves it to the device per
step: the same targets as "live" (a teacher forward at every step) bit for bit, since the teacher
is deterministic and does not train, at one forward a step instead of two. A resumed run
recomputes them (a pure function of the fixed inputs and the base weights; with `train: full` the
originals are swapped in from the host store, which is made from the freshly loaded base before
the checkpoint's trained weights are restored). Under a multi-process launch every process caches
the targets of all inputs (each input may be cut across processes, or go whole to one, step by
step; the cut target follows its input through `parallel._cut`, as a batch-first tensor).

Plain torch on one process: without mixed precision (HLA parameters are float32; the base model
keeps its own dtype) `Accelerator.backward/prepare` add nothing but a wrapper. Device placement is
the caller's (the model and the inputs from `build_inputs(device=...)` are already where they
should be). Keeping the loop plain keeps it bit-for-bit deterministic on CPU, which the resume
guarantee relies on. Under a multi-process launch, `parallel` (hla_convert.stages.parallel) shares each
step's global batch out and sums the gradients with accelerate; the main process alone writes.

The loop both stages share (schedule, batch order, checkpoints, resume, the multi-process step)
is hla_convert.stages.distill_loop; a killed process leaves the last complete checkpoint there.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distill_loop import DistillError, Progress, _batch_indices, _only_trainable, _relative_sq_error, _run_stage, _shared_relative_sq_error, student_matches  # noqa: F401 - re-exported
from ..model.compiling import compiled_blocks
from ..model.full_tuning import attach_base_store, full_tuning_blocks, full_tuning_parameters
from ..model.layers import hla_layers, hla_parameters
from ..model.lora import LoraError, add_lora, has_lora, lora_config, lora_parameters, lora_target_modules, without_lora
from ..model.modes import attention_mode, forward, set_attention_mode, streamed_pairs
from ..recipe import Recipe, RecipeError

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over processes (hla_convert.stages.parallel)
# The key under which a stage-2 input dict carries its cached teacher output (host memory, batch
# first like the input's tensors, so parallel._cut cuts it with them); removed before the forward.
TARGET_KEY = "_hla_convert_target"


# -- feature-map initialisation ------------------------------------------------------------------------


@torch.no_grad()
def initialize_feature_maps(
    model: nn.Module,
    inputs: Sequence[dict[str, Any]],
    progress: Progress | None = None,
    max_batches: int = 8,
    tokens_per_layer: int = 2048,
) -> dict[str, Any]:
    """Data-driven start for every HLA layer: teacher q/k samples -> `initialize_from_samples`.

    Runs the model in teacher mode on up to `max_batches` inputs, each layer keeping an even
    spread of about `tokens_per_layer` (q, k) token samples in all (bounded host memory: 2048 x
    heads x head_dim x 2 floats per layer), then sets the feature maps from them (HLA-MATH.md:
    principal directions of the teacher's q and k). Returns {"layers", "tokens"}.
    """
    layers = {n: l for n, l in hla_layers(model).items() if l.config.kind != "softmax"}
    if not layers or not inputs:
        return {"layers": 0, "tokens": 0}
    batches = list(inputs[:max_batches])
    with attention_mode(model, "teacher"):
        for layer in layers.values():
            layer.sample_sink = []
            layer.sample_tokens = max(16, tokens_per_layer // len(batches))
        for i, item in enumerate(batches):
            forward(model, item)
            if progress:
                progress("init", i + 1, len(batches), {})
        tokens = 0
        for n, layer in layers.items():
            sink = layer.sample_sink or []
            if not sink:
                raise DistillError(f"feature-map init: layer {n} was never called by the model's forward")
            q = torch.cat([s[0] for s in sink]).to(next(layer.parameters()).device)
            k = torch.cat([s[1] for s in sink]).to(q.device)
            layer.initialize_from_samples(q, k, generator=torch.Generator().manual_seed(0))
            tokens = q.shape[0]
    return {"layers": len(layers), "tokens": tokens}


# -- stage 1 -------------------------------------------------------------------------------------------


def attention_transfer(
    model: nn.Module,
    inputs: Sequence[dict[str, Any]],
    recipe: Recipe,
    work_dir: str | Path,
    resume: bool = False,
    progress: Progress | None = None,
    parallel: Any = None,
) -> dict[str, Any]:
    """Stage 1: every converted layer's HLA output learns its teacher's softmax output.

    Loss per step: mean over converted layers of ||pred - target||^2 / ||target||^2, averaged
    over the stage1.batch_size / calibration.batch_size inputs of the step. AdamW (no weight
    decay) on the HLA parameters only, warm-up + cosine learning rate, gradient clipping.

    Returns {"stage", "steps", "steps_run", "resumed_from", "checkpoint", "seconds",
    "step_seconds" (each step run in this call), "initial_loss", "final_loss", "loss_history", "layers": {layer: relative L2 at the last step}}
    ("skipped" instead when there is nothing to train). Raises DistillError on a non-finite loss.
    """
    n_layers = len([l for l in hla_layers(model).values() if l.config.kind != "softmax"])

    def step_loss(item: dict[str, Any], scale: float, reduce: Reduce | None) -> tuple[float, dict[str, float]]:
        per_layer: dict[str, float] = {}

        def consume(name: str, target: torch.Tensor, pred: torch.Tensor) -> None:
            if reduce is None:
                rel = _relative_sq_error(pred, target)
                value = float(rel.detach())
            else:
                rel, value = _shared_relative_sq_error(pred, target, reduce)
            per_layer[name] = math.sqrt(value) if math.isfinite(value) else value
            if math.isfinite(value) and rel.requires_grad:
                (rel * (scale / n_layers)).backward()

        set_attention_mode(model, "both")
        with streamed_pairs(model, consume), torch.enable_grad():
            forward(model, item)
        if len(per_layer) != n_layers:
            raise DistillError(f"stage 1: {n_layers - len(per_layer)} converted layers were not reached by the forward")
        # per_layer holds relative L2 (sqrt); the loss is the mean relative squared error
        loss = sum(v * v if math.isfinite(v) else v for v in per_layer.values()) / n_layers
        return loss, per_layer

    return _run_stage("stage1", model, inputs, recipe, work_dir, resume, progress, step_loss, parallel=parallel)


# -- stage 2 -------------------------------------------------------------------------------------------


def output_distillation(
    model: nn.Module,
    inputs: Sequence[dict[str, Any]],
    recipe: Recipe,
    work_dir: str | Path,
    resume: bool = False,
    progress: Progress | None = None,
    parallel: Any = None,
) -> dict[str, Any]:
    """Stage 2: the converted model's denoiser output matches the teacher's at the same inputs.

    Per input: the teacher's output (cached before the first step, or with stage2.teacher "live"
    a no_grad "teacher" forward at every step), then the student forward with gradients; loss
    ||student - teacher||^2 / ||teacher||^2. Trains the HLA parameters (recipe stage2.train
    "hla"), plus LoRA adapters (train "lora": stage2.lora_rank, lora_alpha, lora_targets,
    lora_ffn; lr stage2.lora_lr or stage2.lr) that are added here, enabled, with B = 0, and stay
    on the model (save_adapter stores them), or plus every base weight of the blocks holding
    converted modules (train "full", at stage2.lr; their originals go to the model's host store,
    model.full_tuning, first). The teacher runs with the adapters disabled and the original
    weights. stage2.gradient_checkpointing turns on the model's own gradient checkpointing for the
    student forward; stage2.compile runs the steps with the model's repeated blocks compiled
    (hla_convert.model.compiling; summary "compile": what was). Returns the same summary as attention_transfer (its "layers" is empty, "lora"
    lists the adapted modules, "full" the trained blocks, "teacher" how the targets came);
    steps 0 returns {"skipped": ...}. Raises RecipeError for train "full" under FSDP.
    """
    spec = recipe.stage2
    extra: dict[str, nn.Parameter] = {}
    lora_modules: list[str] = []
    full_blocks: list[str] = []
    active = spec.steps > 0 and bool(hla_parameters(model))
    if active:
        check_stage2_parallel(recipe, parallel)
    if spec.train == "lora" and active:
        extra, lora_modules = _stage2_lora(model, recipe)
    if spec.train == "full" and active:
        full_blocks = full_tuning_blocks(model)
        extra = full_tuning_parameters(model, full_blocks)
        attach_base_store(model, extra)  # the originals, before any of them trains (or a checkpoint loads)

    def step_loss(item: dict[str, Any], scale: float, reduce: Reduce | None) -> tuple[float, dict[str, float]]:
        target = item.get(TARGET_KEY)
        if target is None:
            set_attention_mode(model, "teacher")
            with torch.no_grad():
                target = forward(model, item).detach()
        else:
            item = {k: v for k, v in item.items() if k != TARGET_KEY}
        return student_matches(model, item, target, scale, reduce), {}

    checkpointing = recipe.stage2.gradient_checkpointing and getattr(model, "_supports_gradient_checkpointing", False)
    was = bool(getattr(model, "is_gradient_checkpointing", False))
    if checkpointing and not was:
        model.enable_gradient_checkpointing()
    try:
        teacher: dict[str, Any] = {"mode": spec.teacher}
        if spec.teacher == "cached" and active and inputs:
            inputs, teacher["targets"], teacher["seconds"] = _cache_targets(model, inputs, recipe)
        extra_lr = spec.lora_lr if spec.train == "lora" else None
        # compiled after the targets' cache (the teacher runs once, eager); eager again after the stage
        with compiled_blocks(model) if spec.compile and active else contextlib.nullcontext() as compiled:
            summary = _run_stage("stage2", model, inputs, recipe, work_dir, resume, progress, step_loss, extra, extra_lr, parallel)
        if compiled:
            summary["compile"] = compiled
    finally:
        if checkpointing and not was:
            model.disable_gradient_checkpointing()
    if active:
        summary["teacher"] = teacher
    if lora_modules:
        summary["lora"] = {"modules": lora_modules, "parameters": sum(p.numel() for p in extra.values())}
    if full_blocks:
        summary["full"] = {"blocks": full_blocks, "parameters": sum(p.numel() for p in extra.values())}
    return summary


def _cache_targets(model: nn.Module, inputs: Sequence[dict[str, Any]], recipe: Recipe) -> tuple[list[dict[str, Any]], int, float]:
    """The stage-2 inputs, each one the loop will use carrying its teacher output under TARGET_KEY
    (on the host); (inputs, how many targets, seconds). The teacher runs as the live one would
    inside the loop: "teacher" mode, no_grad, eval mode (no dropout), the model's gradient
    checkpointing setting as it is, so the targets are the live ones bit for bit."""
    spec = recipe.stage2
    accumulate = max(1, spec.batch_size // recipe.calibration.batch_size)
    n = len(inputs)
    used = sorted({i for step in range(spec.steps) for i in _batch_indices(step, accumulate, n, recipe.calibration.seed, "stage2")})
    t0 = time.perf_counter()
    out = list(inputs)
    was_training = model.training
    model.eval()
    try:
        with attention_mode(model, "teacher"), torch.no_grad():
            for i in used:
                target = forward(model, inputs[i]).detach()
                out[i] = {**inputs[i], TARGET_KEY: target.to("cpu")}
    finally:
        model.train(was_training)
    return out, len(used), time.perf_counter() - t0


def check_stage2_parallel(recipe: Recipe, parallel: Any) -> None:
    """Refuse (RecipeError) what stage 2 cannot train under this launch: `train: full` under FSDP,
    which shards the frozen base (stages.parallel.shard_frozen_base) that full training would train;
    `compile` under several processes (not tried there).
    Run before the base is sharded (conversion) and when stage 2 starts."""
    if recipe.stage2.train == "full" and recipe.stage2.steps > 0 and getattr(parallel, "fsdp", False):
        raise RecipeError(
            "stage2.train",
            "full is not supported under FSDP yet; FSDP shards the frozen base weights that full would train: "
            "use lora, or launch without an FSDP config",
        )
    if recipe.stage2.compile and recipe.stage2.steps > 0 and parallel is not None:
        raise RecipeError("stage2.compile", "is not supported under several processes yet: set it false, or launch one process")


def check_lora_rank(model: nn.Module, recipe: Recipe) -> None:
    """Refuse (RecipeError) a stage2.lora_rank past min(in, out features) of a layer it adapts: a
    rank-r update of a smaller layer is a full-rank one, at r x (in + out) parameters. Run once the
    model is converted, before anything is trained or written."""
    spec = recipe.stage2
    if spec.train != "lora" or spec.steps <= 0 or not hla_layers(model):
        return
    try:
        modules = lora_target_modules(model, list(hla_layers(model)), spec.lora_targets, spec.lora_ffn)
    except LoraError as exc:
        raise RecipeError("stage2.lora_ffn" if spec.lora_ffn and "feed-forward" in str(exc) else "stage2.lora_targets", str(exc)) from None
    with without_lora(model):
        layers = {name: model.get_submodule(name) for name in modules}
    name, smallest = min(((n, min(m.in_features, m.out_features)) for n, m in layers.items()), key=lambda t: t[1])
    if spec.lora_rank > smallest:
        raise RecipeError("stage2.lora_rank", f"must be at most {smallest} (min of in and out features of {name}, a layer it adapts), got {spec.lora_rank}")


def _stage2_lora(model: nn.Module, recipe: Recipe) -> tuple[dict[str, nn.Parameter], list[str]]:
    """Add the recipe's LoRA adapter (or accept the same one already there); its parameters and modules."""
    spec = recipe.stage2
    alpha = float(spec.lora_alpha if spec.lora_alpha is not None else spec.lora_rank)
    try:
        modules = lora_target_modules(model, list(hla_layers(model)), spec.lora_targets, spec.lora_ffn)
        if has_lora(model):
            have = lora_config(model)
            if have != {"rank": spec.lora_rank, "alpha": alpha, "modules": sorted(modules)}:
                raise DistillError(
                    f"stage 2: the model already has a LoRA adapter (rank {have['rank']}, {len(have['modules'])} modules) "
                    "that differs from the recipe's stage2.lora_* settings"
                )
        else:
            add_lora(model, rank=spec.lora_rank, alpha=alpha, modules=modules, seed=recipe.calibration.seed)
    except LoraError as exc:  # the recipe names layers this model lacks: bad input, not a failed run
        raise RecipeError("stage2.lora_ffn" if spec.lora_ffn and "feed-forward" in str(exc) else "stage2.lora_targets", str(exc)) from None
    return lora_parameters(model), modules


# -- the whole distil stage ----------------------------------------------------------------------------


def distil(
    model: nn.Module,
    inputs: Sequence[dict[str, Any]],
    recipe: Recipe,
    work_dir: str | Path,
    resume: bool = False,
    progress: Progress | None = None,
    parallel: Any = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """The distil stage as `hla-convert convert` runs it: feature-map init, stage 1, the recipe's
    per-layer softmax budget (hla_convert.stages.selection), stage 2, stage 3 (on-policy, with
    `scheduler`: hla_convert.stages.onpolicy; stage3.steps > 0 without one is a RecipeError, raised
    before anything trains). Returns {"init", "stage1", "selection", "stage2", "stage3"} (each
    stage's summary). parallel: see hla_convert.stages.parallel; the init and the selection run
    whole in every process, and every process reverts the layers the main process (rank 0) chose
    (selection.main_process_choice: a device's non-deterministic kernels can make the processes'
    choices differ; the summary's "processes_disagreed" says when they did). The choice is recorded
    in `work_dir`; a resumed run reverts the recorded layers without choosing again (its summary
    then says "reused_on_resume": true), so stages 2 and 3 resume the model their checkpoints trained."""
    from ..model.surgery import revert_attention
    from .onpolicy import check_stage3_scheduler, onpolicy_distillation
    from .selection import softmax_choice

    check_stage3_scheduler(recipe, scheduler is not None)

    init = initialize_feature_maps(model, inputs, progress=progress)
    stage1 = attention_transfer(model, inputs, recipe, work_dir=work_dir, resume=resume, progress=progress, parallel=parallel)
    attn = recipe.attention
    chosen, selection = softmax_choice(model, inputs, attn.softmax_layers, attn.softmax_select, work_dir, resume=resume, parallel=parallel)
    revert_attention(model, chosen)
    stage2 = output_distillation(model, inputs, recipe, work_dir=work_dir, resume=resume, progress=progress, parallel=parallel)
    stage3 = onpolicy_distillation(model, inputs, recipe, scheduler, work_dir=work_dir, resume=resume, progress=progress, parallel=parallel)
    return {"init": init, "stage1": stage1, "selection": selection, "stage2": stage2, "stage3": stage3}


__all__ = [
    "TARGET_KEY",
    "DistillError",
    "check_stage2_parallel",
    "attention_transfer",
    "distil",
    "forward",
    "initialize_feature_maps",
    "output_distillation",
    "streamed_pairs",
]
