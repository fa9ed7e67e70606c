"""`hla-convert validate` on the shared demo conversion (conftest's `converted`): the drift again,
a tight threshold (exit 1), and what it refuses as bad input (exit 2): corrupt or tampered files,
a different base, a manifest that no longer matches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_one_line_error, invoke, relist
from tiny_models import tiny_wan

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
