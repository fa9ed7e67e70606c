"""Host helpers shared by the Hadamard, hybrid and causal kernel hosts (hadamard.py, hybrid.py,
causal.py): the mode (compiled or interpreted), loading the jitted modules, the input checks every
kernel makes, output allocation, strides, the dot operand setup and the key mask.

Public within the package (no leading underscore); not part of hla_kernels' API.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from collections.abc import Sequence
from types import ModuleType

import torch

HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, *HALF)

#: Filled with NaN instead of left uninitialised when True (tests), so unwritten elements show.
POISON_OUTPUTS = False

_MODULES: dict[tuple[str, bool], ModuleType] = {}


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks for the interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def load_jitted(stem: str, interpret: bool) -> ModuleType:
    """hla_kernels/<stem>.py executed as its own module with TRITON_INTERPRET set to `interpret`
    (triton reads it at decoration), once per (stem, mode). The shared @jit helpers
    (_triton_common.py) of the same mode are loaded first: the kernel modules take them from
    sys.modules under the name of their own mode."""
    key = (stem, interpret)
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    if stem != "_triton_common":
        load_jitted("_triton_common", interpret)
    name = jitted_name(stem, interpret)
    path = pathlib.Path(__file__).with_name(f"{stem}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        sys.modules[name] = mod  # triton resolves the kernels' globals through their module
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    _MODULES[key] = mod
    return mod


def jitted_name(stem: str, interpret: bool) -> str:
    """The sys.modules name of hla_kernels/<stem>.py loaded for one mode."""
    return f"hla_kernels.{stem}_{'interp' if interpret else 'jit'}"


@torch.compiler.assume_constant_result  # torch.compile: read once at trace time, not traced
def major_capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled under POISON_OUTPUTS."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def rowmajor(t: torch.Tensor) -> torch.Tensor:
    """Kernels index [B, H, N, C] with free strides except the last, which must be 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def s3(t: torch.Tensor) -> tuple[int, int, int]:
    """The (batch, head, token) strides of a [B, H, N, C] tensor, as the kernels take them."""
    return t.stride(0), t.stride(1), t.stride(2)


def dot_setup(tensors: Sequence[torch.Tensor], interp: bool):
    """(dot operand dtype, fp32 input precision, emulate) for these inputs.

    Half inputs: bf16 operands for both bf16 and fp16 (the state sums N products and would
    overflow fp16's range). fp32 inputs: 3xTF32, fp32-accurate on the tensor cores.
    """
    import triton.language as tl

    if all(t.dtype in HALF for t in tensors):
        return tl.bfloat16, None, interp
    return tl.float32, (None if interp else "tf32x3"), interp


def is_fp32(dot) -> bool:
    return dot[0].primitive_bitwidth == 32


def to_dot(t: torch.Tensor, dot) -> torch.Tensor:
    """A state (fp32) in the dot operand dtype."""
    return t if is_fp32(dot) else t.to(torch.bfloat16)


def launch_extra(cfg: dict, interp: bool) -> dict:
    """num_warps / num_stages of a launch config (the interpreter takes none)."""
    return {} if interp else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def no_zero_grads(ctx) -> None:
    """In a custom op's setup_context: the backward gets None, not zeros, for the forward's
    non-differentiable extra outputs (den, states: returned only because a custom op's backward may
    save nothing else).

    torch.library's autograd wrapper is an autograd.Function, which by default materialises a zero
    gradient of each output's shape and dtype before calling the backward; those zeros stay alive
    through the backward kernels. For the causal kernel that is one more copy of every per-slot
    state: token-causal N = 32,760, H = 12, r = 32, dv = 128, bf16: 391.5 MiB of the 2,041 MB peak
    (benchmarks/RESULTS.md, 2026-12-06). The formulas never read those gradients.
    """
    ctx.set_materialize_grads(False)


def mask_weights(key_mask: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor | None:
    """bool key_mask [B, N] (True = keep) -> fp32 weights [B, N] on v's device, or None."""
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be bool [B, N] (True = keep), got {key_mask.dtype}")
    if key_mask.dim() != 2 or key_mask.shape[0] != v.shape[0] or key_mask.shape[1] != v.shape[2]:
        raise ValueError(f"key_mask must be [B, N] = {[v.shape[0], v.shape[2]]}, got {list(key_mask.shape)}")
    return key_mask.to(device=v.device, dtype=torch.float32).contiguous()
