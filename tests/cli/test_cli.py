"""The `hla-convert` command line, end to end on the embedded demo model.

One short conversion (a test recipe: the demo's, with few samples and steps) is shared by the
tests (conftest's `converted`); it runs as a real subprocess of the installed `hla-convert` entry
point. Everything else goes through typer's CliRunner, in process. Exit codes: 0 ok, 1 drift, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hla_convert.recipe import load_recipe
from helpers import FAST, assert_one_line_error, console_script, invoke, relist
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


# -- validate -----------------------------------------------------------------------------------


def test_validate_passes_and_fails_on_a_tight_threshold(converted):
    out, _ = converted
    ok = invoke("validate", out, "--device", "cpu", "--json")
    assert ok.exit_code == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["passed"] is True
    saved = json.loads((out / "drift_report.json").read_text())
    again = {row["metric"]: row["value"] for row in doc["drift"]["table"]}
    for row in saved["table"]:  # the held-out inputs are seeded: the same drift again
        assert again[row["metric"]] == pytest.approx(row["value"], rel=1e-4, abs=1e-6)

    tight = invoke("validate", out, "--device", "cpu", "--max-output-rel-l2", "1e-9")
    assert tight.exit_code == 1, tight.stderr
    assert "FAIL" in tight.stdout


def test_validate_refuses_corrupt_and_mismatched_adapters(converted, tmp_path):
    out, _ = converted
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(invoke("validate", broken, "--device", "cpu"), contains="corrupt")

    other = tmp_path / "other-base"
    tiny_wan().save_pretrained(other)
    assert_one_line_error(invoke("validate", out, "--base", other, "--device", "cpu"), contains="different base")


def test_validate_refuses_a_folder_without_a_conversion(tmp_path):
    assert_one_line_error(invoke("validate", tmp_path), contains="adapter")
    assert_one_line_error(invoke("validate", tmp_path / "missing"))


# -- resume -------------------------------------------------------------------------------------


def test_resume_after_an_interrupted_run_gives_the_same_adapter(converted, tmp_path, fast_recipe):
    """Stopped in stage 1 and resumed, through the command line and the Python API (one stopped
    run serves both: --stop-after-steps is a KeyboardInterrupt raised from the progress callback,
    as a Ctrl-C during hla_convert.convert, and --resume is convert(resume=True))."""
    import hla_convert
    from hla_convert.io.output_guard import OutputError

    # The reference is the shared uninterrupted run of the same recipe (one CPU thread there and here:
    # float sums depend on the thread count).
    reference, _ = converted
    out = tmp_path / "interrupted"
    stopped = invoke("convert", "--recipe", fast_recipe, "--out", out, "--device", "cpu", "--stop-after-steps", "4")
    assert stopped.exit_code == 130, stopped.stderr
    assert "--resume" in stopped.stderr
    assert (out / ".hla_work" / "stage1.checkpoint.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists() and not (out / ".hla-convert.lock").exists()

    with pytest.raises(OutputError, match="resume"):  # the API refuses to start over it as well
        hla_convert.convert(recipe=str(fast_recipe), out=out, device="cpu")
    again = invoke("convert", "--recipe", fast_recipe, "--out", out, "--device", "cpu")
    assert_one_line_error(again, contains="--resume")
    assert_one_line_error(invoke("validate", out), contains="unfinished")

    resumed = invoke("convert", "--recipe", fast_recipe, "--out", out, "--device", "cpu", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["resumed"] is True and doc["drift"]["training"]["stage1"]["resumed_from"] == 4
    assert not (out / ".hla_work").exists()
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(reference / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_resume_refuses_a_different_run_and_a_finished_one(converted, tmp_path, fast_recipe):
    out, _ = converted
    assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", out, "--resume"), contains="nothing to resume")
    stopped = tmp_path / "stopped"
    invoke("convert", "--recipe", fast_recipe, "--out", stopped, "--device", "cpu", "--stop-after-steps", "2")
    line = assert_one_line_error(
        invoke("convert", "--recipe", fast_recipe, "--out", stopped, "--steps", "3", "--resume"), contains="different run"
    )
    assert "recipe" in line


def test_a_diverging_run_stops_with_exit_3_and_keeps_its_checkpoint(tmp_path, fast_recipe):
    recipe = tmp_path / "diverges.yaml"
    fields = {"stage1.lr": 1e30, "stage1.grad_clip": 1e30, "stage1.checkpoint_every": 1}
    recipe.write_text(load_recipe(str(fast_recipe)).with_overrides(fields=fields).to_yaml())
    out = tmp_path / "out"
    line = assert_one_line_error(invoke("convert", "--recipe", recipe, "--out", out, "--device", "cpu"), code=3)
    assert "loss is nan" in line and "step 1" in line
    assert (out / ".hla_work" / "stage1.checkpoint.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()


# -- bad input: one line on stderr, exit 2, no traceback ----------------------------------------


def test_usage_errors(tmp_path):
    assert_one_line_error(invoke("convert", "--bogus"), contains="--bogus")
    assert_one_line_error(invoke("convert"), contains="--out")
    assert_one_line_error(invoke("convert", "--out", tmp_path / "o", "--resume", "--overwrite"), contains="exclude")
    assert_one_line_error(invoke("convert", "--out", tmp_path / "o", "--steps", "many"))
    assert_one_line_error(invoke("frobnicate"))


def test_recipe_errors(tmp_path):
    assert_one_line_error(invoke("convert", "--recipe", "no-such-recipe", "--out", tmp_path / "o"), contains="unknown recipe")
    bad = tmp_path / "bad.yaml"
    data = load_recipe("tiny-wan").to_dict()
    data["stage1"]["lr"] = "fast"
    bad.write_text(yaml.safe_dump(data))
    assert_one_line_error(invoke("convert", "--recipe", bad, "--out", tmp_path / "o"), contains="stage1.lr")
    bad.write_text("name: [unclosed\n")
    assert_one_line_error(invoke("convert", "--recipe", bad, "--out", tmp_path / "o"), contains="YAML")
    assert_one_line_error(invoke("convert", "--attention", "quadratic", "--out", tmp_path / "o"), contains="attention.kind")
    assert_one_line_error(invoke("recipes", "no-such-recipe"), contains="unknown recipe")
    assert not (tmp_path / "o").exists()


def test_model_errors(tmp_path, monkeypatch):
    assert_one_line_error(invoke("convert", tmp_path / "nowhere", "--recipe", "tiny-wan", "--out", tmp_path / "o"))
    # No network here: offline mode answers at once instead of retrying the Hub for ~50 s.
    # (huggingface_hub reads HF_HUB_OFFLINE when imported, so the environment variable is too late.)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_one_line_error(
        invoke("convert", "nobody-here/no-such-model", "--recipe", "tiny-wan", "--out", tmp_path / "o"), contains="no-such-model"
    )
    assert_one_line_error(invoke("convert", "nobody-here/no-such-model", "--out", tmp_path / "o"), contains="--recipe")
    assert_one_line_error(invoke("convert", "--out", tmp_path / "o", "--dtype", "float7"), contains="float7")
    assert_one_line_error(invoke("inspect", tmp_path / "nowhere", "--recipe", "tiny-wan"))
    # --json: the error is also the one document on stdout, for scripts
    result = invoke("convert", tmp_path / "nowhere", "--recipe", "tiny-wan", "--out", tmp_path / "o", "--json")
    line = assert_one_line_error(result)
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 2 and doc["error"] in line
    # a failed load leaves nothing behind: the same --out works at once
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


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
    assert invoke("validate", out, "--device", "cpu").exit_code == 0
    inspected = json.loads(invoke("inspect", pipe, "--recipe", recipe, "--json").stdout)
    assert inspected["tokens"] == 2 * 2 * 2 and len(inspected["converted"]) == 2


# -- inspect and recipes ------------------------------------------------------------------------


def test_inspect_the_demo_as_json():
    result = invoke("inspect", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["class"] == "WanTransformer3DModel" and doc["tokens"] > 0
    kind = load_recipe("tiny-wan").attention.kind
    assert doc["converted"] and all(m["converts_to"] == kind for m in doc["modules"] if m["name"] in doc["converted"])
    assert doc["flops"]["before"] > 0 and doc["flops"]["after"] > 0
    bigger = json.loads(invoke("inspect", "--frames", "16", "--height", "32", "--width", "32", "--json").stdout)
    assert bigger["tokens"] == 8 * doc["tokens"]


def test_recipes_lists_and_prints():
    listing = invoke("recipes", "--json")
    assert listing.exit_code == 0
    names = json.loads(listing.stdout)["recipes"]
    assert "tiny-wan" in names
    shown = invoke("recipes", "tiny-wan")
    assert shown.exit_code == 0 and shown.stdout.startswith("name: tiny-wan")


def test_help_reads_like_a_manual():
    for cmd in ("convert", "validate", "inspect", "recipes"):
        result = invoke(cmd, "--help")
        assert result.exit_code == 0
    assert "Exit codes" in invoke("convert", "--help").stdout


# -- issue 13: --json on usage errors, checks before loading, smaller promises -------------------


@pytest.mark.parametrize(
    "args, command, contains",
    [
        (["convert", "--json"], "convert", "--out"),
        (["convert", "--json", "--out", "o", "--steps", "-1"], "convert", "--steps"),
        (["convert", "--json", "--bogus"], "convert", "--bogus"),
        (["validate", "somewhere", "--max-output-rel-l2", "abc", "--json"], "validate", "--max-output-rel-l2"),
        (["inspect", "--frames", "0", "--json"], "inspect", "--frames"),
        (["recipes", "a", "b", "--json"], "recipes", "unexpected extra argument"),
        (["frobnicate", "--json"], None, "frobnicate"),
    ],
)
def test_json_usage_errors_still_print_one_document(args, command, contains):
    result = invoke(*args)
    line = assert_one_line_error(result, contains=contains)
    doc = json.loads(result.stdout)  # the whole of stdout is one document
    assert doc == {"command": command, "exit_code": 2, "error": line.removeprefix("hla-convert: error: ")}


def test_bad_devices_are_refused_before_loading(converted, tmp_path):
    out, _ = converted
    cases = ["banana", "meta", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in cases:
        line = assert_one_line_error(invoke("convert", "--out", tmp_path / "o", "--device", device), contains="--device")
        assert repr(device) in line
        assert_one_line_error(invoke("validate", out, "--device", device), contains="--device")
    assert not (tmp_path / "o").exists()


def test_a_missing_local_model_is_reported_missing(tmp_path, monkeypatch):
    # a relative MODEL: the message shows a path cut to 80 characters, and how deep tmp_path lies
    # depends on the machine (pytest-xdist adds a folder per worker)
    monkeypatch.chdir(tmp_path)
    for cmd in (["convert", "--out", tmp_path / "o"], ["inspect"]):
        line = assert_one_line_error(invoke(cmd[0], "nowhere", *cmd[1:]), contains="does not exist")
        assert "'nowhere'" in line and "recipe" not in line
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(invoke("convert", tmp_path / "afile", "--out", tmp_path / "o"), contains="is a file")


def test_a_hub_lookup_says_so_while_it_waits(tmp_path, monkeypatch):
    import huggingface_hub.constants

    import hla_convert.io.checks as checks

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(checks, "HUB_NOTICE_AFTER_S", 0.0)  # the notice comes after 2 s; offline answers at once
    result = invoke("convert", "nobody-here/no-such-model", "--recipe", "tiny-wan", "--out", tmp_path / "o")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "trying the Hugging Face Hub for 'nobody-here/no-such-model' ..."
    assert lines[-1].startswith("hla-convert: error: ") and "no-such-model" in lines[-1]


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


def _demo_folder(path: Path, bump: float = 0.0) -> Path:
    from hla_convert.model.loading import load_demo_model

    model = load_demo_model().transformer
    if bump:
        name, tensor = max(model.state_dict().items(), key=lambda kv: kv[1].numel())
        with torch.no_grad():  # the last value of the largest tensor
            tensor.view(-1)[-1] += bump
    model.save_pretrained(path)
    return path


def test_validate_base_refuses_one_changed_weight_and_says_when_sampling_is_not_run(converted, tmp_path):
    out, _ = converted
    bumped = _demo_folder(tmp_path / "bumped", bump=0.5)
    assert_one_line_error(invoke("validate", out, "--base", bumped, "--device", "cpu"), contains="different base")

    bare = _demo_folder(tmp_path / "bare")  # the same weights, as a bare transformer: no scheduler
    result = invoke("validate", out, "--base", bare, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    drift = json.loads(result.stdout)["drift"]
    assert drift["sampling"] is None and "bare transformer" in drift["sampling_not_run"]
    assert {"metric": "sampling check (final latent)", "value": "not run", "threshold": None, "ok": None} in drift["table"]
    table = invoke("validate", out, "--base", bare, "--device", "cpu")
    assert "not run" in table.stdout


def test_validate_refuses_a_tampered_config_and_bad_thresholds(converted, tmp_path):
    out, _ = converted
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    config = json.loads((tampered / "hla_config.json").read_text())
    config["config"]["feature_dim"] = 64
    (tampered / "hla_config.json").write_text(json.dumps(config))
    assert_one_line_error(invoke("validate", tampered, "--device", "cpu"), contains="hla_config.json disagrees")
    (tampered / "hla_config.json").unlink()
    assert_one_line_error(invoke("validate", tampered, "--device", "cpu"), contains="no hla_config.json")
    shutil.copy(out / "hla_config.json", tampered / "hla_config.json")
    (tampered / "drift_report.json").unlink()
    (tampered / "drift_report.json").mkdir()
    assert_one_line_error(invoke("validate", tampered, "--device", "cpu"), contains="not a regular file")
    for value in ("nan", "inf", "-1"):
        assert_one_line_error(invoke("validate", out, "--max-output-rel-l2", value), contains="validation.max_output_rel_l2")
    assert_one_line_error(invoke("validate", out / "README.md"), contains="not a folder")


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda text: text.replace('"format_version": 1', '"format_version": true'), "disagrees with the metadata in adapter_model.safetensors (format_version)"),
        (lambda text: text.replace('"factors": 2', '"factors": 2.0'), "disagrees with the metadata in adapter_model.safetensors (config)"),
        (lambda text: text.replace('"normalize": true', '"normalize": 1'), "(config)"),
        (lambda text: text.replace('"learn_temperature": false', '"learn_temperature": 0'), "(config)"),
        (lambda text: text.replace('{', '{"base_source": "someone/else",', 1), "duplicate key 'base_source'"),
    ],
)
def test_validate_compares_hla_config_by_type_and_refuses_duplicate_keys(converted, tmp_path, edit, expect):
    out, _ = converted
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    text = (tampered / "hla_config.json").read_text()
    assert edit(text) != text
    (tampered / "hla_config.json").write_text(edit(text))  # equal in Python (true == 1, 2.0 == 2), not as JSON
    line = assert_one_line_error(invoke("validate", tampered, "--device", "cpu"), contains=expect)
    assert "hla_config.json" in line


def test_validate_checks_the_manifest_hashes_of_what_it_trusts(converted, tmp_path):
    out, _ = converted
    for name, edit in [
        ("drift_report.json", lambda b: b.replace(b'"max_output_rel_l2": 10.0', b'"max_output_rel_l2": 1000.0')),
        ("recipe.yaml", lambda b: b + b"# looser thresholds\n"),
        ("adapter_model.safetensors", lambda b: b[:-4] + bytes(4)),
    ]:
        folder = tmp_path / name
        shutil.copytree(out, folder)
        (folder / name).write_bytes(edit((folder / name).read_bytes()))
        line = assert_one_line_error(invoke("validate", folder, "--device", "cpu"), contains="changed since hla-convert wrote it")
        assert f"{name} was changed" in line

    # NaN weights (written consistently, manifest and all): a corrupt adapter, exit 2, naming the key
    nan = tmp_path / "nan"
    shutil.copytree(out, nan)
    path = nan / "adapter_model.safetensors"
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=meta)
    relist(nan, "adapter_model.safetensors")
    line = assert_one_line_error(invoke("validate", nan, "--device", "cpu"), contains="holds NaN or infinite values")
    assert f"tensor {sorted(tensors)[0]!r}" in line

    # no manifest at all (a folder from before it existed, or a Hub download): not checked
    from hla_convert.io.converted import read_output

    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / ".hla-convert-manifest.json").unlink()
    (bare / "recipe.yaml").write_bytes((bare / "recipe.yaml").read_bytes() + b"# edited\n")
    read_output(bare)
    (bare / ".hla-convert-manifest.json").write_text("{not json")
    assert_one_line_error(invoke("validate", bare, "--device", "cpu"), contains="not a manifest hla-convert wrote")


def test_other_commands_take_hostile_values_as_bad_input(tmp_path):
    assert_one_line_error(invoke("inspect", "--frames", str(10**12), "--json"), contains="calibration.frames")
    assert_one_line_error(invoke("recipes", str(tmp_path)), contains="is a folder")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert_one_line_error(invoke("recipes", empty), contains="is empty")
    assert_one_line_error(invoke("convert", "--recipe", empty, "--out", tmp_path / "o"), contains="is empty")
    # an empty string is not "." (the current folder)
    assert_one_line_error(invoke("convert", "--out", ""), contains="--out is empty")
    assert_one_line_error(invoke("validate", ""), contains="DIR is empty")
    assert_one_line_error(invoke("convert", "", "--out", tmp_path / "o"), contains="MODEL is empty")
    assert_one_line_error(invoke("inspect", " "), contains="MODEL is empty")


def test_unusable_paths_and_recorded_bases_are_bad_input(converted, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    long = "x" * 5000  # past the file system's name limit
    assert_one_line_error(invoke("validate", long), contains="not a usable path")
    assert_one_line_error(invoke("convert", long, "--out", tmp_path / "o"), contains="not a usable path")
    assert_one_line_error(invoke("convert", "--out", tmp_path / long), contains="--out")
    assert_one_line_error(invoke("convert", "--recipe", long + ".yaml", "--out", tmp_path / "o"), contains="cannot be read")
    assert_one_line_error(invoke("convert", "--out", "o\0o"), contains="NUL byte")

    out, _ = converted
    for recorded, message in ((None, "no usable base model"), (["a"], "no usable base model"), (long, "no usable base model"),
                              (str(tmp_path / "gone"), "does not exist")):
        edited = tmp_path / f"edited-{len(str(recorded))}"
        shutil.copytree(out, edited)
        path = edited / "adapter_model.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        meta["base_source"] = json.dumps(recorded)
        save_file(load_file(str(path)), str(path), metadata=meta)
        (edited / "hla_config.json").write_text(json.dumps({k: json.loads(v) for k, v in meta.items()}))
        for name in ("adapter_model.safetensors", "hla_config.json"):
            relist(edited, name)  # as a run that recorded such a base would have written them
        assert_one_line_error(invoke("validate", edited, "--device", "cpu"), contains=message)


# -- issue 18: exit codes and the --json promise at the edges ----------------------------------


# Sends the signal to the process itself while it imports typer: the first second of a run, before
# the command line is even parsed.
_SIGNAL_DURING_IMPORTS = """
import os, signal, sys
class _SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "typer":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIG{sig})
        return None
