"""`hla-convert convert` end to end on the embedded demo model: the output folder and its manifest,
load_converted on it, --out safety, a local pipeline folder as MODEL, --steps 0, a NaN base
(exit 1), stage 3.

One short conversion (a test recipe: the demo's, with few samples and steps) is shared by the
tests (conftest's `converted`); it runs as a real subprocess of the installed `hla-convert` entry
point. Everything else goes through typer's CliRunner, in process.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from safetensors.torch import load_file

from hla_convert.recipe import load_recipe
from helpers import FAST, assert_one_line_error, invoke
from tiny_models import tiny_wan

# -- convert ------------------------------------------------------------------------------------


def test_convert_writes_the_output_folder(converted):
    out, doc = converted
    assert doc["command"] == "convert" and doc["exit_code"] == 0 and doc["passed"] is True
    assert doc["device"] == "cpu" and doc["dtype"] == "float32"
    names = sorted(p.name for p in out.iterdir())
    outputs = sorted(["README.md", "adapter_model.safetensors", "drift_report.json", "hla_config.json", "recipe.yaml"])
    assert names == sorted([*outputs, ".hla-convert-manifest.json"])  # no lock, no work folder left
    manifest = json.loads((out / ".hla-convert-manifest.json").read_text())
    assert sorted(manifest["files"]) == outputs
    for name, hashes in manifest["files"].items():
        assert hashes == [hashlib.sha256((out / name).read_bytes()).hexdigest()]
    report = json.loads((out / "drift_report.json").read_text())
    assert report["passed"] is True and report["training"]["stage1"]
    card = (out / "README.md").read_text()
    assert "hla-convert/demo-wan-tiny" in card and "load_converted" in card and "| metric |" in card
    assert load_recipe(str(out / "recipe.yaml")).stage1.steps == FAST["stage1.steps"]
    assert set(doc["seconds"]) == {"load", "convert", "calibrate", "distil", "validate", "save"}


def test_load_converted_gives_the_converted_transformer(converted):
    from hla_convert import hla_layers, load_converted

    out, _ = converted
    from hla_convert.model.lora import lora_state_dict

    model = load_converted(out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    # the default recipe trains LoRA in stage 2: its weights ride in the same file under `lora.`
    state = model.state_dict() | {f"lora.{k}": v for k, v in lora_state_dict(model).items()}
    assert hla_layers(model) and weights
    assert any(k.startswith("lora.") for k in weights) == (load_recipe(str(out / "recipe.yaml")).stage2.train == "lora")
    assert set(weights) == {k for k in state if ".hla." in k or k.startswith("lora.")}
    for name, tensor in weights.items():
        assert torch.equal(state[name].float(), tensor)


def test_refuses_a_non_empty_out_unless_overwrite(converted, tmp_path, fast_recipe):
    out, _ = converted
    assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", out), contains="not empty")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", foreign, "--overwrite"), contains="did not write")
    assert (foreign / "notes.txt").read_text() == "keep me"


# -- a local pipeline folder ---------------------------------------------------------------------


def test_convert_a_pipeline_folder(tmp_path, fast_recipe):
    """MODEL as a pipeline folder: its transformer converts, its scheduler drives the sampling check,
    and the model card loads the result into that pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tmp_path / "wan-pipe"
    tiny_wan().save_pretrained(pipe / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }))
    recipe = tmp_path / "gaussian.yaml"
    fields = {"calibration.synthetic": "gaussian", "calibration.frames": 5, "calibration.height": 32, "calibration.width": 32,
              "calibration.vae_scale_temporal": 4, "calibration.vae_scale_spatial": 8}
    recipe.write_text(load_recipe(str(fast_recipe)).with_overrides(fields=fields).to_yaml())
    out = tmp_path / "out"
    result = invoke("convert", pipe, "--recipe", recipe, "--out", out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["source"] == str(pipe.resolve())
    assert doc["drift"]["sampling"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    card = (out / "README.md").read_text()
    assert f'WanPipeline.from_pretrained("{pipe.resolve()}", transformer=transformer)' in card
    assert "with hla_convert.teacher_steps(pipe, 4):" in card  # the sampling-time lever, named where users load it
    assert invoke("validate", out, "--device", "cpu").exit_code == 0
    inspected = json.loads(invoke("inspect", pipe, "--recipe", recipe, "--json").stdout)
    assert inspected["tokens"] == 2 * 2 * 2 and len(inspected["converted"]) == 2


def test_steps_zero_trains_nothing_in_either_stage(tmp_path, fast_recipe):
    out = tmp_path / "ünïcode öut ☃"  # a path the file system allows is a path hla-convert takes
    result = invoke("convert", "--recipe", fast_recipe, "--out", out, "--steps", "0", "--device", "cpu", "--json")
    assert result.exit_code in (0, 1), result.stderr
    training = json.loads(result.stdout)["drift"]["training"]
    assert training["stage1"]["steps"] == 0 and training["stage2"]["steps"] == 0
    assert training["stage1"].get("steps_run", 0) == 0 and training["stage2"].get("steps_run", 0) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_a_nan_base_writes_its_report_with_nan_strings_and_fails_with_exit_1(tmp_path, fast_recipe):
    from hla_convert.model.loading import load_demo_model

    model = load_demo_model().transformer
    with torch.no_grad():
        for p in model.proj_out.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan-base")
    out = tmp_path / "out"
    result = invoke("convert", tmp_path / "nan-base", "--recipe", fast_recipe, "--out", out, "--steps", "0", "--device", "cpu", "--json")
    assert result.exit_code == 1, result.stderr  # drift over the thresholds, not a failed save (exit 3)
    doc = json.loads(result.stdout)
    assert doc["passed"] is False and doc["drift"]["output"]["rel_l2"] == "nan"
    saved = json.loads((out / "drift_report.json").read_text())  # strict JSON: no bare NaN
    assert saved["passed"] is False and saved["output"]["rel_l2"] == "nan" and saved["failures"]
    assert not (out / ".hla_work").exists()  # the save finished: nothing to --resume


# -- stage 3 (on-policy trajectory distillation) -------------------------------------------------


def test_convert_the_demo_with_stage3_and_load_it_back(tmp_path, fast_recipe):
    """A small stage 3 on the demo through the command line: it runs after stage 2 with the demo's
    scheduler, its summary is in the report, and the saved folder loads with load_converted."""
    from hla_convert import load_converted
    from hla_convert.model.lora import has_lora

    recipe = tmp_path / "stage3.yaml"
    fields = {"stage3.steps": 2, "stage3.batch_size": 2, "stage3.sampling_steps": 3}
    recipe.write_text(load_recipe(str(fast_recipe)).with_overrides(fields=fields).to_yaml())
    out = tmp_path / "out"
    result = invoke("convert", "--recipe", recipe, "--out", out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    stage3 = json.loads((out / "drift_report.json").read_text())["training"]["stage3"]
    assert stage3["steps_run"] == 2 and stage3["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert all(math.isfinite(x) for x in stage3["loss_history"])
    model = load_converted(out)
    assert has_lora(model)
    latents = torch.randn(1, 3, 2, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(model(latents, torch.tensor([500.0]), torch.randn(1, 8, 32), return_dict=False)[0]).all()


def test_stage3_on_a_bare_transformer_is_refused_before_the_load(tmp_path, fast_recipe):
    bare = tmp_path / "bare"
    tiny_wan().save_pretrained(bare)
    (bare / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")  # never read: refused from the config
    recipe = tmp_path / "stage3.yaml"
    recipe.write_text(load_recipe(str(fast_recipe)).with_overrides(fields={"stage3.steps": 2}).to_yaml())
    out = tmp_path / "out"
    line = assert_one_line_error(invoke("convert", bare, "--recipe", recipe, "--out", out), contains="stage3.steps: must be 0")
    assert "without a scheduler" in line
    assert not out.exists()
