"""Atomic file writes: every file this package writes that a later run reads back (checkpoints,
reports, adapters, manifests) goes through `atomic_write_bytes`, or `atomic_write_with` for a writer
that streams to a path itself (training checkpoints: no second copy of a many-GB file in memory).

The bytes go to a temporary file in the same folder, are flushed to disk, and `os.replace` puts
them in place. A process killed at any moment (Ctrl-C, OOM killer, pre-emption) leaves either the
previous complete file or the new complete file, never half of one. A leaf of the bottom layer: it
imports nothing from hla_convert (docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes the whole file to a temporary path in the same folder, which is then flushed
    to disk and put in place: readers only ever see the old or the new complete file. For writers that
    stream to a path themselves (safetensors' save_file) instead of building the bytes in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file owner-only; give it the mode a plain open() would (shared checkpoints)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files an atomic write of `path` leaves only when its process is killed mid-write
    (SIGKILL, a second Ctrl-C while the interpreter waits on a writing thread): `.<name>.*.tmp`."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers only ever see the old or the new complete file."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write_with(path, write)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """JSON (UTF-8, trailing newline) written atomically. Non-finite floats are refused (not JSON)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_with", "stale_temporaries", "write_json_atomic"]
