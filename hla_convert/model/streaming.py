"""Frame-block streaming of a converted block-causal video model (SkyReels-V2 diffusion forcing).

A block-causal model attends from each frame block to itself and every earlier block. Converted to
a linear kind, each layer can keep the earlier blocks as one constant-size state instead of a
growing KV cache: the model then runs on the new block's frames alone.

    stream = BlockStream(model)                # every converted layer streams
    out0 = stream(hidden_states=x[:, :, 0:2], timestep=t[:, 0:2], encoder_hidden_states=text,
                  enable_diffusion_forcing=True)
    stream.commit()                            # block 0 is final: its states become the past
    out1 = stream(hidden_states=x[:, :, 2:4], timestep=t[:, 2:4], ...)
    stream.close()

A call that is not committed (a denoising step of the current block) reads the past and changes
nothing, so the block can be run at many noise levels before it is committed. The outputs of the
calls equal the frames of one full block-causal pass. The rotary embedding is shifted by the
committed frames (models with a `rope` module that returns frame-major [.., N, .., D] tables:
the Wan family, SkyReels-V2). State per layer: hadamard/linear/hybrid [B, H, r^F, dv + 1],
higher_order (S, C, X) of [B, H, r, r + 2 (dv + 1)]; neither grows with the number of blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import ops
from .layers import HLAAttention, hla_layers


class BlockStream:
    """Runs `model` block by block with every converted layer carrying its state (see module doc)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = hla_layers(model)
        if not self.layers:
            raise ValueError("the model has no converted attention layers to stream")
        for name, layer in self.layers.items():
            if layer.config.kind == "softmax":
                raise ValueError(f"{name} is a softmax layer: streaming needs a linear kind in every converted layer")
            if layer.mode != "student":
                raise ValueError(f"{name} is in {layer.mode!r} mode: streaming runs the student")
        rope = getattr(model, "rope", None)
        if not isinstance(rope, nn.Module) or not hasattr(getattr(model, "config", None), "patch_size"):
            raise ValueError(f"{type(model).__name__} has no rope module whose positions streaming could shift")
        self.frames = 0  # latent frames committed so far
        self._new_frames = 0
        self._hook = rope.register_forward_hook(self._shift_rope)
        for layer in self.layers.values():
            layer.stream = _LayerStream()

    def _shift_rope(self, module: nn.Module, args: tuple, out: Any) -> Any:
        """Rotary tables of frames [committed, committed + new) instead of [0, new)."""
        (x,) = args
        if not self.frames:
            return out
        pt = module.patch_size[0]
        longer = x.new_zeros(x.shape[0], x.shape[1], (self.frames + x.shape[2] // pt) * pt, *x.shape[3:])
        tables = module.forward(longer)  # forward, not __call__: this hook must not run again
        n = out[0].shape[1]
        return tuple(t[:, -n:] for t in tables)

    def __call__(self, **inputs: Any) -> Any:
        x = inputs["hidden_states"]
        self._new_frames = x.shape[2] // self.model.config.patch_size[0]
        return self.model(**inputs)

    def commit(self) -> None:
        """Make the last call's blocks the past of the next call."""
        for layer in self.layers.values():
            s = layer.stream
            if s.pending is None:
                raise RuntimeError("nothing to commit: run the model on a block first")
            s.state, s.pending = s.pending, None
        self.frames += self._new_frames
        self._new_frames = 0

    def close(self) -> None:
        self._hook.remove()
        for layer in self.layers.values():
            layer.stream = None

    def __enter__(self) -> BlockStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _LayerStream:
    """One layer's committed state and the state after the last (uncommitted) call."""

    def __init__(self) -> None:
        self.state: Any = None
        self.pending: Any = None

    def attend(self, core: HLAAttention, *args: Any) -> torch.Tensor:
        """stream_attend(core, *args): HLAAttention calls this, so the layers need not import streaming."""
        return stream_attend(core, *args)


def stream_attend(
    core: HLAAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qf: list[torch.Tensor],
    kf: list[torch.Tensor],
    key_mask: torch.Tensor | None,
    scale: float,
    block: int | None,
) -> torch.Tensor:
    """The new tokens q, k [B, H, n, d], v [B, H, n, dv] against the committed state: one block
    (block None), or blocks of `block` tokens one after another. Leaves the new state pending."""
    c = core.config
    n = q.shape[2]
    bs = n if block is None else block
    state = core.stream.state
    outs = []
    for t0 in range(0, n, bs):
        sl = slice(t0, t0 + bs)
        km = None if key_mask is None else key_mask[:, sl]
        qs, ks = [f[:, :, sl] for f in qf], [f[:, :, sl] for f in kf]
        if c.kind == "hybrid":
            out, state = ops.hybrid_stream_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], qs, ks, scale, core.log_beta, state, km, c.eps)
        elif c.kind in ("hadamard", "linear"):
            out, state = ops.hadamard_stream_step(qs, ks, v[:, :, sl], state, km, c.eps)
        elif c.kind == "higher_order":
            out, state = ops.higher_order_stream_step(qs[0], ks[0], v[:, :, sl], state, km, c.normalize, c.eps)
        else:
            raise AssertionError(f"no streaming form for kind {c.kind}")
        outs.append(out)
    core.stream.pending = state
    return torch.cat(outs, dim=2)
