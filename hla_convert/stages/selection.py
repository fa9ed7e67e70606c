"""Which converted layers go back to exact softmax: a per-layer budget chosen by measured error.

Some layers' attention is much harder for a linear-cost form than others' (LinVideo and Attention
Surgery choose per layer which to convert; keeping the first and last layer softmax roughly halved
the drift in the fidelity issue's measurements). A recipe's `attention.softmax_layers: n` gives n
converted layers back to softmax after stage 1, before stage 2, so stage 2 (and its LoRA) trains
the model as it will run. `attention.softmax_select` says which:

- "attention" (default): the n with the largest attention-transfer error after stage 1;
- "output": greedily, n times, the layer whose return to softmax lowers the denoiser output's
  rel L2 against the teacher most (given the layers already picked). A layer's attention error is
  not what it costs the output: later blocks, the residual stream and the FFNs can amplify or hide
  it. Each candidate is tried as a temporary mode switch (that layer alone in "teacher" mode: its
  own softmax core, same weights), never a copy; the summary keeps every measured effect.

Either choice is a pure function of the model's weights and the inputs (ties: the earlier layer),
so a resumed run makes the same one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..model.layers import hla_layers
from ..model.modes import attention_mode, forward, streamed_pairs
from ..recipe.schema import SOFTMAX_SELECT, RecipeError


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


class OutputDrift:
    """Denoiser output rel L2 against the teacher on fixed inputs, with any set of converted layers
    temporarily running their own softmax core ("teacher" mode of those layers alone; LoRA adapters,
    where there are any, stay on, as they are on a layer that revert_attention gave back).

    The teacher outputs ([B, C, F, H, W] per input, float32) are computed once and kept."""

    def __init__(self, model: nn.Module, inputs: Sequence[dict[str, Any]]):
        self.model, self.inputs = model, list(inputs)
        with attention_mode(model, "teacher"):
            self.reference = [forward(model, item).detach().float() for item in self.inputs]
        self.ref2 = sum(float(r.pow(2).sum()) for r in self.reference)

    @torch.no_grad()
    def __call__(self, softmax: Sequence[str] = ()) -> float:
        layers = hla_layers(self.model)
        err2 = 0.0
        with attention_mode(self.model, "student"):  # puts every layer's mode back afterwards
            for name in softmax:
                layers[name].mode = "teacher"
            for item, ref in zip(self.inputs, self.reference):
                err2 += float((forward(self.model, item).float() - ref).pow(2).sum())
        return math.sqrt(err2 / max(self.ref2, 1e-30))


def _least(drifts: dict[str, float]) -> str:
    """The layer with the smallest drift; a NaN or infinite one never wins over a finite one, ties:
    the earlier layer (dicts keep model order)."""
    order = list(drifts)
    return min(order, key=lambda n: (not math.isfinite(drifts[n]), drifts[n] if math.isfinite(drifts[n]) else 0.0, order.index(n)))


@torch.no_grad()
def choose_by_output(
    model: nn.Module, inputs: Sequence[dict[str, Any]], count: int, max_batches: int = 4
) -> tuple[list[str], list[dict[str, Any]]]:
    """Greedy selection by effect on the denoiser output over the first `max_batches` inputs.

    Round k measures the drift with the k-1 layers picked so far in softmax, then with each other
    converted layer added, and picks the one that lowers it most. Returns (picked names in model
    order, one entry per round: {"drift": before this round's pick, "with_softmax": {layer: drift
    with it added}, "picked": name}). Costs 1 + sum over rounds of the candidates' forwards per input.
    """
    names = [n for n, layer in hla_layers(model).items() if layer.config.kind != "softmax"]
    if count <= 0 or not names:
        return [], []
    drift = OutputDrift(model, list(inputs)[:max_batches])
    picked: list[str] = []
    rounds: list[dict[str, Any]] = []
    before = drift(picked)
    for _ in range(min(count, len(names))):
        trials = {n: drift([*picked, n]) for n in names if n not in picked}
        best = _least(trials)
        rounds.append({"drift": before, "with_softmax": trials, "picked": best})
        picked.append(best)
        before = trials[best]
    return [n for n in names if n in picked], rounds


def give_back_to_softmax(
    model: nn.Module, inputs: Sequence[dict[str, Any]], count: int, max_batches: int = 4, select: str = "attention"
) -> dict[str, Any]:
    """Choose `count` converted layers (`select`: "attention" or "output", see the module docstring)
    and revert them to softmax; returns {"select", "errors": {layer: stage-1 attention rel L2},
    "softmax_layers": [names reverted, model order]} plus, for "output", "output_effects" (the
    rounds of choose_by_output) and "output_drift" (before any pick, and after the picks).
    count 0 measures nothing."""
    from ..model.surgery import ConversionError, revert_attention

    if select not in SOFTMAX_SELECT:
        raise RecipeError("attention.softmax_select", f"{select!r} is not one of {', '.join(SOFTMAX_SELECT)}")

    layers = [n for n, layer in hla_layers(model).items() if layer.config.kind != "softmax"]
    if count <= 0 or not layers:
        return {"select": select, "errors": {}, "softmax_layers": []}
    if count >= len(layers):
        raise ConversionError(
            f"attention.softmax_layers is {count} but only {len(layers)} layers are converted: "
            "at least one must stay converted (convert fewer modules with attention.include instead)"
        )
    errors = measure_layer_errors(model, inputs, max_batches)
    summary: dict[str, Any] = {"select": select, "errors": errors}
    if select == "output":
        chosen, rounds = choose_by_output(model, inputs, count, max_batches)
        summary["output_effects"] = rounds
        summary["output_drift"] = {"all_converted": rounds[0]["drift"], "after": rounds[-1]["with_softmax"][rounds[-1]["picked"]]}
    else:
        chosen = choose_softmax_layers(errors, count)
    revert_attention(model, chosen)
    summary["softmax_layers"] = chosen
    return summary


__all__ = [
    "LayerErrors",
    "OutputDrift",
    "choose_by_output",
    "choose_softmax_layers",
    "give_back_to_softmax",
    "measure_layer_errors",
]
