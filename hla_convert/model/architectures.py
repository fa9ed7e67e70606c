"""One row per diffusers video transformer class: everything hla-convert knows about a model family.

    ARCHITECTURES["WanTransformer3DModel"].default_include   -> ("blocks.*.attn1",)
    architecture_of(model)                                   -> its row, or None for an unknown class

The modules that need a family's facts read them here: surgery (default modules), grid (hidden-state
layout, where the joint text tokens sit, patch sizes), pipeline_loading (joint text attention),
recipe.checks (VAE scales, causal frame blocks), io.output (the pipeline class in the model card)
and stages.calibration_synthetic (which synthetic-input builder, by the key `synthetic`).
Adding a family is one row here and one recipe in recipes/ (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def patch_sizes(config: Any) -> tuple[int, int, int]:
    """(temporal, height, width) patch size of a video transformer config."""
    p = config.get("patch_size", 1) if hasattr(config, "get") else getattr(config, "patch_size", 1)
    if isinstance(p, (list, tuple)):
        if len(p) == 3:
            return int(p[0]), int(p[1]), int(p[2])
        if len(p) == 2:
            return 1, int(p[0]), int(p[1])
        p = p[0]
    pt = config.get("patch_size_t") if hasattr(config, "get") else getattr(config, "patch_size_t", None)
    return int(pt or 1), int(p or 1), int(p or 1)


GRID_LAYOUTS = (None, "BCFHW", "BFCHW", "packed")
TEXT_TOKENS = (None, "first", "last", "joint")


@dataclass(frozen=True)
class Architecture:
    """What hla-convert knows about one diffusers transformer class (`name`).

    default_include: glob patterns of the self-attention modules converted by default; None: every
        attention module without is_cross_attention (surgery.select_modules).
    grid_layout: how hidden_states hold the latent video, for the hybrid kind's token grid:
        "BCFHW", "BFCHW", or "packed" ([B, N, C] tokens; the grid from num_frames / height / width);
        None: the grid cannot be read (the hybrid kind refuses the model).
    text_tokens: where the converted self-attention sees text tokens: None (video tokens only),
        "first" / "last" (joint attention, text before / after the video tokens), "joint" (joint
        attention, order not recorded: no grid).
    vae_scales: (temporal, spatial) compression of the family's VAE (latent frames = (frames - 1) /
        temporal + 1); None: a recipe must give calibration.vae_scale_temporal / _spatial.
    pipeline: the diffusers pipeline class name the model card shows; None: the card names none.
    patch_sizes: reads (temporal, height, width) patch sizes from the model config.
    synthetic: the key of stages.calibration_synthetic's gaussian-input builder; None: no synthetic
        inputs (calibration.source trajectories or folder).
    causal_blocks: the model attends in causal frame blocks (SkyReels-V2 diffusion forcing:
        attention.causal_block_frames, model.block_causal).
    single_file_keys: tensor names that a single-file checkpoint of the family's ORIGINAL layout
        (as its authors release it, and ComfyUI uses it; model.single_file) holds, without a
        "model.diffusion_model." prefix; () = no single-file loading (diffusers' from_single_file
        converts the layout). The row whose keys are all present, most keys first, names the file's class.
    """

    name: str
    default_include: tuple[str, ...] | None = None
    grid_layout: str | None = None
    text_tokens: str | None = None
    vae_scales: tuple[int, int] | None = None
    pipeline: str | None = None
    patch_sizes: Callable[[Any], tuple[int, int, int]] = patch_sizes
    synthetic: str | None = None
    causal_blocks: bool = False
    single_file_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # a typo in a new row fails here, at import, rather than at the first forward that needs it
        if self.grid_layout not in GRID_LAYOUTS:
            raise ValueError(f"{self.name}: grid_layout {self.grid_layout!r} is not one of {GRID_LAYOUTS}")
        if self.text_tokens not in TEXT_TOKENS:
            raise ValueError(f"{self.name}: text_tokens {self.text_tokens!r} is not one of {TEXT_TOKENS}")
        if self.text_tokens == "joint" and self.grid_layout is not None:
            raise ValueError(f"{self.name}: a row with a grid_layout says where its text tokens sit (first / last)")
        if self.vae_scales is not None and not (len(self.vae_scales) == 2 and all(isinstance(x, int) and x >= 1 for x in self.vae_scales)):
            raise ValueError(f"{self.name}: vae_scales must be (temporal, spatial) positive integers, got {self.vae_scales!r}")


# Wan's image-to-video variants are the same class (WanTransformer3DModel, one row below); what
# sets them apart is in the model config, and the facts the calibration needs are these:
# - Wan2.1 I2V (image_dim set, e.g. 1280): CLIP image tokens come in `encoder_hidden_states_image`
#   and go to the cross-attention only (added_kv_proj_dim: attn2's add_k_proj / add_v_proj); the
#   self-attention attn1 sees the video tokens alone. diffusers' WanAttnProcessor splits the image
#   tokens off the cross-attention context by assuming exactly 512 text tokens (umT5's
#   max_sequence_length, "hardcoded for now" in transformer_wan.py), so the text must be 512 long.
# - Wan2.1 / 2.2 I2V: hidden_states carry the conditioning after the noisy latent on the channel
#   axis (in_channels 36 = 16 noise + 4 first-frame mask + 16 image latent; out_channels 16): the
#   latent grid, hence the token grid, is the video's.
# - Wan2.2 TI2V-5B: in = out = 48 channels (the Wan2.2 VAE's z_dim, 4x temporal, 16x spatial
#   compression: its recipe sets calibration.vae_scale_spatial 16, the table's (4, 8) is Wan2.1's
#   VAE), and its pipeline (WanPipeline / WanImageToVideoPipeline with expand_timesteps) gives a
#   timestep per video token, [B, F*H*W/4], the first latent frame at 0 (kept clean) for an image.
WAN_I2V_TEXT_TOKENS = 512
WAN_CLIP_IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token
WAN_TI2V_CHANNELS = 48

# Wan-AI's released layout (diffusers' convert_wan_transformer_to_diffusers renames these):
# "head.modulation" is what diffusers itself looks for; the others make a partial file fail here.
_WAN_ORIGINAL_KEYS = ("patch_embedding.weight", "head.modulation", "blocks.0.self_attn.q.weight")

_ROWS = (
    Architecture(
        "WanTransformer3DModel", ("blocks.*.attn1",), "BCFHW", None, (4, 8), "WanPipeline", synthetic="wan",
        single_file_keys=_WAN_ORIGINAL_KEYS,
    ),
    Architecture(
        "WanVACETransformer3DModel", ("blocks.*.attn1", "vace_blocks.*.attn1"), "BCFHW", None, (4, 8), "WanVACEPipeline",
        single_file_keys=(*_WAN_ORIGINAL_KEYS, "vace_blocks.0.after_proj.weight"),
    ),
    Architecture(
        "SkyReelsV2Transformer3DModel", ("blocks.*.attn1",), "BCFHW", None, (4, 8), "SkyReelsV2Pipeline",
        synthetic="wan", causal_blocks=True,
    ),
    Architecture(
        "CogVideoXTransformer3DModel", ("transformer_blocks.*.attn1",), "BFCHW", "first", (4, 8), "CogVideoXPipeline",
        synthetic="cogvideox",
    ),
    Architecture("ConsisIDTransformer3DModel", ("transformer_blocks.*.attn1",), None, "joint", (4, 8)),
    # joint text+video attention in the dual- and single-stream blocks; the text token refiner
    # attends over a few hundred text tokens only and stays softmax.
    Architecture(
        "HunyuanVideoTransformer3DModel", ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"), "BCFHW",
        "last", (4, 8), "HunyuanVideoPipeline", synthetic="hunyuanvideo",
    ),
    Architecture(
        "HunyuanVideoFramepackTransformer3DModel", ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
        None, "joint", (4, 8),
    ),
    Architecture(
        "LTXVideoTransformer3DModel", ("transformer_blocks.*.attn1",), "packed", None, (8, 32), "LTXPipeline", synthetic="ltx"
    ),
    Architecture("MochiTransformer3DModel", ("transformer_blocks.*.attn1",), None, "joint", (6, 8), "MochiPipeline"),
    Architecture("AllegroTransformer3DModel", ("transformer_blocks.*.attn1",), None, None, (4, 8), "AllegroPipeline"),
    Architecture(
        "LatteTransformer3DModel", ("transformer_blocks.*.attn1", "temporal_transformer_blocks.*.attn1"),
        pipeline="LattePipeline",
    ),
    Architecture("EasyAnimateTransformer3DModel", ("transformer_blocks.*.attn1",), pipeline="EasyAnimatePipeline"),
    Architecture("CosmosTransformer3DModel", ("transformer_blocks.*.attn1",)),
    Architecture("ChronoEditTransformer3DModel", ("blocks.*.attn1",)),
    Architecture("HeliosTransformer3DModel", ("blocks.*.attn1",)),
    # the text token refiner stays softmax, as for HunyuanVideo
    Architecture("HunyuanVideo15Transformer3DModel", ("transformer_blocks.*.attn",)),
    # These attention classes have no is_cross_attention flag, so the fallback would pick their
    # text (and audio-video) cross-attention too. Video self-attention only; audio stays softmax.
    Architecture("LTX2VideoTransformer3DModel", ("transformer_blocks.*.attn1",)),
    Architecture("MotifVideoTransformer3DModel", ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")),
    Architecture("Kandinsky5Transformer3DModel", ("visual_transformer_blocks.*.self_attention",)),
    Architecture("Kandinsky6Transformer3DModel", ("visual_transformer_blocks.*.video_dec_block.self_attention",)),
)

#: diffusers transformer class name -> its row
ARCHITECTURES: dict[str, Architecture] = {row.name: row for row in _ROWS}


def architecture_of(model_or_name: Any) -> Architecture | None:
    """The row of a model (by its class name) or of a class name; None for a family not in the table."""
    name = model_or_name if isinstance(model_or_name, str) else type(model_or_name).__name__
    return ARCHITECTURES.get(name)


def patch_sizes_of(model: Any) -> tuple[int, int, int]:
    """(temporal, height, width) patch sizes of a model, read as its row says (any class: patch_sizes)."""
    row = architecture_of(model)
    return (row.patch_sizes if row is not None else patch_sizes)(model.config)


def with_field(attr: str) -> dict[str, Any]:
    """{class name: row.<attr>} for the rows where it is set (not None / False), in table order."""
    return {row.name: getattr(row, attr) for row in _ROWS if getattr(row, attr) not in (None, False)}


__all__ = [
    "ARCHITECTURES",
    "GRID_LAYOUTS",
    "TEXT_TOKENS",
    "WAN_CLIP_IMAGE_TOKENS",
    "WAN_I2V_TEXT_TOKENS",
    "WAN_TI2V_CHANNELS",
    "Architecture",
    "architecture_of",
    "patch_sizes",
    "patch_sizes_of",
    "with_field",
]
