"""The `hla-convert` command line (docs/architecture.md: the top layer).

Light on purpose: `hla_convert.cli.entry` (the console script and `python -m hla_convert`) installs
its Ctrl-C / SIGTERM handlers before typer, torch and diffusers load, so this package imports
nothing heavy itself. The Typer app and the commands live in `commands` (flags in, tables / JSON /
exit codes out: its docstring lists the exit codes); `run` maps a command's exceptions to exit codes
and one line on stderr; `share` holds `sample` and `push`, `options` the shared options, `display`
the tables and progress. Every other public name of `commands` (`app`, `StageProgress`, the EXIT_*
codes) is reachable from here, imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .entry import main


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name in ("commands", "entry", "run", "checks", "display", "options", "share"):
        raise AttributeError(f"module 'hla_convert.cli' has no attribute {name!r}")  # submodules: the import system's
    commands = importlib.import_module(".commands", __name__)
    try:
        value = getattr(commands, name)
    except AttributeError:
        raise AttributeError(f"module 'hla_convert.cli' has no attribute {name!r}") from None
    globals()[name] = value
    return value


__all__ = ["main"]
