"""The pieces of image-to-video calibration on tiny models: the conditioning images (folder and
synthetic), the input checks for I2V's extra keys and TI2V's per-token timestep, the noise level
of a per-token timestep, the synthetic inputs of both variants, the sampled latent's shape, and
the hybrid's token grid (video tokens only: the CLIP image tokens go to the cross-attention)."""

from __future__ import annotations

import os

import pytest
import torch

from hla_convert.model.config import HLAConfig
from hla_convert.model.grid import token_grid
from hla_convert.model.surgery import convert_attention
from hla_convert.stages.calibration import CalibrationError, check_input, noise_levels
from hla_convert.stages.calibration_images import image_files, read_images, synthetic_image
from hla_convert.stages.calibration_synthetic import synthetic_inputs
from hla_convert.stages.drift import noise_shape
from helpers import wan_recipe
from tiny_models import TINY_CLIP_DIM, TINY_CLIP_TOKENS, TINY_I2V_CHANNELS, TINY_TI2V_CHANNELS, tiny_wan, tiny_wan_i2v, tiny_wan_ti2v


def _i2v_item(text_len: int = 512) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(2, TINY_I2V_CHANNELS, 2, 4, 4, generator=g),
        "timestep": torch.tensor([500.0, 100.0]),
        "encoder_hidden_states": torch.randn(2, text_len, 16, generator=g),
        "encoder_hidden_states_image": torch.randn(2, TINY_CLIP_TOKENS, TINY_CLIP_DIM, generator=g),
    }


def test_the_hybrid_grid_is_the_video_grid_and_self_attention_sees_video_tokens_only():
    model = tiny_wan_i2v()
    item = _i2v_item()
    assert token_grid(model, (), item) == ((2, 2, 2), 0, False)  # 12 channels, the same 2 x 4 x 4 latent
    seen = {}

    def record(name: str, key: str, position: int):
        def hook(module, args, kwargs):
            seen[name] = (kwargs[key] if key in kwargs else args[position]).shape

        return hook

    model.blocks[0].attn1.register_forward_pre_hook(record("self", "hidden_states", 0), with_kwargs=True)
    model.blocks[0].attn2.register_forward_pre_hook(record("cross", "encoder_hidden_states", 1), with_kwargs=True)
    convert_attention(model, HLAConfig(kind="hybrid", feature_dim=8, window=(1, 0, 0)))
    with torch.no_grad():
        out = model(**item, return_dict=False)[0]
    assert out.shape == (2, 4, 2, 4, 4) and bool(torch.isfinite(out).all())
    assert seen["self"][1] == 8  # 2 x 2 x 2 video tokens
    assert seen["cross"][1] == TINY_CLIP_TOKENS + 512  # image tokens then text, in the cross-attention


def test_check_input_takes_i2v_keys_and_per_token_timesteps():
    check_input(tiny_wan_i2v(), _i2v_item(), "x")
    with pytest.raises(CalibrationError, match="x: encoder_hidden_states_image: missing"):
        check_input(tiny_wan_i2v(), {k: v for k, v in _i2v_item().items() if k != "encoder_hidden_states_image"}, "x")
    with pytest.raises(CalibrationError, match="x: encoder_hidden_states: an image-to-video Wan needs 512 text tokens"):
        check_input(tiny_wan_i2v(), _i2v_item(text_len=6), "x")
    ti2v = tiny_wan_ti2v()
    item = {"hidden_states": torch.randn(1, TINY_TI2V_CHANNELS, 2, 4, 4), "timestep": torch.full((1, 8), 300.0), "encoder_hidden_states": torch.randn(1, 6, 16)}
    check_input(ti2v, item, "x")
    with pytest.raises(CalibrationError, match=r"x: timestep: a per-token timestep needs the 8 video tokens of hidden_states, got \[1, 7\]"):
        check_input(ti2v, {**item, "timestep": torch.full((1, 7), 300.0)}, "x")


def test_noise_level_of_a_per_token_timestep_is_its_noisy_tokens():
    ts = torch.tensor([[0.0] * 4 + [600.0] * 4, [0.0] * 4 + [200.0] * 4])  # first latent frame clean
    item = {"hidden_states": torch.zeros(2, 1), "timestep": ts}
    assert noise_levels(item).tolist() == pytest.approx([0.6, 0.2])


def test_synthetic_inputs_of_the_i2v_and_ti2v_variants():
    rec = wan_recipe(calibration__samples=4, calibration__batch_size=2, calibration__text_len=512)
    batch = synthetic_inputs(tiny_wan_i2v(), rec, "train")[0]
    assert batch["hidden_states"].shape == (2, TINY_I2V_CHANNELS, 2, 8, 8)
    assert batch["encoder_hidden_states_image"].shape == (2, 257, TINY_CLIP_DIM)
    with pytest.raises(CalibrationError, match="calibration.text_len: must be 512 for an image-to-video Wan"):
        synthetic_inputs(tiny_wan_i2v(), wan_recipe(calibration__text_len=6), "train")
    model = tiny_wan_ti2v()
    batch = synthetic_inputs(model, wan_recipe(calibration__samples=4, calibration__batch_size=2), "train")[0]
    ts = batch["timestep"]
    assert ts.shape == (2, 2 * 4 * 4)  # 2 x 8 x 8 latent -> 2 x 4 x 4 tokens
    assert bool((ts[0, :16] == 0).all()) and bool((ts[0, 16:] > 0).all())  # image-conditioned: first frame clean
    assert bool((ts[1] == ts[1, 0]).all()) and float(ts[1, 0]) > 0  # text-to-video: one level
    check_input(model, {k: v[:1] for k, v in batch.items()}, "x")


def test_noise_shape_is_the_latent_without_the_conditioning():
    hs = torch.zeros(1, TINY_I2V_CHANNELS, 2, 4, 4)
    assert noise_shape(tiny_wan_i2v(), hs) == (1, 4, 2, 4, 4)
    assert noise_shape(tiny_wan(), torch.zeros(1, 4, 2, 4, 4)) == (1, 4, 2, 4, 4)


def test_conditioning_images_folder_and_synthetic(tmp_path):
    from PIL import Image

    a = synthetic_image(0, "train", 0, 32, 48)
    assert a.size == (48, 32) and a.mode == "RGB"
    assert a.tobytes() == synthetic_image(0, "train", 0, 32, 48).tobytes()  # seeded: validate sees the same image
    assert a.tobytes() != synthetic_image(0, "train", 1, 32, 48).tobytes()  # one per prompt
    assert a.tobytes() != synthetic_image(0, "heldout", 0, 32, 48).tobytes()
    a.save(tmp_path / "b.JPG")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.JPG"]  # sorted, png / jpg only
    assert read_images(tmp_path)[0].getpixel((0, 0)) == (0, 255, 0)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "c.png")
        with pytest.raises(CalibrationError, match="c.png is a FIFO, not a regular file"):
            image_files(tmp_path)
