"""Wan2.2 I2V A14B-style pipelines (two experts AND an image), end to end on the CPU.

A WanImageToVideoPipeline folder as Wan-AI/Wan2.2-I2V-A14B-Diffusers has it, in small, saved with
save_pretrained: two different tiny 4-block experts (`transformer`, `transformer_2`) of 12 input
channels (4 noise + 4 mask + 4 image latent), no image_dim, no image encoder / image processor
(Wan2.2 I2V conditions on the image's VAE latent only), boundary_ratio 0.5. Converted by
`hla-convert convert` with the shipped `wan2.2-i2v-a14b` recipe cut to tiny sizes, calibrated on
the pipeline's own trajectories (as shipped) once with `--images DIR` and once with the synthetic
image: both experts converted, each calibrated only on its side of the boundary on inputs that
carry the image conditioning, `load_converted` / `validate` / `sample` read the folder back.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TWO_EXPERT_CUT, invoke
from safetensors.torch import load_file
from tiny_models import (
    TINY_I2V_CHANNELS,
    forward,
    save_tiny_wan_i2v_pipeline,
    tiny_wan22_i2v,
)

import hla_convert
import hla_convert.stages.calibration as calibration_module
from hla_convert.model.layers import hla_parameters
from hla_convert.recipe import load_recipe

LAYERS = 4  # the recipe gives 2 layers back to softmax
BOUNDARY = 500.0  # boundary_ratio 0.5 x 1000 train timesteps
EXPERTS = ("transformer", "transformer_2")
CUT = TWO_EXPERT_CUT


def _experts():
    return tiny_wan22_i2v(seed=0, num_layers=LAYERS), tiny_wan22_i2v(seed=1, num_layers=LAYERS)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Both conversions, with the calibration inputs each one recorded (kept from the run itself)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("experts-i2v")
    save_tiny_wan_i2v_pipeline(root / "model", *_experts(), boundary_ratio=0.5)
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (24, 16), (220, 40, 30)).save(images / "a.png")
    Image.linear_gradient("L").resize((20, 20)).convert("RGB").save(images / "b.png")
    recipe = root / "cut.yaml"
    recipe.write_text(load_recipe("wan2.2-i2v-a14b").with_overrides(fields=CUT).to_yaml())
    runs, build = {}, calibration_module.build_expert_input_sets
    for name, extra in (("given", ("--images", images)), ("synthetic", ())):
        seen = {}

        def keep(*args, seen=seen, **kwargs):
            seen.update(build(*args, **kwargs))
            return seen

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(calibration_module, "build_expert_input_sets", keep)
            done = invoke("convert", root / "model", "--recipe", recipe, "--out", root / name, "--device", "cpu", "--json", *extra)
        assert done.exit_code in (0, 1), done.stderr  # tiny steps: a threshold may fail; the folder is written
        runs[name] = (root / name, json.loads(done.stdout), seen)
    return root, runs


@pytest.mark.parametrize("run", ["given", "synthetic"])
def test_i2v_both_experts_are_converted(two, run):
    _, runs = two
    out, doc, _ = runs[run]
    assert doc["model"]["experts"] == list(EXPERTS)
    first, second = hla_convert.read_adapter_info(out), hla_convert.read_adapter_info(out / "transformer_2")
    assert (first["extra"]["expert"], second["extra"]["expert"]) == EXPERTS
    assert first["base_fingerprint"] != second["base_fingerprint"]
    assert len(first["modules"]) == len(second["modules"]) == LAYERS - 2
    report = json.loads((out / "drift_report.json").read_text())
    assert set(report["experts"]) == set(EXPERTS) and report["pipeline"]["steps"] == 2  # the I2V pipeline sampled
    assert all(b["t_min"] >= 0.5 for b in report["experts"]["transformer"]["output"]["buckets"])
    assert all(b["t_max"] <= 0.5 for b in report["experts"]["transformer_2"]["output"]["buckets"])
    assert "WanImageToVideoPipeline.from_pretrained" in (out / "README.md").read_text()


def test_i2v_each_expert_is_calibrated_on_its_side_with_the_image(two):
    root, runs = two
    recipe = load_recipe(str(runs["given"][0] / "recipe.yaml"))
    assert recipe.calibration.images == str(root / "images") and recipe.calibration.source == "trajectories"
    for run in ("given", "synthetic"):
        sets = runs[run][2]
        for name, high in zip(EXPERTS, (True, False)):
            for split, want in (("train", 4), ("heldout", 2)):
                items = sets[name][split]
                ts = torch.cat([item["timestep"].reshape(-1) for item in items])
                assert len(ts) == want, (run, name, split)
                assert bool((ts >= BOUNDARY).all()) if high else bool((ts < BOUNDARY).all()), (run, name, split, ts)
                for item in items:
                    hs = item["hidden_states"]
                    assert hs.shape[1:] == (TINY_I2V_CHANNELS, 2, 4, 4)  # 4 noise + 4 mask + 4 image latent
                    assert bool((hs[:, 4:8, 0] == 1).all()) and bool((hs[:, 4:8, 1:] == 0).all())  # the mask: frame 0 given
                    assert "encoder_hidden_states_image" not in item  # Wan2.2 I2V: no CLIP tokens
    # the image is what conditions them: a.png's latent is not the synthetic image's
    given, synthetic = runs["given"][2]["transformer"]["train"][0], runs["synthetic"][2]["transformer"]["train"][0]
    assert not torch.allclose(given["hidden_states"][:, 8:], synthetic["hidden_states"][:, 8:])


def test_i2v_load_converted_restores_both_experts(two):
    _, runs = two
    out = runs["given"][0]
    pipe = hla_convert.load_converted(out, device="cpu")
    assert type(pipe).__name__ == "WanImageToVideoPipeline" and pipe.config.boundary_ratio == 0.5
    assert pipe.image_encoder is None and pipe.image_processor is None
    g = torch.Generator().manual_seed(3)
    inputs = {
        "hidden_states": torch.randn(2, TINY_I2V_CHANNELS, 2, 4, 4, generator=g),
        "timestep": torch.tensor([700.0, 300.0]),
        "encoder_hidden_states": torch.randn(2, 6, 16, generator=g),
    }
    for name, base in zip(EXPERTS, _experts()):
        net = getattr(pipe, name)
        saved = load_file(str((out if name == "transformer" else out / name) / "adapter_model.safetensors"))
        params = hla_parameters(net)
        assert params and all(torch.equal(p.detach().float(), saved[k]) for k, p in params.items()), name
        alone = hla_convert.load_converted(out, device="cpu", expert=name)
        assert torch.equal(forward(net, inputs), forward(alone, inputs)), name  # the expert alone, bit for bit
        hla_convert.set_attention_mode(net, "teacher")
        assert torch.equal(forward(net, inputs), forward(base, inputs)), name  # on its own base, bit for bit


@pytest.mark.parametrize("run", ["given", "synthetic"])
def test_i2v_validate_reproduces_the_drift_of_each_expert(two, run):
    _, runs = two
    out, doc, _ = runs[run]
    done = invoke("validate", out, "--device", "cpu", "--json")
    assert done.exit_code == (0 if doc["passed"] else 1), done.stderr
    again = {row["metric"]: row["value"] for row in json.loads(done.stdout)["drift"]["table"]}
    saved = {row["metric"]: row["value"] for row in doc["drift"]["table"]}
    assert set(again) == set(saved) and any(m.startswith("pipeline: ") for m in saved)
    for metric, value in saved.items():
        assert again[metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric


def test_i2v_sample_runs_both_experts(two):
    root, runs = two
    video = root / "s.gif"
    done = invoke("sample", runs["given"][0], "--out", video, "--steps", 2, "--device", "cpu", "--json")
    assert done.exit_code == 0, done.stderr
    assert video.is_file() and video.stat().st_size > 0
    assert json.loads(done.stdout)["pipeline"] == "WanImageToVideoPipeline"
