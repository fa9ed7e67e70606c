"""The adapter: only the new weights (HLA, and LoRA after a `train: lora` stage 2, the trained base
weights of the converted blocks after a `train: full` one), as safetensors, bound to the base model
they were made for.

A folder holds two files (peft's shape: a config JSON plus a safetensors of the new weights):

    adapter_model.safetensors   HLA parameters under their model state_dict keys
                                (e.g. "blocks.0.attn1.hla.proj"), and the LoRA weights of a
                                stage 2 `train: lora` run under "lora." + peft's key
                                (e.g. "lora.blocks.0.attn1.to_q.lora_A.weight"), and the trained
                                base weights of a `train: full` run under "full." + their
                                parameter name ("full.blocks.0.ffn.net.2.weight"): whole tensors
                                in the model's dtype, not differences (a bf16 difference added
                                back to a bf16 base rounds: whole tensors load exactly); header
                                metadata below
    hla_config.json             the same metadata as readable JSON

Metadata: format ("hla-convert-adapter"), format_version, base_source (Hub ID or path),
base_revision, base_fingerprint (see fingerprint_weights; of the base weights, LoRA excluded),
config (HLAConfig JSON), modules (the converted attention modules) and, only with LoRA weights,
lora ({"rank", "alpha", "modules": the adapted linear layers}), only with full weights, full
({"train": "full", "blocks": the trained blocks, "parameters": their parameter count}). An adapter
without "lora" or "full" is HLA-only (and older adapters load as before). Loading a full adapter
puts the trained weights into the base after keeping its originals on the host
(model.full_tuning), so "teacher" mode is still the base. The safetensors header is authoritative; both are
written atomically (temp file, then rename). Loading refuses a NaN or infinite weight (a corrupt
adapter: every output would be NaN).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..atomic_files import atomic_write_bytes, atomic_write_text
from ..errors import clip, first_line
from ..json_docs import DuplicateKeyError, loads_strict, same_json
from ..model.config import ConfigError, HLAConfig
from ..model.full_tuning import attach_base_store, base_store, full_tuning_blocks, full_tuning_parameters, original_weights
from ..model.layers import hla_layers, hla_parameters
from ..model.lora import LORA_PREFIX, LoraError, has_lora, load_lora_state, lora_config, lora_state_dict, remove_lora, without_lora
from ..model.surgery import ConversionError, convert_attention, revert_attention
from ..model.user_loras import share_lora_api
from .checks import shown

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "hla_config.json"
FORMAT = "hla-convert-adapter"
FORMAT_VERSION = 1
_SAMPLES_PER_TENSOR = 4096
FULL_PREFIX = "full."  # adapter-file keys of a `train: full` run's base weights: "full." + parameter name


class AdapterError(ValueError):
    """An adapter that cannot be saved or loaded; the message is one line saying why.

    The message is put on one line and bounded here, whatever a check put in it: metadata values
    (a base_source with a newline, a 3,000-character module name) come from the file.
    """

    def __init__(self, message: str):
        super().__init__(clip(message))


# Fingerprint schemes, told apart by their prefix. "sha256:" (hla-convert <= the first release)
# hashed a strided sample of each tensor and missed most single-weight changes; adapters that record
# it still load, checked the old way (fingerprint_matches), and are re-saved with the new scheme.
FINGERPRINT_PREFIX = "sha256-v2:"
_LEGACY_PREFIX = "sha256:"
_CHUNK = 1 << 22  # elements reduced at once: bounds the int64 temporaries to 32 MiB per tensor


def fingerprint_weights(model: nn.Module) -> str:
    """A short hash of the base weights (HLA parameters excluded) that changes when any weight does.

    The same in any float dtype and on any device: each floating tensor is rounded to bfloat16 (so a
    bf16 copy of an fp32 base matches it) and its 16-bit patterns are reduced in full, as int64, where
    the tensor already is: the sum, the sum of squares and a position-weighted sum (which sees two
    weights swapped). Integer sums wrap modulo 2^64 whatever the order, so they are exact and equal on
    the CPU and a GPU; a single changed pattern always changes the plain sum. Names, shapes and the
    kind of dtype are hashed with them. Memory traffic is a few passes over the weights (a 14B model:
    well under a second on a GPU), with temporaries of at most 32 MiB.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".hla." in f".{name}":
            continue
        h.update(f"{name}:{tuple(tensor.shape)}:{_dtype_kind(tensor)}:".encode())
        h.update(",".join(str(x) for x in _reductions(tensor.detach())).encode() + b";")
    return FINGERPRINT_PREFIX + h.hexdigest()[:32]


