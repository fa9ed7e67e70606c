"""What every calibration source shares: the error type, the seed streams of the two splits, the
noise levels of the recipe's timestep distribution, and small helpers on input dicts
(hla_convert.stages.calibration says what an input dict is)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..recipe import Recipe

SPLITS = ("train", "heldout")
NUM_TRAIN_TIMESTEPS = 1000
_SPLIT_STREAM = {"train": 1, "heldout": 2}


class CalibrationError(ValueError):
    """Calibration inputs that cannot be built or read; the message names the source and what is wrong."""


# -- helpers ---------------------------------------------------------------------------------------


def split_generator(seed: int, split: str) -> torch.Generator:
    """The seed stream of one split: train and heldout never share one."""
    if split not in SPLITS:
        raise CalibrationError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return torch.Generator().manual_seed(seed * 1_000_003 + _SPLIT_STREAM[split])


def sample_noise_levels(recipe: Recipe, n: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels t in [0, 1] [n] from calibration.timesteps (then model timestep = 1000 t)."""
    ts = recipe.calibration.timesteps
    if ts.distribution == "uniform":
        u = torch.rand(n, generator=generator)
    else:  # logit_normal (SD3 / rectified-flow training)
        u = torch.sigmoid(ts.mean + ts.std * torch.randn(n, generator=generator))
    t = ts.min + (ts.max - ts.min) * u
    if ts.shift != 1.0:  # the flow shift samplers apply: t' = s t / (1 + (s - 1) t)
        t = ts.shift * t / (1 + (ts.shift - 1) * t)
    return t


def noise_levels(item: dict[str, Any]) -> torch.Tensor:
    """Per-sample noise level t = timestep / 1000, [B] float, of one input dict (for bucketing).

    A per-token timestep [B, N] (Wan2.2 TI2V) gives its largest: the noisy tokens' level, not the
    0 of a first frame kept clean for image conditioning."""
    ts = torch.as_tensor(item["timestep"]).detach().float().cpu()
    b = batch_size_of(item)
    if ts.dim() == 0:
        ts = ts.expand(b)
    return ts.reshape(ts.shape[0], -1).amax(dim=1) / NUM_TRAIN_TIMESTEPS


def batch_size_of(item: dict[str, Any]) -> int:
    return int(item["hidden_states"].shape[0])


def _text_dim(config: Any) -> int | None:
    for key in ("text_dim", "text_embed_dim", "caption_channels", "cross_attention_dim"):
        v = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        if isinstance(v, int):
            return v
    return None


def _arch(model: nn.Module) -> str:
    return type(model).__name__


def _to(item: dict[str, Any], device: Any, dtype: torch.dtype) -> dict[str, Any]:
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return {k: move(v) for k, v in item.items()}


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]
