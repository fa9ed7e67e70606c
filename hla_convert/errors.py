"""How an underlying library's exception becomes part of one of our one-line error messages, and
the error classes that several layers raise (the bottom layer: imports nothing from hla_convert)."""

from __future__ import annotations

from typing import Any


ERROR_PREFIX = "hla-convert: error: "
MAX_LINE = 600  # characters of a whole error line, prefix included (the README's promise)
MAX_MESSAGE = MAX_LINE - len(ERROR_PREFIX)  # so a message never carries a whole input


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """The text on one line (whitespace runs, newlines included, become one space), cut to `limit`."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a message never carries a whole input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class InputError(ValueError):
    """A bad argument to hla_convert.convert / validate (or the matching command-line input): a
    device this machine lacks, a MODEL that is neither a folder nor a Hub ID, an empty folder name,
    a recipe that cannot be loaded or overridden. The message is one line; it names the command
    line's flag (--device, --out, MODEL), which is the argument of the same name in Python."""


class OutputError(ValueError):
    """An output folder that cannot be used as asked; the message is one line saying why."""
