"""Reading a file the user names or puts in a folder (a recipe, a config.json, a README.md to push,
calibration or --inputs tensors): only a regular file, only up to a stated size.

A FIFO would block the read forever, a device (`/dev/zero`) would be read until memory runs out, a
multi-GB stray file would be loaded whole. `check_regular_file` refuses all three with one line
(the caller's error type, a ValueError: exit 2 on the command line) from the file's metadata alone;
`read_regular_file` also reads it, opened without blocking and never past the cap, so a file that
is swapped or grows after the check is still bounded.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from .errors import InputError

# Caps of the files hla-convert reads (the bytes a legitimate one has, with a wide margin).
MAX_JSON_BYTES = 16 << 20  # config.json, hla_config.json, drift_report.json, model_index.json
MAX_CARD_BYTES = 16 << 20  # README.md
MAX_TENSOR_FILE_BYTES = 64 << 30  # a calibration or --inputs safetensors file (memory-mapped)
MAX_IMAGE_BYTES = 256 << 20  # a calibration.images conditioning image (an 8K PNG is ~100 MiB)


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB" if n >= 1 << 20 else f"{n:,} bytes"


def check_regular_file(path: str | os.PathLike, what: str, max_bytes: int, error: Callable[[str], Exception] = InputError) -> os.stat_result:
    """The stat of `path` (symlinks followed) when it is a regular file of at most `max_bytes`;
    else `error` with one line naming `what` (e.g. "--inputs 'x.safetensors'") and why."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} does not exist") from None
    except (OSError, ValueError) as exc:
        raise error(f"{what} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    return _checked(st, what, max_bytes, error)


def _checked(st: os.stat_result, what: str, max_bytes: int, error: Callable[[str], Exception]) -> os.stat_result:
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} is a folder, not a regular file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file"
        raise error(f"{what} is {kind}, not a regular file; hla-convert reads regular files only")
    if st.st_size > max_bytes:
        raise error(f"{what} is larger than {_size(max_bytes)} ({st.st_size:,} bytes), more than such a file may be")
    return st


def read_regular_file(path: str | os.PathLike, what: str, max_bytes: int, error: Callable[[str], Exception] = InputError) -> bytes:
    """The bytes of `path` when it is a regular file of at most `max_bytes` (see check_regular_file).

    Opened with O_NONBLOCK (a FIFO swapped in after a check does not block the open), checked on the
    open descriptor, read up to max_bytes + 1 bytes at most."""
    check_regular_file(path, what, max_bytes, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"{what} cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        _checked(os.fstat(fd), what, max_bytes, error)
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise error(f"{what} cannot be read ({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise error(f"{what} is larger than {_size(max_bytes)}, more than such a file may be (it grew while read)")
    return data


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int, error: Callable[[str], Exception] = InputError) -> str:
    """read_regular_file decoded as UTF-8 (a file that is not: `error`, naming the byte)."""
    data = read_regular_file(path, what, max_bytes, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text (byte {exc.start})") from None


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES, error: Callable[[str], Exception] = InputError):
    """A JSON document from a regular file of at most `max_bytes` (unreadable JSON, or a key given
    twice, which json.loads would settle silently by keeping the last: `error`)."""
    from .json_docs import DuplicateKeyError, loads_strict

    text = read_text_file(path, what, max_bytes, error)
    try:
        return loads_strict(text)
    except DuplicateKeyError as exc:
        raise error(f"{what} has a {exc}: edited by hand, not written as one document") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not readable JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


__all__ = [
    "MAX_CARD_BYTES",
    "MAX_JSON_BYTES",
    "MAX_TENSOR_FILE_BYTES",
    "check_regular_file",
    "read_json_file",
    "read_regular_file",
    "read_text_file",
]
