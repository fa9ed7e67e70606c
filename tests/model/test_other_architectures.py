"""The other diffusers video transformers (docs/architectures.md): a softmax conversion of each
tiny config (tests/tiny_models/other_architectures.py) is bit-exact and picks exactly its video
self-attention, a hadamard conversion runs through every converted layer; an architecture-table
row is checked when written.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hla_convert import HLAConfig, convert_attention, hla_layers
from hla_convert.model.surgery import converted_modules
from helpers import HADAMARD

from tiny_models import OTHER_ARCHITECTURES, other_model, output_tensor

# -- the other diffusers video transformers (docs/architectures.md) ----------------------------------

# What a default conversion must pick in each tiny config: the video self-attention (joint
# text+video where the model attends jointly). Text refiners, text/image/audio cross-attention and
# audio self-attention stay softmax.
OTHER_SELF_ATTENTION = {
    "allegro": ["transformer_blocks.0.attn1"],
    "latte": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1",
              "temporal_transformer_blocks.0.attn1", "temporal_transformer_blocks.1.attn1"],
    "easyanimate": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "skyreels_v2": ["blocks.0.attn1", "blocks.1.attn1"],
    "wan_vace": [f"blocks.{i}.attn1" for i in range(4)] + ["vace_blocks.0.attn1", "vace_blocks.1.attn1"],
    "chronoedit": ["blocks.0.attn1", "blocks.1.attn1"],
    "helios": ["blocks.0.attn1", "blocks.1.attn1"],
    "consisid": ["transformer_blocks.0.attn1"],
    "hunyuan_framepack": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
    "hunyuan_video15": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
    "ltx2": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "cosmos": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "motif_video": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
    "sana_video": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "mochi": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "kandinsky5": ["visual_transformer_blocks.0.self_attention", "visual_transformer_blocks.1.self_attention"],
    "kandinsky6": ["visual_transformer_blocks.0.video_dec_block.self_attention",
                   "visual_transformer_blocks.1.video_dec_block.self_attention"],
}  # fmt: skip

# Known gaps of the seam, strict so that fixing one turns its test red until this list is updated.
KNOWN_GAPS: dict[str, tuple[type, str]] = {}


def _other_params():
    for name in OTHER_ARCHITECTURES:
        if name in KNOWN_GAPS:
            exc, why = KNOWN_GAPS[name]
            yield pytest.param(name, marks=pytest.mark.xfail(raises=exc, strict=True, reason=why))
        else:
            yield name


@pytest.mark.filterwarnings("ignore:In CPU autocast")  # Mochi's RoPE asks for float32 autocast
@pytest.mark.parametrize("name", list(_other_params()))
def test_other_architectures_convert(name):
    """softmax conversion bit-exact, hadamard conversion runs through every converted layer."""
    built = other_model(name)
    if built is None:
        pytest.skip(f"this diffusers has no {name} transformer")
    model, inputs = built
    with torch.no_grad():
        ref = output_tensor(model(**inputs))
    soft = copy.deepcopy(model)
    convert_attention(soft, HLAConfig(kind="softmax"))
    assert converted_modules(soft) == OTHER_SELF_ATTENTION[name]
    if name == "sana_video":  # its self-attention is already ReLU linear attention: no softmax call to replace
        with pytest.raises(RuntimeError, match="never reached"):
            soft(**inputs)
        return
    with torch.no_grad():
        assert torch.equal(output_tensor(soft(**inputs)), ref)
    convert_attention(model, HADAMARD)
    with torch.no_grad():
        out = output_tensor(model(**inputs))
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4
    assert all(layer.calls >= 1 for layer in hla_layers(model).values())


def test_architecture_rows_are_checked_when_written():
    """A new family is one row of model.architectures; a misspelt layout fails at import, with the
    class named, instead of at the first hybrid forward."""
    from hla_convert.model.architectures import ARCHITECTURES, Architecture

    with pytest.raises(ValueError, match="MyTransformer3DModel: grid_layout 'BCHWF'"):
        Architecture("MyTransformer3DModel", ("blocks.*.attn1",), "BCHWF")
    with pytest.raises(ValueError, match="says where its text tokens sit"):
        Architecture("MyTransformer3DModel", None, "BCFHW", "joint")
    assert ARCHITECTURES["WanTransformer3DModel"].default_include == ("blocks.*.attn1",)
