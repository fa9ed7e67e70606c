"""Training checkpoints, written atomically (hla_convert.atomic_files).

A checkpoint is one safetensors file: the tensors (HLA parameters, optimizer moments, RNG state)
plus a JSON document in the safetensors metadata (step, stage, optimizer hyper-parameters, a
fingerprint of what was being trained). One file, so one `os.replace` makes it appear atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import atomic_write_bytes
from ..errors import first_line

_STATE_KEY = "hla_convert_checkpoint"
# The layers given back to softmax after stage 1 (stages.selection.record_choice): a resumed run
# reverts these instead of choosing again, so stages 2 and 3 go on training the model they started.
SELECTION_FILE = "softmax_selection.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run; the message says which and why."""


def checkpoint_path(work_dir: str | os.PathLike, stage: str) -> Path:
    """Where the latest checkpoint of a stage ("stage1", "stage2", "stage3") lives in a work folder."""
    return Path(work_dir) / f"{stage}.checkpoint.safetensors"


def selection_path(work_dir: str | os.PathLike) -> Path:
    """Where the recorded choice of layers given back to softmax lives in a work folder."""
    return Path(work_dir) / SELECTION_FILE


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
    "SELECTION_FILE",
    "CheckpointError",
    "checkpoint_path",
    "load_checkpoint",
    "optimizer_from_checkpoint",
    "optimizer_to_checkpoint",
    "save_checkpoint",
    "selection_path",
]
