"""Tiny, seeded diffusers video transformers and matching forward inputs, shared by the tests.

Each builder constructs the real diffusers class from a small config (no Hub access), in eval mode,
with weights drawn from a fixed seed; `tiny_inputs(name)` gives the keyword arguments of one
forward call, also seeded, so `model(**tiny_inputs(name))` is deterministic. Shapes are chosen so
that one forward takes a few milliseconds on a CPU while still exercising what the seam must keep
working: RoPE, q/k norms, joint text+video attention, cross-attention left softmax, and (Hunyuan)
padded text tokens behind a key padding mask.

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


# -- the other diffusers video transformers ------------------------------------------------------------
#
# Tiny configs of the remaining video DiTs in diffusers (0.42.1), for the architecture-support checks
# (docs/architectures.md). Each entry: (diffusers class name, config kwargs, inputs(generator) -> kwargs).
# Parameters that a class initialises to exactly zero (output projections, gates) are redrawn so that
# the output depends on every attention layer.


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


# -- a whole pipeline -------------------------------------------------------------------------------


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
