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


def time_distill(model, recipe, res, text_len, device, dtype, steps: int, compile_backend: str | None = None) -> list[dict[str, Any]]:
    """Stage 1, then stage 2 with its teacher live and cached, and cached with `train: full` (every
    weight of the converted blocks, not LoRA), as the library runs them: `steps` steps each on
    synthetic inputs; the cached LoRA run once more without gradient checkpointing. The cached runs'
    first step also holds the targets' cache (`cache_s`), which the median after the first step
    leaves out. A run that fails (out of memory: full's optimizer, or every activation kept) is a
    record with "error"; full runs after the LoRA runs, as it changes the weights it trains.
    compile_backend: given, stage 2 cached with LoRA runs once more with the recipe's
    `stage2.compile: true` (the model's repeated blocks compiled for the steps, with this dynamo
    backend: hla_convert.model.compiling), its record with "compile" and dynamo's graph count."""
    from hla_convert.stages.distill import attention_transfer, output_distillation

    items = [model_inputs(model, res, text_len, device, dtype, seed=10 + i) for i in range(4)]
    recipe = recipe.with_overrides(
        fields={"stage1.steps": steps, "stage2.steps": steps, "stage1.checkpoint_every": 10**6, "stage2.checkpoint_every": 10**6}
    )
    accumulate = recipe.stage2.batch_size // recipe.calibration.batch_size
    lora = {"stage2.train": "lora"}
    runs = [("stage1", attention_transfer, recipe, None)] + [
        ("stage2", output_distillation, recipe.with_overrides(fields={"stage2.teacher": how, **lora}), how) for how in ("live", "cached")
    ] + [
        # without gradient checkpointing (no recompute of each block's forward in the backward; every
        # activation kept): what the recipe's `stage2.gradient_checkpointing: false` costs and buys
        ("stage2", output_distillation, recipe.with_overrides(fields={"stage2.teacher": "cached", **lora, "stage2.gradient_checkpointing": False}), "cached"),
        ("stage2", output_distillation, recipe.with_overrides(fields={"stage2.teacher": "cached", "stage2.train": "full"}), "cached"),
    ]
    if compile_backend is not None:  # the cached LoRA run, compiled
        runs.append(("stage2", output_distillation, runs[2][2].with_overrides(fields={"stage2.compile": True}), "cached"))
    out = []
    for stage, run, recipe, how in runs:
        compiled = stage == "stage2" and recipe.stage2.compile
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
            out.append({"measurement": stage, "train": train, "teacher": how, "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        step_s = [b - a for a, b in zip([t0] + marks[:-1], marks)]
        spec = getattr(recipe, stage)
        out.append({
            "measurement": stage,
            "train": train,
            "steps": len(step_s),
            "seconds_per_step": statistics.median(step_s[1:] or step_s),
            "step_s": [round(s, 4) for s in step_s],
            # the stage's clock after its last step: the final checkpoint write, which the stage waits for
            # (the loop's other writes run in the background since 2026-12-07 evening; before, each was
            # in the step it ended, and the last one in the last step)
            "after_steps_s": round(summary["seconds"] - sum(summary["step_seconds"]), 4),
            "forwards_per_step": spec.batch_size // recipe.calibration.batch_size,
            "gradient_checkpointing": bool(stage == "stage2" and recipe.stage2.gradient_checkpointing),
            "lora": summary.get("lora"),
            "full": summary.get("full"),
            "final_loss": summary.get("final_loss"),
            "peak_mem_gb": peak_gb(device),
        })  # fmt: skip
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
    return out
