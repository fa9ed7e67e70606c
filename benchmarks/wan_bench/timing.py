"""bench_wan.py's clocks and measurements: the environment a record carries, medians of CUDA events
(perf_counter on the CPU) with peak memory, and the timed forward, forward+backward, sampling and
distillation steps.
"""

from __future__ import annotations

import contextlib
import datetime
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from .model import model_inputs


# -- environment --------------------------------------------------------------------------------


def environment(device: torch.device, commit: str) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent is an answer
            return None

    source = "argument"
    if not commit:
        source = "git (the device's .git may be stale: pass --commit or GIT_COMMIT there)"
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            commit, source = "", "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "commit_source": source,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
    }


# -- timing -------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict[str, Any]:
    """Median time of fn (CUDA events on a GPU, perf_counter on the CPU) and the peak memory of
    the timed calls (GB allocated by torch, None on the CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "times_ms": [round(t, 3) for t in times], "peak_mem_gb": peak_gb(device)}


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# -- measurements ---------------------------------------------------------------------------------


def time_forward(fn, inputs, device, warmup, reps) -> dict[str, Any]:
    def run():
        with torch.no_grad():
            fn(**inputs, return_dict=False)

    return measure(run, device, warmup, reps)


def time_forward_backward(fn, model, inputs, params, checkpointing, device, warmup, reps) -> dict[str, Any]:
    from hla_convert.stages.distill import _only_trainable

    def run():
        out = fn(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
        for p in params.values():
            p.grad = None

    was = bool(getattr(model, "is_gradient_checkpointing", False))
    if checkpointing and not was:
        model.enable_gradient_checkpointing()
    try:
        with _only_trainable(model, params), torch.enable_grad():
            res = measure(run, device, warmup, reps)
    finally:
        if checkpointing and not was:
            model.disable_gradient_checkpointing()
    res["trainable_parameters"] = sum(p.numel() for p in params.values())
    res["gradient_checkpointing"] = bool(checkpointing)
    return res


def time_sampling(pipe, res, steps, device) -> dict[str, Any]:
    f, h, w = res
    marks: list[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        _sync(device)
        marks.append(time.perf_counter())
        return kwargs

    def run():
        marks.clear()
        g = torch.Generator(device="cpu").manual_seed(0)
        t0 = time.perf_counter()
        pipe(
            prompt="w1 w2 w3 w4", negative_prompt="w5 w6", height=h, width=w, num_frames=f, num_inference_steps=steps,
            guidance_scale=5.0, generator=g, output_type="np", callback_on_step_end=on_step,
        )
        _sync(device)
        return t0, time.perf_counter()

    run()  # warm-up (first kernels, allocator)
    reset_peak(device)
    t0, t1 = run()
    step_s = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    return {
        "seconds_per_video": t1 - t0,
        "loop_s": marks[-1] - t0,
        "steps": steps,
        "median_step_s": statistics.median(step_s[1:] or step_s),
        "guidance_scale": 5.0,
        "peak_mem_gb": peak_gb(device),
    }


@contextlib.contextmanager
def _backend(name: str | None):
    """hla_convert.model.compiling.COMPILE_BACKEND = name within (None: as it is)."""
    from hla_convert.model import compiling

    was = compiling.COMPILE_BACKEND
    compiling.COMPILE_BACKEND = name or was
    try:
        yield
    finally:
        compiling.COMPILE_BACKEND = was


def time_distill(model, recipe, res, text_len, device, dtype, steps: int, compile_backend: str | None = None,
                 skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Stage 1, then stage 2 as the library runs it, `steps` steps each on synthetic inputs: LoRA with
    the teacher live and cached, and `train: full` (every weight of the converted blocks: the
    default recipes' stage 2) cached. Every stage-2 run starts from the same weights (the model as
    stage 1 left it, restored from a host copy before each run), so their losses compare: the
    first step's loss is the same forward on the same weights. The cached runs' first step also
    holds the targets' cache (`cache_s`), and the last step the stage's final checkpoint snapshot
    (`last_step_s`): `seconds_per_step` is the median of the steps between (of the steps after the
    first, with fewer than 4). A run that fails (out of memory) is a record with "error".
    compile_backend: given, the cached LoRA and full runs each run once more with the recipe's
    `stage2.compile: true` (the model's repeated blocks compiled for the steps, with this dynamo
    backend: hla_convert.model.compiling), the records with "compile", dynamo's graph count and
    `first_loss_rel_to_eager`: the compiled first step's loss against the eager run's. skip: "stage1"
    and / or "live" leave those runs out (a short device call; stage 2 then starts from the
    converted model as is).
    (Without gradient checkpointing, stage 2 at 480p ran out of the H100's 80 GB, 2026-12-07 (late night): not
    run any more.)"""
    from hla_convert.model.lora import remove_lora
    from hla_convert.stages.distill import attention_transfer, output_distillation

    items = [model_inputs(model, res, text_len, device, dtype, seed=10 + i) for i in range(4)]
    recipe = recipe.with_overrides(
        fields={"stage1.steps": steps, "stage2.steps": steps, "stage1.checkpoint_every": 10**6, "stage2.checkpoint_every": 10**6}
    )
    accumulate = recipe.stage2.batch_size // recipe.calibration.batch_size

    def stage2(how: str, train: str, compiled: bool = False):
        fields = {"stage2.teacher": how, "stage2.train": train, "stage2.compile": compiled}
        return ("stage2", output_distillation, recipe.with_overrides(fields=fields), how)

    runs = [("stage1", attention_transfer, recipe, None), stage2("live", "lora"), stage2("cached", "lora")]
    runs = [r for r in runs if r[0] not in skip and r[3] not in skip]
    if compile_backend is not None:
        runs.append(stage2("cached", "lora", compiled=True))
    runs.append(stage2("cached", "full"))
    if compile_backend is not None:
        runs.append(stage2("cached", "full", compiled=True))
    out = []
    start: dict[str, torch.Tensor] | None = None  # the weights every stage-2 run starts from
    eager_first: dict[str, float] = {}  # train mode -> the eager cached run's first loss
    for stage, run, recipe, how in runs:
        compiled = stage == "stage2" and recipe.stage2.compile
        if stage == "stage2":
            remove_lora(model)  # the LoRA runs add their adapter afresh (B = 0, the same seed)
            if start is None:
                start = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                model.load_state_dict(start)
        if compiled:
            from torch._dynamo.utils import counters

            counters.clear()
        marks: list[float] = []

        def progress(_stage, _done, _total, _info):
            _sync(device)
            marks.append(time.perf_counter())

        reset_peak(device)
        train = getattr(recipe, stage).train if stage == "stage2" else "hla"
        try:
            with tempfile.TemporaryDirectory() as work, _backend(compile_backend if compiled else None):
                t0 = time.perf_counter()
                summary = run(model, items, recipe, work_dir=work, progress=progress)
        except Exception as exc:  # noqa: BLE001 - one run failing (memory) keeps the others' records
            out.append({"measurement": stage, "train": train, "teacher": how, "compile": "blocks" if compiled else None,
                        "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"})  # fmt: skip
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        step_s = [b - a for a, b in zip([t0] + marks[:-1], marks)]
        steady = step_s[1:-1] if len(step_s) >= 4 else (step_s[1:] or step_s)
        spec = getattr(recipe, stage)
        history = summary.get("loss_history") or []
        out.append({
            "measurement": stage,
            "train": train,
            "steps": len(step_s),
            "seconds_per_step": statistics.median(steady),
            "step_s": [round(s, 4) for s in step_s],
            # the last step ends with the stage's final checkpoint: its snapshot (device to host) is
            # in the step; the write runs in the background and the stage waits for it after the steps
            "last_step_s": round(step_s[-1], 4),
            "after_steps_s": round(summary["seconds"] - sum(summary["step_seconds"]), 4),
            "forwards_per_step": spec.batch_size // recipe.calibration.batch_size,
            "gradient_checkpointing": bool(stage == "stage2" and recipe.stage2.gradient_checkpointing),
            "lora": summary.get("lora"),
            "full": summary.get("full"),
            "first_loss": history[0] if history else None,
            "final_loss": summary.get("final_loss"),
            "peak_mem_gb": peak_gb(device),
        })  # fmt: skip
        if how == "cached" and history:
            if not compiled:
                eager_first[train] = history[0]
            elif train in eager_first:
                out[-1]["first_loss_rel_to_eager"] = abs(history[0] - eager_first[train]) / max(abs(eager_first[train]), 1e-30)
        if compiled:  # what dynamo made of the training step
            out[-1].update(compile=summary.get("compile"), compile_backend=compile_backend,
                           dynamo_graphs=counters["stats"].get("unique_graphs", 0),
                           dynamo_graph_breaks=sum(counters["graph_break"].values()))  # fmt: skip
        if how is not None:  # stage 2: how the targets came, and the teacher forwards a step costs
            teacher = summary.get("teacher") or {}
            out[-1].update({
                "teacher": teacher.get("mode", how),
                "teacher_forwards_per_step": accumulate if how == "live" else 0,
                "cache_s": teacher.get("seconds"),
                "cached_targets": teacher.get("targets"),
            })  # fmt: skip
    if start is not None:
        remove_lora(model)
        model.load_state_dict(start)  # the model as stage 1 left it, for whatever runs next
    return out
