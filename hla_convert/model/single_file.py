"""A single-file checkpoint as MODEL: one .safetensors file in a family's ORIGINAL layout (as
Wan-AI releases it and ComfyUI uses it: `blocks.0.self_attn.q.weight`, `patch_embedding.weight`,
..., possibly under a `model.diffusion_model.` prefix), loaded by diffusers' `from_single_file`.

This module only reads the file's header (the tensor names, not the weights) and tells which
architecture it is, from the architecture table's `single_file_keys` (model.architectures: one
home per family fact). model.loading resolves the diffusers config that goes with it and loads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import first_line
from .architectures import ARCHITECTURES

SINGLE_FILE_SUFFIX = ".safetensors"
# Prefixes a single file may put before every tensor name (ComfyUI's, which diffusers strips too).
KEY_PREFIXES = ("model.diffusion_model.",)


class SingleFileError(ValueError):
    """A single-file checkpoint that cannot be used; the message is one line saying why."""


def is_single_file(model: str | os.PathLike | None) -> bool:
    """Whether MODEL names an existing file ending in .safetensors (a single-file checkpoint)."""
    if model is None:
        return False
    try:
        path = Path(os.path.expanduser(str(model)))
        return path.suffix.lower() == SINGLE_FILE_SUFFIX and path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file, prefixes (KEY_PREFIXES) removed; only its header is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SingleFileError(f"{path} is not a safetensors file ({first_line(exc)})") from None
    out = []
    for key in keys:
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out.append(key)
    return out


def checkpoint_architecture(path: str | os.PathLike) -> str:
    """The diffusers class name of a single-file checkpoint, read from its tensor names: the
    architecture row all of whose single_file_keys it holds (the row with the most keys wins, so a
    VACE file is VACE, not plain Wan). SingleFileError when no row matches."""
    keys = set(checkpoint_keys(path))
    rows = [row for row in ARCHITECTURES.values() if row.single_file_keys and set(row.single_file_keys) <= keys]
    if not rows:
        known = ", ".join(name for name, row in ARCHITECTURES.items() if row.single_file_keys)
        example = next(iter(sorted(keys)), None)
        raise SingleFileError(
            f"{path} holds no known architecture's original single-file layout (known: {known}; "
            f"its first tensor is {example!r})"
        )
    return max(rows, key=lambda row: len(row.single_file_keys)).name


__all__ = ["KEY_PREFIXES", "SINGLE_FILE_SUFFIX", "SingleFileError", "checkpoint_architecture", "checkpoint_keys", "is_single_file"]
