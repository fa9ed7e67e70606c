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


def test_every_relative_import_names_a_module_that_exists():
    """import-linter skips an import it cannot resolve, so a relative import left behind by a move
    (`from . import demo_data` in io/, where stages/ holds it) passes the contracts and fails only
    when that line runs."""
    import ast

    unresolved = []
    for path in sorted((ROOT / "hla_convert").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            names = [node.module] if node.module else [a.name for a in node.names]
            for name in names:
                target = base.joinpath(*name.split("."))
                init_names = (base / "__init__.py").read_text() if not node.module and (base / "__init__.py").is_file() else ""
                if not (target.with_suffix(".py").is_file() or (target / "__init__.py").is_file() or f"def {name}" in init_names):
                    unresolved.append(f"{path.relative_to(ROOT)}:{node.lineno} {'.' * node.level}{name}")
    assert not unresolved, unresolved
