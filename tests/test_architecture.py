"""The layer rule of docs/architecture.md, checked by import-linter (the [tool.importlinter]
contracts in pyproject.toml): cli > conversion > io > stages > recipe > model > ops > the bottom
utilities, no import cycles, ops and hla_kernels free of diffusers / peft and of the rest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (the test extra)")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'kernels'}"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )


def test_the_layer_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contracts see this checkout's modules, lazy imports included: a model module that imports
    the command line inside a function fails the check."""
    shutil.copytree(ROOT / "hla_convert", tmp_path / "hla_convert", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    layers = tmp_path / "hla_convert" / "model" / "layers.py"
    layers.write_text(layers.read_text() + "\n\ndef _upward():\n    from ..cli import main\n\n    return main\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "hla_convert.model.layers -> hla_convert.cli" in result.stdout
