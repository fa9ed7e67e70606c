"""Synthetic calibration inputs built from the model config and the recipe: gaussian latents and
text for the known architectures (the builder a model.architectures row names, BUILDERS), or the
embedded demo's procedural videos (`demo_videos`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .calibration_base import NUM_TRAIN_TIMESTEPS, CalibrationError, _arch, _chunks, _text_dim, sample_noise_levels, split_generator
from ..model.architectures import WAN_CLIP_IMAGE_TOKENS, WAN_I2V_TEXT_TOKENS, WAN_TI2V_CHANNELS, architecture_of, patch_sizes_of
from ..recipe import Recipe


def _gaussian_item(model: nn.Module, recipe: Recipe, b: int, g: torch.Generator) -> dict[str, Any]:
    """One synthetic batch for a known architecture: gaussian latents and text, sampled timesteps,
    made by the builder its row in model.architectures names (`synthetic`)."""
    cal, arch = recipe.calibration, _arch(model)
    row = architecture_of(arch)
    build = BUILDERS.get(row.synthetic) if row is not None and row.synthetic is not None else None
    if build is None:
        raise CalibrationError(
            f"calibration.synthetic: no synthetic input recipe for {arch}; use calibration.source trajectories "
            "(with the model's pipeline) or folder (cached inputs)"
        )
    t = sample_noise_levels(recipe, b, g)
    return build(model, cal, b, g, cal.latent_shape(), t * NUM_TRAIN_TIMESTEPS)


# Each builder: (model, calibration section, batch size, generator, latent (frames, height, width),
# model timesteps [b]) -> the model's keyword inputs for one batch.


def _wan_item(model: nn.Module, cal: Any, b: int, g: torch.Generator, latent: tuple[int, int, int], timestep: torch.Tensor) -> dict[str, Any]:
    """Wan (model.architectures says what sets its variants apart): I2V's hidden_states carry the
    conditioning channels (in_channels, gaussian too); Wan2.1 I2V (image_dim) gets CLIP image
    tokens and needs 512 text tokens; TI2V-5B (48 channels) gets a timestep per video token, the
    first latent frame at 0 (kept clean, as its pipeline does for an image) in every other sample."""
    cfg, (f, h, w) = model.config, latent
    c, text_dim = int(cfg.in_channels), _text_dim(cfg)
    if getattr(cfg, "image_dim", None) and cal.text_len != WAN_I2V_TEXT_TOKENS:
        raise CalibrationError(
            f"calibration.text_len: must be {WAN_I2V_TEXT_TOKENS} for an image-to-video Wan (image_dim {cfg.image_dim}): diffusers "
            f"splits its image tokens off the cross-attention context at that length; got {cal.text_len}"
        )
    item = {
        "hidden_states": torch.randn(b, c, f, h, w, generator=g),
        "timestep": timestep,
        "encoder_hidden_states": torch.randn(b, cal.text_len, text_dim, generator=g),
    }
    if getattr(cfg, "image_dim", None):  # Wan2.1 I2V: CLIP image tokens
        item["encoder_hidden_states_image"] = torch.randn(b, WAN_CLIP_IMAGE_TOKENS, cfg.image_dim, generator=g)
    if c == WAN_TI2V_CHANNELS:
        _, ph, pw = patch_sizes_of(model)
        per_token = timestep[:, None, None].expand(b, f, (h // ph) * (w // pw)).clone()
        per_token[0::2, 0] = 0.0
        item["timestep"] = per_token.reshape(b, -1)
    return item


def _cogvideox_item(model: nn.Module, cal: Any, b: int, g: torch.Generator, latent: tuple[int, int, int], timestep: torch.Tensor) -> dict[str, Any]:
    cfg, (f, h, w) = model.config, latent
    c, text_dim = int(cfg.in_channels), _text_dim(cfg)
    p_t = cfg.patch_size_t or 1
    if f % p_t:
        raise CalibrationError(f"calibration.frames: {f} latent frames are not a multiple of the model's patch_size_t ({p_t})")
    # the joint positional embedding covers exactly max_text_seq_length text tokens
    item = {
        "hidden_states": torch.randn(b, f, c, h, w, generator=g),
        "encoder_hidden_states": torch.randn(b, cfg.max_text_seq_length, text_dim, generator=g),
        "timestep": timestep.round().clamp(max=NUM_TRAIN_TIMESTEPS - 1).long(),
    }
    if cfg.use_rotary_positional_embeddings:
        item["image_rotary_emb"] = cogvideox_rotary_emb(model, f, h, w)
    if getattr(cfg, "ofs_embed_dim", None):
        item["ofs"] = torch.full((b,), 2.0)
    return item


def _hunyuanvideo_item(model: nn.Module, cal: Any, b: int, g: torch.Generator, latent: tuple[int, int, int], timestep: torch.Tensor) -> dict[str, Any]:
    cfg, (f, h, w) = model.config, latent
    c, text_dim = int(cfg.in_channels), _text_dim(cfg)
    # padded prompts: a random number of real tokens per sample, the rest masked out
    lengths = torch.randint(max(1, cal.text_len // 4), cal.text_len + 1, (b,), generator=g)
    mask = (torch.arange(cal.text_len)[None, :] < lengths[:, None]).long()
    item = {
        "hidden_states": torch.randn(b, c, f, h, w, generator=g),
        "timestep": timestep,
        "encoder_hidden_states": torch.randn(b, cal.text_len, text_dim, generator=g) * mask[..., None],
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(b, cfg.pooled_projection_dim, generator=g),
    }
    if cfg.guidance_embeds:
        item["guidance"] = torch.full((b,), 6.0 * 1000)  # the pipeline's default 6.0, scaled by 1000
    return item


def _ltx_item(model: nn.Module, cal: Any, b: int, g: torch.Generator, latent: tuple[int, int, int], timestep: torch.Tensor) -> dict[str, Any]:
    cfg, (f, h, w) = model.config, latent
    c, text_dim = int(cfg.in_channels), _text_dim(cfg)
    p, p_t = cfg.patch_size, cfg.patch_size_t
    if f % p_t or h % p or w % p:
        raise CalibrationError(f"calibration: latent {f}x{h}x{w} is not divisible by the model's patch ({p_t}, {p}, {p})")
    n = (f // p_t) * (h // p) * (w // p)
    lengths = torch.randint(max(1, cal.text_len // 4), cal.text_len + 1, (b,), generator=g)
    return {
        "hidden_states": torch.randn(b, n, c, generator=g),  # packed latent tokens
        "encoder_hidden_states": torch.randn(b, cal.text_len, text_dim, generator=g),
        "timestep": timestep,
        "encoder_attention_mask": (torch.arange(cal.text_len)[None, :] < lengths[:, None]).long(),
        "num_frames": f // p_t,
        "height": h // p,
        "width": w // p,
        # as LTXPipeline at its default 25 fps
        "rope_interpolation_scale": (cal.vae_scale_temporal / 25.0, float(cal.vae_scale_spatial), float(cal.vae_scale_spatial)),
    }


#: the `synthetic` key of a model.architectures row -> its gaussian-input builder
BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "wan": _wan_item,
    "cogvideox": _cogvideox_item,
    "hunyuanvideo": _hunyuanvideo_item,
    "ltx": _ltx_item,
}


def cogvideox_rotary_emb(model: nn.Module, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX's 3D RoPE (cos, sin) for a latent of frames x height x width, as its pipeline makes it."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    try:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    except ImportError:  # pragma: no cover - moved in some diffusers version
        from diffusers.models.embeddings import get_resize_crop_region_for_grid  # type: ignore

    cfg = model.config
    p, p_t = cfg.patch_size, cfg.patch_size_t
    gh, gw = height // p, width // p
    bw, bh = cfg.sample_width // p, cfg.sample_height // p
    if p_t is None:
        cos, sin = get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=get_resize_crop_region_for_grid((gh, gw), bw, bh),
            grid_size=(gh, gw),
            temporal_size=frames,
            device=torch.device("cpu"),
        )
    else:
        cos, sin = get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=None,
            grid_size=(gh, gw),
            temporal_size=(frames + p_t - 1) // p_t,
            grid_type="slice",
            max_size=(bh, bw),
            device=torch.device("cpu"),
        )
    return cos, sin


def _demo_item(model: nn.Module, recipe: Recipe, b: int, g: torch.Generator) -> dict[str, Any]:
    try:
        from . import demo_data
    except ImportError as e:
        raise CalibrationError("calibration.synthetic: demo_videos needs hla_convert.stages.demo_data, which is not installed") from e
    cfg, cal = model.config, recipe.calibration
    if _arch(model) != "WanTransformer3DModel" or cfg.in_channels != demo_data.DEMO_CHANNELS or _text_dim(cfg) != demo_data.DEMO_TEXT_DIM:
        raise CalibrationError(
            f"calibration.synthetic: demo_videos is the embedded demo model's data (WanTransformer3DModel, "
            f"{demo_data.DEMO_CHANNELS} channels, text dim {demo_data.DEMO_TEXT_DIM}); this model is {_arch(model)} with "
            f"{getattr(cfg, 'in_channels', '?')} channels, text dim {_text_dim(cfg)}: use synthetic gaussian"
        )
    f, h, w = cal.latent_shape()
    x0, text = demo_data.sample_videos(b, g, frames=f, height=h, width=w, text_len=cal.text_len, text_dim=demo_data.DEMO_TEXT_DIM)
    t = sample_noise_levels(recipe, b, g)
    x_t, timestep, _ = demo_data.flow_matching_inputs(x0, g, t)
    return {"hidden_states": x_t, "timestep": timestep, "encoder_hidden_states": text}


def synthetic_inputs(model: nn.Module, recipe: Recipe, split: str) -> list[dict[str, Any]]:
    cal = recipe.calibration
    g = split_generator(cal.seed, split)
    total = cal.samples if split == "train" else cal.heldout
    make = _demo_item if cal.synthetic == "demo_videos" else _gaussian_item
    return [make(model, recipe, b, g) for b in _chunks(total, cal.batch_size)]
