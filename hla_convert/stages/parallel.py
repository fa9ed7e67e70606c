"""Distillation across processes, through accelerate: data parallel, and the frozen base sharded (FSDP2).

`accelerate launch -m hla_convert convert ...` (or torchrun) starts one process per device; each
builds the same calibration inputs (seeded) and runs the same steps in lockstep:

- Each step's global batch (stageN.batch_size samples: batch_size / calibration.batch_size inputs
  of calibration.batch_size samples) is shared out: every input is cut along its batch axis when
  its batch divides by the process count ("split"), else whole inputs go to each process when
  their number does ("items"), else every process runs the whole step ("replicate": correct, no
  speed-up; a line on stderr says so once). The global batch is the recipe's whatever the count.
- The losses are relative errors ||pred - target||^2 / ||target||^2 over a whole input, so with
  "split" the two sums are added over the processes (one small all-reduce per converted layer in
  stage 1, one per input in stage 2) before each process back-propagates its own share of the
  numerator over the global denominator: the summed gradient is the one-process gradient.
- No DDP wrapper: stage 1 back-propagates each layer's loss while the forward runs (hooks), and
  the trainable parameters are a few million at most. After the step's backward, one all-reduce
  (accelerator.reduce, sum) carries every trainable gradient and the step's loss values; then
  clipping and AdamW run identically everywhere, so the parameters stay equal on all processes.
- The main process alone takes the output folder's lock, writes the run file, checkpoints and
  outputs; the others wait at a barrier (wait_for_everyone). A checkpoint does not depend on the
  process count (the batch order is a function of the step), so any count resumes it.
- FSDP (an accelerate config with distributed_type FSDP, e.g. configs/accelerate/fsdp_wan14b.yaml):
  the frozen base is sharded with FSDP2 `fully_shard`, one unit per transformer block
  (`_no_split_modules`), the trainable HLA / LoRA parameters left out of the sharding
  (`ignored_params`): they stay whole on every process and are reduced as above.

The single-process path never creates an Accelerator: `from_environment()` is None unless the
process was started by a multi-process launcher (WORLD_SIZE > 1).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_failed_with_main = False  # set where an error is raised because the main process's failed

# step_loss(item, scale, reduce) -> (loss, per-layer values): see distill_loop._run_stage
StepLoss = Callable[[dict[str, Any], float, "Callable[[torch.Tensor], torch.Tensor] | None"], tuple[float, dict[str, float]]]


def launched() -> bool:
    """Whether this process is one of several started by accelerate launch / torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass
class StepShare:
    """This process's part of one step: its inputs, how the global batch was shared ("split",
    "items" or "replicate"), the scale its losses are back-propagated with, and the weight of its
    loss values in the step's (all-reduced) mean."""

    items: list[dict[str, Any]]
    mode: str
    scale: float
    weight: float


