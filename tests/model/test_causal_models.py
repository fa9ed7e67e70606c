"""Block-causal masks through the seam: a tiny SkyReels-V2 model in diffusion-forcing mode converts
(softmax bit-exact, HLA kinds block-causal) and streams frame block by frame block."""

from __future__ import annotations

import pytest
import torch

from hla_convert import HLAConfig
from hla_convert.model.streaming import BlockStream
from hla_convert.model.surgery import attention_mask_structure, convert_attention

FRAMES, PER_BLOCK = 4, 2  # latent frames, frames per causal block
TOKENS_PER_BLOCK = PER_BLOCK * 4 * 4  # 8x8 latents, 2x2 patches

KINDS = {
    "hadamard": HLAConfig(kind="hadamard", factors=2, feature_dim=4, feature_map="taylor"),
    "linear": HLAConfig(kind="linear", factors=2, feature_dim=3),
    "higher_order": HLAConfig(kind="higher_order", feature_dim=5),
    "hybrid": HLAConfig(kind="hybrid", factors=2, feature_dim=4, feature_map="taylor"),
}


def _skyreels_df(seed: int = 0):
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, num_frame_per_block=PER_BLOCK,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    inputs = dict(
        hidden_states=torch.randn(2, 4, FRAMES, 8, 8, generator=g),
        timestep=torch.tensor([[900, 900, 500, 500], [100, 100, 700, 700]]),  # one noise level per frame
        encoder_hidden_states=torch.randn(2, 12, 16, generator=g),
        enable_diffusion_forcing=True,
    )
    return model.eval(), inputs


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _randomise_hla(model) -> None:
    """Feature maps away from their init values, so that every part of the kinds is exercised."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".hla." in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_softmax_conversion_of_a_diffusion_forcing_model_is_bit_exact():
    model, inputs = _skyreels_df()
    base = _run(model, inputs)
    convert_attention(model, HLAConfig(kind="softmax"))
    assert torch.equal(_run(model, inputs), base)


@pytest.mark.parametrize("kind", list(KINDS))
def test_hla_kinds_run_block_causal(kind):
    model, inputs = _skyreels_df()
    convert_attention(model, KINDS[kind])
    _randomise_hla(model)
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    # later frames cannot reach the first block; they do change their own block
    x = inputs["hidden_states"].clone()
    x[:, :, PER_BLOCK:] += torch.randn(x[:, :, PER_BLOCK:].shape, generator=torch.Generator().manual_seed(5))
    out2 = _run(model, {**inputs, "hidden_states": x})
    assert torch.allclose(out2[:, :, :PER_BLOCK], out[:, :, :PER_BLOCK], rtol=0, atol=1e-6)
    assert (out2[:, :, PER_BLOCK:] - out[:, :, PER_BLOCK:]).abs().max() > 1e-3
    # the same model without the frame-block mask (bidirectional) gives the first block other outputs
    model._set_ar_attention(1)
    bidir = _run(model, inputs)
    assert (bidir[:, :, :PER_BLOCK] - out[:, :, :PER_BLOCK]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", list(KINDS))
def test_streamed_blocks_equal_the_full_pass(kind):
    model, inputs = _skyreels_df()
    convert_attention(model, KINDS[kind])
    _randomise_hla(model)
    full = _run(model, inputs)
    x, t = inputs["hidden_states"], inputs["timestep"]
    outs = []
    with BlockStream(model) as stream, torch.no_grad():
        for f0 in range(0, FRAMES, PER_BLOCK):
            block = dict(inputs, hidden_states=x[:, :, f0 : f0 + PER_BLOCK], timestep=t[:, f0 : f0 + PER_BLOCK])
            # a denoising step of the block at another noise level, not committed: changes nothing
            stream(**dict(block, hidden_states=torch.randn_like(block["hidden_states"])), return_dict=False)
            outs.append(stream(**block, return_dict=False)[0])
            stream.commit()
    streamed = torch.cat(outs, dim=2)
    assert torch.allclose(streamed, full, rtol=0, atol=2e-5), (streamed - full).abs().max()
    # the stream is closed: the model runs its full pass again
    assert torch.allclose(_run(model, inputs), full, rtol=0, atol=0)


def test_streaming_refuses_softmax_layers():
    model, _ = _skyreels_df()
    convert_attention(model, HLAConfig(kind="softmax"))
    with pytest.raises(ValueError, match="softmax layer"):
        BlockStream(model)


B, N = 2, 12


@pytest.mark.parametrize("block", [1, 3, 5])
def test_block_causal_masks_are_recognised(block):
    p = torch.arange(N) // block
    keep = p[None, :] <= p[:, None]
    assert attention_mask_structure(keep[None, None], B, N, N) == (None, block)
    additive = torch.zeros(N, N).masked_fill(~keep, float("-inf"))
    assert attention_mask_structure(additive[None, None], B, N, N) == (None, block)
    assert attention_mask_structure(torch.zeros(N, N).masked_fill(~keep, -10000.0), B, N, N) == (None, block)
    # with key padding on top (batch element 1 pads its last 2 tokens)
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[1, -2:] = False
    key_mask, got = attention_mask_structure(keep[None, None] & pad[:, None, None, :], B, N, N)
    assert got == block and torch.equal(key_mask, pad)


def test_is_causal_and_plain_masks():
    assert attention_mask_structure(None, B, N, N, is_causal=True) == (None, 1)
    assert attention_mask_structure(None, B, N, N) == (None, None)
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[0, :3] = False
    key_mask, block = attention_mask_structure(pad[:, None, None, :], B, N, N)
    assert block is None and torch.equal(key_mask, pad)


@pytest.mark.parametrize("kind", ["sliding", "anticausal", "uneven", "bias"])
def test_other_masks_are_refused_with_one_line(kind):
    i = torch.arange(N)
    if kind == "sliding":
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
    elif kind == "anticausal":
        mask = i[None, :] >= i[:, None]
    elif kind == "uneven":  # blocks of 2 then 4 tokens: no single block size
        p = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4])
        mask = p[None, :] <= p[:, None]
    else:
        mask = torch.zeros(N, N).masked_fill(i[None, :] > i[:, None], float("-inf"))
        mask[3, 1] = 0.5
    with pytest.raises(RuntimeError) as err:
        attention_mask_structure(mask[None, None], B, N, N)
    assert "\n" not in str(err.value)


def test_mask_structure_is_read_once_per_mask_object(monkeypatch):
    """The blocks of one forward share the mask: its [N, N] scan runs once; a changed mask is re-read."""
    from hla_convert.model import attn_masks

    calls = []
    real = attn_masks._mask_structure
    monkeypatch.setattr(attn_masks, "_mask_structure", lambda *a: calls.append(1) or real(*a))
    keep = torch.arange(N)[None, :] // 3 <= torch.arange(N)[:, None] // 3
    mask = keep[None, None].clone()
    for _ in range(3):
        assert attention_mask_structure(mask, B, N, N) == (None, 3)
    assert len(calls) == 1
    mask.copy_(torch.arange(N)[None, :] // 4 <= torch.arange(N)[:, None] // 4)  # in place: a new version
    assert attention_mask_structure(mask, B, N, N) == (None, 4)
    assert len(calls) == 2


def test_calibration_and_stage1_train_through_the_block_causal_form(tmp_path, monkeypatch):
    """Distillation of a diffusion-forcing model: teacher and student both see the frame blocks."""
    from helpers import wan_recipe

    from hla_convert.stages.calibration import build_inputs
    from hla_convert.stages.distill import attention_transfer, initialize_feature_maps
    from hla_convert.model.layers import HLAAttention

    # 13 video frames -> 4 latent frames -> 2 causal blocks of 2 frames
    rec = wan_recipe(model__architecture="SkyReelsV2Transformer3DModel", calibration__frames=13, calibration__text_len=12, stage1__steps=15)
    model, _ = _skyreels_df()
    convert_attention(model, rec.hla_config())
    blocks = []  # the causal block of every student call (None: bidirectional)
    real = HLAAttention.student

    def student(self, q, k, v, key_mask, scale, causal_block=None):
        blocks.append(causal_block)
        return real(self, q, k, v, key_mask, scale, causal_block)

    monkeypatch.setattr(HLAAttention, "student", student)
    inputs = build_inputs(model, rec, "train")
    initialize_feature_maps(model, inputs)
    out = attention_transfer(model, inputs, rec, tmp_path)
    assert out["final_loss"] < out["initial_loss"]
    assert blocks and set(blocks) == {TOKENS_PER_BLOCK}


def test_streaming_refuses_models_without_a_shiftable_rope():
    from tiny_models import tiny_model

    model = tiny_model("cogvideox")  # rotary tables come in as an input, not from a rope module
    convert_attention(model, KINDS["hadamard"])
    with pytest.raises(ValueError, match="no rope module"):
        BlockStream(model)


def _cli_recipe(path, **attention) -> str:
    import yaml

    data = {
        "name": "skyreels-df-test",
        "model": {"architecture": "SkyReelsV2Transformer3DModel"},
        "attention": {"kind": "hadamard", "factors": 2, "feature_dim": 4, **attention},
        # 13 video frames -> 4 latent frames; 64 x 64 pixels -> 8 x 8 latents -> 4 x 4 tokens a frame
        "calibration": {"frames": 13, "height": 64, "width": 64, "samples": 2, "heldout": 2, "batch_size": 2, "text_len": 12},
        "stage1": {"steps": 2, "checkpoint_every": 2},
        "stage2": {"steps": 0},
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_converts_a_diffusion_forcing_model_with_its_causal_blocks(tmp_path):
    """`convert --causal-block-frames` on a SkyReels-V2 checkpoint whose config is bidirectional
    (num_frame_per_block = 1, as published): the teacher and the converted layers see frame blocks,
    the adapter records them, and load_converted / validate restore them; bad values are one line."""
    import json

    import yaml
    from helpers import assert_one_line_error, invoke

    from hla_convert import load_converted

    model, inputs = _skyreels_df()
    model._set_ar_attention(1)
    model.save_pretrained(tmp_path / "sky")
    recipe = _cli_recipe(tmp_path / "r.yaml")
    out = tmp_path / "out"
    result = invoke("convert", tmp_path / "sky", "--recipe", recipe, "--out", out, "--causal-block-frames", PER_BLOCK, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["attention"]["causal_block_frames"] == PER_BLOCK
    assert json.loads((out / "hla_config.json").read_text())["config"]["causal_block_frames"] == PER_BLOCK

    loaded = load_converted(out).float()
    assert loaded.config.num_frame_per_block == PER_BLOCK
    _randomise_hla(loaded)
    x = inputs["hidden_states"].clone()
    x[:, :, PER_BLOCK:] += 1.0
    a, b = _run(loaded, inputs), _run(loaded, {**inputs, "hidden_states": x})
    assert torch.allclose(a[:, :, :PER_BLOCK], b[:, :, :PER_BLOCK], rtol=0, atol=1e-6)  # block-causal again
    assert invoke("validate", out, "--device", "cpu", "--json").exit_code == 0

    args = ("--out", tmp_path / "o2", "--device", "cpu")
    assert_one_line_error(invoke("convert", tmp_path / "sky", "--recipe", recipe, "--causal-block-frames", 3, *args), contains="do not divide the 4 latent frames")
    assert_one_line_error(invoke("convert", "--causal-block-frames", 2, *args), contains="only SkyReels-V2")  # the demo: a Wan model
    # a recipe that names no architecture: refused once the model is loaded
    from tiny_models import tiny_wan

    tiny_wan().save_pretrained(tmp_path / "wan")
    anon = _cli_recipe(tmp_path / "anon.yaml", causal_block_frames=2)
    data = yaml.safe_load(open(anon))
    data["model"]["architecture"] = None
    data["calibration"].update(vae_scale_temporal=4, vae_scale_spatial=8)
    (tmp_path / "anon.yaml").write_text(yaml.safe_dump(data))
    late = invoke("convert", tmp_path / "wan", "--recipe", anon, *args)
    assert late.exit_code == 2 and "Traceback" not in late.stderr
    assert "WanTransformer3DModel has no causal frame-block setting" in late.stderr.strip().splitlines()[-1]  # after the load's line
    assert not (tmp_path / "o2" / "adapter_model.safetensors").exists()


def test_convert_attention_sets_the_causal_blocks_and_refuses_other_models():
    from tiny_models import tiny_model

    from hla_convert import ConfigError
    from hla_convert.recipe import RecipeError, parse_recipe
    from hla_convert.model.surgery import ConversionError

    model, _ = _skyreels_df()
    model._set_ar_attention(1)
    convert_attention(model, HLAConfig(kind="softmax", causal_block_frames=PER_BLOCK))
    assert model.config.num_frame_per_block == PER_BLOCK
    with pytest.raises(ConversionError, match="no causal frame-block setting"):
        convert_attention(tiny_model("wan"), HLAConfig(causal_block_frames=2))
    with pytest.raises(ConfigError, match="causal_block_frames"):
        HLAConfig(causal_block_frames=0)
    base = {"name": "t", "model": {"architecture": "SkyReelsV2Transformer3DModel"}, "calibration": {"frames": 13}}
    assert parse_recipe({**base, "attention": {"causal_block_frames": 2}}).hla_config().causal_block_frames == 2
    with pytest.raises(RecipeError, match="^attention.causal_block_frames: must be a positive integer"):
        parse_recipe({**base, "attention": {"causal_block_frames": "2"}})
