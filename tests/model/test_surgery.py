"""The diffusers seam (hla_convert.model.surgery) on tiny real models of the four main architectures.

What a user relies on: an identity conversion changes nothing, bit for bit; HLA conversions train
only the new parameters; only self-attention is converted unless asked otherwise; padded text
tokens stay invisible; no attention backend or processor can quietly run softmax on a converted
layer; state_dict keys are stable; revert is exact.
"""

from __future__ import annotations

import contextlib
import copy

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
from hla_convert.model.surgery import HLAProcessor, attention_modules, converted_modules, key_mask_from_attn_mask

from tiny_models import (
    ARCHITECTURES,
    HUNYUAN_PADDED,
    LEFT_SOFTMAX,
    OTHER_ARCHITECTURES,
    SELF_ATTENTION,
    forward,
    other_model,
    output_tensor,
    tiny_inputs,
    tiny_model,
)

HADAMARD = HLAConfig(kind="hadamard", factors=2, feature_dim=4)
STUDENT_CONFIGS = [
    HADAMARD,
    HLAConfig(kind="hadamard", factors=3, feature_dim=3, feature_map="softplus"),
    HLAConfig(kind="linear", factors=2, feature_dim=3),
    HLAConfig(kind="higher_order", feature_dim=4),
    HLAConfig(kind="hybrid", factors=2, feature_dim=4, window=(1, 0, 0), halo=(0, 1, 1)),
]
STUDENT_IDS = ["hadamard-taylor", "hadamard-softplus-F3", "linear", "higher_order", "hybrid"]

_CACHE: dict[str, tuple[torch.nn.Module, dict, torch.Tensor]] = {}


def _base(arch: str):
    """(a fresh copy of the tiny model, its inputs, its unconverted output)."""
    if arch not in _CACHE:
        model = tiny_model(arch)
        inputs = tiny_inputs(arch, model=model)
        with torch.no_grad():
            ref = forward(model, inputs)
        _CACHE[arch] = (model, inputs, ref)
    model, inputs, ref = _CACHE[arch]
    return copy.deepcopy(model), inputs, ref


def _run(model, inputs):
    with torch.no_grad():
        return forward(model, inputs)


