"""How a command of the command line runs: its exceptions become exit codes and one line on
stderr, its --json document is the one thing on stdout (see hla_convert.cli for the codes)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import typer

from .checks import EXIT_BAD_INPUT, CommandFailed

EXIT_OK = 0
EXIT_DRIFT = 1
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130

MAX_MESSAGE = 600  # characters of an error line: a message never carries a whole input


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_line(message: str) -> None:
    text = clip(message)
    print(f"hla-convert: error: {text}", file=sys.stderr, flush=True)



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


@contextlib.contextmanager
def command(name: str, json_mode: bool, resume_hint: Callable[[], str | None] | None = None) -> Iterator[dict[str, Any]]:
    """Run a command body: map exceptions to exit codes, keep stdout clean in --json mode.

    The body fills the yielded dict (the --json document) and sets its "exit_code". resume_hint()
    gives the command that continues an unfinished run, or None when there is nothing to continue.
    """
    doc: dict[str, Any] = {"command": name, "exit_code": EXIT_OK}
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
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        if isinstance(exc, (typer.Exit, SystemExit)):
            raise
        if isinstance(exc, _bad_input_types()):
            code, doc["error"] = EXIT_BAD_INPUT, str(exc)
        else:
            code, doc["error"] = EXIT_RUN_FAILED, _failure_message(exc, resume_hint)
            if os.environ.get("HLA_CONVERT_DEBUG"):
                traceback.print_exc(file=sys.stderr)
    doc["exit_code"] = code
    if "error" in doc:
        doc["error"] = clip(doc["error"])
        error_line(doc["error"])
    if json_mode:
        real_stdout.write(json.dumps(_finite(doc), indent=2, default=str, allow_nan=False) + "\n")
        real_stdout.flush()
    if code != EXIT_OK:
        raise typer.Exit(code)


def _finite(obj: Any) -> Any:
    """The document with NaN/inf floats as the strings "nan", "inf", "-inf": JSON has no such numbers,
    and a diverged metric must not cost the document."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


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


__all__ = ["CommandFailed", "EXIT_BAD_INPUT", "EXIT_DRIFT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUN_FAILED", "clip", "command", "error_line"]
