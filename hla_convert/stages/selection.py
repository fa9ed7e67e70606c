"""Which converted layers go back to exact softmax: a per-layer budget chosen by measured error.

Some layers' attention is much harder for a linear-cost form than others' (LinVideo and Attention
Surgery choose per layer which to convert; keeping the first and last layer softmax roughly halved
the drift in the fidelity issue's measurements). A recipe's `attention.softmax_layers: n` gives the
n converted layers with the largest attention-transfer error after stage 1 back to softmax before
stage 2, so stage 2 (and its LoRA) trains the model as it will run. The choice is a pure function of
the model's weights and the inputs, so a resumed run makes the same one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..model.layers import hla_layers
from ..model.modes import attention_mode, forward, streamed_pairs


class LayerErrors:
    """A `streamed_pairs` consumer that sums ||pred - target||^2 and ||target||^2 per layer (float32,
    no gradient); `rel_l2()` gives each layer's relative L2 over everything it has seen."""

    def __init__(self) -> None:
        self.err2: dict[str, float] = {}
        self.ref2: dict[str, float] = {}

    def __call__(self, name: str, target: torch.Tensor, pred: torch.Tensor) -> None:
        t, p = target.detach().float(), pred.detach().float()
        self.err2[name] = self.err2.get(name, 0.0) + float((p - t).pow(2).sum())
        self.ref2[name] = self.ref2.get(name, 0.0) + float(t.pow(2).sum())

    def rel_l2(self) -> dict[str, float]:
        return {n: math.sqrt(self.err2[n] / max(self.ref2[n], 1e-30)) for n in self.err2}


@torch.no_grad()
def measure_layer_errors(model: nn.Module, inputs: Sequence[dict[str, Any]], max_batches: int = 4) -> dict[str, float]:
    """Attention-transfer error per converted layer: ||student - teacher|| / ||teacher|| over the
    first `max_batches` inputs, each layer fed the teacher's own activations ("both" mode)."""
    errors = LayerErrors()
    with attention_mode(model, "both"):
        with streamed_pairs(model, errors):
            for item in list(inputs)[:max_batches]:
                forward(model, item)
    return errors.rel_l2()


def choose_softmax_layers(errors: dict[str, float], count: int) -> list[str]:
    """The `count` layers with the largest error (ties: the earlier name), in model order. A NaN or
    infinite error counts as the largest (NaN compares False both ways, so a plain sort would put
    such a layer anywhere)."""
    if count <= 0:
        return []
    ranked = sorted(errors, key=lambda n: (math.isfinite(errors[n]), -errors[n] if math.isfinite(errors[n]) else 0.0, n))[:count]
    return [n for n in errors if n in ranked]


def give_back_to_softmax(
    model: nn.Module, inputs: Sequence[dict[str, Any]], count: int, max_batches: int = 4
) -> dict[str, Any]:
    """Measure every converted layer, revert the `count` worst to softmax; returns
    {"errors": {layer: rel L2}, "softmax_layers": [names reverted]}. count 0 measures nothing."""
    from ..model.surgery import ConversionError, revert_attention

    layers = [n for n, layer in hla_layers(model).items() if layer.config.kind != "softmax"]
    if count <= 0 or not layers:
        return {"errors": {}, "softmax_layers": []}
    if count >= len(layers):
        raise ConversionError(
            f"attention.softmax_layers is {count} but only {len(layers)} layers are converted: "
            "at least one must stay converted (convert fewer modules with attention.include instead)"
        )
    errors = measure_layer_errors(model, inputs, max_batches)
    chosen = choose_softmax_layers(errors, count)
    revert_attention(model, chosen)
    return {"errors": errors, "softmax_layers": chosen}


__all__ = ["LayerErrors", "choose_softmax_layers", "give_back_to_softmax", "measure_layer_errors"]
