"""Property-based fuzz of the command line: `hla-convert recipes FILE` and `hla-convert validate DIR`
on the fuzz's hostile recipes and adapters exit 2 with one `hla-convert: error:` line and no
traceback. Profile, bounds and strategies: tests/fuzzing.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import event, example, given
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes
from typer.testing import CliRunner

from hla_convert.io.adapter import ADAPTER_FILE, CONFIG_FILE
from hla_convert.cli import app
from hla_convert.recipe import recipe_text
from fuzzing import (
    TinyBase,
    adapter_metadata,
    adapter_tensors,
    bounded_memory,
    corrupted,
    fuzz,
    hostile_yaml,
    make_adapter,
    mutated_recipes,
    random_metadata,
    random_safetensors,
    recipe_path,
    yaml_soup,
)


@pytest.fixture(scope="module")
def base():
    return TinyBase()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base):
    """(the bytes of a real adapter_model.safetensors, its header length): made once per module."""
    return make_adapter(tmp_path_factory.mktemp("fuzz_adapter_src"), base)


# -- the command line ---------------------------------------------------------------------------------
#
# Few examples each: a command's checks are the Python ones above, so these check what the command
# line adds (its error rendering, exit code 2, nothing on stderr but the one line). In process,
# through typer's CliRunner as the tests in tests/cli/ do: a subprocess costs ~3 s of imports, which
# 2 x 15 examples cannot afford within this file's budget; one real subprocess per command checks
# the installed entry point on a hostile input.

_runner = CliRunner()


def _assert_bad_input(result, args) -> str:
    """Exit 2 with one `hla-convert: error:` line on stderr and no traceback anywhere."""
    out = (result.stdout or "") + (result.stderr or "")
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in out, out[-2000:]
    assert result.exit_code == 2, (args, result.exit_code, out[-2000:])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hla-convert: error: "), result.stderr[-2000:]
    return lines[0]


@fuzz(15)
@given(text=yaml_soup | hostile_yaml() | mutated_recipes().map(lambda d: yaml.safe_dump(d)))
@example(text="a: !!timestamp\n")
def test_cli_recipes_on_a_random_recipe_file_is_exit_2_and_one_line(recipe_path, text):
    recipe_path.write_text(text, encoding="utf-8")
    result = _runner.invoke(app, ["recipes", str(recipe_path)])
    if result.exit_code != 0:  # a file that happens to be a valid recipe is printed
        _assert_bad_input(result, text[:200])


@pytest.fixture(scope="module")
def output_folder(tmp_path_factory, adapter) -> Path:
    """A finished output folder around the fuzz adapter (recipe.yaml, drift_report.json,
    hla_config.json). Its recorded base does not exist, so even an intact folder is refused (exit 2)
    before any model loads: every example is bad input, whichever check catches it."""
    folder = tmp_path_factory.mktemp("fuzz_output")
    raw, header_len = adapter
    (folder / ADAPTER_FILE).write_bytes(raw)
    (folder / CONFIG_FILE).write_text(json.dumps({k: json.loads(v) for k, v in adapter_metadata(raw, header_len).items()}))
    (folder / "recipe.yaml").write_text(recipe_text("tiny-wan"))
    (folder / "drift_report.json").write_text(json.dumps({"table": []}))
    return folder


def _rewrite_config_to_match(folder: Path) -> None:
    """hla_config.json made to agree with the (corrupted) header, as someone editing both would, so
    the checks behind the agreement check are reached too."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / ADAPTER_FILE), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        (folder / CONFIG_FILE).write_text(json.dumps(meta))
    except Exception:  # noqa: BLE001 - a header too broken to read: read_adapter_info refuses it anyway
        pass


@fuzz(15)
@given(st.data())
def test_cli_validate_on_a_corrupt_adapter_is_exit_2_and_one_line(adapter, output_folder, data):
    raw, header_len = adapter
    meta = adapter_metadata(raw, header_len)
    on_real_tensors = random_metadata(meta).map(lambda m: safetensors_bytes(adapter_tensors(raw), metadata=m))
    (output_folder / ADAPTER_FILE).write_bytes(data.draw(corrupted(raw, header_len) | random_safetensors(meta) | on_real_tensors))
    if data.draw(st.booleans()):
        _rewrite_config_to_match(output_folder)
    line = _assert_bad_input(_runner.invoke(app, ["validate", str(output_folder)]), "validate")
    event(line.split("(")[0][:70].replace(str(output_folder), "DIR"))


def test_cli_validate_with_a_non_mapping_extra_in_both_files_is_exit_2(adapter, output_folder):
    """Found by the property above: `"extra": [1]` in the header and hla_config.json alike (so they
    agree) was an AttributeError in reading the recorded base, reported as a failed run (exit 3)."""
    raw, header_len = adapter
    meta = {**adapter_metadata(raw, header_len), "extra": "[1]"}
    (output_folder / ADAPTER_FILE).write_bytes(safetensors_bytes(adapter_tensors(raw), metadata=meta))
    _rewrite_config_to_match(output_folder)
    line = _assert_bad_input(_runner.invoke(app, ["validate", str(output_folder)]), "validate")
    assert "'extra' must be a mapping, got [1]" in line


def _alias_bomb(tmp: Path, raw: bytes) -> Path:
    """9 ** 11 nodes once expanded, and a scalar PyYAML cannot build."""
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    (tmp / "bomb.yaml").write_text("\n".join(lines) + "\nb: !!timestamp\n")
    return tmp / "bomb.yaml"


def _lying_prefix(tmp: Path, raw: bytes) -> Path:
    """An adapter whose length prefix claims 2**63 header bytes, cut after 100 bytes."""
    (tmp / ADAPTER_FILE).write_bytes(struct.pack("<Q", 2**63) + raw[8:100])
    return tmp


@pytest.mark.parametrize("command, make", [("recipes", _alias_bomb), ("validate", _lying_prefix)])
def test_the_installed_command_refuses_a_hostile_file_in_one_line(tmp_path, adapter, command, make):
    """The real entry point (a subprocess): exit 2, one line on stderr, no traceback."""
    target = make(tmp_path, adapter[0])
    script = Path(sys.executable).with_name("hla-convert")
    proc = subprocess.run(
        [str(script), command, str(target)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hla-convert: error: "), proc.stderr[-2000:]
