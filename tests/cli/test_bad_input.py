"""Bad input to the command line: one line on stderr (`hla-convert: error: ...`), exit 2, no
traceback, and with --json the same error as the one document on stdout. Usage, recipe, model,
device and path errors, checked before anything loads.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hla_convert.recipe import load_recipe
from helpers import assert_one_line_error, invoke, relist

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


def test_a_folder_name_that_is_not_utf8_is_refused_before_the_run(tmp_path):
    # issue 18: the whole run, then "adapter ... corrupt" (safetensors takes UTF-8 paths only)
    bad = str(tmp_path / b"out\xff".decode("utf-8", "surrogateescape"))
    assert_one_line_error(invoke("convert", "--out", bad, "--steps", "0", "--device", "cpu"), contains="use a UTF-8 name")
    assert list(tmp_path.iterdir()) == []
    assert_one_line_error(invoke("validate", bad), contains="use a UTF-8 name")
