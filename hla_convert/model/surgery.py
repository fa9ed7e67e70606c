"""The one seam into diffusers models: swap the softmax core of chosen attention modules.

The model's own attention processor keeps running: projections, q/k norms, RoPE, joint text+video
concatenation and the output projection stay diffusers' code. `convert_attention` wraps each chosen
module's processor in an `HLAProcessor`, which runs the original processor with two changes:

- the processor's attention backend is pinned to "native" for the call, so that a flash, sage or
  other backend the user set cannot take the softmax call down a path we do not see;
- a TorchFunctionMode routes the `scaled_dot_product_attention` call whose keys are the queries'
  own tokens (self or joint attention; I2V image cross-attention in the same processor passes
  through) to the module's `HLAAttention` core at `<module>.hla`.

If a converted module's processor never reaches that call (context parallelism, a custom kernel),
the forward raises instead of silently running softmax.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .architectures import with_field
from .attn_masks import attention_mask_structure, key_mask_from_attn_mask
from .config import HLAConfig
from .flops import attention_flops
from .grid import set_token_grid, token_grid
from .layers import HLAAttention, hla_layers

# Self-attention modules converted by default, per architecture (class name of the transformer; model.architectures).
DEFAULT_INCLUDE: dict[str, tuple[str, ...]] = with_field("default_include")


class ConversionError(ValueError):
    """A conversion request that cannot be carried out; the message says which part and why."""


def _attention_classes() -> tuple[type, ...]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    classes: tuple[type, ...] = (Attention, AttentionModuleMixin)
    try:  # Mochi's attention predates the mixin
        from diffusers.models.attention_processor import MochiAttention

        classes += (MochiAttention,)
    except ImportError:
        pass
    return classes


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every diffusers attention module of the model, by name."""
    classes = _attention_classes()
    return {name: m for name, m in model.named_modules() if isinstance(m, classes) and hasattr(m, "processor")}


def _is_self_attention(module: nn.Module) -> bool:
    return not bool(getattr(module, "is_cross_attention", False))


def default_include(model: nn.Module) -> tuple[str, ...] | None:
    """The architecture's default patterns, or None: then every non-cross attention module."""
    return DEFAULT_INCLUDE.get(type(model).__name__)


def select_modules(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[str]:
    """Names of the attention modules that `include`/`exclude` glob patterns pick (see convert_attention)."""
    mods = attention_modules(model)
    if not mods:
        raise ConversionError(f"{type(model).__name__} has no diffusers attention modules to convert")
    include = list(include) if include else None
    if include is None:
        patterns = default_include(model)
        if patterns is None:
            chosen = [n for n, m in mods.items() if _is_self_attention(m)]
        else:
            chosen = [n for n in mods if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    else:
        for p in include:
            if not any(fnmatch.fnmatchcase(n, p) for n in mods):
                raise ConversionError(f"include pattern {p!r} matches no attention module (e.g. {_examples(mods)})")
        chosen = [n for n in mods if any(fnmatch.fnmatchcase(n, p) for p in include)]
    for p in exclude or ():
        if not any(fnmatch.fnmatchcase(n, p) for n in mods):
            raise ConversionError(f"exclude pattern {p!r} matches no attention module (e.g. {_examples(mods)})")
    chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude or ())]
    if not chosen:
        raise ConversionError("the include/exclude patterns leave no attention module to convert")
    return chosen


