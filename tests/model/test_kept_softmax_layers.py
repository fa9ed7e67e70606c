"""A layer given back to softmax (attention.softmax_layers) runs torch's own SDPA with no backend
forced, and a converted layer in teacher mode reaches SDPA the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hla_convert import HLAConfig, convert_attention, revert_attention
from hla_convert.model.surgery import HLAProcessor
from helpers import forward_no_grad, tiny_base

# -- (i) kept softmax layers run torch's own SDPA, no backend forced ------------------------------------


class _SdpaSpy(torch.overrides.TorchFunctionMode):
    """Records every scaled_dot_product_attention call that reaches torch: (module, query tokens,
    key tokens, the SDPA backends enabled at the call). A converted layer's router sits above this
    mode, so a call it sends to HLA never gets here."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str | None, int, int, dict[str, bool]]] = []
        self.module: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key")))
            backends = {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            }
            self.calls.append((self.module, q.shape[-2], k.shape[-2], backends))
        return func(*args, **kwargs)


def _spy_forward(model, inputs, modules):
    spy = _SdpaSpy()
    hooks = []
    for name in modules:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_pre_hook(lambda _m, _a, name=name: setattr(spy, "module", name)))
        hooks.append(mod.register_forward_hook(lambda _m, _a, _o: setattr(spy, "module", None)))
    try:
        with spy:
            forward_no_grad(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return spy.calls


def test_kept_softmax_layer_calls_sdpa_with_no_backend_forced():
    """A layer given back to softmax (attention.softmax_layers) is diffusers' own processor again, whose
    self-attention is one torch SDPA call with every fused backend (flash, memory-efficient, cuDNN)
    left on: the fastest softmax a user's GPU has. The converted layer's SDPA goes to HLA instead;
    in teacher mode it reaches torch's SDPA the same way."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hla_convert import set_attention_mode

    model, inputs, _ = tiny_base("wan")
    convert_attention(model, HLAConfig(kind="hybrid", factors=2, feature_dim=4, window=(1, 0, 0)))
    revert_attention(model, ["blocks.1.attn1"])  # kept softmax
    kept = model.blocks[1].attn1
    assert not isinstance(kept.processor, HLAProcessor) and kept.processor._attention_backend is None
    tokens = 2 * 4 * 4
    watched = ["blocks.0.attn1", "blocks.1.attn1"]
    all_on = {"flash": True, "mem_efficient": True, "cudnn": True, "math": True}

    calls = _spy_forward(model, inputs, watched)
    assert [c[:3] for c in calls if c[0] is not None] == [("blocks.1.attn1", tokens, tokens)]
    assert all(c[3] == all_on for c in calls), calls
    set_attention_mode(model, "teacher")  # stage 2's teacher: the converted layer's own softmax call
    calls = _spy_forward(model, inputs, watched)
    assert [c[:3] for c in calls if c[0] is not None] == [("blocks.0.attn1", tokens, tokens), ("blocks.1.attn1", tokens, tokens)]
    assert all(c[3] == all_on for c in calls), calls
    # the spy sees a forced backend: what a sdpa_kernel(MATH) around the kept layer would look like
    with sdpa_kernel(SDPBackend.MATH):
        forced = _spy_forward(model, inputs, watched)
    assert forced and all(c[3]["flash"] is False and c[3]["math"] is True for c in forced)
