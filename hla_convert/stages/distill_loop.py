"""The loop the distillation stages share (hla_convert.stages.distill has the losses of stages 1 and 2, stages.onpolicy stage 3): the
learning-rate schedule, the batch order, checkpoints and resume, the one-process step and the
multi-process one (hla_convert.stages.parallel).

Checkpoints: `<work_dir>/stage1.checkpoint.safetensors` (resp. stage2, stage3), one file written
atomically (temp file + os.replace) every `checkpoint_every` steps and at the end, on a background
thread while the next steps train (stages.checkpoints.CheckpointWriter; the stage ends when the last
write is on disk): the trained
parameters, the AdamW state, the torch RNG state, the step and the loss history, and a
fingerprint of what is trained (recipe fields, parameter shapes, input count: not the process
count, so a run resumes under any number of processes). The batch order is a pure function of
(seed, stage, step), so a resumed run sees the same batches and ends with the same parameters as
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import first_line
from ..json_docs import same_json
from ..model.layers import hla_parameters
from ..model.modes import attention_mode, forward, set_attention_mode
from ..recipe import Recipe
from .checkpoints import CheckpointError, CheckpointWriter, checkpoint_path, load_checkpoint, optimizer_from_checkpoint, optimizer_to_checkpoint, selection_path
from .master_weights import MasterWeights

Progress = Callable[[str, int, int, dict[str, Any]], None]
_FORMAT = 1
_STAGE_STREAM = {"stage1": 11, "stage2": 22, "stage3": 33}
_STAGES = tuple(_STAGE_STREAM)  # in the order they run


class DistillError(RuntimeError):
    """Training could not go on (non-finite loss, a checkpoint from another run); the message says where."""



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



# -- the losses' shared helpers (stages 2 and 3) ------------------------------------------------------


def _relative_sq_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 / ||target||^2 over the whole tensor, in float32."""
    p, t = pred.float(), target.float()
    return (p - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def _shared_relative_sq_error(pred: torch.Tensor, target: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """This process's share of an input cut across processes: (its ||pred - target||^2 over the
    whole input's ||target||^2, which sums to the whole relative error; the whole one's value)."""
    p, t = pred.float(), target.float()
    err = (p - t).pow(2).sum()
    sums = reduce(torch.stack([err.detach(), t.detach().pow(2).sum()]))
    ref = sums[1].clamp_min(1e-12)
    return err / ref, float(sums[0] / ref)


def student_matches(
    model: nn.Module, item: dict[str, Any], target: torch.Tensor, scale: float, reduce: Callable[[torch.Tensor], torch.Tensor] | None
) -> float:
    """The output-matching step stages 2 and 3 share: the student forward (student mode, with
    gradients) on `item`, loss ||student - target||^2 / ||target||^2 (this process's share under
    `reduce`), back-propagated times `scale` when finite; returns the loss's value."""
    set_attention_mode(model, "student")
    with torch.enable_grad():
        pred = forward(model, item)
        target = target.to(pred.device)
        if reduce is None:
            rel = _relative_sq_error(pred, target)
            value = float(rel.detach())
        else:
            rel, value = _shared_relative_sq_error(pred, target, reduce)
        if math.isfinite(value):
            (rel * scale).backward()
    return value


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


def _restore(
    ckpt: Path, fingerprint: str, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, total: int, stage: str, work_dir: Path
) -> tuple[int, list, dict]:
    """Load a stage's checkpoint into `params`, `optimizer` and torch's RNG; (step, loss history,
    last per-layer values). Everything read is checked first: a damaged or edited checkpoint (bad
    JSON, a string step, a step past the stage's end, a missing tensor, RNG garbage, a folder in
    its place; NaN or integer weights, optimizer hyper-parameters or moments not the recipe's, a loss
    history that is not one finite number per step) is one CheckpointError (exit 2), not an exception
    from inside torch, a "diverged" run (exit 3) or junk in the drift report."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{stage}: the checkpoint {ckpt} {why}; start afresh without --resume (with --overwrite), "
            f"or delete {work_dir} first"
        )

    if not ckpt.is_file() or ckpt.is_symlink():
        raise bad("is not a regular file")
    tensors, state = load_checkpoint(ckpt)
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{stage}: the checkpoint in {work_dir} was written for a different recipe, model or input set; "
            "resume with the same ones, or start afresh without --resume (with --overwrite)"
        )
    step, history, layers = state.get("step"), state.get("history"), state.get("layers", {})
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total:
        raise bad(f"records step {str(step)[:40]!r}, not a whole number from 0 to the stage's {total} steps")
    if not isinstance(history, list) or not isinstance(layers, dict) or not isinstance(state.get("optimizer"), dict):
        raise bad("has a damaged state (history, layers or optimizer of the wrong type)")
    # the loss history and last per-layer values go into drift_report.json as they are: one finite
    # number per step run (a NaN loss stops a run before its checkpoint), per layer
    if len(history) != step or not all(_finite_number(x) for x in [*history, *layers.values()]):
        raise bad("has a damaged state (the loss history or per-layer values are not one finite number per step and layer)")
    for n, p in params.items():
        t = tensors.get(f"param.{n}")
        if t is None or t.shape != p.shape:
            raise bad(f"lacks param.{n} or has it in another shape" )
    for key, t in tensors.items():  # an integer weight would load truncated, a NaN one diverge as a "failed run"
        if key != "rng.torch" and (not t.is_floating_point() or not bool(torch.isfinite(t).all())):
            raise bad(f"has {key} {'with NaN or infinite values' if t.is_floating_point() else 'of dtype ' + str(t.dtype).removeprefix('torch.')}")
    # the optimizer's hyper-parameters are the recipe's (the fingerprint says so); only the lr is
    # recomputed every step. Anything else that differs (betas ["a", "b"]) is damage.
    fresh = optimizer.state_dict()["param_groups"]
    saved = state["optimizer"].get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(fresh) or not all(
        isinstance(s, dict) and set(s) == set(f) and all(k == "lr" or same_json(s[k], f[k]) for k in f) for s, f in zip(saved, fresh)
    ):
        raise bad("has a damaged optimizer state (its param_groups are not the recipe's)")
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise bad("has no usable RNG state (rng.torch)")
    saved_rng = torch.get_rng_state()
    try:  # torch's own checks of the optimizer state and the RNG bytes
        optimizer_from_checkpoint(optimizer, tensors, state["optimizer"])  # load_state_dict moves them
        torch.set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        torch.set_rng_state(saved_rng)
        raise bad(f"has a damaged optimizer or RNG state ({first_line(exc)[:200]})") from None
    for p, entry in optimizer.state.items():  # AdamW's moments have the parameter's shape, its step is a scalar
        if any(isinstance(v, torch.Tensor) and v.shape != p.shape and v.numel() != 1 for v in entry.values()):
            optimizer.state.clear()
            torch.set_rng_state(saved_rng)
            raise bad("has a damaged optimizer state (a moment of another shape than its parameter)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
    return step, history, layers


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@contextlib.contextmanager
def _writes_finished(writer: CheckpointWriter) -> Iterator[None]:
    """The stage's last checkpoint write is on disk when the stage ends, however it ends: a run that
    stops on an error or Ctrl-C keeps the checkpoint it was writing (its error, if the body raised
    one, is the one that surfaces)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        raise
    writer.close()


def stage_fingerprint(stage: str, recipe: Recipe, params: Mapping[str, Any], n_inputs: int) -> str:
    """What a stage checkpoint must have been written for to be resumed: the stage's recipe fields
    (not checkpoint_every, teacher or compile), the attention config, the calibration batch and seed, the
    trained parameters' names and shapes (`params`: name -> anything with a .shape) and the number
    of inputs (calibration batches). A 16-hex-digit hash."""
    spec = getattr(recipe, stage)
    # teacher (cached | live) gives the same targets, compile the same steps: a checkpoint of either
    # resumes under the other (and the fingerprints of checkpoints written before compile existed hold)
    fields = {k: v for k, v in vars(spec).items() if k not in ("checkpoint_every", "teacher", "compile")}
    if getattr(spec, "train", None) in ("hla", "full"):  # unused LoRA settings: keep HLA-only fingerprints as they were
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
    prepare: Callable[[int, int, dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Shared loop. step_loss(item, scale, reduce) runs one input, back-propagates scale * loss and
    returns (loss, per-layer values) as floats; reduce is None, or (an input cut across processes)
    sums a tensor over them, so that the loss's denominators are the whole input's. Trains the HLA
    parameters at spec.lr and `extra` (LoRA) at extra_lr (None: spec.lr), both on the same
    warm-up + cosine schedule. parallel: a hla_convert.stages.parallel.Parallel, or None (one process).
    prepare(step, j, item), when given, makes the input step_loss trains on from the j-th input of
    step `step` (stage 3: the student's trajectory point); a pure function of its arguments, so a
    resumed run sees the same inputs. Every process prepares the whole step before sharing it out
    (same inputs everywhere, and an FSDP model's forwards stay in lockstep)."""
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
    fingerprint = stage_fingerprint(stage, recipe, params, len(inputs))
    names = list(params)
    # the optimizer steps fp32 masters of bf16 / fp16 parameters (train: full on a bf16 model), and
    # the checkpoint holds them: a bf16 weight updated in place loses every update below its precision
    masters = MasterWeights(params)
    opt = masters.opt
    groups = [{"params": [opt[n] for n in hla], "lr": spec.lr}]
    if extra:
        groups.append({"params": [opt[n] for n in extra], "lr": extra_lr or spec.lr})
    base_lrs = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=0.0)
    start, history, last_layers = 0, [], {}

    if resume and (ckpt.exists() or ckpt.is_symlink()):
        start, history, last_layers = _restore(ckpt, fingerprint, opt, optimizer, spec.steps, stage, work_dir)
        summary["resumed_from"] = start
    elif main:
        # A fresh stage makes older checkpoints of it (and of what follows it) stale; a fresh stage 1
        # also the softmax layers chosen after it.
        for later in _STAGES[_STAGES.index(stage) :]:
            checkpoint_path(work_dir, later).unlink(missing_ok=True)
        if stage == _STAGES[0]:
            selection_path(work_dir).unlink(missing_ok=True)
    if parallel is not None:  # every process starts the stage from the main process's parameters
        parallel.broadcast_([opt[n] for n in names])
    masters.to_model()  # a restored or broadcast master's value into the model

    writer = CheckpointWriter()

    def save(step: int) -> None:
        opt_tensors, opt_meta = optimizer_to_checkpoint(optimizer)
        tensors = {f"param.{n}": opt[n] for n in names} | opt_tensors | {"rng.torch": torch.get_rng_state()}
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
        if main:  # the write goes on while the next steps train (CheckpointWriter)
            writer.submit(ckpt, tensors, state)
        if parallel is not None:
            parallel.barrier()

    last_saved = start if summary["resumed_from"] is not None else None
    t0 = mark = time.perf_counter()
    step_seconds: list[float] = []  # wall time of each step run here, its checkpoint's snapshot included (the write runs on)
    with _only_trainable(model, params), attention_mode(model), _writes_finished(writer):
        for step in range(start, spec.steps):
            lr = _lr_at(step, spec.steps, spec.lr)
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = _lr_at(step, spec.steps, base_lr)
            loss, layer_vals = 0.0, {}
            indices = _batch_indices(step, accumulate, len(inputs), recipe.calibration.seed, stage)
            items = [inputs[i] for i in indices]
            if prepare is not None:
                items = [prepare(step, j, item) for j, item in enumerate(items)]
            if parallel is not None:
                loss, layer_vals = parallel.run_step(items, step_loss, [params[n] for n in names])
            else:
                for item in items:
                    item_loss, item_layers = step_loss(item, 1.0 / accumulate, None)
                    loss += item_loss / accumulate
                    for k, v in item_layers.items():
                        layer_vals[k] = layer_vals.get(k, 0.0) + v / accumulate
            masters.grads_to_masters()
            kept = (
                f"the last good checkpoint (step {last_saved}) is kept in {work_dir}"
                if last_saved is not None
                else f"no checkpoint had been written yet (checkpoint_every is {spec.checkpoint_every})"
            )
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                raise DistillError(f"{label} step {step + 1}: loss is {loss}; {kept}")
            grad_norm = float(torch.nn.utils.clip_grad_norm_([opt[n] for n in names], spec.grad_clip))
            if not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise DistillError(f"{label} step {step + 1}: gradient norm is {grad_norm}; {kept}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            masters.to_model()
            history.append(loss)
            last_layers = layer_vals
            done = step + 1
            summary["steps_run"] += 1
            if done % spec.checkpoint_every == 0 or done == spec.steps:
                save(done)
                last_saved = done
            # reading the loss and the gradient norm synchronises the device every step, so these are
            # the steps' times (the last one's optimizer update may still be in flight)
            now = time.perf_counter()
            step_seconds.append(round(now - mark, 4))
            mark = now
            if progress:
                progress(stage, done, spec.steps, {"loss": loss, "lr": lr, "grad_norm": grad_norm})
    summary.update(
        seconds=time.perf_counter() - t0,
        step_seconds=step_seconds,
        initial_loss=history[0] if history else None,
        final_loss=history[-1] if history else None,
        loss_history=history,
        layers=last_layers,
    )
    return summary
