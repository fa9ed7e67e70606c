"""`hla-convert sample` and hla_convert.sampling on a short conversion of the embedded demo model."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hla_convert.cli import app
from hla_convert.recipes import load_recipe
from test_cli import FAST

runner = CliRunner()
STEPS = 3


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    recipe = tmp_path_factory.mktemp("recipe") / "fast.yaml"
    recipe.write_text(load_recipe("tiny-wan").with_overrides(fields=FAST).to_yaml())
    out = tmp_path_factory.mktemp("runs") / "demo-hla"
    # --steps 0: no training; the student is the HLA layers as initialised from calibration data
    result = invoke("convert", "--recipe", recipe, "--out", out, "--steps", 0, "--device", "cpu", "--json")
    assert result.exit_code in (0, 1), result.stderr
    return out


def test_sample_writes_a_video_and_a_contact_sheet_into_the_folder(converted):
    from hla_convert.output import read_output
    from hla_convert.output_guard import foreign_entries, read_manifest
    from hla_convert.sampling import default_video_suffix

    result = invoke("sample", converted, "--steps", STEPS, "--seed", 2, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    video = converted / f"sample{default_video_suffix()}"
    sheet = converted / "sample.png"
    assert doc["files"] == {"video": str(video), "contact_sheet": str(sheet)}
    assert (doc["frames"], doc["height"], doc["width"], doc["steps"]) == (8, 16, 16, STEPS)
    assert len(doc["psnr_db"]) == 8 and all(0 < p <= 200 for p in doc["psnr_db"])
    frames = iio.imread(video, index=None)
    # teacher | 4 px separator | student, each 16 px frame upscaled x8 (nearest)
    assert frames.shape == (8, 128, 128 + 4 + 128, 3)
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width >= 8 * 128 and im.height >= 2 * 128
    # registered as hla-convert's own: `convert --overwrite` may replace them, the card links them
    assert {video.name, sheet.name} <= set(read_manifest(converted))
    assert foreign_entries(converted) == []
    card = (converted / "README.md").read_text()
    assert "](sample.png)" in card and video.name in card
    read_output(converted)  # still a finished conversion that validate and load_converted accept


def test_teacher_half_is_the_plain_softmax_base_from_the_same_noise(converted, tmp_path):
    import diffusers
    from diffusers import WanTransformer3DModel

    from hla_convert import demo_data
    from hla_convert.drift import sample_latents
    from hla_convert.sampling import latents_to_frames, sample_side_by_side, upscale, write_contact_sheet

    result = sample_side_by_side(converted, seed=5, steps=STEPS, device="cpu")
    base = WanTransformer3DModel.from_pretrained(demo_data.demo_model_dir()).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    plain = sample_latents(base, result.inputs, scheduler, STEPS, result.noise).float()
    torch.testing.assert_close(result.teacher_latents, plain, atol=1e-6, rtol=0)
    assert not torch.equal(result.student_latents, result.teacher_latents)  # the student did run
    assert min(result.psnr_db) < 200
    # the contact sheet's teacher row is exactly those frames (PNG: lossless)
    write_contact_sheet(tmp_path / "s.png", result)
    sheet = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    big = upscale(latents_to_frames(plain))
    for i in range(8):
        x = 60 + i * (128 + 4)
        assert np.array_equal(sheet[:128, x : x + 128], big[i])
    # another seed: other noise and prompt, another sample
    other = sample_side_by_side(converted, seed=6, steps=STEPS, device="cpu")
    assert not torch.equal(other.noise, result.noise)


def test_sample_gif_to_another_place(converted, tmp_path):
    target = tmp_path / "look" / "demo.gif"
    target.parent.mkdir()
    result = invoke("sample", converted, "--steps", 2, "--out", target, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    frames = iio.imread(target, index=None)
    assert frames.shape[1:] == (128, 260, 3) and 1 <= frames.shape[0] <= 8
    assert (tmp_path / "look" / "demo.png").is_file()
    assert "PSNR" in result.stdout


@pytest.mark.parametrize(
    "args, contains",
    [
        (["{empty}"], "no adapter"),
        (["{dir}", "--out", "{tmp}/x.avi"], ".mp4 or .gif"),
        (["{dir}", "--steps", "0"], "--steps"),
        (["{dir}", "--out", "{tmp}"], "folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(converted, tmp_path, args, contains):
    empty = tmp_path / "empty"
    empty.mkdir()
    words = [a.format(dir=converted, empty=empty, tmp=tmp_path) for a in args]
    if words[-1] == str(tmp_path):  # an existing folder as --out: named .gif so only the folder check can refuse it
        (tmp_path / "d.gif").mkdir()
        words[-1] = str(tmp_path / "d.gif")
    result = invoke("sample", *words, "--json")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert doc["command"] == "sample" and doc["exit_code"] == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert contains.lower() in doc["error"].lower(), doc["error"]
