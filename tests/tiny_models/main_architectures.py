"""The tiny, seeded diffusers transformers of the four main architectures and their forward inputs.

Each builder constructs the real diffusers class from a small config (no Hub access), in eval mode,
with weights drawn from a fixed seed; `tiny_inputs(name)` gives the keyword arguments of one
forward call, also seeded, so `model(**tiny_inputs(name))` is deterministic. Shapes are chosen so
that one forward takes a few milliseconds on a CPU while still exercising what the seam must keep
working: RoPE, q/k norms, joint text+video attention, cross-attention left softmax, and (Hunyuan)
padded text tokens behind a key padding mask. The Wan image-conditioning variants (Wan2.1 I2V,
Wan2.2 TI2V and I2V experts) are here too; the pipelines that hold them are in pipelines.py.

    model = tiny_model("wan")
    out = model(**tiny_inputs("wan")).sample
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("wan", "cogvideox", "hunyuan", "ltx")

# The self-attention modules a default conversion must pick in the default tiny configs, and the
# attention modules it must leave softmax (text cross-attention, Hunyuan's text token refiner).
SELF_ATTENTION = {
    "wan": ["blocks.0.attn1", "blocks.1.attn1"],
    "cogvideox": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "hunyuan": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
    "ltx": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
}
LEFT_SOFTMAX = {
    "wan": ["blocks.0.attn2", "blocks.1.attn2"],
    "cogvideox": [],
    "hunyuan": ["context_embedder.token_refiner.refiner_blocks.0.attn"],
    "ltx": ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"],
}

# Hunyuan: batch element 1 has this many padded (masked) text tokens at the end of its prompt.
HUNYUAN_TEXT_TOKENS = 6
HUNYUAN_PADDED = 2


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build under a fixed torch seed (parameter init draws from the global generator)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build()
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def tiny_wan(seed: int = 0, num_layers: int = 2) -> nn.Module:
    """WanTransformer3DModel: 2 heads x 12 dims (3-axis RoPE), rms_norm_across_heads q/k norm, text cross-attention."""
    from diffusers import WanTransformer3DModel

    return _seeded(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=32,
            ffn_dim=32,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        seed,
    )


def tiny_cogvideox(seed: int = 0, num_layers: int = 2, rotary: bool = True) -> nn.Module:
    """CogVideoXTransformer3DModel (2 heads x 16 dims): joint text+video attention in one module (attn1).

    rotary=True is the CogVideoX 1.5 / 5B layout: 3D RoPE passed as `image_rotary_emb`, which the
    processor wrapper must forward (diffusers drops keyword arguments a processor does not name).
    """
    from diffusers import CogVideoXTransformer3DModel

    return _seeded(
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,  # 3D RoPE splits it 4 / 6 / 6
            in_channels=4,
            out_channels=4,
            time_embed_dim=8,
            text_embed_dim=16,
            num_layers=num_layers,
            sample_width=8,
            sample_height=8,
            sample_frames=5,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=4,
            use_rotary_positional_embeddings=rotary,
        ),
        seed,
    )


def tiny_hunyuan(seed: int = 0, num_layers: int = 1, num_single_layers: int = 1) -> nn.Module:
    """HunyuanVideoTransformer3DModel: dual-stream (transformer_blocks.*.attn, separate text
    projections) and single-stream (single_transformer_blocks.*.attn) joint attention, plus the
    softmax text token refiner."""
    from diffusers import HunyuanVideoTransformer3DModel

    return _seeded(
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        ),
        seed,
    )


def tiny_ltx(seed: int = 0, num_layers: int = 2) -> nn.Module:
    """LTXVideoTransformer3DModel: token-sequence input, 3D RoPE, text cross-attention (attn2)."""
    from diffusers import LTXVideoTransformer3DModel

    return _seeded(
        lambda: LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=num_layers,
            caption_channels=16,
        ),
        seed,
    )


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "wan": tiny_wan,
    "cogvideox": tiny_cogvideox,
    "hunyuan": tiny_hunyuan,
    "ltx": tiny_ltx,
}


def tiny_model(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """The tiny model of one architecture (see ARCHITECTURES), eval mode, seeded."""
    if name not in BUILDERS:
        raise KeyError(f"unknown tiny architecture {name!r}; one of {', '.join(ARCHITECTURES)}")
    return BUILDERS[name](seed=seed, **kwargs)


def _cogvideox_rope(model: nn.Module, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) 3D RoPE the CogVideoX pipeline computes for a latent of this size."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    p = cfg.patch_size
    grid_h, grid_w = height // p, width // p
    return get_3d_rotary_pos_embed(
        embed_dim=cfg.attention_head_dim,
        crops_coords=((0, 0), (grid_h, grid_w)),
        grid_size=(grid_h, grid_w),
        temporal_size=frames,
        device=torch.device("cpu"),
    )


def tiny_inputs(name: str, seed: int = 0, batch: int = 2, model: nn.Module | None = None) -> dict[str, Any]:
    """Seeded keyword arguments for one forward of tiny_model(name): model(**tiny_inputs(name)).

    hunyuan: batch element 1 has its last HUNYUAN_PADDED text tokens masked out
    (encoder_attention_mask 0); cogvideox: `image_rotary_emb` when the model uses RoPE (pass the
    model, or the default tiny config is assumed).
    """
    g = torch.Generator().manual_seed(1000 + seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    t = torch.tensor([500, 250][:batch] + [100] * max(0, batch - 2), dtype=torch.long)
    if name == "wan":
        return {
            "hidden_states": randn(batch, 4, 2, 8, 8),  # 2 x 4 x 4 = 32 video tokens
            "timestep": t,
            "encoder_hidden_states": randn(batch, 5, 16),
        }
    if name == "cogvideox":
        frames, height, width = 2, 8, 8  # 2 x 4 x 4 = 32 video tokens + 4 text tokens
        rotary = True if model is None else bool(model.config.use_rotary_positional_embeddings)
        inputs = {
            "hidden_states": randn(batch, frames, 4, height, width),
            "encoder_hidden_states": randn(batch, 4, 16),
            "timestep": t,
        }
        if rotary:
            inputs["image_rotary_emb"] = _cogvideox_rope(model or tiny_cogvideox(), frames, height, width)
        return inputs
    if name == "hunyuan":
        mask = torch.ones(batch, HUNYUAN_TEXT_TOKENS, dtype=torch.long)
        if batch > 1:
            mask[1, HUNYUAN_TEXT_TOKENS - HUNYUAN_PADDED :] = 0
        return {
            "hidden_states": randn(batch, 4, 2, 4, 4),  # 2 x 4 x 4 = 32 video tokens
            "timestep": t,
            "encoder_hidden_states": randn(batch, HUNYUAN_TEXT_TOKENS, 16),
            "encoder_attention_mask": mask,
            "pooled_projections": randn(batch, 8),
            "guidance": torch.full((batch,), 6000.0),
        }
    if name == "ltx":
        frames, height, width = 2, 4, 4
        return {
            "hidden_states": randn(batch, frames * height * width, 8),
            "encoder_hidden_states": randn(batch, 5, 16),
            "timestep": t,
            "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.long),
            "num_frames": frames,
            "height": height,
            "width": width,
        }
    raise KeyError(f"unknown tiny architecture {name!r}; one of {', '.join(ARCHITECTURES)}")


def forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's output tensor (every tiny architecture returns `.sample` with return_dict)."""
    out = model(**{**inputs, "return_dict": True})
    return out.sample


