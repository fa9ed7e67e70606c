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

Either choice is a pure function of the model's weights and the inputs (ties: the earlier layer)
on one machine, but measured drifts can rank two close layers differently on another device type,
process count or torch version. So the choice is made once: `softmax_choice` records it in the work
folder (checkpoints.SELECTION_FILE, JSON, written atomically by the main process) and a resumed run
reverts the recorded layers without choosing again, so stages 2 and 3 go on training the model
their checkpoints were trained on. `choose_softmax_layers` chooses, `give_back_to_softmax` chooses
and reverts; under several processes every process trains rank 0's choice (`main_process_choice`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic_files import atomic_write_text
from ..json_docs import dumps_document, loads_strict
from ..model.layers import hla_layers
from ..model.modes import attention_mode, forward, streamed_pairs
from ..recipe.schema import SOFTMAX_SELECT, RecipeError
from .checkpoints import CheckpointError, selection_path


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


def largest_errors(errors: dict[str, float], count: int) -> list[str]:
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


def choose_softmax_layers(
    model: nn.Module, inputs: Sequence[dict[str, Any]], count: int, max_batches: int = 4, select: str = "attention"
) -> tuple[list[str], dict[str, Any]]:
    """Choose `count` converted layers to give back to softmax (`select`: "attention" or "output",
    see the module docstring) without changing the model: (the names in model order, the summary
    {"select", "errors": {layer: stage-1 attention rel L2}, "softmax_layers": the names} plus, for
    "output", "output_effects" (the rounds of choose_by_output) and "output_drift" (before any
    pick, and after the picks)). count 0 measures nothing. Raises RecipeError for an unknown
    `select`, ConversionError for a budget that would leave no layer converted."""
    from ..model.surgery import ConversionError

    if select not in SOFTMAX_SELECT:
        raise RecipeError("attention.softmax_select", f"{select!r} is not one of {', '.join(SOFTMAX_SELECT)}")

    layers = [n for n, layer in hla_layers(model).items() if layer.config.kind != "softmax"]
    if count <= 0 or not layers:
        return [], {"select": select, "errors": {}, "softmax_layers": []}
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
        chosen = largest_errors(errors, count)
    summary["softmax_layers"] = chosen
    return chosen, summary


def give_back_to_softmax(
    model: nn.Module, inputs: Sequence[dict[str, Any]], count: int, max_batches: int = 4, select: str = "attention"
) -> dict[str, Any]:
    """choose_softmax_layers, then revert the chosen layers (model.surgery.revert_attention); its summary."""
    from ..model.surgery import revert_attention

    chosen, summary = choose_softmax_layers(model, inputs, count, max_batches, select)
    revert_attention(model, chosen)
    return summary


def main_process_choice(summary: dict[str, Any], parallel: Any) -> dict[str, Any]:
    """Under a multi-process launch: the main process's (rank 0's) selection summary, in every process,
    with "processes_disagreed": whether any process had chosen other layers than rank 0.

    Every process measured the same inputs on the same weights, but a device's non-deterministic
    kernels (atomics in a reduction, autotuned configs) can still rank two close layers differently;
    then each process would train a different model. Choosing is a heuristic, what matters is that
    every process trains the same one: all of them take rank 0's layers (the caller reverts exactly
    those), and the summary says when some had chosen otherwise (a note on stderr too) instead of
    ending the run. A collective: every process calls it, after its own choice.

    Every process still runs all the measuring forwards: letting rank 0 measure alone would save no
    wall-clock time (the others would only wait for its answer, inside a collective whose timeout
    then bounds the selection), and under FSDP a forward is itself a collective (each block's
    weights are all-gathered), so a forward on one process alone would hang."""
    mine = list(summary["softmax_layers"])
    shared = dict(parallel.share_object(summary))
    differs = torch.tensor([float(mine != list(shared["softmax_layers"]))], dtype=torch.float64, device=parallel.device)
    shared["processes_disagreed"] = bool(float(parallel.reduce_sum(differs).sum()) > 0)
    if shared["processes_disagreed"]:
        parallel.note(
            "the processes chose different layers to give back to softmax (attention.softmax_layers): "
            f"every process trains the main process's choice ({', '.join(shared['softmax_layers'])})"
        )
    return shared