def _examples(mods: Iterable[str]) -> str:
    names = list(mods)
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def convert_attention(
    model: nn.Module,
    config: HLAConfig,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> nn.Module:
    """Convert, in place, the chosen attention modules of a diffusers transformer; returns the model.

    include / exclude: glob patterns on module names (e.g. "blocks.*.attn1", "blocks.0.*"). With no
    include, the architecture's self-attention modules (DEFAULT_INCLUDE), or every non-cross
    attention module for architectures not in that table. Modules left out stay softmax (hybrid).
    New parameters (float32) are created on the module's device at `<module>.hla`.
    config.causal_block_frames (block-causal models only) is set on the model first.
    """
    if not isinstance(config, HLAConfig):
        raise ConversionError(f"config must be an HLAConfig, got {type(config).__name__}")
    mods = attention_modules(model)
    names = select_modules(model, include, exclude)
    for name in names:
        if isinstance(mods[name].processor, HLAProcessor):
            raise ConversionError(f"{name} is already converted; load the base model again to convert it anew")
    if config.causal_block_frames is not None:  # the model's frame-block mask (block_causal.py)
        from .block_causal import causal_block_problem

        problem = causal_block_problem(model, config.causal_block_frames)
        if problem is not None:
            raise ConversionError(problem)
        model._set_ar_attention(config.causal_block_frames)
    for name in names:
        module = mods[name]
        heads, to_q = _heads_and_query(module, name)
        core = HLAAttention(config, heads, to_q.out_features // heads).to(device=to_q.weight.device)
        module.hla = core
        _set_processor(module, wrap_processor(module.processor))
        module._hla_guard = module.register_forward_pre_hook(_check_processor)
    if getattr(model, "_hla_grid_hook", None) is None:
        model._hla_grid_hook = model.register_forward_pre_hook(set_token_grid, with_kwargs=True)
    return model


def _heads_and_query(module: nn.Module, name: str) -> tuple[int, nn.Linear]:
    """Head count and query projection, under either of the names diffusers' attention classes use."""
    heads = getattr(module, "heads", None) or getattr(module, "num_heads", None)
    to_q = getattr(module, "to_q", None) or getattr(module, "to_query", None)
    if not heads or not isinstance(to_q, nn.Linear):
        raise ConversionError(f"{name} ({type(module).__name__}) has no head count or query projection the seam knows")
    return int(heads), to_q


def _set_processor(module: nn.Module, processor: Any) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def _check_processor(module: nn.Module, args: Any) -> None:
    """A converted module whose processor was replaced afterwards (set_attn_processor) must not run softmax silently."""
    if not isinstance(module.processor, HLAProcessor):
        raise RuntimeError(
            f"{type(module).__name__} was converted to HLA but its processor was replaced by "
            f"{type(module.processor).__name__}; call hla_convert.revert_attention first to go back to softmax"
        )


def revert_attention(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Undo convert_attention: original processors back, HLA cores removed.

    names: only these converted modules go back to softmax (the rest stay converted); None = all.
    """
    converted = hla_layers(model)
    if names is not None:
        unknown = [n for n in names if n not in converted]
        if unknown:
            raise ConversionError(f"{unknown[0]} is not a converted attention module")
    for name, module in attention_modules(model).items():
        if names is not None and name not in names:
            continue
        if isinstance(getattr(module, "hla", None), HLAAttention):
            if isinstance(module.processor, HLAProcessor):
                _set_processor(module, module.processor.inner)
            module._hla_guard.remove()
            del module._hla_guard, module.hla
    hook = getattr(model, "_hla_grid_hook", None)
    if hook is not None and not hla_layers(model):
        hook.remove()
        del model._hla_grid_hook
    return model


def converted_modules(model: nn.Module) -> list[str]:
    return list(hla_layers(model))


# -- the processor wrapper ----------------------------------------------------------------------


class HLAProcessor:
    """Runs the wrapped diffusers processor with its softmax call routed to `attn.hla`."""

    def __init__(self, inner: Any):
        self.inner = inner

    # diffusers sets these on every processor (set_attention_backend, context parallel); they
    # belong to the wrapped processor.
    @property
    def _attention_backend(self):
        return getattr(self.inner, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.inner._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.inner, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.inner._parallel_config = value

    def _run(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
        core = getattr(attn, "hla", None)
        if not isinstance(core, HLAAttention):
            raise RuntimeError(f"{type(attn).__name__} has an HLA processor but no .hla core")
        pinned = hasattr(self.inner, "_attention_backend")
        saved = getattr(self.inner, "_attention_backend", None)
        router = _SoftmaxRouter(core)
        try:
            if pinned:
                self.inner._attention_backend = _native_backend()
            with router:
                out = self.inner(attn, *args, **kwargs)
        finally:
            if pinned:
                self.inner._attention_backend = saved
        if router.routed == 0:
            raise RuntimeError(
                f"the converted attention ({type(self.inner).__name__}) never reached "
                "scaled_dot_product_attention, so HLA would be bypassed; context parallelism and custom "
                "attention kernels are not supported on converted layers"
            )
        return out


_WRAPPERS: dict[type, type] = {}


def wrap_processor(inner: Any) -> HLAProcessor:
    """An HLAProcessor whose __call__ has the wrapped processor's signature.

    diffusers drops keyword arguments (image_rotary_emb, ...) that the processor's signature does
    not name, so the wrapper must present the inner one's.
    """
    cls = type(inner)
    sub = _WRAPPERS.get(cls)
    if sub is None:

        def __call__(self, attn, *args, **kwargs):
            return self._run(attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(cls.__call__)
        sub = type(f"HLA{cls.__name__}", (HLAProcessor,), {"__call__": __call__})
        _WRAPPERS[cls] = sub
    return sub(inner)


def _native_backend():
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName.NATIVE


_SDPA_PARAMS = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None
)


class _SoftmaxRouter(TorchFunctionMode):
    """Sends the self-attention SDPA call of one processor run to an HLA core."""

    def __init__(self, core: HLAAttention):
        super().__init__()
        self.core = core
        self.routed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            if torch.compiler.is_compiling() and getattr(func, "__module__", None) == "torch._tensor" and args and isinstance(args[0], torch.Tensor):
                # A Python-level Tensor method (unflatten, ...) called as a plain function makes
                # dynamo trace its super() call, a graph break; as a method call it is one op.
                return getattr(args[0], func.__name__)(*args[1:], **kwargs)
            return func(*args, **kwargs)
        bound = _SDPA_PARAMS.bind(*args, **kwargs).arguments
        q, k, v = bound["query"], bound["key"], bound["value"]
        if q.shape[-2] != k.shape[-2]:  # cross-attention inside the same processor (Wan I2V image keys)
            return func(*args, **kwargs)
        if bound.get("dropout_p", 0.0):
            raise RuntimeError("converted attention got a softmax call with dropout; HLA has no attention dropout")
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        key_mask, block = attention_mask_structure(
            bound.get("attn_mask"), q.shape[0], q.shape[-2], k.shape[-2], bool(bound.get("is_causal"))
        )
        self.routed += 1
        teacher = lambda: func(*args, **kwargs)  # noqa: E731
        if block is None:
            return self.core.attend(teacher, q, k, v, key_mask, bound.get("scale"))
        return self.core.attend(teacher, q, k, v, key_mask, bound.get("scale"), causal_block=block)


__all__ = [
    "ConversionError",
    "DEFAULT_INCLUDE",
    "HLAProcessor",
    "attention_flops",
    "attention_modules",
    "convert_attention",
    "converted_modules",
    "attention_mask_structure",
    "key_mask_from_attn_mask",
    "revert_attention",
    "select_modules",
    "token_grid",
]
