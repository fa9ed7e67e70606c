"""The benchmark's two teacher architectures and how each one is called on the benchmark's videos.

- ``wan``: ``WanTransformer3DModel``, patch (1, 2, 2): 16 x 32 x 32 pixels -> 16 x 16 x 16 =
  4,096 video tokens; self-attention over video only, text through cross-attention.
- ``cogvideox``: ``CogVideoXTransformer3DModel``, patch 2 (spatial only, CogVideoX 1.0 layout),
  3D rotary embeddings: the same 4,096 video tokens plus the 8 text tokens, concatenated first,
  in one joint self-attention.

Both: 2 heads x 64 dims (inner 128), feed-forward 512, q/k normalisation as in the real models;
6 blocks (the fast tier, `models/`) or 15 (the deep tier, `models-deep/`: one kept softmax layer
is 1/15 = 6.7 % of them, the share `softmax_layers: 2` keeps of Wan2.1-1.3B's 30). Videos are ``[B, 3, F, H, W]`` (the data's layout and Wan's); CogVideoX takes
``[B, F, 3, H, W]``, which `model_inputs` / `model_output` convert.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_data import VideoSpec

ARCHITECTURES = ("wan", "cogvideox")
CLASSES = {"wan": "WanTransformer3DModel", "cogvideox": "CogVideoXTransformer3DModel"}
INFO_FILE = "bench_info.json"


DEPTHS = {"fast": 6, "deep": 15}


def model_config(arch: str, spec: VideoSpec, tiny: bool = False, layers: int | None = None) -> dict[str, Any]:
    """diffusers config kwargs. tiny: 2 blocks, 2 heads x 16, for CPU smoke tests; layers: the
    number of blocks (default: the fast tier's 6)."""
    depth, heads, head_dim, ffn = (2, 2, 16, 64) if tiny else (DEPTHS["fast"], 2, 64, 512)
    layers = depth if layers is None else int(layers)
    if arch == "wan":
        return dict(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,  # Wan's RoPE splits 64 as t/h/w = 24/20/20
            in_channels=spec.channels,
            out_channels=spec.channels,
            text_dim=spec.text_dim,
            freq_dim=64,
            ffn_dim=ffn,
            num_layers=layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            image_dim=None,
            added_kv_proj_dim=None,
            rope_max_seq_len=64,
            pos_embed_seq_len=None,
        )
    if arch == "cogvideox":
        return dict(
            num_attention_heads=heads,
            attention_head_dim=head_dim,  # 3D RoPE splits 64 as t/h/w = 16/24/24
            in_channels=spec.channels,
            out_channels=spec.channels,
            time_embed_dim=128,
            text_embed_dim=spec.text_dim,
            num_layers=layers,
            sample_width=spec.width,
            sample_height=spec.height,
            # no VAE: one latent frame per frame (sample_frames is in "pixel" frames of the
            # compression ratio; with ratio 1 they are the same)
            sample_frames=spec.frames,
            temporal_compression_ratio=1,
            patch_size=2,
            patch_size_t=None,
            max_text_seq_length=spec.text_len,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        )
    raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")


def model_class(arch: str):
    import diffusers

    return getattr(diffusers, CLASSES[arch])


def build_model(arch: str, spec: VideoSpec, seed: int, tiny: bool = False, layers: int | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return model_class(arch)(**model_config(arch, spec, tiny, layers))


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> tuple[str, nn.Module, VideoSpec, dict]:
    """(arch, model in eval mode, data spec, info) of a folder written by train_models.py."""
    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text())
    arch = info["architecture"]
    model = model_class(arch).from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    return arch, model, VideoSpec.from_dict(info["data"]), info


def rotary_emb(model: nn.Module, spec: VideoSpec, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX's 3D RoPE for the benchmark's latent grid, exactly as the library builds it."""
    from hla_convert.stages.calibration import cogvideox_rotary_emb

    cos, sin = cogvideox_rotary_emb(model, spec.frames, spec.height, spec.width)
    return cos.to(device), sin.to(device)


def model_inputs(arch: str, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, rope: Any = None) -> dict[str, Any]:
    """Forward keyword arguments for videos x_t [B, 3, F, H, W], timestep [B] (0..1000), text [B, L, D]."""
    if arch == "wan":
        return {"hidden_states": x_t, "timestep": timestep, "encoder_hidden_states": text}
    item = {"hidden_states": x_t.transpose(1, 2).contiguous(), "timestep": timestep, "encoder_hidden_states": text}
    if rope is not None:
        item["image_rotary_emb"] = rope
    return item


def model_output(arch: str, out: torch.Tensor) -> torch.Tensor:
    """The model's prediction back in the data layout [B, 3, F, H, W]."""
    return out if arch == "wan" else out.transpose(1, 2)


def to_video(arch: str, hidden_states: torch.Tensor) -> torch.Tensor:
    """An input dict's hidden_states in the data layout [B, 3, F, H, W]."""
    return model_output(arch, hidden_states)


def video_tokens(arch: str, spec: VideoSpec) -> int:
    return spec.frames * (spec.height // 2) * (spec.width // 2)


def uniform_entropy(n: int) -> float:
    return math.log(n)
