"""torch.compile of a model for a training stage (recipe `stage2.compile`).

compiled_blocks(model) compiles, in place, the model's repeated blocks (diffusers'
`compile_repeated_blocks`: one compiled block reused by every block of the class, so the compile
costs one block's, not the model's) or, for a model that names none, the whole model; on leaving,
the model is eager again. The state dict is untouched (nn.Module.compile keeps the module and its
names), so checkpoints and the saved adapter do not change.

COMPILE_BACKEND is dynamo's backend: "inductor" (the one that fuses; it needs a C compiler on the
CPU and Triton on CUDA). The CPU tests set "eager" / "aot_eager": the wiring and the gradients, not
inductor's code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

COMPILE_BACKEND = "inductor"
# Under gradient checkpointing a converted block's forward has side effects dynamo will not replay in
# the recompute (the processor enters its routing TorchFunctionMode, the core counts its calls);
# without this flag (newer torch only) the whole forward falls back to eager (tests/model/test_compile.py).
CHECKPOINT_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def uncompile(model: nn.Module) -> None:
    """Undo nn.Module.compile on the model and its submodules (compile_repeated_blocks uses it)."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, backend: str | None = None) -> Iterator[str]:
    """Within: the model's repeated blocks compiled in place with `backend` (COMPILE_BACKEND), or the
    whole model where it has no `_repeated_blocks`; yields which ("blocks" or "model"). After, however
    the body ends: the model eager, dynamo's caches cleared and its checkpoint flag as it was."""
    config = torch._dynamo.config
    had_flag = hasattr(config, CHECKPOINT_FLAG)
    flag = getattr(config, CHECKPOINT_FLAG, None)
    if had_flag:
        setattr(config, CHECKPOINT_FLAG, True)
    torch._dynamo.reset()
    try:
        if getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
            model.compile_repeated_blocks(backend=backend or COMPILE_BACKEND)
            how = "blocks"
        else:
            model.compile(backend=backend or COMPILE_BACKEND)
            how = "model"
        yield how
    finally:
        uncompile(model)
        torch._dynamo.reset()
        if had_flag:
            setattr(config, CHECKPOINT_FLAG, flag)


__all__ = ["CHECKPOINT_FLAG", "COMPILE_BACKEND", "compiled_blocks", "uncompile"]
