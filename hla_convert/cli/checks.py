"""What only the command line needs to stop a command: CommandFailed and the bad-input exit code.
The input checks themselves are library code, in hla_convert.io.checks."""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class CommandFailed(Exception):
    """Stop a command with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


__all__ = ["CommandFailed", "EXIT_BAD_INPUT"]