sys.meta_path.insert(0, _SignalOnImport())
"""


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_a_signal_during_the_first_imports_is_exit_130_with_the_json_document(tmp_path, sig):
    (tmp_path / "sitecustomize.py").write_text(_SIGNAL_DURING_IMPORTS.format(sig=sig))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), HF_HUB_OFFLINE="1")
    proc = subprocess.run([console_script(), "recipes", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "hla-convert: error: interrupted"
    assert json.loads(proc.stdout) == {"command": "recipes", "exit_code": 130, "error": "interrupted"}


def test_an_interrupt_a_library_rewraps_is_still_exit_130_with_the_json_document(capsys):
    """Seen by the hostile pass under load: a SIGTERM while diffusers lazily imported a model module
    came back as "RuntimeError: Failed to import diffusers..." and was reported as a failed run (3)."""
    import typer

    from hla_convert.cli.run import command

    with pytest.raises(typer.Exit) as stopped:
        with command("convert", json_mode=True):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                raise RuntimeError("Failed to import diffusers.models.modeling_utils") from exc
    out, err = capsys.readouterr()
    assert stopped.value.exit_code == 130
    assert err.strip().splitlines()[-1] == "hla-convert: error: interrupted"
    assert json.loads(out) == {"command": "convert", "exit_code": 130, "error": "interrupted"}


@pytest.mark.parametrize("args", [["recipes"], ["recipes", "--json"], ["recipes", "tiny-wan"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(args):
    # `hla-convert recipes | head -0`: the pipe is closed before anything is written (git and ripgrep
    # end quietly there too); the command's exit code stands.
    proc = subprocess.Popen([console_script(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.decode() == ""


def test_every_json_document_has_the_error_key():
    doc = json.loads(invoke("recipes", "--json").stdout)
    assert doc["exit_code"] == 0 and "error" in doc and doc["error"] is None


@pytest.mark.parametrize("make_args", [
    lambda long: ["inspect", long],
    lambda long: ["validate", long],
    lambda long: ["recipes", long + ".yaml"],
    lambda long: ["convert", "--out", long, "--steps", "0"],
])
def test_an_error_line_is_at_most_600_characters_prefix_included(tmp_path, make_args):
    long = str(tmp_path) + "/x" * 1500  # a path of 3,000 characters, 1,500 folders deep
    result = invoke(*make_args(long), "--json")
    line = assert_one_line_error(result)
    assert len(line) <= 600
    assert json.loads(result.stdout)["error"] == line.removeprefix("hla-convert: error: ")


# Makes `import pydantic` fail as it does where typer >= 0.29 was installed without it (--no-deps).
_NO_PYDANTIC = """
import sys
class _NoPydantic:
    def find_spec(self, name, path=None, target=None):
        if name == "pydantic" or name.startswith("pydantic."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoPydantic())
"""


def test_a_missing_dependency_is_one_line_naming_it(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_NO_PYDANTIC)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), HF_HUB_OFFLINE="1")
    proc = subprocess.run([console_script(), "recipes", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("hla-convert: error: a package hla-convert needs cannot be imported: pydantic"), line
    assert json.loads(proc.stdout)["exit_code"] == 2


def test_a_folder_name_that_is_not_utf8_is_refused_before_the_run(tmp_path):
    # issue 18: the whole run, then "adapter ... corrupt" (safetensors takes UTF-8 paths only)
    bad = str(tmp_path / b"out\xff".decode("utf-8", "surrogateescape"))
    assert_one_line_error(invoke("convert", "--out", bad, "--steps", "0", "--device", "cpu"), contains="use a UTF-8 name")
    assert list(tmp_path.iterdir()) == []
    assert_one_line_error(invoke("validate", bad), contains="use a UTF-8 name")


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
