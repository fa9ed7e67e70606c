"""hla-convert: softmax video DiTs -> Hadamard Linear Attention.

The public API; each name lives in the module that says what it holds.
"""

from .io.adapter import AdapterError, fingerprint_weights, load_adapter, read_adapter_info, save_adapter
from .model.config import ConfigError, HLAConfig
from .conversion import ConversionResult, ProgressEvent, ValidationResult, convert, validate
from .errors import InputError
from .io.hub import HubError
from .io.push import push_output
from .model.layers import HLAAttention, hla_layers, hla_parameters
from .model.modes import set_attention_mode
from .io.output import load_converted
from .model.surgery import ConversionError, convert_attention, revert_attention, select_modules

__all__ = [
    "AdapterError",
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
]
