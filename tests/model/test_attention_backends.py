"""No attention backend or processor can quietly run softmax on a converted layer: diffusers'
set_attention_backend (native math, flash), a processor that never reaches SDPA or one put back
after the conversion; and gradient checkpointing recomputes through HLA with the same gradients.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from hla_convert import HLAConfig, convert_attention, hla_layers, hla_parameters, revert_attention
from hla_convert.model.surgery import attention_modules
from helpers import HADAMARD, forward_no_grad, tiny_base

from tiny_models import ARCHITECTURES, LEFT_SOFTMAX, SELF_ATTENTION, forward


@pytest.fixture
def restore_active_backend():
    """set_attention_backend also sets diffusers' global active backend; put it back afterwards."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


# -- (e) attention backends and processors cannot bypass HLA ----------------------------------------


@contextlib.contextmanager
def _pretend_backend_installed(monkeypatch):
    """Let diffusers select a backend whose package is not installed here (flash-attn on a CPU box).
    Only the install check is skipped: any call that really reached the backend would fail."""
    from diffusers.models import attention_dispatch

    monkeypatch.setattr(attention_dispatch, "_check_attention_backend_requirements", lambda backend: None)
    monkeypatch.setattr(attention_dispatch, "_maybe_download_kernel_for_backend", lambda backend: None)
    yield


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_native_math_backend_keeps_hla(arch, restore_active_backend):
    model, inputs, ref = tiny_base(arch)
    convert_attention(model, HADAMARD)
    native = forward_no_grad(model, inputs)
    model.set_attention_backend("_native_math")
    out = forward_no_grad(model, inputs)
    assert all(layer.calls == 2 for layer in hla_layers(model).values())
    assert torch.allclose(out, native, rtol=0, atol=1e-5)
    assert (out - ref).abs().max() > 1e-4  # still HLA, not the softmax the backend would compute


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flash_backend_on_converted_layers_keeps_hla(arch, monkeypatch, restore_active_backend):
    """Whatever backend the converted layers' processors are given (what set_attention_backend
    writes per module), or a global `attention_backend(...)` context, HLA runs, unchanged."""
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

    model, inputs, _ = tiny_base(arch)
    convert_attention(model, HADAMARD)
    native = forward_no_grad(model, inputs)
    mods = attention_modules(model)
    with _pretend_backend_installed(monkeypatch):
        for name in SELF_ATTENTION[arch]:
            mods[name].processor._attention_backend = AttentionBackendName.FLASH
        assert torch.equal(forward_no_grad(model, inputs), native)
        for name in SELF_ATTENTION[arch]:
            mods[name].processor._attention_backend = None
        # global context: the softmax layers left in the model must not see it, so pin them
        for name in LEFT_SOFTMAX[arch]:
            if hasattr(mods[name].processor, "_attention_backend"):
                mods[name].processor._attention_backend = AttentionBackendName.NATIVE
        with attention_backend("flash"):
            assert torch.equal(forward_no_grad(model, inputs), native)
    for name in SELF_ATTENTION[arch]:  # the processors' own settings are restored after each call
        assert mods[name].processor._attention_backend is None


def test_flash_backend_really_would_be_used_without_conversion(monkeypatch, restore_active_backend):
    """Control for the test above: on an unconverted layer the same setting does reach flash."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    model, inputs, _ = tiny_base("wan")
    with _pretend_backend_installed(monkeypatch):
        model.blocks[0].attn1.processor._attention_backend = AttentionBackendName.FLASH
        with pytest.raises(Exception):
            forward_no_grad(model, inputs)


@pytest.mark.parametrize("arch", ["cogvideox", "hunyuan"])
def test_set_attention_backend_flash_on_whole_model(arch, monkeypatch, restore_active_backend):
    """Models whose every backend-aware processor is converted: model.set_attention_backend("flash")."""
    model, inputs, _ = tiny_base(arch)
    convert_attention(model, HADAMARD)
    native = forward_no_grad(model, inputs)
    with _pretend_backend_installed(monkeypatch):
        model.set_attention_backend("flash")
        assert torch.equal(forward_no_grad(model, inputs), native)


class _ManualSoftmaxProcessor:
    """A Wan self-attention processor that computes softmax by hand, never calling SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        out = (w @ v).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def test_processor_that_never_reaches_sdpa_raises():
    model, inputs, _ = tiny_base("wan")
    model.blocks[0].attn1.set_processor(_ManualSoftmaxProcessor())
    assert torch.isfinite(forward_no_grad(model, inputs)).all()  # the processor itself works
    convert_attention(model, HADAMARD, include=["blocks.0.attn1"])
    with pytest.raises(RuntimeError, match="never reached"):
        forward_no_grad(model, inputs)


def test_replacing_the_processor_after_conversion_does_not_silently_run_softmax():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, inputs, ref = tiny_base("wan")
    convert_attention(model, HADAMARD)
    model.set_attn_processor(WanAttnProcessor())
    with pytest.raises(RuntimeError, match="processor was replaced"):
        forward_no_grad(model, inputs)
    revert_attention(model)
    assert torch.equal(forward_no_grad(model, inputs), ref)


@pytest.mark.parametrize("kind", ["hadamard", "hybrid"])  # hybrid: the grid must hold in the recompute
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    grads = []
    for checkpointing in (False, True):
        model, inputs, _ = tiny_base("wan")
        model.requires_grad_(False)
        with torch.random.fork_rng():  # softplus maps start from random draws
            torch.manual_seed(0)
            convert_attention(model, HLAConfig(kind=kind, factors=2, feature_dim=4, feature_map="softplus"))
        if checkpointing:
            model.enable_gradient_checkpointing()
        forward(model, inputs).square().mean().backward()
        # with checkpointing every converted layer ran twice: forward, then recomputed in backward
        assert {layer.calls for layer in hla_layers(model).values()} == {2 if checkpointing else 1}
        grads.append({n: p.grad for n, p in hla_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])
