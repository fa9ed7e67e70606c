"""Tiny real Wan pipelines built from configs only and saved with save_pretrained: text-to-video
(one or two experts), Wan2.1 / Wan2.2 image-to-video and Wan2.2 TI2V, for the tests that load a
pipeline folder. Their transformers are main_architectures.py's builders; seeded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .main_architectures import (
    TINY_CLIP_DIM,
    TINY_TI2V_CHANNELS,
    _seeded,
    tiny_wan,
    tiny_wan_i2v,
    tiny_wan_ti2v,
)

TINY_VOCAB = "a an the red fox cat dog runs across snowy snow meadow forest over sea boat".split()


def _tiny_text_parts() -> tuple[Any, Any]:
    """A word-level tokenizer (TINY_VOCAB) and a 1-layer UMT5 encoder (d_model 16 = tiny_wan's text_dim)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in TINY_VOCAB:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8)
    return tokenizer, _seeded(lambda: UMT5EncoderModel(config), 1)


def _tiny_wan_vae(z_dim: int = 4, **kwargs: Any) -> nn.Module:
    """A tiny AutoencoderKLWan: Wan2.1's layout (4x temporal, 8x spatial) or with kwargs Wan2.2's."""
    from diffusers import AutoencoderKLWan

    return _seeded(
        lambda: AutoencoderKLWan(
            base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim, **kwargs,
        ),
        2,
    )  # fmt: skip


def save_tiny_wan_pipeline(
    folder: Any, transformer: nn.Module | None = None, transformer_2: nn.Module | None = None, boundary_ratio: float | None = None
) -> Any:
    """A real WanPipeline from configs only, saved with save_pretrained into `folder`: a word-level
    tokenizer (TINY_VOCAB), a 1-layer UMT5 encoder (d_model 16 = tiny_wan's text_dim), a tiny
    AutoencoderKLWan (z_dim 4 = tiny_wan's channels; 4x temporal, 8x spatial), the FlowMatch Euler
    scheduler (shift 3) and `transformer` (default tiny_wan()). `transformer_2` and `boundary_ratio`:
    a Wan2.2 A14B-style two-expert pipeline (transformer for t >= boundary_ratio * 1000). Seeded;
    returns the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer, text_encoder = _tiny_text_parts()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer if transformer is not None else tiny_wan(),
        **({"transformer_2": transformer_2, "boundary_ratio": boundary_ratio} if transformer_2 is not None else {}),
    )
    pipe.save_pretrained(folder)
    return pipe


def save_tiny_wan_i2v_pipeline(
    folder: Any, transformer: nn.Module | None = None, transformer_2: nn.Module | None = None, boundary_ratio: float | None = None
) -> Any:
    """A real WanImageToVideoPipeline (Wan2.1 I2V layout) saved with save_pretrained into `folder`:
    save_tiny_wan_pipeline's text encoder, VAE and scheduler, a tiny CLIPVisionModel (32 x 32 px,
    16 px patches, TINY_CLIP_DIM features) with its CLIPImageProcessor, and `transformer`
    (default tiny_wan_i2v()). `transformer_2` and `boundary_ratio`: the Wan2.2 I2V A14B layout
    instead, two experts (tiny_wan22_i2v) and no image encoder / processor (Wan2.2 I2V has none).
    Seeded; returns the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tokenizer, text_encoder = _tiny_text_parts()
    if transformer_2 is not None:
        parts: dict[str, Any] = {"transformer_2": transformer_2, "boundary_ratio": boundary_ratio}
    else:
        vision = CLIPVisionConfig(
            hidden_size=TINY_CLIP_DIM, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16
        )
        parts = {
            "image_processor": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            "image_encoder": _seeded(lambda: CLIPVisionModel(vision), 3),
        }
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer if transformer is not None else tiny_wan_i2v(),
        **parts,
    )
    pipe.save_pretrained(folder)
    return pipe


def save_tiny_wan_ti2v_pipeline(folder: Any, transformer: nn.Module | None = None, image_to_video: bool = False) -> Any:
    """A real Wan2.2-TI2V-style WanPipeline (expand_timesteps=True) saved with save_pretrained: a
    tiny Wan2.2 VAE (z_dim 48, residual, 2x2 patchify: 4x temporal, 16x spatial) and `transformer`
    (default tiny_wan_ti2v()). image_to_video: a WanImageToVideoPipeline with expand_timesteps
    instead (TI2V's image mode: the first latent frame is the image's, its tokens at timestep 0;
    no CLIP encoder). Seeded; returns the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    tokenizer, text_encoder = _tiny_text_parts()
    vae = _tiny_wan_vae(
        TINY_TI2V_CHANNELS, is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16
    )
    pipe = (WanImageToVideoPipeline if image_to_video else WanPipeline)(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer if transformer is not None else tiny_wan_ti2v(),
        expand_timesteps=True,
    )
    pipe.save_pretrained(folder)
    return pipe
