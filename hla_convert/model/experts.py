"""Pipelines with two transformers ("experts"), Wan2.2 A14B's: `transformer` serves the high-noise
steps and `transformer_2` the low-noise ones, switched at the pipeline's `boundary_ratio`.

diffusers' WanPipeline / WanImageToVideoPipeline call `transformer` while the timestep
t >= boundary_ratio * num_train_timesteps (t on the 0..1000 scale) and `transformer_2` below it;
model_index.json lists `transformer_2` (non-null) and `boundary_ratio`. Both numbers are read
from the pipeline, never from a recipe.

A conversion of such a pipeline converts each expert in turn, each calibrated on the inputs the
pipeline gave it (stages.calibration.build_expert_input_sets); the output folder holds one adapter
per expert (io.output's docstring has the layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .loading import LoadedModel, ModelLoadError, load_transformer, resolve_model

EXPERTS = ("transformer", "transformer_2")  # model_index components, in the pipeline's order (high noise first)


def pipeline_index(pipeline_dir: str | None, revision: str | None = None) -> dict[str, Any]:
    """The model_index.json of a pipeline (local folder or Hub ID); {} when there is none."""
    if not pipeline_dir:
        return {}
    try:
        if Path(pipeline_dir).is_dir():
            from .loading import _read_json

            return _read_json(Path(pipeline_dir) / "model_index.json")
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(pipeline_dir, "model_index.json", revision=revision)).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the model_index.json of {pipeline_dir}: {exc}") from None


def expert_names(model: str | None, revision: str | None = None, subfolder: str | None = None) -> tuple[str, ...]:
    """EXPERTS when MODEL is a pipeline whose model_index.json lists a non-null `transformer_2`;
    () for everything else (one transformer, a bare transformer folder, --subfolder given)."""
    if model is None or subfolder:
        return ()
    ref = resolve_model(model, revision, subfolder)
    entry = pipeline_index(ref.pipeline_dir, revision).get("transformer_2")
    return EXPERTS if isinstance(entry, list) and len(entry) == 2 and entry[1] else ()


def boundary_timestep(pipeline_dir: str | None, revision: str | None = None, num_train_timesteps: int = 1000) -> float:
    """The timestep (0..1000 scale) at which the pipeline hands over from `transformer` to
    `transformer_2`: boundary_ratio * num_train_timesteps; ModelLoadError when the index has none."""
    ratio = pipeline_index(pipeline_dir, revision).get("boundary_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ModelLoadError(f"{pipeline_dir}: model_index.json lists transformer_2 but no boundary_ratio in (0, 1) (got {ratio!r})")
    return float(ratio) * num_train_timesteps


def expert_of(timestep: float, boundary: float) -> str:
    """Which expert the pipeline calls at `timestep`: diffusers' rule `t >= boundary -> transformer`."""
    return EXPERTS[0] if timestep >= boundary else EXPERTS[1]


def load_experts(
    model: str,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> dict[str, LoadedModel]:
    """Both experts of a two-expert pipeline, {"transformer": ..., "transformer_2": ...}, each a
    LoadedModel whose pipeline_dir is the pipeline (a Hub subfolder load does not know it)."""
    pipeline = resolve_model(model, revision).pipeline_dir
    loaded = {}
    for name in EXPERTS:
        one = load_transformer(model, revision=revision, subfolder=name, dtype=dtype, device=device)
        one.pipeline_dir = pipeline
        loaded[name] = one
    return loaded


__all__ = ["EXPERTS", "boundary_timestep", "expert_names", "expert_of", "load_experts", "pipeline_index"]
