"""Fixtures shared by the test modules; plain helpers are in helpers.py, tiny models in tiny_models.py.

One CPU thread for torch, in this process and (OMP_NUM_THREADS=1) in every process a test starts:
the models here are a few thousand parameters, and on a shared 2-core machine extra threads only
spin against each other (the demo conversion took 49 s with 2 threads against 11 s with one, with
3 other processes busy). It also makes a subprocess's float sums the same as this process's, so a
run made by the console script can be compared bit for bit with one made in process.

- `interp`: the Triton kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1 for the
  requesting test only: the kernels read it when called, and leaving it set would send other
  tests' CPU tensors through the slow interpreter), outputs poisoned with NaN first so an element
  a kernel leaves unwritten fails.
- `gpu`: the compiled kernels on CUDA, outputs poisoned the same way. Tests that take it carry the
  `gpu` marker (`pytest -m gpu` selects them); without CUDA they are skipped at collection.
- `fast_recipe`: the demo recipe cut down by helpers.FAST, written once per session (read-only:
  a test that changes a field writes its own copy).
- `converted`: one finished conversion of the demo with that recipe, made once per session by the
  installed console script in a real subprocess, as `(folder, the --json document)`; the same
  adapter, bit for bit, as a run of that recipe in this process. Tests only read it; one that
  writes into the folder (sample, push, a tampered file) copies it first (`shutil.copytree`), so
  sharing does not couple tests.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import FAST, console_script

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every subprocess the tests start
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (select the GPU tests with `pytest -m gpu` on a CUDA machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def _poison_kernel_outputs(monkeypatch) -> None:
    from hla_kernels import _runtime

    monkeypatch.setattr(_runtime, "POISON_OUTPUTS", True)


@pytest.fixture
def interp(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _poison_kernel_outputs(monkeypatch)


@pytest.fixture
def gpu(request, monkeypatch):
    assert request.node.get_closest_marker("gpu") is not None, "a test taking the gpu fixture carries @pytest.mark.gpu"
    if not torch.cuda.is_available():  # also when the marker's collection-time skip was bypassed
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _poison_kernel_outputs(monkeypatch)


@pytest.fixture(scope="session")
def fast_recipe(tmp_path_factory) -> Path:
    from hla_convert.recipe import load_recipe

    path = tmp_path_factory.mktemp("recipe") / "fast.yaml"
    path.write_text(load_recipe("tiny-wan").with_overrides(fields=FAST).to_yaml())
    return path


@pytest.fixture(scope="session")
def converted(tmp_path_factory, fast_recipe) -> tuple[Path, dict]:
    """A finished conversion of the demo, made by the installed console script (a real subprocess)."""
    out = tmp_path_factory.mktemp("runs") / "demo-hla"
    proc = subprocess.run(
        [console_script(), "convert", "--recipe", str(fast_recipe), "--out", str(out), "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # stdout holds the one JSON document and nothing else
    return out, doc
