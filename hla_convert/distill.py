"""The training stages: feature-map initialisation, attention transfer (stage 1), output distillation (stage 2).

One copy of the weights (DESIGN.md). Stage 1 runs the model in mode "both": every converted layer
computes the teacher's softmax output (the target, which flows on to the next layer) and the HLA
output (the prediction) from the same q/k/v, so one teacher forward trains all layers at once.
Each layer's loss is back-propagated the moment the layer has run (`streamed_pairs`): the loss of
a layer depends only on that layer's HLA parameters and on q/k/v that carry no gradient, so the
gradient is the same as one backward of the summed loss, while only one layer's HLA graph is
alive at a time: stage 1 costs the memory of teacher inference. Stage 2 runs the model in
"teacher" mode under no_grad, then in "student" mode with gradients, and matches the outputs.

Stage 1 trains the HLA parameters only. Stage 2 trains them, and with `stage2.train: lora` also
peft LoRA adapters on base linear layers (hla_convert.lora), added when stage 2 starts with B = 0
so that its step 0 is the HLA-only student. The base weights themselves never train: they are
the teacher; the adapters are disabled in "teacher" mode, so the teacher stays the base model.

Plain torch on one process: without mixed precision (HLA parameters are float32; the base model
keeps its own dtype) `Accelerator.backward/prepare` add nothing but a wrapper. Device placement is
the caller's (the model and the inputs from `build_inputs(device=...)` are already where they
should be). Keeping the loop plain keeps it bit-for-bit deterministic on CPU, which the resume
guarantee relies on. Under a multi-process launch, `parallel` (hla_convert.parallel) shares each
step's global batch out and sums the gradients with accelerate; the main process alone writes.

Checkpoints: `<work_dir>/stage1.checkpoint.safetensors` (resp. stage2), one file written
atomically (temp file + os.replace) every `checkpoint_every` steps and at the end: the HLA
parameters (and the LoRA ones), the AdamW state, the torch RNG state, the step and the loss history. The batch order
is a pure function of (seed, stage, step), so a resumed run sees the same batches and ends with
the same parameters as an uninterrupted one. A killed process leaves the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import checkpoint_path, load_checkpoint, optimizer_from_checkpoint, optimizer_to_checkpoint, save_checkpoint
from .layers import HLAAttention, hla_layers, hla_parameters, set_attention_mode
from .lora import LoraError, add_lora, has_lora, lora_config, lora_parameters, lora_target_modules
from .recipes import Recipe, RecipeError

Progress = Callable[[str, int, int, dict[str, Any]], None]
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over processes (hla_convert.parallel)
_FORMAT = 1
_STAGE_STREAM = {"stage1": 11, "stage2": 22}


class DistillError(RuntimeError):
    """Training could not go on (non-finite loss, a checkpoint from another run); the message says where."""


# -- shared helpers ------------------------------------------------------------------------------------


def forward(model: nn.Module, item: dict[str, Any]) -> torch.Tensor:
    """The denoiser output of one input dict."""
    out = model(**item, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def streamed_pairs(model: nn.Module, consume: Callable[[str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """In mode "both", hand each layer's (target, pred) to `consume(name, target, pred)` as soon as
    the layer has run, then drop it, so that no more than one layer's pair is alive at a time."""
    layers = hla_layers(model)
    for name, layer in layers.items():

        def attend(*args: Any, _layer: HLAAttention = layer, _name: str = name, **kwargs: Any) -> torch.Tensor:
            out = HLAAttention.attend(_layer, *args, **kwargs)
            if _layer.last_pair is not None:
                target, pred = _layer.last_pair
                _layer.last_pair = None
                consume(_name, target, pred)
            return out

        layer.attend = attend  # instance attribute: shadows the method for this run only
    try:
        yield
    finally:
        for layer in layers.values():
            layer.__dict__.pop("attend", None)
            layer.last_pair = None


