"""Calibration and held-out inputs: the transformer forward calls that distillation and drift use.

Every input is a dict of keyword arguments for one forward, `model(**item, return_dict=False)`,
batched by `recipe.calibration.batch_size` (hidden_states [B, ...], timestep [B] on the model's
0..1000 scale, encoder_hidden_states [B, L, D], plus what the architecture needs). Three sources:

- synthetic: built from the model config and the recipe. `synthetic: gaussian` gives gaussian
  latents of the VAE latent shape (frames/height/width over the VAE scales) and gaussian text
  embeddings at timesteps drawn from `calibration.timesteps`. `synthetic: demo_videos` is the
  embedded demo's own data: procedural videos noised by rectified flow,
  x_t = (1 - t) x0 + t noise, with their prompt embeddings (`hla_convert.stages.demo_data`).
- trajectories: the model's diffusers pipeline (a local folder) is run for a few denoising steps
  with the transformer being distilled (in teacher mode) plugged in, and a forward pre-hook records
  what the transformer is called with.
- folder: `<path>/train/*.safetensors` and `<path>/heldout/*.safetensors`, one input dict per
  file, as written by `save_inputs`.

Everything is seeded; "train" and "heldout" draw from different seed streams (and, for
trajectories, different prompts), so held-out inputs are never training inputs.

The sources live in calibration_base (seeds, noise levels, shared helpers), calibration_synthetic
and calibration_sources (trajectories, folder); this module holds the entry points and re-exports
their public names, so `from hla_convert.stages.calibration import ...` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .calibration_base import (
    NUM_TRAIN_TIMESTEPS,
    SPLITS,
    CalibrationError,
    _to,
    batch_size_of,
    noise_levels,
    sample_noise_levels,
    split_generator,
)
from .calibration_sources import (
    HELDOUT_PROMPTS,
    TRAIN_PROMPTS,
    _split_item,
    check_input,
    expert_trajectory_inputs,
    folder_inputs,
    load_input_file,
    load_pipeline,
    rebatch,
    save_inputs,
    trajectory_inputs,
)
from .calibration_synthetic import cogvideox_rotary_emb, synthetic_inputs
from ..recipe import Recipe

# -- the entry point -------------------------------------------------------------------------------


def build_inputs(
    model: nn.Module,
    recipe: Recipe,
    split: str,
    pipeline_dir: str | None = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str, int, int, dict[str, Any]], None] | None = None,
    pipe: Any = None,
) -> list[dict[str, Any]]:
    """The calibration ("train") or held-out ("heldout") inputs of a recipe, as forward kwargs.

    Each item: `model(**item, return_dict=False)` works. Floating tensors come in `dtype` on
    `device`. pipeline_dir: the local folder of the model's full diffusers pipeline, needed by
    source "trajectories" (calibration.path, when set, names it instead).
    """
    if split not in SPLITS:
        raise CalibrationError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    source = recipe.calibration.source
    if source == "synthetic":
        items = synthetic_inputs(model, recipe, split)
    elif source == "folder":
        items = folder_inputs(model, recipe, split)
    else:
        where = recipe.calibration.path or pipeline_dir
        if not where:
            raise CalibrationError(
                "calibration.source: 'trajectories' needs the model's full diffusers pipeline (MODEL as a pipeline "
                "folder or Hub ID, or calibration.path); use source synthetic or folder otherwise"
            )
        items = trajectory_inputs(model, recipe, split, str(where), device=device, progress=progress, pipe=pipe)
    if progress and source != "trajectories":
        progress("calibration", len(items), len(items), {"split": split})
    return [_to(it, device, dtype) for it in items]


def build_input_sets(
    model: nn.Module,
    recipe: Recipe,
    pipeline_dir: str | None = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str, int, int, dict[str, Any]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Both splits, {"train": [...], "heldout": [...]}, as build_inputs gives them; with source
    "trajectories" the pipeline (text encoder, VAE) is loaded once for both."""
    pipe = None
    where = recipe.calibration.path or pipeline_dir
    if recipe.calibration.source == "trajectories" and where:
        pipe = load_pipeline(model, str(where), device)
    return {split: build_inputs(model, recipe, split, pipeline_dir, device, dtype, progress, pipe=pipe) for split in SPLITS}


def build_expert_input_sets(
    experts: dict[str, nn.Module],
    recipe: Recipe,
    boundary: float,
    pipeline_dir: str | None = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str, int, int, dict[str, Any]], None] | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{expert: {split: inputs}} for a two-expert pipeline (model.experts): each expert gets only the
    inputs of the timesteps it serves. Source "trajectories": one pass of the pipeline with every
    expert in it, each expert's calls recorded (expert_trajectory_inputs); the others: the recipe's
    inputs, each sample given to the expert whose side of `boundary` (0..1000 scale) its timestep
    is on (t >= boundary: the first expert), as the pipeline would."""
    from ..model.experts import expert_of

    names = list(experts)
    where = recipe.calibration.path or pipeline_dir
    sets: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in names}
    if recipe.calibration.source == "trajectories":
        if not where:
            raise CalibrationError("calibration.source: 'trajectories' needs the model's full diffusers pipeline")
        first, rest = experts[names[0]], {k: v for k, v in experts.items() if k != names[0]}
        pipe = load_pipeline(first, str(where), device, **rest)
        for split in splits:
            found = expert_trajectory_inputs(experts, recipe, split, str(where), device=device, progress=progress, pipe=pipe)
            for name in names:
                sets[name][split] = [_to(it, device, dtype) for it in found[name]]
        return sets
    for split in splits:
        items = build_inputs(experts[names[0]], recipe, split, pipeline_dir, device, dtype, progress)
        served: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for one in (x for item in items for x in _split_item(item)):
            served[expert_of(float(one["timestep"].reshape(-1)[0]), boundary)].append(one)
        for name in names:
            if not served[name]:
                raise CalibrationError(f"calibration: no {split} input has a timestep that {name} serves (boundary t = {boundary:g}); widen calibration.timesteps")
            sets[name][split] = rebatch(served[name], recipe.calibration.batch_size)
    return sets


__all__ = [
    "CalibrationError",
    "HELDOUT_PROMPTS",
    "NUM_TRAIN_TIMESTEPS",
    "SPLITS",
    "TRAIN_PROMPTS",
    "batch_size_of",
    "build_expert_input_sets",
    "build_input_sets",
    "build_inputs",
    "check_input",
    "cogvideox_rotary_emb",
    "load_input_file",
    "load_pipeline",
    "noise_levels",
    "rebatch",
    "sample_noise_levels",
    "save_inputs",
    "split_generator",
]
