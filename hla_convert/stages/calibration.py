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
    check_input,
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


__all__ = [
    "CalibrationError",
    "HELDOUT_PROMPTS",
    "NUM_TRAIN_TIMESTEPS",
    "SPLITS",
    "TRAIN_PROMPTS",
    "batch_size_of",
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
