"""Python started in the repository root still imports Hugging Face's `kernels`, not ours.

transformers (through peft and diffusers) imports Hugging Face's `kernels` package whenever its
metadata is installed. With a `kernels/__init__.py` at the root, a Python whose current directory
is the checkout found that folder first and every diffusers model import failed there
(`cannot import name 'CUDAProperties' from 'kernels'`). The package now lives one level down,
kernels/hla_kernels/, and kernels/ is a plain folder.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_in_root(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "hla_kernels" / "__init__.py").exists()


@pytest.mark.slow
def test_module_cli_and_a_diffusers_model_import_from_the_repository_root():
    """`python -m hla_convert inspect` in the root, one Python (each start imports torch and diffusers,
    ~7 s): hla_kernels imports, and inspect loads the demo's WanTransformer3DModel from diffusers."""
    res = _run_in_root("-c", "import runpy, sys, hla_kernels; sys.argv = ['hla_convert', 'inspect']; "
                             "runpy.run_module('hla_convert', run_name='__main__', alter_sys=True)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "(WanTransformer3DModel), recipe tiny-wan" in res.stdout