def fingerprint_matches(model: nn.Module, recorded: str) -> tuple[bool, str]:
    """(does `model` match the fingerprint an adapter recorded, the model's fingerprint in that scheme)."""
    found = _legacy_fingerprint(model) if str(recorded).startswith(_LEGACY_PREFIX) else fingerprint_weights(model)
    return found == recorded, found


def _dtype_kind(tensor: torch.Tensor) -> str:
    return "float" if tensor.is_floating_point() or tensor.is_complex() else str(tensor.dtype).removeprefix("torch.")


def _as_int64_patterns(chunk: torch.Tensor) -> torch.Tensor:
    if chunk.is_complex():
        chunk = torch.view_as_real(chunk).reshape(-1)
    if chunk.is_floating_point():
        return chunk.to(torch.bfloat16).view(torch.int16).to(torch.int64)
    return chunk.to(torch.int64)


def _reductions(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(sum, sum of squares, sum of (position + 1) * value) of the tensor's int64 patterns, mod 2^64.

    Computed chunk by chunk on the tensor's device; int64 additions wrap, and addition modulo 2^64
    is associative, so the result does not depend on how the device orders the sums.
    """
    flat = tensor.reshape(-1)
    total = squares = weighted = 0
    for start in range(0, flat.numel(), _CHUNK):
        v = _as_int64_patterns(flat[start : start + _CHUNK])
        pos = torch.arange(start + 1, start + 1 + v.numel(), dtype=torch.int64, device=v.device)
        sums = torch.stack([v.sum(), (v * v).sum(), (v * pos).sum()]).tolist()
        total, squares, weighted = total + sums[0], squares + sums[1], weighted + sums[2]
    return total % 2**64, squares % 2**64, weighted % 2**64


def _legacy_fingerprint(model: nn.Module) -> str:
    """The first scheme ("sha256:"), kept only to check adapters saved with it."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".hla." in f".{name}":
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR]
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(sample.cpu().contiguous().numpy().tobytes())
    return _LEGACY_PREFIX + h.hexdigest()[:32]


def _adapter_metadata(model: nn.Module, base_source: str | None, base_revision: str | None) -> dict[str, Any]:
    layers = hla_layers(model)
    if not layers:
        raise AdapterError("the model has no converted attention layers to save; call convert_attention first")
    configs = {layer.config for layer in layers.values()}
    if len(configs) != 1:
        raise AdapterError("the converted layers use different HLAConfigs; an adapter holds one config")
    with without_lora(model), original_weights(model):  # the base the adapter is for: no LoRA, untrained weights
        fingerprint = fingerprint_weights(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_source": base_source,
        "base_revision": base_revision,
        "base_fingerprint": fingerprint,
        "base_class": type(model).__name__,
        "config": configs.pop().to_dict(),
        "modules": sorted(layers),
    }
    if has_lora(model):
        meta["lora"] = lora_config(model)
    store = base_store(model)
    if store is not None:
        meta["full"] = {"train": "full", "blocks": full_tuning_blocks(model), "parameters": sum(p.numel() for p in store.params.values())}
    return meta


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_source: str | None = None,
    base_revision: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the model's HLA parameters and metadata to `directory`; returns the safetensors path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = _adapter_metadata(model, base_source, base_revision)
    if extra_metadata:
        meta["extra"] = extra_metadata
    tensors = {k: p.detach().to("cpu", torch.float32).contiguous() for k, p in hla_parameters(model).items()}
    tensors |= {LORA_PREFIX + k: v for k, v in lora_state_dict(model).items()}
    store = base_store(model)
    if store is not None:  # the trained values (host copies), whether or not teacher mode shows the originals now
        tensors |= {FULL_PREFIX + k: v.contiguous() for k, v in store.trained_state().items()}
    header = {k: json.dumps(v) for k, v in meta.items()}
    path = directory / ADAPTER_FILE
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=header))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


