"""Image-to-video conversions end to end, through the command line, on tiny real pipelines saved
with save_pretrained: a Wan2.1-style WanImageToVideoPipeline (CLIP image encoder, 12-channel
transformer with image_dim) calibrated on trajectories conditioned on `--images DIR` and on
synthetic images, and a Wan2.2-TI2V-style WanPipeline (expand_timesteps: a timestep per video
token; 48-channel latents of a 16x-spatial VAE). What the user gets is checked from the saved
folder: `load_converted` equals the model the conversion held in memory, `validate` reproduces
the saved drift.
"""

from __future__ import annotations

import json

import pytest
import torch

import hla_convert
import hla_convert.io.output as output_module
from hla_convert.recipe import load_recipe
from hla_convert.stages.calibration import build_inputs, folder_inputs, noise_levels, save_inputs
from helpers import FAST, assert_one_line_error, invoke
from tiny_models import (
    TINY_CLIP_DIM,
    TINY_CLIP_TOKENS,
    TINY_I2V_CHANNELS,
    TINY_TI2V_CHANNELS,
    save_tiny_wan_i2v_pipeline,
    save_tiny_wan_ti2v_pipeline,
)

CUT = {  # the shipped recipes at tiny sizes, FAST's counts and steps
    **FAST,
    "calibration.frames": 5,
    "calibration.trajectory_steps": 2,  # x (cond + uncond): 4 inputs a pipeline run
    "stage2.lora_rank": 8,  # the shipped 32 is past the tiny model's 24 features
    "attention.softmax_layers": 1,  # of the tiny models' 2 layers one stays converted
}
I2V_CUT = {**CUT, "calibration.height": 32, "calibration.width": 32}  # 8x VAE: 2 x 4 x 4 latent, 2 x 2 x 2 tokens
TI2V_CUT = {**CUT, "calibration.height": 64, "calibration.width": 64, "calibration.text_len": 6}  # 16x VAE: the same grid


def _probe(channels: int, image: bool) -> dict:
    g = torch.Generator().manual_seed(7)
    item = {
        "hidden_states": torch.randn(1, channels, 2, 4, 4, generator=g),
        "timestep": torch.tensor([400.0]),
        "encoder_hidden_states": torch.randn(1, 512 if image else 6, 16, generator=g),
    }
    if image:
        item["encoder_hidden_states_image"] = torch.randn(1, TINY_CLIP_TOKENS, TINY_CLIP_DIM, generator=g)
    return item


def _convert(root, name, pipeline, recipe, cut, probe, *extra):
    """`hla-convert convert` of `pipeline` with the cut recipe into root/name; returns (out, the
    --json document, the student output of the model convert held in memory on `probe`)."""
    path = root / f"{name}.yaml"
    path.write_text(load_recipe(recipe).with_overrides(fields=cut).to_yaml())
    out, seen = root / name, {}
    save = output_module.save_output

    def keep(out_dir, model, *args):
        hla_convert.set_attention_mode(model, "student")
        with torch.no_grad():
            seen["student"] = model(**probe, return_dict=False)[0]
        return save(out_dir, model, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(output_module, "save_output", keep)
        done = invoke("convert", pipeline, "--recipe", path, "--out", out, "--device", "cpu", "--json", *extra)
    assert done.exit_code in (0, 1), done.stderr  # tiny steps: a threshold may fail; the folder is written
    return out, json.loads(done.stdout), seen["student"]


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("i2v")
    save_tiny_wan_i2v_pipeline(root / "pipe")
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (24, 16), (220, 40, 30)).save(images / "a.png")
    Image.linear_gradient("L").resize((20, 20)).convert("RGB").save(images / "b.png")
    probe = _probe(TINY_I2V_CHANNELS, image=True)
    given = _convert(root, "given", root / "pipe", "wan2.1-i2v-14b-480p", I2V_CUT, probe, "--images", images)
    synthetic = _convert(root, "synthetic", root / "pipe", "wan2.1-i2v-14b-480p", I2V_CUT, probe)
    return root, probe, {"given": given, "synthetic": synthetic}


@pytest.mark.parametrize("run", ["given", "synthetic"])
def test_i2v_load_converted_equals_the_converted_model(i2v, run):
    _, probe, runs = i2v
    out, doc, student = runs[run]
    assert doc["model"]["class"] == "WanTransformer3DModel" and doc["attention"]["kind"] == "hybrid"
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-to-video" in card and "WanImageToVideoPipeline.from_pretrained" in card
    model = hla_convert.load_converted(out, device="cpu")
    hla_convert.set_attention_mode(model, "student")
    with torch.no_grad():
        assert torch.equal(model(**probe, return_dict=False)[0], student)


@pytest.mark.parametrize("run", ["given", "synthetic"])
def test_i2v_validate_reproduces_the_saved_drift(i2v, run):
    _, _, runs = i2v
    out, doc, _ = runs[run]
    assert doc["drift"]["sampling"]["steps"] == 2  # the sampled-latent check ran: 4 noise channels + 8 conditioning
    done = invoke("validate", out, "--device", "cpu", "--json")
    assert done.exit_code == (0 if doc["passed"] else 1), done.stderr
    saved = {row["metric"]: row["value"] for row in doc["drift"]["table"]}
    for row in json.loads(done.stdout)["drift"]["table"]:
        assert row["value"] == pytest.approx(saved[row["metric"]], rel=1e-4, abs=1e-6), row["metric"]


def test_i2v_sample_runs_the_image_to_video_pipeline(i2v):
    root, _, runs = i2v
    video = root / "s.gif"
    done = invoke("sample", runs["given"][0], "--out", video, "--steps", 2, "--device", "cpu", "--json")
    assert done.exit_code == 0, done.stderr
    assert video.is_file() and video.stat().st_size > 0
    doc = json.loads(done.stdout)
    assert doc["pipeline"] == "WanImageToVideoPipeline" and doc["frames"] == 5


