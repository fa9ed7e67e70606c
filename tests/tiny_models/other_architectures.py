"""Tiny configs of the other video transformers in diffusers (0.42.1), for the architecture-support
checks (docs/architectures.md): `other_model(name)` gives (seeded tiny model, forward kwargs) of one of
OTHER_ARCHITECTURES.

Each entry: (diffusers class name, config kwargs, inputs(generator) -> kwargs). Parameters that a
class initialises to exactly zero (output projections, gates) are redrawn so that the output
depends on every attention layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .main_architectures import _seeded


def _other_specs() -> dict[str, tuple[str, dict[str, Any], Callable[[torch.Generator], dict[str, Any]]]]:
    def r(g, *shape):
        return torch.randn(*shape, generator=g)

    t1, t2 = torch.tensor([500]), torch.tensor([500, 100])
    wan_like = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, in_channels=4, out_channels=4, text_dim=16, ffn_dim=32,
        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )  # fmt: skip
    return {
        "mochi": (
            "MochiTransformer3DModel",
            dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                 in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
                 activation_fn="swiglu", max_sequence_length=16),
            lambda g: dict(hidden_states=r(g, 2, 4, 2, 8, 8), encoder_hidden_states=r(g, 2, 16, 16), timestep=t2,
                           encoder_attention_mask=torch.tensor([[1] * 16, [1] * 12 + [0] * 4]).bool()),
        ),
        "allegro": (
            "AllegroTransformer3DModel",
            dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
                 cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
            lambda g: dict(hidden_states=r(g, 2, 4, 2, 8, 8), encoder_hidden_states=r(g, 2, 16, 8), timestep=t2),
        ),
        "latte": (
            "LatteTransformer3DModel",
            dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2,
                 caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
                 activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                 norm_elementwise_affine=False, norm_eps=1e-6, video_length=2),
            lambda g: dict(hidden_states=r(g, 2, 4, 2, 8, 8), encoder_hidden_states=r(g, 2, 8, 8), timestep=t2,
                           enable_temporal_attentions=True),
        ),
        "easyanimate": (
            "EasyAnimateTransformer3DModel",
            dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2,
                 out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16,
                 time_embed_dim=8, time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
            lambda g: dict(hidden_states=r(g, 2, 4, 2, 8, 8), timestep=t2, encoder_hidden_states=r(g, 2, 16, 16)),
        ),
        "skyreels_v2": (
            "SkyReelsV2Transformer3DModel",
            dict(wan_like, attention_head_dim=12, freq_dim=32, rope_max_seq_len=32),
            lambda g: dict(hidden_states=r(g, 2, 4, 2, 8, 8), encoder_hidden_states=r(g, 2, 12, 16), timestep=t2),
        ),
        "wan_vace": (
            "WanVACETransformer3DModel",
            dict(wan_like, attention_head_dim=12, freq_dim=32, rope_max_seq_len=32, num_layers=4, vace_layers=[0, 2],
                 vace_in_channels=12),
            lambda g: dict(hidden_states=r(g, 1, 4, 2, 8, 8), encoder_hidden_states=r(g, 1, 12, 16),
                           control_hidden_states=r(g, 1, 12, 2, 8, 8), timestep=t1),
        ),
        "chronoedit": (
            "ChronoEditTransformer3DModel",
            dict(wan_like, attention_head_dim=8, freq_dim=16, rope_max_seq_len=64, rope_temporal_skip_len=8),
            lambda g: dict(hidden_states=r(g, 1, 4, 2, 8, 8), encoder_hidden_states=r(g, 1, 12, 16), timestep=t1),
        ),
        "helios": (
            "HeliosTransformer3DModel",
            dict(wan_like, attention_head_dim=12, freq_dim=32, rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
                 guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False),
            lambda g: dict(hidden_states=r(g, 1, 4, 2, 8, 8), timestep=t1, encoder_hidden_states=r(g, 1, 12, 16),
                           indices_hidden_states=torch.ones(1, 2), indices_latents_history_short=torch.ones(1, 1),
                           indices_latents_history_mid=torch.ones(1, 1), indices_latents_history_long=torch.ones(1, 4),
                           latents_history_short=r(g, 1, 4, 1, 8, 8), latents_history_mid=r(g, 1, 4, 1, 8, 8),
                           latents_history_long=r(g, 1, 4, 4, 8, 8)),
        ),
        "consisid": (
            "ConsisIDTransformer3DModel",
            dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                 text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                 temporal_compression_ratio=4, max_text_seq_length=8, cross_attn_interval=1, is_kps=False,
                 is_train_face=True, cross_attn_dim_head=1, cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2,
                 LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1,
                 LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1),
            lambda g: dict(hidden_states=r(g, 2, 1, 4, 8, 8), encoder_hidden_states=r(g, 2, 8, 8), timestep=t2,
                           id_vit_hidden=[torch.ones(2, 2, 2)], id_cond=torch.ones(2, 2)),
        ),
        "hunyuan_framepack": (
            "HunyuanVideoFramepackTransformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                 num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                 text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
                 has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
            lambda g: dict(hidden_states=r(g, 1, 4, 3, 4, 4), timestep=t1, encoder_hidden_states=r(g, 1, 12, 16),
                           pooled_projections=r(g, 1, 8), encoder_attention_mask=torch.tensor([[1] * 10 + [0] * 2]),
                           guidance=torch.tensor([5000.0]), image_embeds=r(g, 1, 12, 16), indices_latents=torch.ones(3),
                           latents_clean=r(g, 1, 4, 2, 4, 4), indices_latents_clean=torch.ones(2),
                           latents_history_2x=r(g, 1, 4, 2, 4, 4), indices_latents_history_2x=torch.ones(2),
                           latents_history_4x=r(g, 1, 4, 8, 4, 4), indices_latents_history_4x=torch.ones(8)),
        ),
        "hunyuan_video15": (
            "HunyuanVideo15Transformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                 num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                 text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
            lambda g: dict(hidden_states=r(g, 1, 4, 1, 8, 8), timestep=torch.tensor([1.0]),
                           encoder_hidden_states=r(g, 1, 6, 16), encoder_hidden_states_2=r(g, 1, 4, 8),
                           encoder_attention_mask=torch.tensor([[1.0, 1, 1, 1, 0, 0]]),
                           encoder_attention_mask_2=torch.ones(1, 4), image_embeds=torch.zeros(1, 3, 12)),
        ),
        "ltx2": (
            "LTX2VideoTransformer3DModel",
            dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                 attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                 audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2,
                 qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False),
            lambda g: dict(hidden_states=r(g, 2, 32, 4), audio_hidden_states=r(g, 2, 9, 4),
                           encoder_hidden_states=r(g, 2, 16, 16), audio_encoder_hidden_states=r(g, 2, 16, 16),
                           timestep=torch.tensor([500.0, 100.0]), encoder_attention_mask=torch.ones(2, 16).bool(),
                           num_frames=2, height=4, width=4, audio_num_frames=9, fps=25.0),
        ),
        "cosmos": (
            "CosmosTransformer3DModel",
            # concat_padding_mask=False: the padding-mask path needs torchvision
            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                 mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
                 rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"),
            lambda g: dict(hidden_states=r(g, 1, 4, 1, 8, 8), timestep=t1, encoder_hidden_states=r(g, 1, 12, 16),
                           attention_mask=torch.ones(1, 12), fps=30),
        ),
        "motif_video": (
            "MotifVideoTransformer3DModel",
            dict(in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
                 num_single_layers=1, num_decoder_layers=0, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                 qk_norm="rms_norm", norm_type="layer_norm", text_embed_dim=32, image_embed_dim=4, rope_theta=256.0,
                 rope_axes_dim=(4, 4, 4), enable_text_cross_attention_dual=True,
                 enable_text_cross_attention_single=False),
            lambda g: dict(hidden_states=r(g, 1, 33, 3, 4, 4), encoder_hidden_states=r(g, 1, 12, 32), timestep=t1),
        ),
        "sana_video": (
            "SanaVideoTransformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                 num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
                 mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
                 norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
            lambda g: dict(hidden_states=r(g, 1, 4, 2, 8, 8), encoder_hidden_states=r(g, 1, 12, 16), timestep=t1),
        ),
        "kandinsky5": (
            "Kandinsky5Transformer3DModel",
            dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
                 model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
            lambda g: dict(hidden_states=r(g, 1, 2, 8, 8, 4), encoder_hidden_states=r(g, 1, 6, 16),
                           timestep=torch.tensor([500.0]), pooled_projections=r(g, 1, 8),
                           visual_rope_pos=(torch.arange(2), torch.arange(4), torch.arange(4)),
                           text_rope_pos=torch.arange(6)),
        ),
        "kandinsky6": (
            "Kandinsky6Transformer3DModel",
            dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
                 model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4),
                 visual_cond=True, in_audio_dim=4, out_audio_dim=4),
            lambda g: dict(hidden_states=r(g, 1, 2, 4, 4, 9), encoder_hidden_states=r(g, 1, 6, 8),
                           pooled_projections=r(g, 1, 8), timestep=torch.tensor([500.0]),
                           encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]).bool()),
        ),
    }


OTHER_ARCHITECTURES = tuple(_other_specs())


def other_model(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, Any]] | None:
    """(tiny model, forward kwargs) of one of OTHER_ARCHITECTURES, or None where this diffusers
    lacks the class."""
    import diffusers

    cls_name, config, inputs = _other_specs()[name]
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        return None
    model = _seeded(lambda: cls(**config), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model, inputs(torch.Generator().manual_seed(1000 + seed))


def output_tensor(out: Any) -> torch.Tensor:
    """The video output of any of these models' forward (ModelOutput `.sample`, or a tuple's first item)."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out
