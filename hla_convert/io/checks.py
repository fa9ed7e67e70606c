"""Checks of hla_convert.convert / validate / sample's arguments (and so of the command line's
inputs) that run before anything slow (a model load, a Hub lookup): each refuses bad input with
InputError (one line; the command line exits 2). The messages name the command line's flags."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError, shown
from ..model.loading import looks_like_hub_id

def check_arg_types(**args: tuple[Any, tuple[type, ...]]) -> None:
    """The Python API's arguments, each of the type its docstring says (None always allowed): keyword
    = the command line's flag or argument name ("out", "recipe"), value = (argument, accepted
    types). An int for a path, say, is one InputError here, not an AttributeError deep inside."""
    for name, (value, types) in args.items():
        if value is None:
            continue
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            flag = name.upper() if name in ("model", "dir") else "--" + name.replace("_", "-")
            wanted = " or ".join(t.__name__ for t in types)
            raise InputError(f"{flag} must be a {wanted}, not {type(value).__name__} ({shown(value)})")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """--device, checked before anything loads: a torch device this machine has (default: cuda when
    available, else cpu)."""
    import torch

    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {shown(device)} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    checks: dict[str, Callable[[], int]] = {
        "cpu": lambda: 1,
        "cuda": lambda: torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": lambda: int(bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())),
        "xpu": lambda: torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0,
    }
    if dev.type not in checks:
        raise InputError(f"--device {shown(device)}: hla-convert runs on {', '.join(checks)} devices")
    count = checks[dev.type]()
    if count == 0:
        raise InputError(f"--device {shown(device)}: no {dev.type.upper()} device on this machine (try --device cpu)")
    if dev.index is not None and dev.index >= count:
        raise InputError(f"--device {shown(device)}: this machine has {count} {dev.type} device(s), numbered from 0")
    return str(dev)


def check_model_path(model: str | None, flag: str = "MODEL") -> None:
    """A MODEL that is neither an existing folder nor shaped like a Hub ID is reported as missing,
    before recipes are looked up or anything loads."""
    if model is None:
        return
    if not model.strip():
        raise InputError(f"{flag} is empty; give a folder or a Hub ID (or leave it out for the demo model)")
    try:
        path = Path(os.path.expanduser(model))
        if path.is_dir():
            return
        exists = path.exists()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise InputError(f"{flag} {shown(model)} is not a usable path ({getattr(exc, 'strerror', None) or exc})") from None
    if exists:
        if path.suffix.lower() == ".safetensors" and path.is_file():  # a single-file checkpoint (model.single_file)
            return
        raise InputError(f"{flag} {shown(model)} is a file; it must be a diffusers folder, a Hub ID or a .safetensors checkpoint")
    if not looks_like_hub_id(model):
        raise InputError(f"{flag} {shown(model)} does not exist (not a folder, and not a Hub ID of the form owner/name)")


def check_recorded_base(info: dict[str, Any], source: Any, revision: Any, subfolder: Any, config: Any = None) -> None:
    """The base an adapter records must be a usable MODEL (its metadata may have been edited)."""
    demo = source is None and info.get("base_source")
    if not demo and not (isinstance(source, str) and source.strip() and len(source) <= 4096):
        raise InputError(f"the adapter records no usable base model ({shown(info.get('base_source'))}); pass --base MODEL")
    for what, value in (("revision", revision), ("subfolder", subfolder), ("config", config)):
        if value is not None and not (isinstance(value, str) and len(value) <= 4096):
            raise InputError(f"the adapter records an unusable base {what} ({shown(value)}); pass --base MODEL")
    if not demo:
        check_model_path(source, "the adapter's base")


def folder_arg(flag: str, text: str) -> Path:
    """A folder argument as given; an empty string is refused rather than read as '.'."""
    if not str(text).strip():
        raise InputError(f"{flag} is empty; give a folder")
    if "\0" in str(text):
        raise InputError(f"{flag} {shown(text)} contains a NUL byte")
    try:  # safetensors (Rust) takes UTF-8 paths only: a byte that is not would fail the final save
        os.path.abspath(str(text)).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{flag} {shown(text)} is not valid UTF-8 (the folder or the current folder's path); use a UTF-8 name") from None
    return Path(text)


def note_sampling(report: dict[str, Any], recipe, scheduler: Any, why: str) -> None:
    """When the recipe asks for the sampling check and there is no scheduler to run it, say so in
    the report (its table, and "sampling_not_run" in the JSON) instead of passing in silence."""
    if scheduler is not None or recipe.validation.sampling_steps <= 0 or report.get("sampling") is not None:
        return
    report["sampling_not_run"] = why
    report.setdefault("table", []).append({"metric": "sampling check (final latent)", "value": "not run", "threshold": None, "ok": None})


# Seconds before "trying the Hugging Face Hub" is shown: a cached or offline answer comes sooner.
HUB_NOTICE_AFTER_S = 2.0


@contextlib.contextmanager
def hub_notice(model: str | None) -> Iterator[None]:
    """Say on stderr that MODEL is being looked up on the Hub, once the lookup takes a while."""
    try:
        local = model is None or Path(os.path.expanduser(model)).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: a check will say so
        local = True
    if local or not looks_like_hub_id(model):
        yield
        return
    err = sys.stderr
    if HUB_NOTICE_AFTER_S <= 0:
        print(f"trying the Hugging Face Hub for {shown(model)} ...", file=err, flush=True)
        yield
        return
    timer = threading.Timer(
        HUB_NOTICE_AFTER_S, lambda: print(f"trying the Hugging Face Hub for {shown(model)} ...", file=err, flush=True)
    )
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


__all__ = [
    "HUB_NOTICE_AFTER_S",
    "InputError",
    "check_arg_types",
    "check_device",
    "check_model_path",
    "check_recorded_base",
    "default_device",
    "folder_arg",
    "hub_notice",
    "looks_like_hub_id",
    "note_sampling",
    "shown",
]
