"""The `hla-convert` console script's entry point: the exit-code promise from the first instant.

Importing the command line (typer, rich, then torch and diffusers inside the commands) takes a
second or more. A Ctrl-C or SIGTERM in that second, or a dependency that is missing or too old to
import (typer >= 0.29 imports pydantic lazily, while it parses the arguments), would otherwise end
in a traceback (or, for SIGTERM, exit 143 with nothing). Here the handlers go in first, with only
the standard library and hla_convert.cli.run (itself light) imported, so that every one of these
ends as one error line, exit 130 (interrupted) or 2 (missing dependency), and the --json document
when --json is on the command line; a stdout whose reader has gone ends quietly (run.write_stdout).
What remains is the interpreter's own start (a few tens of milliseconds before this module runs),
where a signal still has the operating system's default effect.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from .run import EXIT_BAD_INPUT, EXIT_INTERRUPTED, caused_by_interrupt, early_document, error_line, missing_dependency, silence_stdout


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point (`hla-convert`, `python -m hla_convert`)."""
    # A SIGTERM (a job scheduler, `timeout`, `kill`) ends a run like Ctrl-C: one line, exit 130,
    # the work folder kept for --resume.
    # (Ctrl-C already raises KeyboardInterrupt: Python's own handler, unless the shell started us
    # with SIGINT ignored, e.g. `nohup` or a background job, which stays so.)
    signal.signal(signal.SIGTERM, _interrupt)
    words = sys.argv[1:]
    try:
        from .commands import app

        app()  # exits through sys.exit with the command's code
    except KeyboardInterrupt:  # before a command body took over (imports, argument parsing)
        code = _stop(words, EXIT_INTERRUPTED, "interrupted")
    except BrokenPipeError:
        silence_stdout()
        code = 0
    except ImportError as exc:
        message = missing_dependency(exc)
        if message is None:
            if caused_by_interrupt(exc):
                code = _stop(words, EXIT_INTERRUPTED, "interrupted")
            else:
                raise
        else:
            code = _stop(words, EXIT_BAD_INPUT, message)
    except Exception as exc:  # a library's own error around a Ctrl-C / SIGTERM during the imports
        if not caused_by_interrupt(exc):
            raise
        code = _stop(words, EXIT_INTERRUPTED, "interrupted")
    sys.exit(code)


def _stop(words: list[str], code: int, message: str) -> int:
    # a second Ctrl-C while the line is written must not turn into a traceback either
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    error_line(message)
    early_document(words, None, code, message)
    return code


__all__ = ["main"]
