"""Tiny, seeded diffusers video transformers, their forward inputs and saved pipelines, shared by the tests.

Tests import every name from here (`from tiny_models import tiny_wan, tiny_inputs`); the modules
hold one kind each:

- main_architectures.py: the four main architectures (ARCHITECTURES: wan, cogvideox, hunyuan, ltx),
  their builders (`tiny_model(name)`, `tiny_wan`, ...), seeded forward inputs (`tiny_inputs`),
  the modules a conversion must pick or leave softmax, and the Wan image-conditioning variants;
- other_architectures.py: the other video DiTs of diffusers (OTHER_ARCHITECTURES, `other_model`);
- pipelines.py: whole Wan pipelines saved with save_pretrained (`save_tiny_wan_pipeline`, ...).

    model = tiny_model("wan")
    out = model(**tiny_inputs("wan")).sample
"""

from __future__ import annotations

from .main_architectures import (
    ARCHITECTURES,
    BUILDERS,
    HUNYUAN_PADDED,
    HUNYUAN_TEXT_TOKENS,
    LEFT_SOFTMAX,
    SELF_ATTENTION,
    TINY_CLIP_DIM,
    TINY_CLIP_TOKENS,
    TINY_I2V_CHANNELS,
    TINY_TI2V_CHANNELS,
    forward,
    tiny_cogvideox,
    tiny_hunyuan,
    tiny_inputs,
    tiny_ltx,
    tiny_model,
    tiny_wan,
    tiny_wan22_i2v,
    tiny_wan_i2v,
    tiny_wan_ti2v,
)
from .other_architectures import OTHER_ARCHITECTURES, other_model, output_tensor
from .pipelines import (
    TINY_VOCAB,
    save_tiny_wan_i2v_pipeline,
    save_tiny_wan_pipeline,
    save_tiny_wan_ti2v_pipeline,
)

__all__ = [
    "ARCHITECTURES",
    "BUILDERS",
    "HUNYUAN_PADDED",
    "HUNYUAN_TEXT_TOKENS",
    "LEFT_SOFTMAX",
    "OTHER_ARCHITECTURES",
    "SELF_ATTENTION",
    "TINY_CLIP_DIM",
    "TINY_CLIP_TOKENS",
    "TINY_I2V_CHANNELS",
    "TINY_TI2V_CHANNELS",
    "TINY_VOCAB",
    "forward",
    "other_model",
    "output_tensor",
    "save_tiny_wan_i2v_pipeline",
    "save_tiny_wan_pipeline",
    "save_tiny_wan_ti2v_pipeline",
    "tiny_cogvideox",
    "tiny_hunyuan",
    "tiny_inputs",
    "tiny_ltx",
    "tiny_model",
    "tiny_wan",
    "tiny_wan22_i2v",
    "tiny_wan_i2v",
    "tiny_wan_ti2v",
]