class LayerErrors:
    """A `streamed_pairs` consumer that sums ||pred - target||^2 and ||target||^2 per layer (float32,
    no gradient); `rel_l2()` gives each layer's relative L2 over everything it has seen."""

    def __init__(self) -> None:
        self.err2: dict[str, float] = {}
        self.ref2: dict[str, float] = {}

    def __call__(self, name: str, target: torch.Tensor, pred: torch.Tensor) -> None:
        t, p = target.detach().float(), pred.detach().float()
        self.err2[name] = self.err2.get(name, 0.0) + float((p - t).pow(2).sum())
        self.ref2[name] = self.ref2.get(name, 0.0) + float(t.pow(2).sum())

    def rel_l2(self) -> dict[str, float]:
        return {n: math.sqrt(self.err2[n] / max(self.ref2[n], 1e-30)) for n in self.err2}


@contextlib.contextmanager
def _restored_modes(model: nn.Module) -> Iterator[None]:
    layers = hla_layers(model)
    modes = {n: layer.mode for n, layer in layers.items()}
    try:
        yield
    finally:
        for n, layer in layers.items():
            layer.mode = modes[n]
            layer.last_pair = None
            layer.sample_sink = None


@contextlib.contextmanager
def _only_trainable(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Only `params` require grad (and the model is in eval mode) inside; flags restored after."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        model.eval()  # no dropout: the teacher is deterministic, and resume must be exact
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(was_training)


def _relative_sq_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 / ||target||^2 over the whole tensor, in float32."""
    p, t = pred.float(), target.float()
    return (p - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def _shared_relative_sq_error(pred: torch.Tensor, target: torch.Tensor, reduce: Reduce) -> tuple[torch.Tensor, float]:
    """This process's share of an input cut across processes: (its ||pred - target||^2 over the
    whole input's ||target||^2, which sums to the whole relative error; the whole one's value)."""
    p, t = pred.float(), target.float()
    err = (p - t).pow(2).sum()
    sums = reduce(torch.stack([err.detach(), t.detach().pow(2).sum()]))
    ref = sums[1].clamp_min(1e-12)
    return err / ref, float(sums[0] / ref)


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
    with _restored_modes(model):
        for layer in layers.values():
            layer.mode = "teacher"
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


# -- the training loop ---------------------------------------------------------------------------------


def _lr_at(step: int, total: int, lr: float) -> float:
    """Linear warm-up over the first 5% (at most 20 steps), then cosine down to 10% of lr."""
    warm = min(20, max(1, total // 20))
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batch_indices(step: int, accumulate: int, n: int, seed: int, stage: str) -> list[int]:
    """Which inputs step `step` uses: epoch-wise seeded permutations, a pure function of the step."""
    out = []
    for j in range(accumulate):
        idx = step * accumulate + j
        epoch, pos = divmod(idx, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + _STAGE_STREAM[stage] * 10_007 + epoch)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return out


def _fingerprint(stage: str, recipe: Recipe, params: dict[str, nn.Parameter], n_inputs: int) -> str:
    spec = getattr(recipe, stage)
    fields = {k: v for k, v in vars(spec).items() if k != "checkpoint_every"}
    if getattr(spec, "train", None) == "hla":  # unused LoRA settings: keep HLA-only fingerprints as they were
        fields = {k: v for k, v in fields.items() if not k.startswith("lora_")}
    doc = {
        "stage": stage,
        "attention": recipe.hla_config().to_dict(),
        "params": {n: list(p.shape) for n, p in params.items()},
        "spec": fields,
        "calibration_batch": recipe.calibration.batch_size,
        "seed": recipe.calibration.seed,
        "inputs": n_inputs,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _run_stage(
    stage: str,
    model: nn.Module,
    inputs: Sequence[dict[str, Any]],
    recipe: Recipe,
    work_dir: str | Path,
    resume: bool,
    progress: Progress | None,
    step_loss: Callable[[dict[str, Any], float], tuple[float, dict[str, float]]],
    extra: dict[str, nn.Parameter] | None = None,
    extra_lr: float | None = None,
    parallel: Any = None,
) -> dict[str, Any]:
    """Shared loop. step_loss(item, scale, reduce) runs one input, back-propagates scale * loss and
    returns (loss, per-layer values) as floats; reduce is None, or (an input cut across processes)
    sums a tensor over them, so that the loss's denominators are the whole input's. Trains the HLA
    parameters at spec.lr and `extra` (LoRA) at extra_lr (None: spec.lr), both on the same
    warm-up + cosine schedule. parallel: a hla_convert.parallel.Parallel, or None (one process)."""
    main = parallel is None or parallel.is_main
    spec = getattr(recipe, stage)
    label = f"stage {stage[-1]}"
    work_dir = Path(work_dir)
    ckpt = checkpoint_path(work_dir, stage)
    hla = hla_parameters(model)
    summary: dict[str, Any] = {"stage": stage, "steps": spec.steps, "steps_run": 0, "resumed_from": None, "checkpoint": str(ckpt)}
    if not hla or spec.steps == 0:
        summary.update(steps=0, skipped="no HLA parameters to train" if not hla else "steps is 0")
        return summary
    if not inputs:
        raise DistillError(f"{stage}: no calibration inputs")
    extra = extra or {}
    params = hla | extra
    accumulate = max(1, spec.batch_size // recipe.calibration.batch_size)
    fingerprint = _fingerprint(stage, recipe, params, len(inputs))
    names = list(params)
    groups = [{"params": [hla[n] for n in hla], "lr": spec.lr}]
    if extra:
        groups.append({"params": [extra[n] for n in extra], "lr": extra_lr or spec.lr})
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=0.0)
    start, history, last_layers = 0, [], {}

    if resume and ckpt.is_file():
        tensors, state = load_checkpoint(ckpt)
        if state.get("fingerprint") != fingerprint:
            raise DistillError(
                f"{stage}: the checkpoint in {work_dir} was written for a different recipe, model or input set; "
                "resume with the same ones, or start afresh without --resume"
            )
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[f"param.{n}"].to(params[n].device, params[n].dtype))
        optimizer_from_checkpoint(optimizer, tensors, state["optimizer"])  # load_state_dict moves them
        torch.set_rng_state(tensors["rng.torch"])
        start, history, last_layers = state["step"], state["history"], state.get("layers", {})
        summary["resumed_from"] = start
    elif main:
        # A fresh stage makes older checkpoints of it (and of what follows it) stale.
        for later in ("stage1", "stage2")[("stage1", "stage2").index(stage) :]:
            checkpoint_path(work_dir, later).unlink(missing_ok=True)
    if parallel is not None:  # every process starts the stage from the main process's parameters
        parallel.broadcast_([params[n] for n in names])

    def save(step: int) -> None:
        opt_tensors, opt_meta = optimizer_to_checkpoint(optimizer)
        tensors = {f"param.{n}": params[n] for n in names} | opt_tensors | {"rng.torch": torch.get_rng_state()}
        state = {
            "format": _FORMAT,
            "stage": stage,
            "step": step,
            "total": spec.steps,
            "fingerprint": fingerprint,
            "optimizer": opt_meta,
            "history": history,
            "layers": last_layers,
        }
        if main:
            save_checkpoint(ckpt, tensors, state)
        if parallel is not None:
            parallel.barrier()

    last_saved = start if summary["resumed_from"] is not None else None
    t0 = time.perf_counter()
    with _only_trainable(model, params), _restored_modes(model):
        for step in range(start, spec.steps):
            lr = _lr_at(step, spec.steps, spec.lr)
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = _lr_at(step, spec.steps, base_lr)
            loss, layer_vals = 0.0, {}
            indices = _batch_indices(step, accumulate, len(inputs), recipe.calibration.seed, stage)
            if parallel is not None:
                loss, layer_vals = parallel.run_step([inputs[i] for i in indices], step_loss, [params[n] for n in names])
            else:
                for idx in indices:
                    item_loss, item_layers = step_loss(inputs[idx], 1.0 / accumulate, None)
                    loss += item_loss / accumulate
                    for k, v in item_layers.items():
                        layer_vals[k] = layer_vals.get(k, 0.0) + v / accumulate
            kept = (
                f"the last good checkpoint (step {last_saved}) is kept in {work_dir}"
                if last_saved is not None
                else f"no checkpoint had been written yet (checkpoint_every is {spec.checkpoint_every})"
            )
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                raise DistillError(f"{label} step {step + 1}: loss is {loss}; {kept}")
            grad_norm = float(torch.nn.utils.clip_grad_norm_([params[n] for n in names], spec.grad_clip))
            if not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise DistillError(f"{label} step {step + 1}: gradient norm is {grad_norm}; {kept}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(loss)
            last_layers = layer_vals
            done = step + 1
            summary["steps_run"] += 1
            if done % spec.checkpoint_every == 0 or done == spec.steps:
                save(done)
                last_saved = done
            if progress:
                progress(stage, done, spec.steps, {"loss": loss, "lr": lr, "grad_norm": grad_norm})
    summary.update(
        seconds=time.perf_counter() - t0,
        initial_loss=history[0] if history else None,
        final_loss=history[-1] if history else None,
        loss_history=history,
        layers=last_layers,
    )
    return summary


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
    "initial_loss", "final_loss", "loss_history", "layers": {layer: relative L2 at the last step}}
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

    Per input: teacher output under no_grad in "teacher" mode, then the student forward with
    gradients; loss ||student - teacher||^2 / ||teacher||^2. Trains the HLA parameters (recipe
    stage2.train "hla"), plus LoRA adapters (train "lora": stage2.lora_rank, lora_alpha,
    lora_targets, lora_ffn; lr stage2.lora_lr or stage2.lr) that are added here, enabled, with
    B = 0, and stay on the model (save_adapter stores them). The teacher forward runs with the
    adapters disabled. stage2.gradient_checkpointing turns on the model's own gradient
    checkpointing for the student forward. Returns the same summary as attention_transfer
    (its "layers" is empty, "lora" lists the adapted modules); steps 0 returns {"skipped": ...}.
    """
    spec = recipe.stage2
    extra: dict[str, nn.Parameter] = {}
    lora_modules: list[str] = []
    if spec.train == "lora" and spec.steps > 0 and hla_parameters(model):
        extra, lora_modules = _stage2_lora(model, recipe)

    def step_loss(item: dict[str, Any], scale: float, reduce: Reduce | None) -> tuple[float, dict[str, float]]:
        set_attention_mode(model, "teacher")
        with torch.no_grad():
            target = forward(model, item).detach()
        set_attention_mode(model, "student")
        with torch.enable_grad():
            pred = forward(model, item)
            if reduce is None:
                rel = _relative_sq_error(pred, target)
                value = float(rel.detach())
            else:
                rel, value = _shared_relative_sq_error(pred, target, reduce)
            if math.isfinite(value):
                (rel * scale).backward()
        return value, {}

    checkpointing = recipe.stage2.gradient_checkpointing and getattr(model, "_supports_gradient_checkpointing", False)
    was = bool(getattr(model, "is_gradient_checkpointing", False))
    if checkpointing and not was:
        model.enable_gradient_checkpointing()
    try:
        summary = _run_stage("stage2", model, inputs, recipe, work_dir, resume, progress, step_loss, extra, spec.lora_lr, parallel)
    finally:
        if checkpointing and not was:
            model.disable_gradient_checkpointing()
    if lora_modules:
        summary["lora"] = {"modules": lora_modules, "parameters": sum(p.numel() for p in extra.values())}
    return summary


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
) -> dict[str, Any]:
    """The distil stage as `hla-convert convert` runs it: feature-map init, stage 1, the recipe's
    per-layer softmax budget (hla_convert.selection), stage 2. Returns {"init", "stage1",
    "selection", "stage2"} (each stage's summary). parallel: see hla_convert.parallel; the init
    and the selection run whole in every process (deterministic, so every process agrees)."""
    from .selection import give_back_to_softmax

    init = initialize_feature_maps(model, inputs, progress=progress)
    stage1 = attention_transfer(model, inputs, recipe, work_dir=work_dir, resume=resume, progress=progress, parallel=parallel)
    selection = give_back_to_softmax(model, inputs, recipe.attention.softmax_layers)
    stage2 = output_distillation(model, inputs, recipe, work_dir=work_dir, resume=resume, progress=progress, parallel=parallel)
    return {"init": init, "stage1": stage1, "selection": selection, "stage2": stage2}


__all__ = [
    "DistillError",
    "attention_transfer",
    "distil",
    "forward",
    "initialize_feature_maps",
    "output_distillation",
    "streamed_pairs",
]