def test_i2v_trajectories_carry_the_image_conditioning(i2v, tmp_path):
    root, _, runs = i2v
    model = hla_convert.load_converted(runs["given"][0], device="cpu")
    recipes = {name: load_recipe(str(runs[name][0] / "recipe.yaml")) for name in ("given", "synthetic")}
    assert recipes["given"].calibration.images == str(root / "images")  # absolute in the saved recipe
    items = {name: build_inputs(model, rec, "heldout", pipeline_dir=str(root / "pipe")) for name, rec in recipes.items()}
    for batch in items["given"] + items["synthetic"]:
        assert batch["hidden_states"].shape[1:] == (TINY_I2V_CHANNELS, 2, 4, 4)  # 4 noise + 4 mask + 4 image latent
        assert batch["encoder_hidden_states_image"].shape[1:] == (TINY_CLIP_TOKENS, TINY_CLIP_DIM)
        assert batch["encoder_hidden_states"].shape[1] == 512
    # the image is what conditions them: a.png's latent and CLIP tokens are not the synthetic image's
    given, synthetic = items["given"][0], items["synthetic"][0]
    assert not torch.allclose(given["hidden_states"][:, 8:], synthetic["hidden_states"][:, 8:])
    assert not torch.allclose(given["encoder_hidden_states_image"], synthetic["encoder_hidden_states_image"])
    # the inputs round-trip through calibration.source folder with their extra keys
    for split in ("train", "heldout"):
        save_inputs(items["given"], tmp_path / split)
    rec = recipes["given"].with_overrides(fields={"calibration.source": "folder", "calibration.path": str(tmp_path), "calibration.images": None})
    back = folder_inputs(model, rec, "heldout")
    assert len(back) == len(items["given"])
    for a, b in zip(back, items["given"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_i2v_images_that_cannot_be_used_are_one_line_before_the_load(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    done = invoke("convert", "--recipe", "wan2.1-i2v-14b-480p", "--images", bad, "--out", tmp_path / "o")
    assert_one_line_error(done, 2, "0.png: not a readable image")
    (bad / "0.png").unlink()
    done = invoke("convert", "--recipe", "wan2.1-i2v-14b-480p", "--images", bad, "--out", tmp_path / "o")
    assert_one_line_error(done, 2, "calibration.images: no .png / .jpg / .jpeg files")
    done = invoke("convert", "--images", bad, "--out", tmp_path / "o")  # the demo's recipe is synthetic
    assert_one_line_error(done, 2, "calibration.images: conditions an image-to-video pipeline's trajectories")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti2v")
    save_tiny_wan_ti2v_pipeline(root / "pipe")
    probe = _probe(TINY_TI2V_CHANNELS, image=False)
    probe["timestep"] = torch.tensor([[0.0] * 4 + [400.0] * 4])  # per token: the first latent frame clean
    return root, probe, _convert(root, "out", root / "pipe", "wan2.2-ti2v-5b", TI2V_CUT, probe)


def test_ti2v_converts_and_loads_back_equal(ti2v):
    root, probe, (out, doc, student) = ti2v
    assert doc["drift"]["sampling"]["steps"] == 2
    model = hla_convert.load_converted(out, device="cpu")
    hla_convert.set_attention_mode(model, "student")
    with torch.no_grad():
        assert torch.equal(model(**probe, return_dict=False)[0], student)
    # its pipeline's inputs: 48 channels, a timestep per video token (2 x 2 x 2 = 8)
    batch = build_inputs(model, load_recipe(str(root / "out.yaml")), "heldout", pipeline_dir=str(root / "pipe"))[0]
    assert batch["hidden_states"].shape[1:] == (TINY_TI2V_CHANNELS, 2, 4, 4)
    assert batch["timestep"].shape == (batch["hidden_states"].shape[0], 8)


def test_ti2v_validate_reproduces_the_saved_drift(ti2v):
    _, _, (out, doc, _) = ti2v
    done = invoke("validate", out, "--device", "cpu", "--json")
    assert done.exit_code == (0 if doc["passed"] else 1), done.stderr
    saved = {row["metric"]: row["value"] for row in doc["drift"]["table"]}
    for row in json.loads(done.stdout)["drift"]["table"]:
        assert row["value"] == pytest.approx(saved[row["metric"]], rel=1e-4, abs=1e-6), row["metric"]


def test_ti2v_image_mode_keeps_the_first_frame_clean(ti2v):
    root, _, (out, _, _) = ti2v
    save_tiny_wan_ti2v_pipeline(root / "i2v-pipe", image_to_video=True)
    model = hla_convert.load_converted(out, device="cpu")
    batch = build_inputs(model, load_recipe(str(out / "recipe.yaml")), "heldout", pipeline_dir=str(root / "i2v-pipe"))[0]
    ts = batch["timestep"]
    assert ts.shape == (batch["hidden_states"].shape[0], 8)
    assert bool((ts[:, :4] == 0).all()) and bool((ts[:, 4:] > 0).all())  # the image's latent frame: 2 x 2 tokens at 0
    assert bool((noise_levels(batch) > 0).all())  # bucketed by the noisy tokens, not the clean frame


def test_images_for_a_text_to_video_pipeline_are_one_line(ti2v, tmp_path):
    from PIL import Image

    root, _, _ = ti2v
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    done = invoke("convert", root / "pipe", "--recipe", root / "out.yaml", "--images", tmp_path, "--out", tmp_path / "o", "--device", "cpu")
    assert_one_line_error(done, 2, "calibration.images: WanPipeline is not an image-to-video pipeline")  # before the load
    assert not (tmp_path / "o").exists()
