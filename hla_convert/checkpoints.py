"""Atomic file writes and training checkpoints.

Every file this package writes that a later run reads back (checkpoints, reports, adapters) goes
through `atomic_write_bytes`: the bytes go to a temporary file in the same folder, are flushed to
disk, and `os.replace` puts them in place. A process killed at any moment (Ctrl-C, OOM killer,
pre-emption) leaves either the previous complete file or the new complete file, never half of one.

A checkpoint is one safetensors file: the tensors (HLA parameters, optimizer moments, RNG state)
plus a JSON document in the safetensors metadata (step, stage, optimizer hyper-parameters, a
fingerprint of what was being trained). One file, so one `os.replace` makes it appear atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import first_line

_STATE_KEY = "hla_convert_checkpoint"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run; the message says which and why."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers only ever see the old or the new complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
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


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """JSON (UTF-8, trailing newline) written atomically. Non-finite floats are refused (not JSON)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def checkpoint_path(work_dir: str | os.PathLike, stage: str) -> Path:
    """Where the latest checkpoint of a stage ("stage1", "stage2") lives in a work folder."""
    return Path(work_dir) / f"{stage}.checkpoint.safetensors"


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write tensors + a JSON-able state dict as one safetensors file, atomically."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = save(flat, metadata={_STATE_KEY: json.dumps(state, allow_nan=False)})
    return atomic_write_bytes(path, data)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by save_checkpoint: (tensors on the CPU, state: a dict; its fields are
    checked by the reader that knows them, distill_loop._restore)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({first_line(e)[:200]})") from None
    if _STATE_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file, but not an hla-convert checkpoint (no {_STATE_KEY} metadata)")
    try:
        state = json.loads(meta[_STATE_KEY])
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: its {_STATE_KEY} metadata is not readable JSON") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its {_STATE_KEY} metadata is a {type(state).__name__}, not an object")
    return tensors, state


def optimizer_to_checkpoint(optimizer: torch.optim.Optimizer, prefix: str = "optimizer.") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimizer.state_dict() into tensors (for safetensors) and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "indices": [int(i) for i in sd["state"]]}


def optimizer_from_checkpoint(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "optimizer."
) -> None:
    """Inverse of optimizer_to_checkpoint: load the saved state into `optimizer`."""
    state: dict[int, dict[str, Any]] = {int(i): dict(meta["scalars"].get(str(i), {})) for i in meta["indices"]}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        idx, name = key[len(prefix) :].split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "checkpoint_path",
    "load_checkpoint",
    "optimizer_from_checkpoint",
    "optimizer_to_checkpoint",
    "save_checkpoint",
    "write_json_atomic",
]
