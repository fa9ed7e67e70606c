"""The console script as a process at its edges: a signal during the first imports or an interrupt a
library rewraps is exit 130 with the --json document; a reader that closes the pipe early ends the
command quietly; a missing dependency is one line naming it (exit 2).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from helpers import console_script

# -- issue 18: exit codes and the --json promise at the edges ----------------------------------


# Sends the signal to the process itself while it imports typer: the first second of a run, before
# the command line is even parsed.
_SIGNAL_DURING_IMPORTS = """
import os, signal, sys
class _SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "typer":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIG{sig})
        return None
sys.meta_path.insert(0, _SignalOnImport())
"""


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_a_signal_during_the_first_imports_is_exit_130_with_the_json_document(tmp_path, sig):
    (tmp_path / "sitecustomize.py").write_text(_SIGNAL_DURING_IMPORTS.format(sig=sig))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), HF_HUB_OFFLINE="1")
    # SIGINT at its default in the child: a suite started as a background job (`cmd &` in a shell
    # without job control) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.run(
        [console_script(), "recipes", "--json"], capture_output=True, text=True, env=env, timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "hla-convert: error: interrupted"
    assert json.loads(proc.stdout) == {"command": "recipes", "exit_code": 130, "error": "interrupted"}


def test_an_interrupt_a_library_rewraps_is_still_exit_130_with_the_json_document(capsys):
    """Seen by the hostile pass under load: a SIGTERM while diffusers lazily imported a model module
    came back as "RuntimeError: Failed to import diffusers..." and was reported as a failed run (3)."""
    import typer

    from hla_convert.cli.run import command

    with pytest.raises(typer.Exit) as stopped:
        with command("convert", json_mode=True):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                raise RuntimeError("Failed to import diffusers.models.modeling_utils") from exc
    out, err = capsys.readouterr()
    assert stopped.value.exit_code == 130
    assert err.strip().splitlines()[-1] == "hla-convert: error: interrupted"
    assert json.loads(out) == {"command": "convert", "exit_code": 130, "error": "interrupted"}


@pytest.mark.parametrize("args", [["recipes"], ["recipes", "--json"], ["recipes", "tiny-wan"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(args):
    # `hla-convert recipes | head -0`: the pipe is closed before anything is written (git and ripgrep
    # end quietly there too); the command's exit code stands.
    proc = subprocess.Popen([console_script(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.decode() == ""


# Makes `import pydantic` fail as it does where typer >= 0.29 was installed without it (--no-deps).
_NO_PYDANTIC = """
import sys
class _NoPydantic:
    def find_spec(self, name, path=None, target=None):
        if name == "pydantic" or name.startswith("pydantic."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoPydantic())
"""


def test_a_missing_dependency_is_one_line_naming_it(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_NO_PYDANTIC)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), HF_HUB_OFFLINE="1")
    proc = subprocess.run([console_script(), "recipes", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("hla-convert: error: a package hla-convert needs cannot be imported: pydantic"), line
    assert json.loads(proc.stdout)["exit_code"] == 2
