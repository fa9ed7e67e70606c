"""The test suite's own rules, read from the test files' source (no test runs here).

- No test module imports another test module: what two of them share lives in helpers.py,
  conftest.py (fixtures), tiny_models/ or fuzzing.py (the fuzz tests' strategies), so running one
  file never collects another's tests and a module's fixtures never run twice under two names.
- A GPU test (`test_gpu_*`) carries the `gpu` marker, so `pytest -m gpu` selects every one and a
  CPU machine skips them at collection.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _modules() -> dict[str, ast.Module]:
    """Every Python file of the suite, by its path under tests/ (subfolders mirror hla_convert's layers)."""
    return {str(p.relative_to(TESTS)): ast.parse(p.read_text(), filename=str(p)) for p in sorted(TESTS.rglob("*.py"))}


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def test_no_test_module_imports_another():
    test_modules = {p.stem for p in TESTS.rglob("test_*.py")}
    offenders = [
        f"{name}:{node.lineno} imports {mod}"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        for mod in _imported(node)
        if mod.split(".")[0] in test_modules
    ]
    assert not offenders, "move the shared helper into tests/helpers.py or a conftest fixture: " + "; ".join(offenders)


def _marks(func: ast.FunctionDef) -> set[str]:
    """The names of the `@pytest.mark.NAME` / `@pytest.mark.NAME(...)` decorators of a function."""
    names = set()
    for dec in func.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute) and target.value.attr == "mark":
            names.add(target.attr)
    return names


def test_test_files_are_named_uniquely_across_the_subfolders():
    """The subfolders have no __init__.py (pytest imports each test file by its own name): two files
    of one name would collide."""
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)) and len(names) >= 30, sorted(n for n in names if names.count(n) > 1)


def test_every_gpu_test_carries_the_gpu_marker():
    unmarked = [
        f"{name}::{node.name}"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_gpu") and "gpu" not in _marks(node)
    ]
    found = [
        node.name
        for tree in _modules().values()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_gpu")
    ]
    assert len(found) >= 7  # the three kernel files' GPU tests (7 functions) are seen at all
    assert not unmarked, unmarked
