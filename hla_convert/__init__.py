"""hla-convert: softmax video DiTs -> Hadamard Linear Attention.

The public API; each name lives in the module that says what it holds.
"""

from .adapter import AdapterError, fingerprint_weights, load_adapter, read_adapter_info, save_adapter
from .config import ConfigError, HLAConfig
from .conversion import ConversionResult, ProgressEvent, ValidationResult, convert, validate
from .errors import InputError
from .hub import HubError, push_output
from .layers import HLAAttention, hla_layers, hla_parameters, set_attention_mode
from .output import load_converted
from .surgery import ConversionError, convert_attention, revert_attention, select_modules

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