# What read_adapter_info accepts for each metadata key: the types a saved adapter has (an edited or
# hostile header with anything else is refused there, in one line, not deep inside a load). The
# recorded base (base_source, base_revision) is checked where it is used: checks.check_recorded_base.
_REQUIRED = ("base_fingerprint", "config", "modules")
# What each metadata value read by loading is (the file is input: "modules": 5 or [[1]] made
# load_adapter raise TypeError, "extra": [1] an AttributeError in `validate`). base_source /
# base_revision are not here: `validate` says which is unusable and that --base replaces them.
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "base_fingerprint": ((str,), "a string"),
    "config": ((dict,), "a mapping"),
    "modules": ((list,), "a non-empty list of module names"),
    "base_class": ((str, type(None)), "a string"),
    "lora": ((dict, type(None)), "a mapping"),
    "full": ((dict, type(None)), "a mapping"),
    "extra": ((dict, type(None)), "a mapping"),
}


def read_adapter_info(directory: str | Path) -> dict[str, Any]:
    """The adapter's metadata (format_version, base_source, base_revision, base_fingerprint, config,
    modules, and lora / extra when present), each of the type a saved adapter has (table _TYPES;
    modules a list of module names), else AdapterError."""
    path = Path(directory) / ADAPTER_FILE
    try:
        is_file = path.is_file()
    except OSError as exc:  # a name too long for the file system
        raise AdapterError(f"{shown(str(directory))} is not a usable path ({exc.strerror or type(exc).__name__})") from None
    if not is_file:
        raise AdapterError(f"{directory} holds no {ADAPTER_FILE}: not an hla-convert adapter folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is corrupt or truncated ({first_line(exc)})") from None
    try:
        meta = {k: loads_strict(v) for k, v in header.items()}
    except DuplicateKeyError as exc:  # json.loads would keep the last value silently
        raise AdapterError(f"{path} has tampered metadata ({exc}): not as hla-convert wrote it") from None
    except (ValueError, RecursionError):  # RecursionError: a value nested thousands of levels deep
        raise AdapterError(f"{path} has unreadable metadata: not written by hla-convert") from None
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path} is not an hla-convert adapter (format {shown(meta.get('format'))})")
    if not same_json(meta.get("format_version"), FORMAT_VERSION):  # true == 1 in Python, not in the format
        raise AdapterError(
            f"{path} has adapter format version {shown(meta.get('format_version'))}; this hla-convert reads version {FORMAT_VERSION}"
        )
    for key in _REQUIRED:
        if key not in meta:
            raise AdapterError(f"{path} metadata lacks {key!r}")
    problem = _metadata_type_problem(meta)
    if problem:
        raise AdapterError(f"{path} metadata {problem}: not written by hla-convert")
    try:  # the config's field types, before any model loads (factors: 2.0, normalize: 1 are refused)
        HLAConfig.from_dict(meta["config"])
    except (ConfigError, TypeError) as exc:
        raise AdapterError(f"{path} has an invalid config: {exc}") from None
    return meta


