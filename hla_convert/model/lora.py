"""Low-rank adapters (peft LoRA) on the base model's linear layers, for stage 2 `train: lora`.

One copy of the weights serves teacher and student (docs/architecture.md): the teacher is the
base model with the adapters disabled and the softmax core, the student has them enabled and the
HLA core. `set_attention_mode` (model.modes) switches both at once. peft's LoRA layer with its
adapters disabled calls the wrapped base layer and nothing else, so the teacher is the base model
bit for bit.

The adapters live under the peft adapter name `ADAPTER` ("hla_lora"), so a user's own LoRAs
loaded into the same model keep theirs. Parameter keys (peft's):

    <module>.lora_A.hla_lora.weight   [rank, in_features]   random (peft default), seeded here
    <module>.lora_B.hla_lora.weight   [out_features, rank]  zero: a fresh adapter changes nothing

`lora_state_dict` gives them without the adapter name (peft's `get_peft_model_state_dict`
convention: `<module>.lora_A.weight`), which is what the adapter file stores under `lora.`.
LoRA weights are kept in float32 whatever the base dtype, like the HLA parameters: bf16 adapter
updates at lr 1e-4 round away.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import shown

ADAPTER = "hla_lora"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_PREFIX = "lora."  # adapter-file keys: "lora." + lora_state_dict key


class LoraError(ValueError):
    """LoRA cannot be added or loaded as asked; the message is one line saying why."""


def tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if "peft" not in sys.modules:  # nothing can be adapted yet, and importing peft takes seconds
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    """Whether the model carries this project's LoRA adapter."""
    return ADAPTER in (getattr(model, "peft_config", None) or {})


def has_adapters(model: nn.Module) -> bool:
    """Whether any peft adapter layer (ours or a user's) is in the model: "teacher" mode turns them off."""
    return bool(tuner_layers(model))


