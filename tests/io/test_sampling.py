"""`hla-convert sample` and hla_convert.io.sampling on a short conversion of the embedded demo model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from hla_convert.recipe import load_recipe
from helpers import FAST, invoke

STEPS = 3


@pytest.fixture(scope="module")
def converted(converted, tmp_path_factory) -> Path:
    """A copy of the session's demo conversion (conftest): `sample` writes into the folder."""
    return Path(shutil.copytree(converted[0], tmp_path_factory.mktemp("runs") / "demo-hla"))


def test_sample_writes_a_video_and_a_contact_sheet_into_the_folder(converted):
    from hla_convert.io.converted import read_output
    from hla_convert.io.output_guard import foreign_entries, read_manifest

    result = invoke("sample", converted, "--steps", STEPS, "--seed", 2, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    video = converted / "sample.mp4"  # MP4 by default: imageio-ffmpeg (its bundled ffmpeg) is a dependency
    sheet = converted / "sample.png"
    assert doc["files"] == {"video": str(video), "contact_sheet": str(sheet)}
    assert (doc["frames"], doc["height"], doc["width"], doc["steps"]) == (8, 16, 16, STEPS)
    assert len(doc["psnr_db"]) == 8 and all(0 < p <= 200 for p in doc["psnr_db"])
    assert video.read_bytes()[4:8] == b"ftyp"  # an MP4 (ISO media) container, not a GIF under another name
    meta = iio.immeta(video, plugin="FFMPEG")
    assert meta["codec"] == "h264" and meta["fps"] == 4
    frames = iio.imread(video, index=None, plugin="FFMPEG")
    # every sampled frame, teacher | 4 px separator | student, each 16 px frame upscaled x8 (nearest)
    assert frames.shape == (doc["frames"], 128, 128 + 4 + 128, 3)
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

    from hla_convert.stages import demo_data
    from hla_convert.stages.drift import sample_latents
    from hla_convert.io.sampling import latents_to_frames, sample_side_by_side, upscale, write_contact_sheet

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


def test_mp4_of_an_odd_frame_size_keeps_every_pixel_and_frame(tmp_path):
    """H.264 (yuv420p) needs even sides: frames are padded white to even, never rescaled by ffmpeg."""
    from hla_convert.io.sample_media import encode_video

    frames = np.zeros((5, 45, 67, 3), dtype=np.uint8)
    frames[:, :, :33] = 200
    (tmp_path / "odd.mp4").write_bytes(encode_video(frames, ".mp4"))
    back = iio.imread(tmp_path / "odd.mp4", index=None, plugin="FFMPEG")
    assert back.shape == (5, 46, 68, 3)
    # the picture is where it was (lossy codec: near, not equal); the padding is white
    assert np.abs(back[:, :45, :67].astype(int) - frames).mean() < 8
    assert back[:, 45, :].min() > 200 and back[:, :, 67].min() > 200


def test_without_an_mp4_encoder_mp4_is_refused_in_one_line_and_gif_still_works(monkeypatch, tmp_path):
    from hla_convert.io import sample_media

    monkeypatch.setattr(sample_media.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(sample_media.SampleError, match="imageio-ffmpeg.*use a .gif name") as info:
        sample_media.check_video_path(tmp_path / "s.mp4")
    assert "\n" not in str(info.value)
    assert sample_media.check_video_path(tmp_path / "s.GIF") == tmp_path / "s.GIF"


@pytest.mark.parametrize(
    "args, contains",
    [
        (["{empty}"], "no adapter"),
        (["{dir}", "--out", "{tmp}/x.avi"], ".mp4 or .gif"),
        (["{dir}", "--steps", "0"], "--steps"),
        (["{dir}", "--out", "{tmp}"], "folder"),
        (["{dir}", "--out", "{tmp}/extra_key.safetensors/s.mp4"], "is not a folder"),  # its folder is a file
        (["{dir}", "--out", "{tmp}/extra_key.safetensors/new/s"], "cannot be written"),
        # issue 18: these were exit 3 from inside torch / the model
        (["{dir}", "--seed", "99999999999999999999999"], "seed must be an integer from 0 to"),
        (["{dir}", "--inputs", "{tmp}/extra_key.safetensors"], "--inputs holds 'guidance'"),
        (["{dir}", "--inputs", "{tmp}/int64.safetensors"], "hidden_states is int64"),
        (["{dir}", "--inputs", "{tmp}/odd_height.safetensors"], "hidden_states has shape [1, 3, 8, 15, 16]"),
        (["{dir}", "--inputs", "{tmp}/text_dim.safetensors"], "encoder_hidden_states has shape [1, 8, 7]"),
        # the fresh hostile pass: a NaN input sampled a NaN video (exit 0); a frame past the demo's
        # RoPE (64 patches a side) failed inside the model (exit 3)
        (["{dir}", "--inputs", "{tmp}/nan.safetensors"], "hidden_states holds NaN or infinite values"),
        (["{dir}", "--inputs", "{tmp}/too_wide.safetensors"], "H and W at most 128"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(converted, tmp_path, args, contains):
    from safetensors.torch import save_file

    empty = tmp_path / "empty"
    empty.mkdir()
    for name, tensors in {
        "extra_key": {"guidance": torch.zeros(1)},
        "int64": {"hidden_states": torch.zeros(1, 3, 8, 16, 16, dtype=torch.int64)},
        "odd_height": {"hidden_states": torch.zeros(1, 3, 8, 15, 16)},
        "text_dim": {"encoder_hidden_states": torch.zeros(1, 8, 7)},
        "nan": {"hidden_states": torch.full((1, 3, 8, 16, 16), float("nan"))},
        "too_wide": {"hidden_states": torch.zeros(1, 3, 2, 16, 130)},
    }.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
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


# -- a whole diffusers pipeline ---------------------------------------------------------------------

PIPE_SIZE = {"calibration.synthetic": "gaussian", "calibration.frames": 5, "calibration.height": 32, "calibration.width": 32,
             "calibration.vae_scale_temporal": 4, "calibration.vae_scale_spatial": 8}  # fmt: skip


@pytest.fixture(scope="module")
def pipeline_conversion(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A tiny real WanPipeline (save_pretrained), converted with `convert --sample`."""
    pytest.importorskip("transformers")
    from tiny_models import save_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    save_tiny_wan_pipeline(root / "wan-pipe")
    recipe = root / "pipe.yaml"
    recipe.write_text(load_recipe("tiny-wan").with_overrides(fields={**FAST, **PIPE_SIZE, "validation.sampling_steps": 2}).to_yaml())
    out = root / "wan-hla"
    result = invoke("convert", root / "wan-pipe", "--recipe", recipe, "--out", out, "--steps", 0, "--device", "cpu", "--sample", "--json")
    assert result.exit_code in (0, 1), result.stderr
    return root / "wan-pipe", out, json.loads(result.stdout)


def test_convert_sample_puts_a_pipeline_sample_in_the_folder_and_card(pipeline_conversion):
    from hla_convert.io.output_guard import foreign_entries
    from hla_convert.io.sampling import default_video_suffix

    _, out, doc = pipeline_conversion
    sample = doc["sample"]
    assert (sample["pipeline"], sample["frames"], sample["height"], sample["width"], sample["steps"]) == ("WanPipeline", 5, 32, 32, 2)
    frames = iio.imread(out / f"sample{default_video_suffix()}", index=None)
    assert frames.shape[1:] == (128, 260, 3) and 1 <= frames.shape[0] <= 5  # 32 px frames upscaled x4
    card = (out / "README.md").read_text()
    assert "## Sample" in card and "](sample.png)" in card and "FlowMatchEulerDiscreteScheduler steps through the whole WanPipeline" in card
    assert foreign_entries(out) == []


def test_pipeline_teacher_is_the_plain_pipeline_from_the_same_seed(pipeline_conversion, tmp_path):
    from diffusers import WanPipeline

    from hla_convert.io.sampling import sample_side_by_side, video_frames

    pipe_dir, out, _ = pipeline_conversion
    result = sample_side_by_side(out, prompt="a red fox runs", seed=3, steps=2, device="cpu")
    assert result.teacher.shape == (5, 32, 32, 3) and result.prompt == "a red fox runs"
    plain = WanPipeline.from_pretrained(pipe_dir)  # the unconverted base, as diffusers loads it
    plain.set_progress_bar_config(disable=True)
    call = dict(prompt="a red fox runs", num_frames=5, height=32, width=32, num_inference_steps=2, output_type="np")
    expected = video_frames(plain(**call, generator=torch.Generator().manual_seed(3)))
    assert np.abs(result.teacher.astype(int) - expected.astype(int)).max() <= 1  # uint8 rounding of ~1e-6 differences
    assert not np.array_equal(result.student, result.teacher) and min(result.psnr_db) < 200
    other = video_frames(plain(**call, generator=torch.Generator().manual_seed(4)))
    assert np.abs(other.astype(int) - expected.astype(int)).max() > 1  # the seed is the noise


def test_pipeline_sample_from_an_inputs_file(pipeline_conversion, tmp_path):
    from safetensors.torch import save_file

    _, out, _ = pipeline_conversion
    g = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(1, 7, 16, generator=g)}, str(tmp_path / "embeds.safetensors"))
    result = invoke("sample", out, "--inputs", tmp_path / "embeds.safetensors", "--steps", 1, "--out", tmp_path / "e.gif", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["prompt"] is None and doc["frames"] == 5 and (tmp_path / "e.png").is_file()
    save_file({"hidden_states": torch.zeros(1, 4, 2, 4, 4)}, str(tmp_path / "bad.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for args, contains in (
        (["--inputs", tmp_path / "bad.safetensors"], "a pipeline takes prompt_embeds"),
        (["--inputs", tmp_path / "junk.safetensors"], "not a readable safetensors file"),
        (["--inputs", tmp_path / "embeds.safetensors", "--prompt", "a fox"], "not both"),
    ):
        bad = invoke("sample", out, *args, "--out", tmp_path / "x.gif")
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and contains in lines[0], bad.stderr


def test_what_cannot_be_sampled_is_refused_in_one_line(converted, tmp_path):
    from tiny_models import tiny_wan

    demo = invoke("sample", converted, "--prompt", "a fox", "--out", tmp_path / "x.gif")
    assert demo.exit_code == 2 and "--prompt applies to pipelines" in demo.stderr
    tiny_wan().save_pretrained(tmp_path / "bare")
    bare = invoke("convert", tmp_path / "bare", "--recipe", "tiny-wan", "--out", tmp_path / "o", "--sample")
    assert bare.exit_code == 2 and "bare transformer" in bare.stderr and len(bare.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before the run


def test_base_can_be_a_copy_of_the_demo_folder(converted, tmp_path):
    from hla_convert.stages import demo_data
    from hla_convert.io.sampling import sample_side_by_side

    copy = shutil.copytree(demo_data.demo_model_dir(), tmp_path / "demo-copy")
    moved = sample_side_by_side(converted, base=str(copy), seed=1, steps=1, device="cpu")
    here = sample_side_by_side(converted, seed=1, steps=1, device="cpu")
    assert np.array_equal(moved.teacher, here.teacher) and np.array_equal(moved.student, here.student)


def test_sample_never_replaces_a_user_edited_card_or_their_own_png(converted, tmp_path):
    import shutil

    for name, content in (("README.md", b"my edited card\n"), ("sample.png", b"my own picture")):
        folder = tmp_path / name
        shutil.copytree(converted, folder)
        for old in folder.glob("sample.*"):  # a folder as convert leaves it, before any sample
            old.unlink()
        (folder / name).write_bytes(content)
        result = invoke("sample", folder, "--steps", 1, "--device", "cpu")
        assert result.exit_code == 2, result.stderr
        line = result.stderr.strip()
        assert line.startswith("hla-convert: error: ") and "\n" not in line and name in line and "--out" in line
        assert (folder / name).read_bytes() == content
        assert not [p for p in folder.glob("sample.*") if p.name != name]  # refused before sampling: nothing written


@pytest.mark.parametrize("args", [["--out", "x" * 5000], ["--out", "x" * 5000 + ".gif"], ["--inputs", "x" * 5000]])
def test_a_name_past_the_file_system_limit_is_bad_input(tmp_path, args):
    """Found with tests/fuzzing.py's long names (the recipe loader had the same OSError): the
    is_dir() / is_file() checks on --out and --inputs raised ENAMETOOLONG, reported as a failed
    run (exit 3)."""
    result = invoke("sample", tmp_path, *args)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "is not a usable path (File name too long)" in lines[0], result.stderr


# -- teacher steps: the first k sampling steps by the base model (model.teacher_steps) -------------


def test_teacher_steps_run_the_first_steps_by_the_plain_base_then_the_conversion(converted):
    import diffusers
    from diffusers import WanTransformer3DModel

    from hla_convert import load_converted
    from hla_convert.stages import demo_data
    from hla_convert.io.sampling import sample_side_by_side

    k = 2
    result = sample_side_by_side(converted, seed=5, steps=STEPS, device="cpu", teacher_steps=k)
    plain = sample_side_by_side(converted, seed=5, steps=STEPS, device="cpu")
    assert result.teacher_steps == k and torch.equal(result.teacher_latents, plain.teacher_latents)
    # the reference: one scheduler stepped by hand, the unconverted base for steps < k, the
    # conversion (student) for the rest
    base = WanTransformer3DModel.from_pretrained(demo_data.demo_model_dir()).eval()
    student = load_converted(converted, device="cpu")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(STEPS)
    item = result.inputs
    latents = result.noise.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            net = base if i < k else student
            ts = t.to(item["timestep"].dtype).expand(latents.shape[0])
            out = net(**{**item, "hidden_states": latents.to(item["hidden_states"].dtype), "timestep": ts}, return_dict=False)[0]
            latents = sched.step(out.float(), t, latents, return_dict=False)[0]
    torch.testing.assert_close(result.student_latents, latents, atol=1e-6, rtol=0)
    assert not torch.equal(result.student_latents, plain.student_latents)  # the teacher's steps changed the run
    assert result.summary()["teacher_steps"] == k


def test_sample_teacher_steps_from_the_command_line(converted, tmp_path):
    result = invoke("sample", converted, "--steps", STEPS, "--teacher-steps", 1, "--out", tmp_path / "t.gif", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["teacher_steps"] == 1 and doc["steps"] == STEPS
    for k in (STEPS, STEPS + 4):  # every step by the teacher is no conversion at all
        bad = invoke("sample", converted, "--steps", STEPS, "--teacher-steps", k, "--out", tmp_path / "x.gif")
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and f"must be below the {STEPS} sampling steps" in lines[0], bad.stderr
    bad = invoke("sample", converted, "--teacher-steps", -1, "--out", tmp_path / "x.gif")
    assert bad.exit_code == 2 and "Traceback" not in bad.stderr


def test_pipeline_teacher_steps_equal_switching_modes_between_steps(pipeline_conversion):
    """The hooks (model.teacher_steps) against an independent way to do the same: the pipeline's own
    step-end callback switching the conversion from teacher to student after step k - 1."""
    from hla_convert import hla_layers, load_converted, set_attention_mode, teacher_steps
    from hla_convert.io.sampling import load_pipeline, sample_side_by_side, video_frames
    from hla_convert.model.loading import resolve_model

    pipe_dir, out, _ = pipeline_conversion
    steps, k = 3, 1
    result = sample_side_by_side(out, prompt="a red fox runs", seed=3, steps=steps, device="cpu", teacher_steps=k)
    model = load_converted(out, device="cpu")
    pipe = load_pipeline(model, resolve_model(str(pipe_dir)), torch.device("cpu"))
    call = dict(prompt="a red fox runs", num_frames=5, height=32, width=32, num_inference_steps=steps, output_type="np")

    def switch(p, i, t, kwargs):
        if i == k - 1:
            set_attention_mode(model, "student")
        return {}

    set_attention_mode(model, "teacher")
    expected = video_frames(pipe(**call, generator=torch.Generator().manual_seed(3), callback_on_step_end=switch))
    assert np.abs(result.student.astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(result.student, result.teacher)
    # what ran where: both forwards of each guided step fall on the same step; student mode after
    own_hooks = dict(model._forward_pre_hooks)  # the token-grid hook of the conversion
    with teacher_steps(pipe, k) as hooks:
        pipe(**call, generator=torch.Generator().manual_seed(3))
    seen = sorted(set(hooks.steps_seen))
    assert seen == [(0, "teacher"), (1, "student"), (2, "student")], hooks.steps_seen
    assert {layer.mode for layer in hla_layers(model).values()} == {"student"} and dict(model._forward_pre_hooks) == own_hooks
