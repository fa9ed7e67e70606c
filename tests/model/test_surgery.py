"""The diffusers seam (hla_convert.model.surgery) on tiny real models of the four main architectures:
finding and replacing the softmax cores.

What a user relies on: an identity conversion changes nothing, bit for bit; HLA conversions train
only the new parameters; only self-attention is converted unless asked otherwise; state_dict keys
are stable; revert is exact; a model converts once. Padded text tokens: test_key_masks.py; attention
backends and processors: test_attention_backends.py; layers kept softmax: test_kept_softmax_layers.py;
the other diffusers video transformers: test_other_architectures.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hla_convert import (
    ConversionError,
    HLAAttention,
    HLAConfig,
    convert_attention,
    hla_layers,
    hla_parameters,
    revert_attention,
    select_modules,
)
from hla_convert.model.surgery import HLAProcessor, attention_modules, converted_modules
from helpers import HADAMARD, STUDENT_CONFIGS, STUDENT_IDS, forward_no_grad, tiny_base

from tiny_models import ARCHITECTURES, LEFT_SOFTMAX, SELF_ATTENTION, forward

# -- (a) identity conversion ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_softmax_conversion_is_bit_identical(arch):
    model, inputs, ref = tiny_base(arch)
    convert_attention(model, HLAConfig(kind="softmax"))
    out = forward_no_grad(model, inputs)
    assert torch.equal(out, ref)
    # ... and it really went through the converted path, once per converted module
    layers = hla_layers(model)
    assert sorted(layers) == sorted(SELF_ATTENTION[arch])
    assert all(layer.calls == 1 for layer in layers.values())


# -- (b) HLA conversions train only the new parameters ----------------------------------------------


@pytest.mark.parametrize("config", STUDENT_CONFIGS, ids=STUDENT_IDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hla_conversion_forward_backward_trains_only_hla(arch, config):
    model, inputs, ref = tiny_base(arch)
    model.requires_grad_(False)
    base_names = {n for n, _ in model.named_parameters()}
    convert_attention(model, config)
    hla = hla_parameters(model)
    assert hla and set(hla).isdisjoint(base_names)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in hla.values())

    out = forward(model, inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-4  # it is not softmax any more
    F.mse_loss(out, torch.zeros_like(out)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(hla)
    for name, p in hla.items():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# -- (c) what gets converted -------------------------------------------------------------------------


def _is_converted(module) -> bool:
    return isinstance(module.processor, HLAProcessor) and isinstance(getattr(module, "hla", None), HLAAttention)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_selection_is_exactly_the_self_attention(arch):
    model, _, _ = tiny_base(arch)
    originals = {n: type(m.processor) for n, m in attention_modules(model).items()}
    assert sorted(originals) == sorted(SELF_ATTENTION[arch] + LEFT_SOFTMAX[arch])  # the tiny tree itself
    assert select_modules(model) == SELF_ATTENTION[arch]
    convert_attention(model, HADAMARD)
    assert converted_modules(model) == SELF_ATTENTION[arch]
    mods = attention_modules(model)
    for name in SELF_ATTENTION[arch]:
        assert _is_converted(mods[name]), name
        assert type(mods[name].processor.inner) is originals[name]
    for name in LEFT_SOFTMAX[arch]:
        assert type(mods[name].processor) is originals[name] and not hasattr(mods[name], "hla"), name


def test_include_exclude_globs_make_a_hybrid():
    model, inputs, ref = tiny_base("wan")
    full, _, _ = tiny_base("wan")
    convert_attention(full, HADAMARD)
    convert_attention(model, HADAMARD, include=["blocks.*.attn1"], exclude=["blocks.1.*"])
    mods = attention_modules(model)
    assert converted_modules(model) == ["blocks.0.attn1"]
    assert _is_converted(mods["blocks.0.attn1"])
    for name in ("blocks.1.attn1", "blocks.0.attn2", "blocks.1.attn2"):
        assert not isinstance(mods[name].processor, HLAProcessor) and not hasattr(mods[name], "hla")
    assert list(hla_parameters(model)) == ["blocks.0.attn1.hla.proj"]
    # the same HLA weights as the full conversion's first layer, the excluded layer left softmax
    full.blocks[0].attn1.hla.load_state_dict(model.blocks[0].attn1.hla.state_dict())
    hybrid = forward_no_grad(model, inputs)
    assert torch.isfinite(hybrid).all()
    assert (hybrid - ref).abs().max() > 1e-4 and (hybrid - forward_no_grad(full, inputs)).abs().max() > 1e-4

    # include alone, an exact name
    other, _, _ = tiny_base("wan")
    convert_attention(other, HADAMARD, include=["blocks.1.attn1"])
    assert converted_modules(other) == ["blocks.1.attn1"]


@pytest.mark.parametrize(
    "include,exclude,match",
    [
        (["blocks.*.attn9"], None, "include pattern"),
        (["blocks.*.attn1", "nope"], None, "include pattern"),
        (None, ["transformer_blocks.*"], "exclude pattern"),
        (None, ["blocks.*"], "no attention module"),
        (["blocks.0.attn1"], ["blocks.0.*"], "no attention module"),
    ],
)
def test_bad_patterns_raise_and_leave_the_model_untouched(include, exclude, match):
    model, inputs, ref = tiny_base("wan")
    with pytest.raises(ConversionError, match=match):
        convert_attention(model, HADAMARD, include=include, exclude=exclude)
    assert hla_layers(model) == {} and not any(isinstance(m.processor, HLAProcessor) for m in attention_modules(model).values())
    assert torch.equal(forward_no_grad(model, inputs), ref)


def test_bad_config_and_models_without_attention_raise():
    model, _, _ = tiny_base("wan")
    with pytest.raises(ConversionError):
        convert_attention(model, {"kind": "hadamard"})
    with pytest.raises(ConversionError):
        convert_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)), HADAMARD)


# -- (f) state_dict keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,shapes",
    [
        (HLAConfig(kind="hadamard", factors=2, feature_dim=4), {"proj": (2, 12, 3)}),
        (HLAConfig(kind="hadamard", factors=3, feature_dim=4, feature_map="softplus"), {"weight": (3, 2, 12, 4), "bias": (3, 2, 4)}),
        (HLAConfig(kind="linear", factors=2, feature_dim=3), {"weight": (1, 2, 12, 9), "bias": (1, 2, 9)}),
        (HLAConfig(kind="higher_order", feature_dim=4), {"weight": (1, 2, 12, 4), "bias": (1, 2, 4)}),
        (
            HLAConfig(kind="hybrid", far="linear", factors=2, feature_dim=3, learn_temperature=True),
            {"log_beta": (2,), "log_temp": (2,), "weight": (1, 2, 12, 9), "bias": (1, 2, 9)},
        ),
    ],
    ids=["hadamard-taylor", "hadamard-softplus", "linear", "higher_order", "hybrid-linear"],
)
def test_state_dict_keys_and_shapes(config, shapes):
    model, inputs, _ = tiny_base("wan")  # 2 heads x 12 dims
    base_sd = model.state_dict()
    convert_attention(model, config)
    sd = model.state_dict()
    expected = {f"{m}.hla.{p}": s for m in SELF_ATTENTION["wan"] for p, s in shapes.items()}
    assert {k: tuple(v.shape) for k, v in sd.items() if ".hla." in k} == expected
    assert set(hla_parameters(model)) == set(expected)
    # every base key is kept, unrenamed and unchanged
    assert set(sd) - set(expected) == set(base_sd)
    assert all(torch.equal(sd[k], base_sd[k]) for k in base_sd)

    # the HLA keys alone restore a converted model (what an adapter saves and loads)
    with torch.no_grad():
        for p in hla_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    out = forward_no_grad(model, inputs)
    fresh, _, _ = tiny_base("wan")
    convert_attention(fresh, config)
    result = fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".hla." in k}, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == set(base_sd)
    assert torch.equal(forward_no_grad(fresh, inputs), out)


# -- (g) revert, (h) converting twice ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_revert_restores_bit_exact_outputs(arch):
    model, inputs, ref = tiny_base(arch)
    originals = {n: m.processor for n, m in attention_modules(model).items()}
    keys = set(model.state_dict())
    convert_attention(model, HADAMARD)
    assert not torch.equal(forward_no_grad(model, inputs), ref)
    revert_attention(model)
    assert torch.equal(forward_no_grad(model, inputs), ref)
    assert hla_layers(model) == {} and set(model.state_dict()) == keys
    assert all(m.processor is originals[n] for n, m in attention_modules(model).items())
    convert_attention(model, HADAMARD)  # and it can be converted again
    assert converted_modules(model) == SELF_ATTENTION[arch]


def test_converting_twice_raises_and_keeps_the_first_conversion():
    model, inputs, _ = tiny_base("wan")
    convert_attention(model, HADAMARD, include=["blocks.0.attn1"])
    first = forward_no_grad(model, inputs)
    core = model.blocks[0].attn1.hla
    with pytest.raises(ConversionError, match="already converted"):
        convert_attention(model, HADAMARD)
    with pytest.raises(ConversionError, match="already converted"):
        convert_attention(model, HLAConfig(kind="linear", feature_dim=3), include=["blocks.0.attn1"])
    assert converted_modules(model) == ["blocks.0.attn1"] and model.blocks[0].attn1.hla is core
    assert not isinstance(model.blocks[1].attn1.processor, HLAProcessor)  # the failed call touched nothing
    assert torch.equal(forward_no_grad(model, inputs), first)


def test_bfloat16_model_runs_converted():
    model, inputs, ref = tiny_base("wan")
    convert_attention(model, HADAMARD)
    model.to(torch.bfloat16)
    bf = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    out = forward_no_grad(model, bf)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