# Wan2.1 I2V in small: CLIP image tokens of TINY_CLIP_DIM features (2 x 2 patches + class token
# of a 32 x 32 image), and hidden_states of 4 noise + 4 mask + 4 image-latent channels.
TINY_CLIP_DIM = 8
TINY_CLIP_TOKENS = 5
TINY_I2V_CHANNELS = 12
# Wan2.2 TI2V in small: the Wan2.2 VAE's 48 latent channels, 16x spatial compression (2x2 pixel
# patchify inside the VAE), a timestep per video token (expand_timesteps).
TINY_TI2V_CHANNELS = 48


def tiny_wan_i2v(seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A Wan2.1-I2V-style WanTransformer3DModel: tiny_wan plus image_dim (CLIP image tokens to the
    cross-attention through added_kv_proj_dim) and 12 input channels (4 noise + 4 mask + 4 image)."""
    from diffusers import WanTransformer3DModel

    return _seeded(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=TINY_I2V_CHANNELS, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32, image_dim=TINY_CLIP_DIM, added_kv_proj_dim=24,
        ),
        seed,
    )  # fmt: skip


def tiny_wan_ti2v(seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A Wan2.2-TI2V-style WanTransformer3DModel: tiny_wan with 48 input and output channels."""
    from diffusers import WanTransformer3DModel

    return _seeded(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=TINY_TI2V_CHANNELS,
            out_channels=TINY_TI2V_CHANNELS, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
        seed,
    )  # fmt: skip


def tiny_wan22_i2v(seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A Wan2.2-I2V-A14B-style expert: tiny_wan with 12 input channels (4 noise + 4 mask + 4 image
    latent) and no image_dim (Wan2.2 I2V has no CLIP image tokens: the image latent is its only
    conditioning)."""
    from diffusers import WanTransformer3DModel

    return _seeded(
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=TINY_I2V_CHANNELS, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        seed,
    )  # fmt: skip
