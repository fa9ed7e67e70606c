"""The latent token grid of a converted model's forward, for the hybrid kind's windows.

Hybrid attention needs each token's place on the latent grid (frames x height x width after
patching). It is read from the transformer's own input, per architecture, never guessed from N:
convert_attention registers `set_token_grid` as a forward pre-hook on the transformer, and it
tells every HLA core of the model (`core.grid`, `core.text_len`, `core.text_first`, or
`core.grid_error` saying why there is none).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .architectures import ARCHITECTURES, with_field
from .layers import hla_layers

# Layout per class (model.architectures): (video layout of hidden_states, where the joint-attention text tokens sit).
_GRID_LAYOUTS: dict[str, tuple[str, str | None]] = {
    name: (layout, ARCHITECTURES[name].text_tokens) for name, layout in with_field("grid_layout").items()
}


def token_grid(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple[int, int, int], int, bool]:
    """((frames, height, width) latent tokens, text tokens, text first) for one forward call.

    Raises ValueError (one line, why) for an architecture or input the grid cannot be read from.
    """
    name = type(model).__name__
    layout = _GRID_LAYOUTS.get(name)
    if layout is None:
        raise ValueError(f"{name} is not an architecture whose latent token grid hla-convert knows ({', '.join(_GRID_LAYOUTS)})")
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError as exc:
        raise ValueError(f"could not read {name}'s forward arguments: {exc}") from None
    x = bound.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} was called without a hidden_states tensor")
    pt, ph, pw = ARCHITECTURES[name].patch_sizes(model.config)
    shape, text = layout
    if shape == "packed":
        dims = [bound.get(k) for k in ("num_frames", "height", "width")]
        if not all(isinstance(d, int) for d in dims):
            raise ValueError(f"{name} was called without integer num_frames, height and width")
        f, h, w = dims
    elif x.dim() != 5:
        raise ValueError(f"{name} hidden_states must be a 5-D video latent, got {list(x.shape)}")
    elif shape == "BCFHW":
        f, h, w = x.shape[2:]
    else:
        f, h, w = x.shape[1], x.shape[3], x.shape[4]
    grid = (-(-int(f) // pt), int(h) // ph, int(w) // pw)
    text_len = 0
    if text is not None:
        enc = bound.get("encoder_hidden_states")
        text_len = int(enc.shape[1]) if isinstance(enc, torch.Tensor) else 0
    return grid, text_len, text == "first"


def set_token_grid(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook on the transformer: tell every HLA core the grid of this call's tokens."""
    cores = hla_layers(model).values()
    if not any(core.config.kind == "hybrid" for core in cores):
        return
    try:
        grid, text_len, text_first = token_grid(model, args, kwargs)
        error = None
    except ValueError as exc:
        grid, text_len, text_first, error = None, 0, True, str(exc)
    for core in cores:
        core.grid, core.text_len, core.text_first, core.grid_error = grid, text_len, text_first, error


