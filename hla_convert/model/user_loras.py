"""A user's own LoRAs (community Wan LoRAs, a style LoRA) on a converted model, through diffusers' API.

A converted model may carry the conversion's own peft adapter, `CONVERSION_ADAPTER` ("hla_lora",
stage 2 `train: lora`: model.lora), which is part of the converted model: without it the student
is not what was distilled and measured. diffusers' LoRA API treats every adapter alike, and two of
its calls would silently drop ours:

- `pipe.load_lora_weights(..., adapter_name="style")` (the transformer's `load_lora_adapter`)
  leaves only the adapter it loaded active: the conversion's own LoRA is switched off.
- `pipe.unload_lora_weights()` (the transformer's `unload_lora`) removes every peft layer, ours
  included.

`share_lora_api(model)` (called by io.adapter.load_adapter, so `load_converted` gives it) replaces
these two on the model instance (bound methods, so deepcopy rebinds them to the copy):

- `load_lora_adapter` loads as diffusers does, then, if the conversion's adapter was active before,
  makes it active again beside the newly loaded one (both at the scales they have; weigh them with
  `pipe.set_adapters(["hla_lora", "style"], [1.0, w])`);
- `unload_lora` deletes every adapter except the conversion's (`delete_adapters`); on a model
  without the conversion's adapter (`train: hla`) it is diffusers' own.

Everything else is diffusers' and peft's as it is: `set_adapters` (name `"hla_lora"` to keep the
conversion's LoRA on: `set_adapters(["style"])` alone turns it off, as diffusers would),
`fuse_lora` / `unfuse_lora`, `delete_adapters`, `disable_lora`. Teacher mode
(model.modes.attention_mode "teacher") disables every peft adapter layer, the user's too: the
teacher is the base model (peft unmerges a fused layer whose adapters are disabled, so after
`fuse_lora` the teacher is the base to float rounding rather than bit for bit).
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from .lora import ADAPTER, tuner_layers

CONVERSION_ADAPTER = ADAPTER

_MARK = "_hla_convert_shares_lora_api"


def share_lora_api(model: nn.Module) -> nn.Module:
    """Make diffusers' LoRA loading and unloading on `model` keep the conversion's adapter (see the
    module docstring); a model without diffusers' LoRA API (no `load_lora_adapter`) is left as it is.
    Idempotent; returns the model."""
    if getattr(model, _MARK, False) or not hasattr(type(model), "load_lora_adapter"):
        return model
    model.load_lora_adapter = types.MethodType(_load_lora_adapter, model)
    model.unload_lora = types.MethodType(_unload_lora, model)
    setattr(model, _MARK, True)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters active in any peft layer of the model, in first-seen order."""
    names: list[str] = []
    for _, layer in tuner_layers(model):
        for name in layer.active_adapters:
            if name not in names:
                names.append(name)
    return names


def user_adapters(model: nn.Module) -> list[str]:
    """The model's peft adapters other than the conversion's own (those a user loaded)."""
    return [n for n in (getattr(model, "peft_config", None) or {}) if n != CONVERSION_ADAPTER]


def _activate(model: nn.Module, names: list[str]) -> None:
    """Make `names` the active adapters of every peft layer, at their current scales, leaving
    requires_grad as it was (peft's set_adapter also flips it; the training loop owns that)."""
    layers = [m for _, m in tuner_layers(model)]
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.set_adapter(names)
    for p, flag in flags:
        p.requires_grad_(flag)


def _load_lora_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    ours_on = CONVERSION_ADAPTER in active_adapters(self)
    result = type(self).load_lora_adapter(self, *args, **kwargs)
    now = active_adapters(self)
    if ours_on and CONVERSION_ADAPTER not in now:
        _activate(self, [CONVERSION_ADAPTER, *now])
    return result


def _unload_lora(self: nn.Module) -> None:
    if CONVERSION_ADAPTER not in (getattr(self, "peft_config", None) or {}):
        type(self).unload_lora(self)
        return
    others = user_adapters(self)
    if others:
        self.delete_adapters(others)


__all__ = ["CONVERSION_ADAPTER", "active_adapters", "share_lora_api", "user_adapters"]
