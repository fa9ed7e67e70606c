"""The model-level switch of block-causal video transformers: how many latent frames one causal
block holds. SkyReels-V2 diffusion forcing builds its frame-block mask only while its config's
`num_frame_per_block` is > 1 (the DF pipelines set it from `causal_block_size` through
`_set_ar_attention`; the published DF configs have 1), so a conversion must set it before the
teacher is calibrated and distilled, and a load must set it again (HLAConfig.causal_block_frames).
"""

from __future__ import annotations

from torch import nn


def causal_block_problem(model: nn.Module, frames: int) -> str | None:
    """Why `model` cannot attend in causal blocks of `frames` latent frames, or None."""
    config = getattr(model, "config", None)
    if not hasattr(model, "_set_ar_attention") or config is None or "num_frame_per_block" not in config:
        return (
            f"causal_block_frames = {frames}: {type(model).__name__} has no causal frame-block setting "
            "(only SkyReels-V2 diffusion-forcing transformers, num_frame_per_block, do); leave it null"
        )
    return None


def latent_frames_problem(latent_frames: int, frames: int | None) -> str | None:
    """Why blocks of `frames` cannot tile `latent_frames` latent frames (the model's mask needs whole blocks), or None."""
    if frames is None or latent_frames % frames == 0:
        return None
    return f"{frames} latent frames per causal block do not divide the {latent_frames} latent frames"


__all__ = ["causal_block_problem", "latent_frames_problem"]
