"""`hla-convert convert FILE.safetensors --config CONFIG`: a single-file checkpoint in Wan-AI's
original layout converts offline, `validate` and `load_converted` find it again through the adapter's
record, and the result is the one a diffusers-folder conversion of the same weights gives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import hla_convert
from hla_convert.recipe import load_recipe
from helpers import FAST, assert_one_line_error, invoke, save_wan_config, save_wan_single_file
from tiny_models import tiny_inputs, tiny_wan

GAUSSIAN = {"calibration.synthetic": "gaussian", "calibration.frames": 5, "calibration.height": 32, "calibration.width": 32,
            "calibration.vae_scale_temporal": 4, "calibration.vae_scale_spatial": 8}  # fmt: skip


@pytest.fixture(scope="module")
def converted_both(tmp_path_factory):
    """The same tiny Wan weights converted twice with one recipe: from a diffusers folder and from
    an original-layout single file (ComfyUI's prefix) whose --config is a config-only folder."""
    root = tmp_path_factory.mktemp("single")
    model = tiny_wan(seed=1)
    model.save_pretrained(root / "folder")
    single = save_wan_single_file(model, root / "wan_t2v_tiny.safetensors", "model.diffusion_model.")
    config = save_wan_config(model, root / "config")
    recipe = root / "r.yaml"
    recipe.write_text(load_recipe("tiny-wan").with_overrides(fields={**FAST, **GAUSSIAN}).to_yaml())
    docs = {}
    for name, args in {"file": [single, "--config", config], "folder": [root / "folder"]}.items():
        result = invoke("convert", *args, "--recipe", recipe, "--out", root / f"out-{name}", "--device", "cpu", "--json")
        assert result.exit_code == 0, result.stderr
        docs[name] = json.loads(result.stdout)
    return root, docs


def test_a_single_file_converts_and_validates_offline(converted_both):
    root, docs = converted_both
    assert docs["file"]["model"]["source"] == str((root / "wan_t2v_tiny.safetensors").resolve())
    info = hla_convert.read_adapter_info(root / "out-file")
    assert info["base_source"] == str((root / "wan_t2v_tiny.safetensors").resolve())
    assert info["extra"]["base_config"] == str((root / "config").resolve())
    result = invoke("validate", root / "out-file", "--device", "cpu", "--json")  # the recorded file and config
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["base"] == info["base_source"]


def test_the_single_file_conversion_equals_the_folder_conversion(converted_both):
    root, _ = converted_both
    a, b = hla_convert.read_adapter_info(root / "out-file"), hla_convert.read_adapter_info(root / "out-folder")
    assert a["base_fingerprint"] == b["base_fingerprint"]
    from_file = hla_convert.load_converted(root / "out-file", device="cpu")
    from_folder = hla_convert.load_converted(root / "out-folder", device="cpu")
    inputs = tiny_inputs("wan", seed=4)
    with torch.no_grad():
        out_file, out_folder = from_file(**inputs).sample, from_folder(**inputs).sample
    assert torch.equal(out_file, out_folder)
    # and the folder conversion's adapter on the single file (as --base, with its config): the same base
    on_file = hla_convert.load_converted(root / "out-folder", base=str(root / "wan_t2v_tiny.safetensors"), config=str(root / "config"))
    with torch.no_grad():
        assert torch.equal(on_file(**inputs).sample, out_folder)


def test_another_file_is_the_existing_mismatch_error(converted_both, tmp_path):
    root, _ = converted_both
    other = save_wan_single_file(tiny_wan(seed=2), tmp_path / "other.safetensors")
    result = invoke("validate", root / "out-file", "--base", other, "--config", root / "config", "--device", "cpu")
    assert_one_line_error(result, 2, "the adapter was made for a different base")
    # the recorded file replaced by other weights (a newer download under the same name): the same error
    recorded = root / "wan_t2v_tiny.safetensors"
    kept = tmp_path / "kept.safetensors"
    shutil.copy(recorded, kept)
    try:
        shutil.copy(other, recorded)
        assert_one_line_error(invoke("validate", root / "out-file", "--device", "cpu"), 2, "the adapter was made for a different base")
    finally:
        shutil.copy(kept, recorded)


@pytest.mark.parametrize("case", ["no_config", "unknown_keys", "garbage", "config_for_folder"])
def test_single_file_errors_are_one_line_exit_2_before_anything_runs(tmp_path, case):
    from safetensors.torch import save_file

    model = tiny_wan()
    config = save_wan_config(model, tmp_path / "config")
    path = save_wan_single_file(model, tmp_path / "wan.safetensors")
    args, says = {
        "no_config": ([path, "--recipe", "tiny-wan"], "give its diffusers config with --config"),
        "unknown_keys": ([tmp_path / "u.safetensors", "--config", config, "--recipe", "tiny-wan"], "no known architecture"),
        "garbage": ([tmp_path / "g.safetensors", "--config", config, "--recipe", "tiny-wan"], "is not a safetensors file"),
        "config_for_folder": ([tmp_path / "config", "--config", config, "--recipe", "tiny-wan"], "--config applies to a single-file MODEL"),
    }[case]
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "u.safetensors"))
    (tmp_path / "g.safetensors").write_bytes(b"\x00" * 40)
    out = tmp_path / "out"
    assert_one_line_error(invoke("convert", *args, "--out", out, "--device", "cpu"), 2, says)
    assert not out.exists()


def test_the_recipe_can_name_the_config(tmp_path):
    """model.config in the recipe stands in for --config (inspect reads it without any weights)."""
    model = tiny_wan()
    path = save_wan_single_file(model, tmp_path / "wan.safetensors")
    config = save_wan_config(model, tmp_path / "config")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(load_recipe("tiny-wan").with_overrides(fields={**GAUSSIAN, "model.config": str(config)}).to_yaml())
    result = invoke("inspect", path, "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["class"] == "WanTransformer3DModel"
    bad = load_recipe("tiny-wan").to_dict()
    bad["model"]["config"] = 5
    (tmp_path / "bad.yaml").write_text(json.dumps(bad))
    assert_one_line_error(invoke("inspect", path, "--recipe", tmp_path / "bad.yaml"), 2, "model.config: must be a non-empty string or null")