def _metadata_type_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the types of the metadata values that loading reads (table _TYPES), or None."""
    for key, (types, what) in _TYPES.items():
        if key in meta and not isinstance(meta[key], types):
            return f"{key!r} must be {what}, got {shown(meta[key])}"
    if not meta["modules"] or not all(isinstance(m, str) and m for m in meta["modules"]):
        return f"'modules' must be a non-empty list of module names, got {shown(meta['modules'])}"
    full = meta.get("full")
    if isinstance(full, dict):
        blocks = full.get("blocks")
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) and b for b in blocks):
            return f"'full' must list its trained blocks (a non-empty list of module names), got {shown(blocks)}"
    return None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path} is corrupt or truncated ({first_line(exc)})") from None


def load_adapter(base_model: nn.Module, directory: str | Path, check_base: bool = True, revision: str | None = None) -> nn.Module:
    """Convert `base_model` as the adapter says and load its weights (and its LoRA adapters, enabled,
    when it has them; and its trained base weights after a `train: full` stage 2, the base's own
    kept on the host for "teacher" mode, model.full_tuning); returns the model.

    directory: a local folder, or a Hub ID "ORG/NAME" (at `revision`: branch, tag or commit),
    read through the local Hugging Face cache (hla_convert.io.hub.resolve_output_dir).
    The base's fingerprint must match the one recorded at save time (check_base=False skips it,
    for deliberate transfers to fine-tuned bases). A user's own LoRAs load onto the result through
    diffusers (`pipe.load_lora_weights(..., adapter_name="style")`) beside the conversion's
    (model.user_loras.share_lora_api).
    """
    from .hub import resolve_output_dir

    directory = resolve_output_dir(directory, revision)
    meta = read_adapter_info(directory)
    if hla_layers(base_model) or has_lora(base_model):
        raise AdapterError("the base model is already converted; load the adapter onto an unconverted base")
    if check_base:
        matches, found = fingerprint_matches(base_model, meta["base_fingerprint"])
        if not matches:
            raise AdapterError(
                f"the adapter was made for a different base ({shown(meta.get('base_source') or 'unknown')}, "
                f"fingerprint {shown(meta['base_fingerprint'])}); this model's fingerprint is {found}"
            )
    config = HLAConfig.from_dict(meta["config"])  # read_adapter_info has checked it
    tensors = _load_tensors(directory / ADAPTER_FILE)
    bad = next((k for k in sorted(tensors) if tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all())), None)
    if bad is not None:  # a NaN weight makes every output NaN: a corrupt adapter, not a model to measure
        raise AdapterError(f"{directory / ADAPTER_FILE} is corrupt: tensor {bad!r} holds NaN or infinite values")
    lora_tensors = {k[len(LORA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    full_tensors = {k[len(FULL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(FULL_PREFIX)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith((LORA_PREFIX, FULL_PREFIX))}
    if lora_tensors and not isinstance(meta.get("lora"), dict):
        raise AdapterError(f"{directory / ADAPTER_FILE} holds {len(lora_tensors)} LoRA weight(s) but its metadata has no lora config")
    if full_tensors and not isinstance(meta.get("full"), dict):
        raise AdapterError(f"{directory / ADAPTER_FILE} holds {len(full_tensors)} full base weight(s) but its metadata has no full record")
    try:
        convert_attention(base_model, config, include=list(meta["modules"]))
    except ConversionError as exc:
        raise AdapterError(f"the adapter does not fit this model: {exc}") from None
    params = hla_parameters(base_model)
    problem = _mismatch(params, tensors)
    full_params: dict[str, nn.Parameter] = {}
    if problem is None and isinstance(meta.get("full"), dict):
        known = {n for n, _ in base_model.named_modules()}
        blocks = meta["full"]["blocks"]
        missing = [b for b in blocks if b not in known]
        if missing:
            problem = f"its full weights are for a block {shown(missing[0])} this model lacks"
        else:
            full_params = full_tuning_parameters(base_model, blocks)
            problem = _mismatch(full_params, full_tensors, FULL_PREFIX)
    if problem:
        revert_attention(base_model)
        raise AdapterError(f"{directory / ADAPTER_FILE} does not match the converted model: {problem}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))
        if full_params:  # the base's originals to the host store first: teacher mode stays the base
            attach_base_store(base_model, full_params)
            for name, p in full_params.items():
                p.copy_(full_tensors[name].to(p.dtype))
    if isinstance(meta.get("lora"), dict):
        try:
            load_lora_state(base_model, lora_tensors, meta["lora"])
        except LoraError as exc:
            remove_lora(base_model)
            revert_attention(base_model)
            raise AdapterError(f"{directory / ADAPTER_FILE} does not match the converted model: {exc}") from None
    return share_lora_api(base_model)  # a user's LoRAs loaded through diffusers keep the conversion's on


def _mismatch(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], prefix: str = "") -> str | None:
    """What keeps `tensors` (file keys without `prefix`) from loading into `params`, or None."""
    missing = sorted(set(params) - set(tensors))
    if missing:
        return f"missing {len(missing)} key(s), e.g. {prefix}{missing[0]}"
    extra = sorted(set(tensors) - set(params))
    if extra:
        return f"{len(extra)} unexpected key(s), e.g. {prefix}{extra[0]}"
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            return f"{prefix}{name} has shape {list(tensors[name].shape)}, the model expects {list(p.shape)}"
        if not tensors[name].is_floating_point():  # an I32/U32 header over float bytes: garbage weights
            return f"{prefix}{name} has dtype {str(tensors[name].dtype).removeprefix('torch.')}, not a floating-point weight"
    return None