@pytest.fixture
def restore_active_backend():
    """set_attention_backend also sets diffusers' global active backend; put it back afterwards."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


# -- (a) identity conversion ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_softmax_conversion_is_bit_identical(arch):
    model, inputs, ref = _base(arch)
    convert_attention(model, HLAConfig(kind="softmax"))
    out = _run(model, inputs)
    assert torch.equal(out, ref)
    # ... and it really went through the converted path, once per converted module
    layers = hla_layers(model)
    assert sorted(layers) == sorted(SELF_ATTENTION[arch])
    assert all(layer.calls == 1 for layer in layers.values())


# -- (b) HLA conversions train only the new parameters ----------------------------------------------


@pytest.mark.parametrize("config", STUDENT_CONFIGS, ids=STUDENT_IDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hla_conversion_forward_backward_trains_only_hla(arch, config):
    model, inputs, ref = _base(arch)
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
    model, _, _ = _base(arch)
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
    model, inputs, ref = _base("wan")
    full, _, _ = _base("wan")
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
    hybrid = _run(model, inputs)
    assert torch.isfinite(hybrid).all()
    assert (hybrid - ref).abs().max() > 1e-4 and (hybrid - _run(full, inputs)).abs().max() > 1e-4

    # include alone, an exact name
    other, _, _ = _base("wan")
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
    model, inputs, ref = _base("wan")
    with pytest.raises(ConversionError, match=match):
        convert_attention(model, HADAMARD, include=include, exclude=exclude)
    assert hla_layers(model) == {} and not any(isinstance(m.processor, HLAProcessor) for m in attention_modules(model).values())
    assert torch.equal(_run(model, inputs), ref)


def test_bad_config_and_models_without_attention_raise():
    model, _, _ = _base("wan")
    with pytest.raises(ConversionError):
        convert_attention(model, {"kind": "hadamard"})
    with pytest.raises(ConversionError):
        convert_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)), HADAMARD)


# -- (d) key padding masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [HLAConfig(kind="softmax")] + STUDENT_CONFIGS, ids=["softmax"] + STUDENT_IDS)
def test_hunyuan_padded_text_tokens_are_invisible(config):
    model, inputs, _ = _base("hunyuan")
    convert_attention(model, config)
    out = _run(model, inputs)
    mask = inputs["encoder_attention_mask"]
    assert mask[1, -HUNYUAN_PADDED:].eq(0).all() and mask[0].eq(1).all()

    g = torch.Generator().manual_seed(7)
    text = inputs["encoder_hidden_states"].clone()
    text[1, -HUNYUAN_PADDED:] = 20 * torch.randn(HUNYUAN_PADDED, text.shape[-1], generator=g)
    out_padded_changed = _run(model, {**inputs, "encoder_hidden_states": text})
    assert torch.allclose(out_padded_changed, out, rtol=0, atol=1e-5)

    # the same change to tokens the mask keeps does show: the comparison above can fail
    unmasked = {**inputs, "encoder_attention_mask": torch.ones_like(mask)}
    a = _run(model, unmasked)
    b = _run(model, {**unmasked, "encoder_hidden_states": text})
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_hunyuan_refiner_mask_is_not_a_padding_mask():
    """The text refiner's mask lets padded queries attend to token 0 only: converting it must fail
    loudly at the forward, not run a different attention."""
    model, inputs, _ = _base("hunyuan")
    convert_attention(model, HADAMARD, include=["context_embedder.*"])
    with pytest.raises(RuntimeError, match="differs between queries"):
        _run(model, inputs)


B, N = 2, 6


def _keep() -> torch.Tensor:
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, -2:] = False
    return keep


def test_key_mask_from_bool_key_padding_mask():
    keep = _keep()
    assert torch.equal(key_mask_from_attn_mask(keep[:, None, None, :], B, N), keep)
    # broadcast over the batch, and a batch with no padding at all means no mask
    assert torch.equal(key_mask_from_attn_mask(keep[1:, None, None, :], B, N), keep[1:].expand(B, N))
    assert key_mask_from_attn_mask(torch.ones(B, 1, 1, N, dtype=torch.bool), B, N) is None
    assert key_mask_from_attn_mask(None, B, N) is None


def test_key_mask_from_outer_product_mask():
    keep = _keep()
    outer = keep[:, None, :, None] & keep[:, None, None, :]  # [B, 1, N, N]: padded queries see nothing
    assert torch.equal(key_mask_from_attn_mask(outer, B, N), keep)
    # same mask repeated over heads
    assert torch.equal(key_mask_from_attn_mask(outer.expand(B, 3, N, N), B, N), keep)


@pytest.mark.parametrize("masked_value", [float("-inf"), torch.finfo(torch.float32).min, -10000.0])
def test_key_mask_from_additive_float_mask(masked_value):
    keep = _keep()
    additive = torch.zeros(B, 1, 1, N).masked_fill(~keep[:, None, None, :], masked_value)
    assert torch.equal(key_mask_from_attn_mask(additive, B, N), keep)
    assert key_mask_from_attn_mask(torch.zeros(B, 1, 1, N), B, N) is None


@pytest.mark.parametrize("kind", ["causal", "refiner", "bias", "per_head", "per_query"])
def test_key_mask_rejects_masks_that_are_not_key_padding(kind):
    keep = _keep()
    if kind == "causal":
        mask = torch.ones(N, N, dtype=torch.bool).tril()[None, None].expand(B, 1, N, N)
    elif kind == "refiner":  # Hunyuan's text refiner: outer product, then every query may see token 0
        mask = (keep[:, None, :, None] & keep[:, None, None, :]).clone()
        mask[:, :, :, 0] = True
    elif kind == "bias":  # a relative-position bias: finite, nonzero
        mask = torch.linspace(-1, 0, N).expand(B, 1, N, N)
    elif kind == "per_head":
        mask = keep[:, None, None, :].repeat(1, 2, 1, 1)
        mask[0, 1, 0, 0] = False
    else:
        mask = keep[:, None, None, :].repeat(1, 1, N, 1)
        mask[0, 0, 2, 3] = False
    with pytest.raises(RuntimeError):
        key_mask_from_attn_mask(mask, B, N)


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
    model, inputs, ref = _base(arch)
    convert_attention(model, HADAMARD)
    native = _run(model, inputs)
    model.set_attention_backend("_native_math")
    out = _run(model, inputs)
    assert all(layer.calls == 2 for layer in hla_layers(model).values())
    assert torch.allclose(out, native, rtol=0, atol=1e-5)
    assert (out - ref).abs().max() > 1e-4  # still HLA, not the softmax the backend would compute


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flash_backend_on_converted_layers_keeps_hla(arch, monkeypatch, restore_active_backend):
    """Whatever backend the converted layers' processors are given (what set_attention_backend
    writes per module), or a global `attention_backend(...)` context, HLA runs, unchanged."""
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

    model, inputs, _ = _base(arch)
    convert_attention(model, HADAMARD)
    native = _run(model, inputs)
    mods = attention_modules(model)
    with _pretend_backend_installed(monkeypatch):
        for name in SELF_ATTENTION[arch]:
            mods[name].processor._attention_backend = AttentionBackendName.FLASH
        assert torch.equal(_run(model, inputs), native)
        for name in SELF_ATTENTION[arch]:
            mods[name].processor._attention_backend = None
        # global context: the softmax layers left in the model must not see it, so pin them
        for name in LEFT_SOFTMAX[arch]:
            if hasattr(mods[name].processor, "_attention_backend"):
                mods[name].processor._attention_backend = AttentionBackendName.NATIVE
        with attention_backend("flash"):
            assert torch.equal(_run(model, inputs), native)
    for name in SELF_ATTENTION[arch]:  # the processors' own settings are restored after each call
        assert mods[name].processor._attention_backend is None


def test_flash_backend_really_would_be_used_without_conversion(monkeypatch, restore_active_backend):
    """Control for the test above: on an unconverted layer the same setting does reach flash."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    model, inputs, _ = _base("wan")
    with _pretend_backend_installed(monkeypatch):
        model.blocks[0].attn1.processor._attention_backend = AttentionBackendName.FLASH
        with pytest.raises(Exception):
            _run(model, inputs)


