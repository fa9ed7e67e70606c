"""A conversion as deep as the real ones, through the command line, with the shipped Wan recipe.

The demo has 3 layers and the fidelity benchmark's teachers 6: both stay under the 20 LoRA targets
at which peft shortens target names, which once made every real conversion write an adapter that
could not be loaded. Here a WanPipeline folder with a 20-block tiny transformer (saved with
save_pretrained, as a user's folder is) runs the shipped `wan2.1-t2v-1.3b` recipe with only its
video size, calibration counts, step counts and LoRA rank cut down (calibration from the pipeline's own
trajectories, as shipped): 2 layers kept softmax, 18 hybrid layers, LoRA on 72 linears. What the user gets is measured
from the saved folder: `validate` (a fresh load) reproduces the saved drift, `load_converted` gives
the adapters on exactly the converted layers, and `sample` runs.
"""

from __future__ import annotations

import json

import pytest
import torch

import hla_convert
from hla_convert.model.layers import hla_layers
from hla_convert.model.lora import adapted_modules
from hla_convert.recipe import load_recipe
from helpers import invoke
from tiny_models import forward, save_tiny_wan_pipeline, tiny_inputs, tiny_wan

LAYERS = 20
CUT = {  # the shipped recipe at tiny sizes: 5 frames x 32 x 32 pixels -> 2 x 4 x 4 latents, 8 tokens
    "calibration.frames": 5,
    "calibration.height": 32,
    "calibration.width": 32,
    "calibration.samples": 4,  # 2 batches: the output-effect selection runs 40 forwards of 20 blocks per batch
    "calibration.heldout": 4,
    "calibration.batch_size": 2,
    "calibration.text_len": 6,
    "calibration.trajectory_steps": 2,
    "stage1.steps": 4,
    "stage1.batch_size": 2,
    "stage1.checkpoint_every": 2,
    "stage2.steps": 3,
    "stage2.batch_size": 2,
    "stage2.checkpoint_every": 2,
    "stage2.train": "lora",  # the LoRA path past 20 targets (the shipped recipe trains full since 2026-12-07)
    "stage2.lora_rank": 8,  # the shipped 32 is past the tiny model's 24 features (refused, as it should be)
    "validation.sampling_steps": 2,
}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    save_tiny_wan_pipeline(root / "model", tiny_wan(num_layers=LAYERS))
    recipe = root / "wan-cut.yaml"
    rec = load_recipe("wan2.1-t2v-1.3b")
    recipe.write_text(rec.with_overrides(fields=CUT).to_yaml())
    out = root / "out"
    done = invoke("convert", root / "model", "--recipe", recipe, "--out", out, "--device", "cpu", "--json")
    assert done.exit_code in (0, 1), done.stderr  # tiny steps: the recipe's thresholds may fail; the folder is written
    return root, out, json.loads(done.stdout), rec


def test_the_shipped_recipe_on_20_layers_saves_exact_lora_names(deep):
    _, out, doc, rec = deep
    info = hla_convert.read_adapter_info(out)
    converted = info["modules"]
    assert rec.attention.softmax_layers == 2 and len(converted) == LAYERS - 2, converted
    want = sorted(f"{c}.{t}" for c in converted for t in ("to_q", "to_k", "to_v", "to_out.0"))
    assert info["lora"]["modules"] == want and len(want) == 72 > 20


def test_validate_loads_the_folder_and_reproduces_its_drift(deep):
    _, out, doc, _ = deep
    done = invoke("validate", out, "--device", "cpu", "--json")
    assert done.exit_code == (0 if doc["passed"] else 1), done.stderr
    again = json.loads(done.stdout)
    saved = {row["metric"]: row["value"] for row in doc["drift"]["table"]}
    for row in again["drift"]["table"]:
        assert row["value"] == pytest.approx(saved[row["metric"]], rel=1e-4, abs=1e-6), row["metric"]
    # the shipped validation.teacher_steps (2) capped to 2 - 1 sampling steps: the sampled PSNR with
    # the teacher's first step, from the saved folder too
    assert "final latent PSNR dB, first 1 of 2 steps by the teacher" in saved
    assert again["drift"]["sampling"]["teacher_steps"]["steps"] == 1


def test_load_converted_puts_lora_on_exactly_the_converted_layers(deep):
    root, out, _, _ = deep
    model = hla_convert.load_converted(out, device="cpu")
    converted = sorted(hla_layers(model))
    assert len(converted) == LAYERS - 2
    assert sorted(adapted_modules(model)) == sorted(f"{c}.{t}" for c in converted for t in ("to_q", "to_k", "to_v", "to_out.0"))
    kept = [f"blocks.{i}.attn1" for i in range(LAYERS) if f"blocks.{i}.attn1" not in converted]
    assert len(kept) == 2 and not [n for n in adapted_modules(model) if n.rsplit(".", 1)[0].removesuffix(".to_out") in kept]
    inputs = tiny_inputs("wan")
    hla_convert.set_attention_mode(model, "teacher")  # the base again, bit for bit
    assert torch.equal(forward(model, inputs), forward(tiny_wan(num_layers=LAYERS), inputs))


def test_sample_runs_on_the_saved_folder(deep):
    root, out, _, _ = deep
    video = root / "s.gif"
    done = invoke("sample", out, "--out", video, "--steps", 2, "--device", "cpu")
    assert done.exit_code == 0, done.stderr
    assert video.is_file() and video.stat().st_size > 0
