"""How a command of the command line runs: its exceptions become exit codes and one line on
stderr, its --json document is the one thing on stdout (see hla_convert.cli for the codes).

Light on purpose (no typer, torch or diffusers at import time): hla_convert.cli.entry uses it for
the errors that come before the command line is parsed (Ctrl-C during the first imports, a missing
dependency)."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ERROR_PREFIX, MAX_LINE, MAX_MESSAGE, clip  # noqa: F401 - MAX_LINE, MAX_MESSAGE: the CLI's surface
from ..json_docs import dumps_document
from .checks import EXIT_BAD_INPUT, CommandFailed

EXIT_OK = 0
EXIT_DRIFT = 1
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130



def error_line(message: str) -> None:
    """The one error line on stderr, at most MAX_LINE characters."""
    print(ERROR_PREFIX + clip(message), file=sys.stderr, flush=True)


def write_stdout(text: str, stream: Any = None) -> bool:
    """Write `text` to stdout (or `stream`, the real stdout while it is redirected); False when the
    reader has gone (a closed pipe: `hla-convert recipes | head -1`). Like git and ripgrep, a reader
    that stops early is not an error: the rest of the output is dropped quietly and the exit code is
    the command's own."""
    stream = sys.stdout if stream is None else stream
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        silence_stdout()
        return False
    return True


def silence_stdout() -> None:
    """Point stdout at /dev/null after its reader has gone, so nothing later (the interpreter's own
    flush at exit included) fails on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):  # no real stdout (an in-process test runner)
        pass


COMMANDS = ("convert", "validate", "inspect", "recipes", "sample", "push")


def early_document(words: list[str], command: str | None, code: int, message: str) -> None:
    """The --json document of a command line that never reached its command body (click refused it,
    Ctrl-C during the imports, a missing dependency): printed only when --json is on it."""
    if "--json" not in words or "--help" in words:
        return
    command = command or next((w for w in words if w in COMMANDS), None)
    doc = {"command": command, "exit_code": code, "error": " ".join(message.split())}
    write_stdout(dumps_document(doc) + "\n")


def missing_dependency(exc: ImportError) -> str | None:
    """The one-line message for a package hla-convert needs that is missing or too old to import
    (e.g. pydantic, which typer >= 0.29 imports while it parses the arguments), or None when the
    ImportError comes from hla_convert itself."""
    package = (exc.name or "").split(".")[0]
    if not package or package == "hla_convert":
        return None
    return (
        f"a package hla-convert needs cannot be imported: {package} ({clip(str(exc), 200)}); "
        "install hla-convert with its dependencies (pip install hla-convert, without --no-deps)"
    )



def _bad_input_types() -> tuple[type[BaseException], ...]:
    from ..io.adapter import AdapterError
    from ..stages.calibration import CalibrationError
    from ..stages.checkpoints import CheckpointError
    from ..model.config import ConfigError
    from ..errors import InputError
    from ..model.loading import ModelLoadError
    from ..io.output import OutputError
    from ..recipe import RecipeError
    from ..model.surgery import ConversionError

    return (AdapterError, CalibrationError, CheckpointError, ConfigError, InputError, ModelLoadError, OutputError, RecipeError, ConversionError)


def _run_failed_types() -> tuple[type[BaseException], ...]:
    from ..stages.distill import DistillError

    return (DistillError,)


def caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt (Ctrl-C, or SIGTERM as the entry point maps it) is in `exc`'s
    chain of causes: diffusers' lazy imports turn one that lands while a model module loads into
    "RuntimeError: Failed to import diffusers...", which is an interruption, not a failed run."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def command(name: str, json_mode: bool, resume_hint: Callable[[], str | None] | None = None) -> Iterator[dict[str, Any]]:
    """Run a command body: map exceptions to exit codes, keep stdout clean in --json mode.

    The body fills the yielded dict (the --json document) and sets its "exit_code". resume_hint()
    gives the command that continues an unfinished run, or None when there is nothing to continue.
    """
    import typer

    doc: dict[str, Any] = {"command": name, "exit_code": EXIT_OK, "error": None}
    real_stdout = sys.stdout
    _quiet_hub_retries()
    code = EXIT_OK
    try:
        # In --json mode anything a library prints goes to stderr: stdout is the document alone.
        with contextlib.redirect_stdout(sys.stderr) if json_mode else contextlib.nullcontext():
            yield doc
        code = doc["exit_code"]
    except CommandFailed as exc:
        code, doc["error"] = exc.code, str(exc)
    except KeyboardInterrupt:
        hint = resume_hint() if resume_hint else None
        code, doc["error"] = EXIT_INTERRUPTED, "interrupted" + (f"; continue with: {hint}" if hint else "")
    except BrokenPipeError:  # stdout's reader has gone: the output is dropped, the outcome stands
        silence_stdout()
        code = doc["exit_code"]
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        if isinstance(exc, (typer.Exit, SystemExit)):
            raise
        if caused_by_interrupt(exc):  # a Ctrl-C / SIGTERM that a library re-raised as its own error
            hint = resume_hint() if resume_hint else None
            code, doc["error"] = EXIT_INTERRUPTED, "interrupted" + (f"; continue with: {hint}" if hint else "")
        elif isinstance(exc, _bad_input_types()):
            code, doc["error"] = EXIT_BAD_INPUT, str(exc)
        elif isinstance(exc, ImportError) and missing_dependency(exc):
            code, doc["error"] = EXIT_BAD_INPUT, missing_dependency(exc)
        else:
            code, doc["error"] = EXIT_RUN_FAILED, _failure_message(exc, resume_hint)
            if os.environ.get("HLA_CONVERT_DEBUG"):
                traceback.print_exc(file=sys.stderr)
    doc["exit_code"] = code
    if doc["error"] is not None:
        doc["error"] = clip(doc["error"])
        error_line(doc["error"])
    if json_mode:
        write_stdout(dumps_document(doc) + "\n", real_stdout)
    if code != EXIT_OK:
        raise typer.Exit(code)


def _quiet_hub_retries() -> None:
    """huggingface_hub logs every retry of an unreachable Hub as a warning; the load error that
    follows is the one line that matters."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover
        return
    hub_logging.set_verbosity_error()


def _failure_message(exc: BaseException, resume_hint: Callable[[], str | None] | None) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, _run_failed_types()):
        # Training diverged (the engine's message says where and which checkpoint is kept). The same
        # recipe would diverge again from that checkpoint, so no --resume hint.
        return f"the run failed: {first}; change the recipe (e.g. a lower learning rate) and run again with --overwrite"
    hint = resume_hint() if resume_hint else None
    debug = "" if os.environ.get("HLA_CONVERT_DEBUG") else " (HLA_CONVERT_DEBUG=1 shows the traceback)"
    return f"the run failed: {type(exc).__name__}: {first}{debug}" + (f"; once fixed, continue with: {hint}" if hint else "")


__all__ = [
    "COMMANDS", "CommandFailed", "caused_by_interrupt", "EXIT_BAD_INPUT", "EXIT_DRIFT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUN_FAILED", "MAX_LINE",
    "clip", "command", "early_document", "error_line", "missing_dependency", "silence_stdout", "write_stdout",
]
