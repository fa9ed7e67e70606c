"""Teacher steps at sampling time: the base model runs the first k denoising steps of a sampling
run, the converted model the rest.

The errors of a converted model that show in its videos are made early in the trajectory, where
the layout is decided: on the deep fidelity benchmark (docs/comparison.md) the first 4 of 20 steps
run by the teacher took the sampled videos from 24.5 to 27.2 dB PSNR against the teacher's, the
last 4 only to 25.0 dB. The cost is the softmax attention of those k steps: at a student step
twice as fast, k = 4 of 20 keeps 1 / (0.8 x 0.5 + 0.2) = 1.67x of the 2x.

One copy of the weights serves both: the teacher is `set_attention_mode(model, "teacher")` (the
model's own softmax, LoRA adapters off, original base weights shown after `train: full`).

    with teacher_steps(pipe, 4):           # a diffusers pipeline: every converted transformer of it
        video = pipe(prompt).frames[0]

    hooks = teacher_steps(pipe, 4)         # or until .remove()

Which step a forward belongs to is read from the pipeline's scheduler: its `step_index` where it
keeps one (FlowMatchEuler, UniPC, DPM-Solver, Euler: exact), else the position of the forward's
`timestep` in `scheduler.timesteps` (the nearest entry; CogVideoX's DDIM / DPM schedulers). Both
forwards of a classifier-free-guidance step fall on the same step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import hla_layers
from .modes import set_attention_mode

EXPERT_ATTRS = ("transformer", "transformer_2")  # the denoisers of a diffusers video pipeline


def converted_denoisers(pipe: Any) -> list[nn.Module]:
    """The transformers of a diffusers pipeline that hold converted layers (one, or both experts of
    Wan2.2 A14B), in EXPERT_ATTRS order."""
    nets = [getattr(pipe, a, None) for a in EXPERT_ATTRS]
    return [n for n in nets if isinstance(n, nn.Module) and hla_layers(n)]


def step_of(scheduler: Any, timestep: Any) -> int:
    """The index of the sampling step a denoiser forward at `timestep` belongs to: the scheduler's
    `step_index` when it keeps one (None before its first step: 0), else the nearest entry of
    `scheduler.timesteps` to the forward's timestep (its largest value: a per-token timestep
    [B, N] holds 0 on a clean conditioning frame)."""
    if hasattr(scheduler, "step_index"):
        index = scheduler.step_index
        return 0 if index is None else int(index)
    if timestep is None:
        raise RuntimeError("teacher_steps: the denoiser was called without a timestep and its scheduler keeps no step_index")
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
        raise RuntimeError("teacher_steps: the scheduler has no step_index and no timesteps set (call it from inside a sampling run)")
    t = float(torch.as_tensor(timestep).detach().float().max())
    return int((timesteps.detach().float().cpu() - t).abs().argmin())


def _timestep_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The `timestep` a diffusers transformer forward was called with (keyword, or its second
    positional argument: forward(hidden_states, timestep, ...) for Wan, CogVideoX and the demo)."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    return args[1] if len(args) > 1 else None


class TeacherSteps:
    """Forward pre-hooks on converted denoisers that put them in teacher mode for a forward at one of
    the first `first` steps of its scheduler's run and in student mode otherwise (module docstring).
    `.remove()` (or leaving the `with`) takes the hooks off and leaves the denoisers in student mode."""

    def __init__(self, nets: list[nn.Module], scheduler: Any, first: int):
        self.nets, self.scheduler, self.first = nets, scheduler, first
        self.steps_seen: list[tuple[int, str]] = []  # (step, mode) of each forward: what ran where
        self._handles = [net.register_forward_pre_hook(self._hook(net), with_kwargs=True) for net in nets]

    def _hook(self, net: nn.Module):
        layers = list(hla_layers(net).values())  # found once, not on every forward of the run

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            step = step_of(self.scheduler, _timestep_of(args, kwargs))
            mode = "teacher" if step < self.first else "student"
            if any(layer.mode != mode for layer in layers):
                set_attention_mode(net, mode)
            self.steps_seen.append((step, mode))

        return pre_hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for net in self.nets:
            set_attention_mode(net, "student")

    def __enter__(self) -> "TeacherSteps":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def teacher_steps(pipe: Any, first: int, scheduler: Any = None) -> TeacherSteps:
    """Run the first `first` denoising steps of every sampling run of `pipe` with the teacher (the
    base model), the rest with the converted model (module docstring). `pipe`: a diffusers pipeline
    whose transformer (and transformer_2) is a converted model (load_converted), or a converted
    model itself with its `scheduler` given. first = 0 runs every step converted. Returns the
    hooks: a context manager, or call `.remove()`."""
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"teacher_steps: first must be a whole number >= 0, got {first!r}")
    if isinstance(pipe, nn.Module):
        nets = [pipe] if hla_layers(pipe) else []
    else:
        nets = converted_denoisers(pipe)
        scheduler = scheduler if scheduler is not None else getattr(pipe, "scheduler", None)
    if not nets:
        raise ValueError("teacher_steps: no converted transformer (load it with hla_convert.load_converted)")
    if scheduler is None:
        raise ValueError("teacher_steps: a bare model needs its scheduler (teacher_steps(model, k, scheduler=...))")
    return TeacherSteps(nets, scheduler, first)


__all__ = ["TeacherSteps", "converted_denoisers", "step_of", "teacher_steps"]