@pytest.mark.parametrize("arch", ["cogvideox", "hunyuan"])
def test_set_attention_backend_flash_on_whole_model(arch, monkeypatch, restore_active_backend):
    """Models whose every backend-aware processor is converted: model.set_attention_backend("flash")."""
    model, inputs, _ = _base(arch)
    convert_attention(model, HADAMARD)
    native = _run(model, inputs)
    with _pretend_backend_installed(monkeypatch):
        model.set_attention_backend("flash")
        assert torch.equal(_run(model, inputs), native)


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
    model, inputs, _ = _base("wan")
    model.blocks[0].attn1.set_processor(_ManualSoftmaxProcessor())
    assert torch.isfinite(_run(model, inputs)).all()  # the processor itself works
    convert_attention(model, HADAMARD, include=["blocks.0.attn1"])
    with pytest.raises(RuntimeError, match="never reached"):
        _run(model, inputs)


def test_replacing_the_processor_after_conversion_does_not_silently_run_softmax():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, inputs, ref = _base("wan")
    convert_attention(model, HADAMARD)
    model.set_attn_processor(WanAttnProcessor())
    with pytest.raises(RuntimeError, match="processor was replaced"):
        _run(model, inputs)
    revert_attention(model)
    assert torch.equal(_run(model, inputs), ref)


@pytest.mark.parametrize("kind", ["hadamard", "hybrid"])  # hybrid: the grid must hold in the recompute
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    grads = []
    for checkpointing in (False, True):
        model, inputs, _ = _base("wan")
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
    model, inputs, _ = _base("wan")  # 2 heads x 12 dims
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
    out = _run(model, inputs)
    fresh, _, _ = _base("wan")
    convert_attention(fresh, config)
    result = fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".hla." in k}, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == set(base_sd)
    assert torch.equal(_run(fresh, inputs), out)


# -- (g) revert, (h) converting twice ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_revert_restores_bit_exact_outputs(arch):
    model, inputs, ref = _base(arch)
    originals = {n: m.processor for n, m in attention_modules(model).items()}
    keys = set(model.state_dict())
    convert_attention(model, HADAMARD)
    assert not torch.equal(_run(model, inputs), ref)
    revert_attention(model)
    assert torch.equal(_run(model, inputs), ref)
    assert hla_layers(model) == {} and set(model.state_dict()) == keys
    assert all(m.processor is originals[n] for n, m in attention_modules(model).items())
    convert_attention(model, HADAMARD)  # and it can be converted again
    assert converted_modules(model) == SELF_ATTENTION[arch]


def test_converting_twice_raises_and_keeps_the_first_conversion():
    model, inputs, _ = _base("wan")
    convert_attention(model, HADAMARD, include=["blocks.0.attn1"])
    first = _run(model, inputs)
    core = model.blocks[0].attn1.hla
    with pytest.raises(ConversionError, match="already converted"):
        convert_attention(model, HADAMARD)
    with pytest.raises(ConversionError, match="already converted"):
        convert_attention(model, HLAConfig(kind="linear", feature_dim=3), include=["blocks.0.attn1"])
    assert converted_modules(model) == ["blocks.0.attn1"] and model.blocks[0].attn1.hla is core
    assert not isinstance(model.blocks[1].attn1.processor, HLAProcessor)  # the failed call touched nothing
    assert torch.equal(_run(model, inputs), first)


