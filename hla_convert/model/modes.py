"""Attention-mode switching, shared by distillation, selection, drift, calibration and sampling.

Every converted layer (model.layers.HLAAttention) computes the teacher (the model's own softmax),
the student (HLA) or both in one pass (`mode`). "teacher" is the base model: it also turns the
LoRA adapters (model.lora) off and, after a stage 2 `train: full`, shows the original base weights
kept on the host (model.full_tuning.BaseStore) in place of the trained ones. Here because it needs
the layers, LoRA and the host store, which the layers themselves must not import
(docs/architecture.md).

    set_attention_mode(model, mode)       every converted layer (and the LoRA adapters) to a mode
    with attention_mode(model, mode): ... borrow a mode, then put modes and adapters back
    forward(model, item)                  the denoiser output of one input dict
    with streamed_pairs(model, consume):  each layer's (target, pred) handed over as it is made
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .full_tuning import base_store, show_base, showing_base
from .layers import MODES, HLAAttention, hla_layers
from .lora import has_adapters, set_lora_enabled, tuner_layers


def set_attention_mode(model: nn.Module, mode: str) -> None:
    """Make every converted layer compute the teacher, the student or both (see HLAAttention.attend);
    "teacher" also disables the LoRA adapters (hla_convert.model.lora), the others enable them, and
    "teacher" swaps the original base weights of a fully trained model in (model.full_tuning), the
    others the trained ones back (host <-> device copies of the trained blocks, only when that changes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for layer in hla_layers(model).values():
        layer.mode = mode
        layer.last_pair = None
    set_lora_enabled(model, mode != "teacher")  # the teacher is the base model: LoRA adapters off
    show_base(model, mode == "teacher")  # ... and its original weights (a no-op unless train: full ran)


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: str | None = None) -> Iterator[nn.Module]:
    """Run the body in `mode` (set_attention_mode; None: leave it), then put every converted layer's
    mode, every peft adapter layer's on/off state and which base weights are shown (original or
    trained) back as they were, and drop the layers' recorded pairs and token samples. The one way
    to borrow the teacher: setting `layer.mode` alone leaves the LoRA adapters on (and the trained
    weights in), and the "teacher" is then not the base model."""
    layers = hla_layers(model)
    modes = {n: layer.mode for n, layer in layers.items()}
    adapters = [(m, bool(m.disable_adapters)) for _, m in tuner_layers(model)]
    original_base = showing_base(model)
    try:
        if mode is not None:
            set_attention_mode(model, mode)
        yield model
    finally:
        for n, layer in layers.items():
            layer.mode = modes[n]
            layer.last_pair = None
            layer.sample_sink = None
        flags = [(p, p.requires_grad) for m, _ in adapters for p in m.parameters()]
        for m, disabled in adapters:
            m.enable_adapters(not disabled)
        for p, flag in flags:  # peft's toggle also flips requires_grad; the training loop owns that
            p.requires_grad_(flag)
        show_base(model, original_base)


def teacher_needs_own_forward(model: nn.Module) -> bool:
    """Whether mode "both" runs other weights than the base (peft adapters, or base weights trained
    by stage 2 `train: full`), so that its teacher path is not the "teacher" output."""
    return has_adapters(model) or base_store(model) is not None


def forward(model: nn.Module, item: dict[str, Any]) -> torch.Tensor:
    """The denoiser output of one input dict."""
    out = model(**item, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def streamed_pairs(model: nn.Module, consume: Callable[[str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """In mode "both", hand each layer's (target, pred) to `consume(name, target, pred)` as soon as
    the layer has run, then drop it, so that no more than one layer's pair is alive at a time."""
    layers = hla_layers(model)
    for name, layer in layers.items():

        def attend(*args: Any, _layer: HLAAttention = layer, _name: str = name, **kwargs: Any) -> torch.Tensor:
            out = HLAAttention.attend(_layer, *args, **kwargs)
            if _layer.last_pair is not None:
                target, pred = _layer.last_pair
                _layer.last_pair = None
                consume(_name, target, pred)
            return out

        layer.attend = attend  # instance attribute: shadows the method for this run only
    try:
        yield
    finally:
        for layer in layers.values():
            layer.__dict__.pop("attend", None)
            layer.last_pair = None


__all__ = ["attention_mode", "forward", "set_attention_mode", "streamed_pairs", "teacher_needs_own_forward"]