def _feed_forwards(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block's feed-forward children (diffusers' FeedForward and look-alikes), by child name."""
    return [(n, m) for n, m in block.named_children() if type(m).__name__.endswith("FeedForward")]


def lora_target_modules(
    model: nn.Module, converted_names: Sequence[str], targets: Sequence[str] = DEFAULT_TARGETS, ffn: bool = False
) -> list[str]:
    """The exact names of the linear layers to adapt, in model order.

    targets: module-name suffixes inside each converted attention module ("to_q", "to_out.0");
    each must name at least one nn.Linear under some converted module. ffn: also every nn.Linear
    of the feed-forward modules (diffusers FeedForward: Wan `blocks.N.ffn.net.0.proj` and
    `ffn.net.2`, CogVideoX `transformer_blocks.N.ff.net.0.proj` and `ff.net.2`) of the blocks
    that hold a converted module; blocks without one (Hunyuan's single blocks fuse theirs into
    proj_out) are skipped, but at least one must have one.
    """
    if not converted_names:
        raise LoraError("LoRA needs converted attention modules; the model has none")
    with without_lora(model):  # an adapted layer counts as the linear it wraps, not as its parts
        return _target_modules(model, converted_names, targets, ffn)


def _target_modules(model: nn.Module, converted_names: Sequence[str], targets: Sequence[str], ffn: bool) -> list[str]:
    modules = dict(model.named_modules())
    missing = [c for c in converted_names if c not in modules]
    if missing:
        raise LoraError(f"no module named {missing[0]!r} in the model")
    chosen: set[str] = set()
    for target in targets:
        found = []
        for c in converted_names:
            for n, m in modules[c].named_modules(prefix=c):
                if isinstance(m, nn.Linear) and ".hla." not in f"{n}." and (n == f"{c}.{target}" or n.endswith(f".{target}")):
                    found.append(n)
        if not found:
            linears = sorted(
                {n[len(converted_names[0]) + 1 :] for n, m in modules[converted_names[0]].named_modules(prefix=converted_names[0]) if isinstance(m, nn.Linear)}
            )
            raise LoraError(
                f"LoRA target {target!r} matches no linear layer inside the converted attention modules "
                f"(e.g. {converted_names[0]}, whose linear layers are: {', '.join(linears) or 'none'})"
            )
        chosen.update(found)
    if ffn:
        blocks = sorted({c.rsplit(".", 1)[0] for c in converted_names if "." in c})
        found_any = False
        for b in blocks:
            for child, ff in _feed_forwards(modules[b]):
                for n, m in ff.named_modules(prefix=f"{b}.{child}"):
                    if isinstance(m, nn.Linear):
                        chosen.add(n)
                        found_any = True
        if not found_any:
            raise LoraError(
                f"LoRA on the feed-forward layers: no block holding a converted module ({blocks[0] if blocks else 'none'}, ...) "
                "has a feed-forward module (diffusers FeedForward)"
            )
    return [n for n in modules if n in chosen]


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    ffn: bool = False,
    modules: Sequence[str] | None = None,
    seed: int = 0,
) -> list[str]:
    """Add this project's LoRA adapter (enabled) to a converted model; returns the adapted module names.

    modules: exact module names (as saved in an adapter); otherwise they come from
    `lora_target_modules(model, converted modules, targets, ffn)`. alpha None = rank (scale 1).
    A is drawn under `seed` without touching the global RNG (two conversions start alike and a
    resumed run's RNG stream is not shifted); B starts at zero, so the student is unchanged.
    """
    from peft import LoraConfig

    from .layers import hla_layers

    if has_lora(model):
        raise LoraError("the model already has the hla-convert LoRA adapter")
    if modules is None:
        modules = lora_target_modules(model, list(hla_layers(model)), targets, ffn)
    modules = list(modules)
    known = dict(model.named_modules())
    bad = [n for n in modules if not isinstance(known.get(n), nn.Linear)]
    if bad:
        raise LoraError(f"LoRA module {bad[0]!r} is not a linear layer of this model")
    if not modules:
        raise LoraError("LoRA needs at least one module to adapt")
    # A list of >= 20 names is shortened by peft to suffixes ("attn1.to_q") that also match layers
    # kept softmax and that no longer name the modules; one anchored pattern of the exact names is
    # taken as it is.
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        target_modules=exact_module_pattern(modules),
        lora_dropout=0.0,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(model, "add_adapter"):  # diffusers ModelMixin: also registers peft_config for its own LoRA API
            model.add_adapter(config, adapter_name=ADAPTER)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    adapted = adapted_modules(model)
    if sorted(adapted) != sorted(modules):
        remove_lora(model)
        odd = sorted(set(adapted) ^ set(modules))
        raise LoraError(f"peft adapted {len(adapted)} module(s) where {len(modules)} were asked for (e.g. {odd[0]!r})")
    with torch.no_grad():
        for p in lora_parameters(model).values():
            if p.dtype != torch.float32:
                p.data = p.data.float()
    return modules


def exact_module_pattern(modules: Sequence[str]) -> str:
    """A regular expression that peft fully matches against each module name: exactly `modules`."""
    return "^(?:" + "|".join(re.escape(n) for n in modules) + ")$"


def adapted_modules(model: nn.Module) -> list[str]:
    """The exact names of the layers that carry this project's adapter, in model order (read from the
    model, not from peft's config, whose target_modules may be a pattern or shortened suffixes)."""
    return [n for n, m in tuner_layers(model) if ADAPTER in (getattr(m, "lora_A", None) or {})]


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters of this project's adapter, by full parameter name."""
    marks = (f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}.")
    return {n: p for n, p in model.named_parameters() if any(m in n for m in marks)}


def lora_config(model: nn.Module) -> dict[str, Any] | None:
    """{"rank", "alpha", "modules"} of the model's adapter (what the adapter file records), or None."""
    if not has_lora(model):
        return None
    cfg = model.peft_config[ADAPTER]
    return {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "modules": sorted(adapted_modules(model))}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights without the adapter name (`<module>.lora_A.weight`), detached, float32, CPU."""
    from peft import get_peft_model_state_dict

    if not has_lora(model):
        return {}
    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def load_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Add the adapter described by `config` ({"rank", "alpha", "modules"}) and load `tensors` (keys as
    `lora_state_dict` gives them). Missing, extra or misshaped keys raise LoraError and leave no adapter."""
    from peft import set_peft_model_state_dict

    rank, alpha, modules = _saved_settings(config, tensors)
    add_lora(model, rank=rank, alpha=alpha, modules=saved_modules(modules, tensors))
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    problem = None
    if missing := sorted(set(expected) - set(tensors)):
        problem = f"missing {len(missing)} LoRA key(s), e.g. {missing[0]}"
    elif extra := sorted(set(tensors) - set(expected)):
        problem = f"{len(extra)} unexpected LoRA key(s), e.g. {extra[0]}"
    else:
        for k, shape in expected.items():
            if tensors[k].shape != shape:
                problem = f"LoRA weight {k} has shape {list(tensors[k].shape)}, the model expects {list(shape)}"
                break
            if not tensors[k].is_floating_point():
                problem = f"LoRA weight {k} has dtype {str(tensors[k].dtype).removeprefix('torch.')}, not a floating-point weight"
                break
    if problem:
        remove_lora(model)
        raise LoraError(problem)
    result = set_peft_model_state_dict(model, {k: v.float() for k, v in tensors.items()}, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        remove_lora(model)
        raise LoraError(f"{len(result.unexpected_keys)} LoRA key(s) not taken by the model, e.g. {result.unexpected_keys[0]}")


def saved_modules(recorded: Sequence[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """The exact module names a saved adapter's LoRA covers.

    recorded: the adapter's metadata `modules`. Adapters written before hla-convert read them from
    the model recorded peft's shortened suffixes when they had >= 20 targets ("attn1.to_q" for every
    blocks.N.attn1.to_q); their weight keys still name each module exactly, so when every recorded
    name is a suffix of the keys' names and each key's name ends in one, the keys' names are used.
    Otherwise the recorded names are (and `load_lora_state` checks them against the keys).
    """
    recorded = [str(n) for n in recorded]
    keyed = sorted({k.split(".lora_A.")[0] for k in tensors if ".lora_A." in k} | {k.split(".lora_B.")[0] for k in tensors if ".lora_B." in k})
    covers = lambda suffix, name: name.endswith("." + suffix)  # noqa: E731
    legacy = keyed and set(recorded).isdisjoint(keyed)
    if legacy and all(any(covers(r, n) for r in recorded) for n in keyed) and all(any(covers(r, n) for n in keyed) for r in recorded):
        return keyed
    return recorded


def _saved_settings(config: Any, tensors: dict[str, torch.Tensor]) -> tuple[int, float, list[str]]:
    """(rank, alpha, modules) of a saved LoRA config, checked before add_lora builds anything.

    The config is read from a file, so each value is checked for its type (rank 0 or false, a NaN
    alpha, no modules made peft raise its own errors, or load NaN weights); and the rank must be the
    one the saved lora_A weights ([rank, in_features]) have, so a forged rank cannot make add_lora
    allocate more than the file itself holds (a weight of another shape is named by the shape check).
    """
    if not isinstance(config, dict):
        raise LoraError(f"the LoRA config must be a mapping with rank, alpha and modules, got {shown(config)}")
    rank, alpha, modules = config.get("rank"), config.get("alpha"), config.get("modules")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"the LoRA config's rank must be a positive integer, got {shown(rank)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraError(f"the LoRA config's alpha must be a positive number, got {shown(alpha)}")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise LoraError(f"the LoRA config's modules must be a non-empty list of module names, got {shown(modules)}")
    saved = sorted({t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A.weight") and t.dim() == 2})
    if rank not in saved:
        raise LoraError(
            f"the LoRA config's rank {rank} is not the rank of any saved lora_A weight ({', '.join(map(str, saved[:4])) or 'none saved'})"
        )
    return rank, float(alpha), list(modules)


def _swap_base(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put each adapted layer's base layer back in its parent; returns (parent, child, wrapper) to undo it."""
    swapped = []
    for name, layer in tuner_layers(model):
        if ADAPTER not in getattr(layer, "lora_A", {}):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
        swapped.append((parent, child, layer))
    return swapped


@contextlib.contextmanager
def without_lora(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its LoRA wrappers swapped out for their base layers, so that its state_dict
    and modules are the base model's (fingerprints of the base); restored on exit."""
    swapped = _swap_base(model)
    try:
        yield model
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)


def remove_lora(model: nn.Module) -> None:
    """Drop this project's adapter, leaving the base layers where they were."""
    _swap_base(model)
    cfg = getattr(model, "peft_config", None)
    if isinstance(cfg, dict):
        cfg.pop(ADAPTER, None)
        if not cfg:
            del model.peft_config
            if hasattr(model, "_hf_peft_config_loaded"):
                model._hf_peft_config_loaded = False


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Enable or disable every peft adapter layer of the model, leaving requires_grad as it was
    (peft's toggle also flips requires_grad; the training loop owns that)."""
    layers = tuner_layers(model)
    if not layers:
        return
    flags = [(p, p.requires_grad) for _, m in layers for p in m.parameters()]
    for _, m in layers:
        m.enable_adapters(enabled)
    for p, flag in flags:
        p.requires_grad_(flag)


__all__ = [
    "ADAPTER",
    "DEFAULT_TARGETS",
    "LORA_PREFIX",
    "LoraError",
    "adapted_modules",
    "add_lora",
    "exact_module_pattern",
    "has_adapters",
    "has_lora",
    "load_lora_state",
    "lora_config",
    "lora_parameters",
    "lora_state_dict",
    "lora_target_modules",
    "remove_lora",
    "saved_modules",
    "set_lora_enabled",
    "tuner_layers",
    "without_lora",
]
