"""Fixtures shared by the test modules; plain helpers are in helpers.py, tiny models in tiny_models/.

One CPU thread for torch, in this process and (OMP_NUM_THREADS=1) in every process a test starts:
the models here are a few thousand parameters, and on a shared 2-core machine extra threads only
spin against each other (the demo conversion took 49 s with 2 threads against 11 s with one, with
3 other processes busy). It also makes a subprocess's float sums the same as this process's, so a
run made by the console script can be compared bit for bit with one made in process.

- `interp`: the Triton kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1 for the
  requesting test only: the kernels read it when called, and leaving it set would send other
  tests' CPU tensors through the slow interpreter), outputs poisoned with NaN first so an element
  a kernel leaves unwritten fails; Triton's interpreter patches triton.language once per kernel
  launch rather than at every @jit helper call as well (`_patch_lang_once_per_launch`).
- `gpu`: the compiled kernels on CUDA, outputs poisoned the same way. Tests that take it carry the
  `gpu` marker (`pytest -m gpu` selects them); without CUDA they are skipped at collection.
- `fast_recipe`: the demo recipe cut down by helpers.FAST, written once per session (read-only:
  a test that changes a field writes its own copy).
- `converted`: one finished conversion of the demo with that recipe, made once per test run (also
  under pytest-xdist's workers: `_made_once`) by the installed console script in a real subprocess, as `(folder, the --json document)`; the same
  adapter, bit for bit, as a run of that recipe in this process. Tests only read it; one that
  writes into the folder (sample, push, a tampered file) copies it first (`shutil.copytree`), so
  sharing does not couple tests.
- `parallel_smoke`: benchmarks/bench_parallel.py --smoke, run once per test run (a tiny Wan saved with
  save_pretrained, `accelerate launch` of the conversion with 1 and with 2 gloo processes on the
  CPU), every atomic write of every process logged with its rank (helpers.write_logging_env), as
  `(the results document, the --work folder, the write log)`. The benchmark's own test and the
  stage layer's two-process test (tests/stages/test_parallel.py) read the same two runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import FAST, console_script, write_logging_env

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


def _patch_lang_once_per_launch(monkeypatch) -> None:
    """Triton's interpreter re-patches triton.language (inspect.getmembers over tl, tl.core,
    tl.math, tl.tensor) at every call of a @jit helper inside a kernel, in every program; the
    launch has patched those same modules already and restores them when it ends, so the repeat
    changes nothing (already-patched members are no longer builtins) and took about a third of the
    kernel tests' time. Within one launch, a helper whose language modules the launch patched skips
    the repeat; any other call (the launch's own, a helper seeing another module) runs Triton's
    own patching. Left as Triton has it where the interpreter lacks these internals."""
    import inspect

    try:
        from triton.runtime import interpreter as it
        import triton.language as tl

        original, grid_call, empty_scope = it._patch_lang, it.GridExecutor.__call__, it._LangPatchScope
        empty_scope().restore()  # the shape this relies on: a scope made with no arguments, restorable
        if list(inspect.signature(original).parameters) != ["fn"]:
            return
    except (ImportError, AttributeError, TypeError, ValueError):
        return
    launch: dict[str, Any] = {"running": False, "patched": set()}

    def langs(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and (v is tl or v is tl.core)}

    def patch_lang(fn):
        mine = langs(fn)
        if launch["running"] and launch["patched"] and mine and mine <= launch["patched"]:
            return empty_scope()  # this launch's patches are in place
        scope = original(fn)
        if launch["running"] and not launch["patched"]:  # the launch's own call, the first of it
            launch["patched"] = mine
        return scope

    def call(self, *args, **kwargs):
        launch.update(running=True, patched=set())
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launch.update(running=False, patched=set())

    monkeypatch.setattr(it, "_patch_lang", patch_lang)
    monkeypatch.setattr(it.GridExecutor, "__call__", call)


@pytest.fixture
def interp(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _poison_kernel_outputs(monkeypatch)
    _patch_lang_once_per_launch(monkeypatch)


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


def _made_once(tmp_path_factory, name: str, make: Callable[[Path], Any]) -> Any:
    """`make(folder)`, a JSON value, made once per test run. Under pytest-xdist (the README's test
    command runs 2 worker processes, each with its own session fixtures) the first worker to ask
    makes it in the run's shared temporary folder, holding a file lock, and the others wait for it
    and read the value back: a session fixture's conversion is not run once per worker."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    from hla_convert.atomic_files import write_json_atomic

    folder = tmp_path_factory.getbasetemp().parent / name  # the run's folder, above each worker's own
    with FileLock(f"{folder}.lock"):
        done = folder.with_name(f"{name}.json")
        if done.is_file():
            return json.loads(done.read_text())
        if folder.exists():
            pytest.fail(f"{name}: another worker started it and failed; its error is in that worker's report")
        folder.mkdir()
        value = make(folder)
        write_json_atomic(done, value)
        return value


@pytest.fixture(scope="session")
def converted(tmp_path_factory, fast_recipe) -> tuple[Path, dict]:
    """A finished conversion of the demo, made by the installed console script (a real subprocess)."""

    def make(folder: Path) -> list:
        out = folder / "demo-hla"
        proc = subprocess.run(
            [console_script(), "convert", "--recipe", str(fast_recipe), "--out", str(out), "--device", "cpu", "--json"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        return [str(out), json.loads(proc.stdout)]  # stdout holds the one JSON document and nothing else

    out, doc = _made_once(tmp_path_factory, "converted", make)
    return Path(out), doc


@pytest.fixture(scope="session")
def parallel_smoke(tmp_path_factory) -> tuple[dict, Path, Path]:
    """bench_parallel.py --smoke: one 1-process and one 2-process launch of the same conversion."""

    def make(tmp: Path) -> list:
        script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_parallel.py"
        log = tmp / "writes.log"
        env = write_logging_env(tmp / "hook", log)
        env.pop("WORLD_SIZE", None)
        # cwd outside the checkout: `-m` and script launches put it first on sys.path, and a checkout's
        # hla_convert lacks the built-in recipes a (non-editable) install maps into it, as CI installs it
        proc = subprocess.run([sys.executable, str(script), str(tmp / "par.json"), "--smoke", "--work", str(tmp / "work")],
                              env=env, capture_output=True, text=True, timeout=300, cwd=tmp, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads((tmp / "par.json").read_text()), str(tmp / "work"), str(log)]

    doc, work, log = _made_once(tmp_path_factory, "parallel-smoke", make)
    return doc, Path(work), Path(log)