def _cut(item: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Samples start:stop of one input dict (tensors whose first axis is the batch; the rest as is)."""
    b = int(item["hidden_states"].shape[0])
    return {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v for k, v in item.items()}


def share_step(items: Sequence[dict[str, Any]], index: int, count: int) -> StepShare:
    """Process `index` of `count`'s part of a step made of `items` (see the module docstring)."""
    a = len(items)
    batches = [int(it["hidden_states"].shape[0]) for it in items]
    if count == 1:
        return StepShare(list(items), "items", 1.0 / a, 1.0 / a)
    if all(b % count == 0 for b in batches):
        mine = [_cut(it, index * b // count, (index + 1) * b // count) for it, b in zip(items, batches)]
        return StepShare(mine, "split", 1.0 / a, 1.0 / (a * count))
    if a % count == 0:
        per = a // count
        return StepShare(list(items[index * per : (index + 1) * per]), "items", 1.0 / a, 1.0 / a)
    return StepShare(list(items), "replicate", 1.0 / (a * count), 1.0 / (a * count))


class Parallel:
    """This process's view of a multi-process run (an accelerate Accelerator underneath)."""

    def __init__(self, accelerator: Any):
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.index = int(accelerator.process_index)
        self.count = int(accelerator.num_processes)
        self.is_main = bool(accelerator.is_main_process)
        # On the CPU accelerate reports MULTI_CPU even under an FSDP config (its plugin is GPU-only);
        # the launcher's ACCELERATE_USE_FSDP still says what was asked, and FSDP2 runs on gloo.
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP or _env_flag("ACCELERATE_USE_FSDP")
        self._warned: set[str] = set()

    @classmethod
    def from_environment(cls) -> "Parallel | None":
        """The run's Parallel when started by a multi-process launcher, else None (one process)."""
        if not launched():
            return None
        from accelerate import Accelerator

        # Without a GPU, accelerate only forms the multi-process (gloo) group when told cpu=True.
        return cls(Accelerator(cpu=not torch.cuda.is_available()))

    @property
    def device(self) -> str:
        dev = self.accelerator.device
        return "cpu" if dev.type == "cpu" else str(dev)

    # -- collectives -------------------------------------------------------------------------------

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def finish(self) -> None:
        """End the run's process group once every process is done (accelerate's end_training, which
        its documentation asks for at the end of a script). Left to interpreter exit, the group's
        teardown can race the other process's exit (rank 0 holds the rendezvous store): once in CI a
        second process that had finished its work aborted there ("terminate called without an active
        exception", SIGABRT) and the launch failed."""
        self.barrier()
        self.accelerator.end_training()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes of a (detached) tensor; every process gets it."""
        return self.accelerator.reduce(tensor.detach().clone(), reduction="sum")

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with the main process's values (one broadcast)."""
        from accelerate.utils import broadcast

        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])  # float64: exact for every dtype trained
        flat = broadcast(flat, from_process=0)
        with torch.no_grad():
            offset = 0
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
                offset += n

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the main process only (the others wait); an error there is raised on every
        process (same type for InputError / OutputError / CheckpointError, so that the exit codes agree)."""
        from accelerate.utils import broadcast_object_list

        result, error = None, ["", ""]
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others hear of it
                error = [type(exc).__name__, str(exc)]
                broadcast_object_list(error, from_process=0)
                raise
        broadcast_object_list(error, from_process=0)
        if not self.is_main and error[0]:
            global _failed_with_main
            _failed_with_main = True
            raise _error_type(error[0])(error[1])
        return result

    def note(self, text: str) -> None:
        """One line on stderr, from the main process only."""
        if self.is_main:
            print(f"hla-convert: note: {text}", file=sys.stderr, flush=True)

    def share_object(self, obj: Any) -> Any:
        """The main process's `obj` (JSON-like: lists, dicts, strings, numbers) in every process."""
        from accelerate.utils import broadcast_object_list

        box = [obj if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    # -- training ----------------------------------------------------------------------------------

    def run_step(self, items: Sequence[dict[str, Any]], step_loss: StepLoss, params: Sequence[nn.Parameter]) -> tuple[float, dict[str, float]]:
        """Run this process's share of one step (backward included), then sum the gradients and the
        loss values over the processes: (the step's loss, its per-layer values), as one process
        would have computed them."""
        share = share_step(items, self.index, self.count)
        if share.mode == "replicate" and "replicate" not in self._warned:
            self._warned.add("replicate")
            batches = [int(it["hidden_states"].shape[0]) for it in items]
            self.note(
                f"a step of {len(items)} input(s) of {batches[0]} sample(s) cannot be shared by {self.count} processes: "
                f"each runs all of it (correct, no speed-up); make the stage's batch_size a multiple of {self.count} samples"
            )
        reduce = self.reduce_sum if share.mode == "split" else None
        loss, values = 0.0, {}
        for item in share.items:
            item_loss, item_values = step_loss(item, share.scale, reduce)
            loss += item_loss * share.weight
            for k, v in item_values.items():
                values[k] = values.get(k, 0.0) + v * share.weight
        names = sorted(values)
        grads = [p.grad for p in params]
        # One all-reduce for everything, in float64: the loss values keep their precision, and a
        # float32 gradient summed there and rounded back is the correctly rounded float32 sum.
        device = params[0].device if params else torch.device("cpu")
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).double() for p, g in zip(params, grads)]
            + [torch.tensor([float(g is not None) for g in grads] + [loss] + [values[k] for k in names], dtype=torch.float64, device=device)]
        )
        flat = self.accelerator.reduce(flat, reduction="sum")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        tail = flat[offset:].tolist()
        had = tail[: len(params)]
        for p, h in zip(params, had):
            if h == 0.0:  # no process produced a gradient: leave it None, as one process would
                p.grad = None
        loss = tail[len(params)]
        values = dict(zip(names, tail[len(params) + 1 :]))
        return loss, values

    # -- FSDP --------------------------------------------------------------------------------------

    def shard_frozen_base(self, model: nn.Module, trainable: Sequence[nn.Parameter]) -> int:
        """FSDP2: shard the model's frozen weights, one unit per block (the accelerate config's
        fsdp_transformer_layer_cls_to_wrap, or the model's `_no_split_modules`); `trainable` (and
        any parameter added later, such as LoRA) stays unsharded.
        Returns the number of units. Every process calls it, on the same model."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)  # None on the CPU: the env then
        wrap = getattr(plugin, "transformer_cls_names_to_wrap", None) or os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
        wrap = wrap or list(getattr(model, "_no_split_modules", None) or [])
        if isinstance(wrap, str):
            wrap = [w.strip() for w in wrap.split(",") if w.strip()]
        reshard = getattr(plugin, "reshard_after_forward", None)
        if reshard is None:
            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")
        reshard = reshard if isinstance(reshard, bool) else str(reshard).upper() not in ("NO_SHARD", "SHARD_GRAD_OP", "FALSE")
        offload = getattr(plugin, "cpu_offload", None)
        offload = bool(getattr(offload, "offload_params", False)) if offload is not None else _env_flag("FSDP_OFFLOAD_PARAMS")
        mesh = init_device_mesh(self.accelerator.device.type, (self.count,))
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard}
        if offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        ignored = set(trainable)
        units = [m for m in model.modules() if type(m).__name__ in set(wrap)]
        if not units:
            raise ValueError(f"FSDP: no {', '.join(wrap) or 'block'} module in {type(model).__name__} to shard (fsdp_transformer_layer_cls_to_wrap)")
        for unit in units:
            fully_shard(unit, ignored_params={p for p in unit.parameters() if p in ignored} | _minority_dtype(unit, ignored), **kwargs)
        # FSDP placed its shards (on the device, or in host memory with offload); the rest -- the
        # trainable parameters, what lies outside the blocks, buffers -- goes to the device whole.
        # Not model.to(): that would move offloaded shards too.
        from torch.distributed.tensor import DTensor

        device = self.accelerator.device
        with torch.no_grad():
            for module in model.modules():
                for name, param in module._parameters.items():
                    if param is not None and not isinstance(param, DTensor) and param.device != device:
                        param.data = param.data.to(device)
                for name, buf in module._buffers.items():
                    if buf is not None and buf.device != device:
                        module._buffers[name] = buf.to(device)
        # Not the root: fully_shard would make the model an FSDP<Class> subclass, and the class name
        # picks the calibration inputs and is recorded in the adapter. What lies outside the blocks
        # (patch and condition embedders, output head: ~1% of Wan-14B) stays whole on each process.
        return len(units)

    @contextlib.contextmanager
    def full_weights(self, model: nn.Module) -> Iterator[None]:
        """Inside, every sharded weight of `model` is whole again on every process (a collective:
        every process enters), so that the base can be fingerprinted and saved as one process
        would; the shards are put back on the way out. A no-op without FSDP."""
        from torch.distributed.tensor import DTensor

        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        if self.fsdp:
            for module in model.modules():
                for name, param in list(module._parameters.items()):
                    if isinstance(param, DTensor):
                        # nothing runs forward inside, so FSDP's hooks never see the stand-in
                        module._parameters[name] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                        swapped.append((module, name, param))
        try:
            yield
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param


def _minority_dtype(unit: nn.Module, ignored: set[nn.Parameter]) -> set[nn.Parameter]:
    """The parameters of `unit` (not in `ignored`) whose dtype is not the one most of its elements
    have. FSDP2 all-gathers a unit's shards as one flat tensor of one dtype, and a model loaded in
    bf16 keeps its class's _keep_in_fp32_modules in float32 inside each block (Wan: the norms and
    scale_shift_table, ~0.01 % of a block); those few stay whole on every process instead."""
    count: dict[torch.dtype, int] = {}
    params = [p for p in unit.parameters() if p not in ignored]
    for p in params:
        count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    if len(count) < 2:
        return set()
    major = max(count, key=count.__getitem__)
    return {p for p in params if p.dtype != major}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def secondary_process() -> bool:
    """A process of a multi-process launch other than the main one (rank 0): it shows nothing.
    Read from the launcher's environment (RANK), so it works before any Accelerator exists."""
    return launched() and os.environ.get("RANK", "0") != "0"


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[bool]:
    """In a secondary process, stdout goes nowhere inside (tables, --json documents: the main
    process prints them once) and stderr is held back: shown when this process fails on its own,
    dropped when it ends as the others do (done, drift, interrupted) or because the main process
    failed (main_first: the main process says it). Yields whether this process is secondary."""
    if not secondary_process():
        yield False
        return
    real_stderr, held = sys.stderr, io.StringIO()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(held):
        try:
            yield True
        except BaseException as exc:
            # 0 / 1 (drift) / 130: the same outcome the main process reports
            if not (_failed_with_main or getattr(exc, "exit_code", None) in (0, 1, 130) or isinstance(exc, KeyboardInterrupt)):
                real_stderr.write(held.getvalue())
                real_stderr.flush()
            raise


def _error_type(name: str) -> type[Exception]:
    from ..errors import InputError, OutputError
    from .checkpoints import CheckpointError

    return {"InputError": InputError, "OutputError": OutputError, "CheckpointError": CheckpointError}.get(name, RuntimeError)


def main_only(parallel: Parallel | None) -> Callable[[Callable[[], Any]], Any]:
    """How a stage or the conversion writes: directly with one process (parallel None); under a
    launch, Parallel.main_first (on the main process while the others wait, its errors raised
    everywhere, None as the others' result)."""
    if parallel is None:
        return lambda fn: fn()
    return parallel.main_first


__all__ = ["Parallel", "StepShare", "launched", "main_only", "quiet_unless_main", "secondary_process", "share_step"]
