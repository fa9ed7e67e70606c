"""hla-convert: softmax video DiTs -> Hadamard Linear Attention.

The public API; each name lives in the module that says what it holds. The names are imported on
first use (PEP 562 __getattr__), so that `import hla_convert.cli.entry` (the console script) stays
light and can install its Ctrl-C / SIGTERM handlers before torch and diffusers load.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "io.adapter": ["AdapterError", "fingerprint_weights", "load_adapter", "read_adapter_info", "save_adapter"],
    "model.config": ["ConfigError", "HLAConfig"],
    "conversion": ["ConversionResult", "ProgressEvent", "ValidationResult", "convert", "validate"],
    "errors": ["InputError"],
    "io.hub": ["HubError"],
    "io.push": ["push_output"],
    "model.layers": ["HLAAttention", "hla_layers", "hla_parameters"],
    "model.modes": ["set_attention_mode"],
    "model.teacher_steps": ["teacher_steps"],
    "model.user_loras": ["CONVERSION_ADAPTER"],
    "io.converted": ["load_converted"],
    "model.surgery": ["ConversionError", "convert_attention", "revert_attention", "select_modules"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'hla_convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME_OF])


__all__ = [
    "AdapterError",
    "CONVERSION_ADAPTER",
    "fingerprint_weights",
    "load_adapter",
    "read_adapter_info",
    "save_adapter",
    "ConfigError",
    "ConversionResult",
    "InputError",
    "ProgressEvent",
    "ValidationResult",
    "convert",
    "validate",
    "ConversionError",
    "HLAAttention",
    "HLAConfig",
    "convert_attention",
    "hla_layers",
    "hla_parameters",
    "load_converted",
    "HubError",
    "push_output",
    "revert_attention",
    "select_modules",
    "set_attention_mode",
    "teacher_steps",
]