# -- the choice of a run, recorded in its work folder ------------------------------------------------


def softmax_choice(
    model: nn.Module, inputs: Sequence[dict[str, Any]], count: int, select: str, work_dir: str | Path, resume: bool = False, parallel: Any = None
) -> tuple[list[str], dict[str, Any]]:
    """The layers to give back to softmax after stage 1 and the selection summary, without changing
    the model (the caller reverts them).

    resume with a recorded choice in `work_dir`: that one, its summary plus "reused_on_resume": true
    (the main process reads it, every process gets its copy). Otherwise choose_softmax_layers (and,
    under several processes, main_process_choice), recorded by the main process for a later resume.
    Raises CheckpointError (one line) for a recorded choice that is damaged, made for another
    attention.softmax_layers / softmax_select, or names a layer this model has not converted."""
    from .parallel import main_only

    run_on_main = main_only(parallel)
    if resume:
        recorded = run_on_main(lambda: recorded_choice(work_dir, model, count, select))
        if parallel is not None:
            recorded = parallel.share_object(recorded)
        if recorded is not None:
            return list(recorded["softmax_layers"]), {**recorded, "reused_on_resume": True}
    chosen, summary = choose_softmax_layers(model, inputs, count, select=select)
    if parallel is not None:
        summary = main_process_choice(summary, parallel)  # every process trains rank 0's choice
        chosen = list(summary["softmax_layers"])
    run_on_main(lambda: record_choice(work_dir, summary))
    return chosen, summary


def record_choice(work_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write a selection summary to the work folder's SELECTION_FILE, atomically (non-finite errors
    as the strings json_docs writes)."""
    return atomic_write_text(selection_path(work_dir), dumps_document(summary) + "\n")


def recorded_choice(work_dir: str | Path, model: nn.Module, count: int, select: str) -> dict[str, Any] | None:
    """The selection summary recorded in `work_dir`, checked against the recipe's budget (`count`,
    `select`) and the model's converted layers; None when there is none (a work folder from before
    choices were recorded, or whose stage 1 started afresh). Raises CheckpointError, one line."""
    path = selection_path(work_dir)
    if not (path.exists() or path.is_symlink()):
        return None
    again = "start afresh without --resume (with --overwrite)"

    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"the softmax layers recorded in {path} {why}; {again}, or delete {Path(work_dir)} first")

    if not path.is_file() or path.is_symlink():
        raise damaged("are not a regular file")
    try:
        doc = loads_strict(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise damaged("are damaged (not readable JSON)") from None
    names = doc.get("softmax_layers") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise damaged("are damaged (softmax_layers is not a list of distinct layer names)")
    converted = [n for n, layer in hla_layers(model).items() if layer.config.kind != "softmax"]
    expected = count if count > 0 and converted else 0
    if doc.get("select") != select or len(names) != expected:
        raise CheckpointError(
            f"the softmax layers recorded in {path} were chosen for a different recipe (attention.softmax_layers, softmax_select); "
            f"resume with the same one, or {again}"
        )
    unknown = [n for n in names if n not in converted]
    if unknown:
        raise CheckpointError(
            f"the softmax layers recorded in {path} name {unknown[0]}, which is not a converted attention module of this model "
            f"(a different recipe or model); resume with the same ones, or {again}"
        )
    return doc


__all__ = [
    "LayerErrors",
    "OutputDrift",
    "choose_by_output",
    "choose_softmax_layers",
    "give_back_to_softmax",
    "largest_errors",
    "main_process_choice",
    "measure_layer_errors",
    "record_choice",
    "recorded_choice",
    "softmax_choice",
]
