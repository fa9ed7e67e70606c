"""Training checkpoints, written atomically (hla_convert.atomic_files).

A checkpoint is one safetensors file: the tensors (HLA parameters, optimizer moments, RNG state)
plus a JSON document in the safetensors metadata (step, stage, optimizer hyper-parameters, a
fingerprint of what was being trained). One file, so one `os.replace` makes it appear atomically.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import atomic_write_with, stale_temporaries
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


def _host_buffer(like: torch.Tensor) -> torch.Tensor:
    """An empty host tensor of `like`'s shape and dtype, page-locked where the allocator can (the
    device-to-host copy then runs at the link's rate); pageable where pinning fails (a host short of
    lockable memory, a build without CUDA), which is slower, not wrong."""
    try:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=True)
    except RuntimeError:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu")


def _state_text(state: dict[str, Any]) -> str:
    return json.dumps(state, allow_nan=False)


def _write(path: str | os.PathLike, flat: dict[str, torch.Tensor], state_text: str) -> Path:
    """Stream host tensors and the serialised state into one safetensors file, atomically. Streamed
    (safetensors' save_file), not built in memory first: a full-weight stage-2 checkpoint of
    Wan2.1-1.3B is ~16 GB (fp32 masters and two AdamW moments)."""
    from safetensors.torch import save_file

    return atomic_write_with(path, lambda tmp: save_file(flat, str(tmp), metadata={_STATE_KEY: state_text}))


class CheckpointWriter:
    """Writes a stage's checkpoints on a background thread, so that training goes on while a file is
    written: measured on an H200 (benchmarks/RESULTS.md, 2026-12-07 (evening)), writing the ~16 GB
    checkpoint of Wan2.1-1.3B's `train: full` held the training loop ~50 s, against ~3.4 s a stage-2
    step: every 25 steps, ~60 % on top of the steps between checkpoints.

    submit() takes the snapshot (the device-to-host copy) and serialises the state in the caller's
    thread, so the file holds the values of that moment (the loss history the loop goes on appending
    to included), then returns; the write runs while the next steps train. At most one
    write is in flight: submit() and wait() first finish the previous one, and raise what it raised
    (a full disk is an error of the run, not of a thread nobody reads). Each write is atomic, so a run
    killed mid-write resumes from the checkpoint before; the temporary file such a kill leaves is
    removed by the next write of the same checkpoint.

    Device tensors are copied into host buffers kept from one checkpoint to the next, page-locked
    where the allocator can: the copy then runs at the link's rate into memory already faulted in.
    The previous copy into freshly allocated pageable memory held the loop ~11 s a checkpoint for
    Wan2.1-1.3B's ~16 GB `train: full` state (one H100, 2026-12-07 (night); ~1 s expected at ~20 GB/s,
    not yet timed). The copy stays synchronous: the optimizer's next in-place step cannot race it.
    The buffers cost host memory of the checkpoint's size until the stage ends (close(); the pinned
    allocator rounds each tensor up to a power of two: up to 2x)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def _snapshot(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host tensors holding this moment's values. Only called with no write in flight, so the
        reused buffers are free."""
        flat: dict[str, torch.Tensor] = {}
        for name, value in tensors.items():
            value = value.detach()
            if value.device.type == "cpu":
                flat[name] = value.clone().contiguous()
                continue
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = self._buffers[name] = _host_buffer(value)
            buffer.copy_(value)  # synchronous: the file holds this moment, whatever the loop queues next
            flat[name] = buffer
        for name in set(self._buffers) - set(tensors):  # a tensor no longer checkpointed: its buffer goes
            del self._buffers[name]
        return flat

    def submit(self, path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.wait()
        text = _state_text(state)  # first: a state that is not JSON is refused before any copy
        flat = self._snapshot(tensors)
        for stale in stale_temporaries(path):
            stale.unlink(missing_ok=True)

        def write() -> None:
            try:
                _write(path, flat, text)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = e

        # not a daemon: an interpreter that exits (Ctrl-C) finishes the write before it goes
        self._thread = threading.Thread(target=write, name=f"checkpoint {Path(path).name}")
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """wait(), then let the host buffers go: the pinned ones back to the system where this torch
        can (its host allocator caches freed pinned blocks otherwise, for the process's life)."""
        try:
            self.wait()
        finally:
            pinned = any(b.is_pinned() for b in self._buffers.values())
            self._buffers.clear()
            empty_cache = getattr(torch._C, "_host_emptyCache", None)
            if pinned and empty_cache is not None:
                empty_cache()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by CheckpointWriter: (tensors on the CPU, state: a dict; its fields are
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
    "CheckpointWriter",
    "checkpoint_path",
    "load_checkpoint",
    "optimizer_from_checkpoint",
    "optimizer_to_checkpoint",
    "selection_path",
]