def test_bfloat16_model_runs_converted():
    model, inputs, ref = _base("wan")
    convert_attention(model, HADAMARD)
    model.to(torch.bfloat16)
    bf = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    out = _run(model, bf)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# -- the other diffusers video transformers (docs/architectures.md) ----------------------------------

# What a default conversion must pick in each tiny config: the video self-attention (joint
# text+video where the model attends jointly). Text refiners, text/image/audio cross-attention and
# audio self-attention stay softmax.
OTHER_SELF_ATTENTION = {
    "allegro": ["transformer_blocks.0.attn1"],
    "latte": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1",
              "temporal_transformer_blocks.0.attn1", "temporal_transformer_blocks.1.attn1"],
    "easyanimate": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "skyreels_v2": ["blocks.0.attn1", "blocks.1.attn1"],
    "wan_vace": [f"blocks.{i}.attn1" for i in range(4)] + ["vace_blocks.0.attn1", "vace_blocks.1.attn1"],
    "chronoedit": ["blocks.0.attn1", "blocks.1.attn1"],
    "helios": ["blocks.0.attn1", "blocks.1.attn1"],
    "consisid": ["transformer_blocks.0.attn1"],
    "hunyuan_framepack": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
    "hunyuan_video15": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
    "ltx2": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "cosmos": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "motif_video": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
    "sana_video": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "mochi": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "kandinsky5": ["visual_transformer_blocks.0.self_attention", "visual_transformer_blocks.1.self_attention"],
    "kandinsky6": ["visual_transformer_blocks.0.video_dec_block.self_attention",
                   "visual_transformer_blocks.1.video_dec_block.self_attention"],
}  # fmt: skip

# Known gaps of the seam, strict so that fixing one turns its test red until this list is updated.
KNOWN_GAPS: dict[str, tuple[type, str]] = {}


def _other_params():
    for name in OTHER_ARCHITECTURES:
        if name in KNOWN_GAPS:
            exc, why = KNOWN_GAPS[name]
            yield pytest.param(name, marks=pytest.mark.xfail(raises=exc, strict=True, reason=why))
        else:
            yield name


@pytest.mark.filterwarnings("ignore:In CPU autocast")  # Mochi's RoPE asks for float32 autocast
@pytest.mark.parametrize("name", list(_other_params()))
def test_other_architectures_convert(name):
    """softmax conversion bit-exact, hadamard conversion runs through every converted layer."""
    built = other_model(name)
    if built is None:
        pytest.skip(f"this diffusers has no {name} transformer")
    model, inputs = built
    with torch.no_grad():
        ref = output_tensor(model(**inputs))
    soft = copy.deepcopy(model)
    convert_attention(soft, HLAConfig(kind="softmax"))
    assert converted_modules(soft) == OTHER_SELF_ATTENTION[name]
    if name == "sana_video":  # its self-attention is already ReLU linear attention: no softmax call to replace
        with pytest.raises(RuntimeError, match="never reached"):
            soft(**inputs)
        return
    with torch.no_grad():
        assert torch.equal(output_tensor(soft(**inputs)), ref)
    convert_attention(model, HADAMARD)
    with torch.no_grad():
        out = output_tensor(model(**inputs))
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4
    assert all(layer.calls >= 1 for layer in hla_layers(model).values())


def test_architecture_rows_are_checked_when_written():
    """A new family is one row of model.architectures; a misspelt layout fails at import, with the
    class named, instead of at the first hybrid forward."""
    from hla_convert.model.architectures import ARCHITECTURES, Architecture

    with pytest.raises(ValueError, match="MyTransformer3DModel: grid_layout 'BCHWF'"):
        Architecture("MyTransformer3DModel", ("blocks.*.attn1",), "BCHWF")
    with pytest.raises(ValueError, match="says where its text tokens sit"):
        Architecture("MyTransformer3DModel", None, "BCFHW", "joint")
    assert ARCHITECTURES["WanTransformer3DModel"].default_include == ("blocks.*.attn1",)


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
            _run(model, inputs)
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

    model, inputs, _ = _base("wan")
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
