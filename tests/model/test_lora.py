"""LoRA stage: peft adapters on base linears, disabled for the teacher; stage 2, resume, drift, adapter round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hla_convert import convert_attention, hla_parameters, set_attention_mode
from hla_convert.io.adapter import ADAPTER_FILE, AdapterError, fingerprint_weights, load_adapter, read_adapter_info, save_adapter
from hla_convert.stages.calibration import build_inputs
from hla_convert.model.modes import forward
from hla_convert.stages.distill import attention_transfer, initialize_feature_maps, output_distillation
from hla_convert.stages.drift import measure_drift
from hla_convert.model.layers import hla_layers
from hla_convert.model.lora import (
    LoraError,
    adapted_modules,
    add_lora,
    has_adapters,
    has_lora,
    lora_config,
    lora_parameters,
    lora_state_dict,
    lora_target_modules,
)
from hla_convert.recipe import RecipeError, parse_recipe
from helpers import rewrite_adapter as _rewrite
from tiny_models import tiny_inputs, tiny_model


def recipe(train="lora", **stage2):
    data = {
        "name": "t",
        "model": {"architecture": "WanTransformer3DModel"},
        "attention": {"kind": "hadamard", "feature_dim": 8},
        "calibration": {"frames": 5, "height": 64, "width": 64, "samples": 8, "heldout": 4, "batch_size": 4, "text_len": 6},
        "stage1": {"steps": 10, "lr": 5e-3, "batch_size": 4, "checkpoint_every": 10},
        "stage2": {"steps": 12, "lr": 1e-3, "batch_size": 4, "checkpoint_every": 5, "train": train,
                   "lora_rank": 4, "lora_lr": 3e-3, "gradient_checkpointing": True, **stage2},
    }
    return parse_recipe(data)


def stage1_model(rec):
    model = tiny_model("wan")
    convert_attention(model, rec.hla_config())
    inputs = build_inputs(model, rec, "train")
    initialize_feature_maps(model, inputs)
    return model, inputs


def _perturb_lora(model, scale=0.1):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _out(model, arch, mode):
    set_attention_mode(model, mode)
    with torch.no_grad():
        return model(**tiny_inputs(arch), return_dict=False)[0]


# -- targets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, expect",
    [
        ("wan", ["blocks.{i}.attn1.to_q", "blocks.{i}.attn1.to_k", "blocks.{i}.attn1.to_v", "blocks.{i}.attn1.to_out.0",
                 "blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.net.2"]),
        ("cogvideox", ["transformer_blocks.{i}.attn1.to_q", "transformer_blocks.{i}.attn1.to_k", "transformer_blocks.{i}.attn1.to_v",
                       "transformer_blocks.{i}.attn1.to_out.0", "transformer_blocks.{i}.ff.net.0.proj", "transformer_blocks.{i}.ff.net.2"]),
    ],
)
def test_target_modules_are_the_attention_projections_and_the_block_ffn(arch, expect):
    model = tiny_model(arch)
    convert_attention(model, recipe().hla_config())
    names = lora_target_modules(model, list(hla_layers(model)), ["to_q", "to_k", "to_v", "to_out.0"], ffn=True)
    assert names == [e.format(i=i) for i in range(2) for e in expect]
    no_ffn = lora_target_modules(model, list(hla_layers(model)), ["to_q", "to_v"], ffn=False)
    assert no_ffn == [e.format(i=i) for i in range(2) for e in (expect[0], expect[2])]
    # text cross-attention (Wan attn2) is not converted, so it is never adapted
    assert not any(".attn2." in n for n in names)


def test_a_target_that_matches_nothing_is_one_clear_line(tmp_path):
    model = tiny_model("wan")
    convert_attention(model, recipe().hla_config())
    with pytest.raises(LoraError, match=r"'to_qkv' matches no linear layer .*blocks.0.attn1.*to_k, to_out.0, to_q, to_v") as e:
        lora_target_modules(model, list(hla_layers(model)), ["to_q", "to_qkv"], ffn=False)
    assert "\n" not in str(e.value)
    rec = recipe(lora_targets=["to_qkv"])
    with pytest.raises(RecipeError, match=r"^stage2.lora_targets: LoRA target 'to_qkv'"):
        output_distillation(model, build_inputs(model, rec, "train"), rec, tmp_path)
    assert not has_lora(model)


# -- teacher = base model ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["wan", "cogvideox"])
def test_teacher_mode_is_the_base_model_bit_for_bit_with_nonzero_lora(arch):
    base = tiny_model(arch)
    with torch.no_grad():
        reference = base(**tiny_inputs(arch), return_dict=False)[0]
    model = tiny_model(arch)
    convert_attention(model, recipe().hla_config())
    student0 = _out(model, arch, "student")
    add_lora(model, rank=4, ffn=True)
    assert torch.equal(_out(model, arch, "student"), student0), "a fresh adapter (B = 0) must not change the student"
    _perturb_lora(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    teacher = _out(model, arch, "teacher")
    assert teacher.dtype == torch.float32 and torch.equal(teacher, reference)
    assert not torch.allclose(_out(model, arch, "student"), student0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, "mode switches must not touch requires_grad"
    # the fingerprint of the adapted model's base is the base's
    from hla_convert.model.lora import without_lora

    with without_lora(model):
        assert fingerprint_weights(model) == fingerprint_weights(base)


def test_drift_reference_is_the_base_model_with_lora(tmp_path):
    rec = recipe()
    model, _ = stage1_model(rec)
    heldout = build_inputs(model, rec, "heldout")
    add_lora(model, rank=4)
    _perturb_lora(model, 0.3)
    base = tiny_model("wan")
    report = measure_drift(model, heldout, rec)
    set_attention_mode(model, "student")
    rels = []
    with torch.no_grad():
        for item in heldout:
            t, s = forward(base, item).flatten(1), forward(model, item).flatten(1)
            rels.append((s - t).norm(dim=1) / t.norm(dim=1))
    expected = float(torch.cat(rels).mean())
    assert report.output_rel_l2 == pytest.approx(expected, rel=1e-5)


# -- stage 2 ---------------------------------------------------------------------------------------


def test_stage2_lora_trains_adapters_and_hla_but_never_the_base(tmp_path):
    rec = recipe()
    model, inputs = stage1_model(rec)
    attention_transfer(model, inputs, rec, tmp_path)
    base = {k: v.clone() for k, v in tiny_model("wan").state_dict().items()}
    hla = {k: v.detach().clone() for k, v in hla_parameters(model).items()}
    out = output_distillation(model, inputs, rec, tmp_path)
    assert has_lora(model) and out["lora"]["modules"][0] == "blocks.0.attn1.to_q"
    assert out["steps_run"] == 12 and out["final_loss"] < out["initial_loss"]
    assert all(not torch.equal(v, hla[k]) for k, v in hla_parameters(model).items())
    assert all(p.abs().sum() > 0 for n, p in lora_parameters(model).items() if ".lora_B." in n), "LoRA B never moved"
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for k, v in base.items():
        assert torch.equal(state[k], v), f"base weight {k} changed"
    assert all(p.grad is None for p in model.parameters())
    assert not model.is_gradient_checkpointing


def test_stage2_hla_only_adds_no_adapter(tmp_path):
    rec = recipe(train="hla")
    model, inputs = stage1_model(rec)
    output_distillation(model, inputs, rec, tmp_path)
    assert not has_adapters(model)


class Interrupt(Exception):
    pass


def test_lora_resume_matches_an_uninterrupted_run(tmp_path):
    rec = recipe()

    def run(work, stop_at=None, resume=False):
        model, inputs = stage1_model(rec)

        def progress(st, step, total, info):
            if st == "stage2" and step == stop_at:
                raise Interrupt

        attention_transfer(model, inputs, rec, work, resume=resume, progress=progress)
        output_distillation(model, inputs, rec, work, resume=resume, progress=progress)
        return {k: v.detach().clone() for k, v in (hla_parameters(model) | lora_parameters(model)).items()}

    reference = run(tmp_path / "a")
    with pytest.raises(Interrupt):
        run(tmp_path / "b", stop_at=7)
    resumed = run(tmp_path / "b", resume=True)
    assert set(resumed) == set(reference) and any(".lora_A." in k for k in reference)
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), f"{k} differs after resume"


def test_lora_settings_are_part_of_the_stage2_fingerprint(tmp_path):
    from hla_convert.stages.checkpoints import CheckpointError  # bad input (exit 2), as any mismatched checkpoint

    rec = recipe()
    model, inputs = stage1_model(rec)
    output_distillation(model, inputs, rec.with_overrides(stage2_steps=5), tmp_path)
    other = rec.with_overrides(stage2_steps=5, fields={"stage2.lora_lr": 1e-2})
    fresh, _ = stage1_model(rec)
    with pytest.raises(CheckpointError, match="different recipe"):
        output_distillation(fresh, inputs, other, tmp_path, resume=True)


# -- adapter round trip ----------------------------------------------------------------------------


@pytest.fixture
def lora_adapter(tmp_path):
    rec = recipe(steps=4, lora_ffn=True)
    model, inputs = stage1_model(rec)
    output_distillation(model, inputs, rec, tmp_path / "work")
    _perturb_lora(model, 0.05)  # well away from zero, so a load that skipped LoRA would show
    student = _out(model, "wan", "student")
    save_adapter(model, tmp_path / "ad", base_source="tiny/wan")
    return tmp_path / "ad", student, model


def test_lora_adapter_round_trip_gives_identical_student_outputs(lora_adapter):
    folder, student, trained = lora_adapter
    info = read_adapter_info(folder)
    assert info["lora"]["rank"] == 4 and info["lora"]["alpha"] == 4.0
    assert "blocks.1.ffn.net.2" in info["lora"]["modules"] and len(info["lora"]["modules"]) == 12
    assert json.loads((folder / "hla_config.json").read_text())["lora"] == info["lora"]
    assert info["base_fingerprint"] == fingerprint_weights(tiny_model("wan"))
    keys = set(load_file(str(folder / ADAPTER_FILE)))
    assert {k for k in keys if k.startswith("lora.")} == {"lora." + k for k in lora_state_dict(trained)}
    assert "lora.blocks.0.attn1.to_q.lora_A.weight" in keys
    loaded = load_adapter(tiny_model("wan"), folder)
    assert torch.equal(_out(loaded, "wan", "student"), student)
    assert torch.equal(_out(loaded, "wan", "teacher"), _out(tiny_model("wan"), "wan", "teacher"))


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda t: t.pop("lora.blocks.1.ffn.net.2.lora_B.weight"), r"missing 1 LoRA key\(s\), e.g. blocks.1.ffn.net.2.lora_B.weight"),
        (lambda t: t.update({"lora.blocks.0.attn2.to_q.lora_A.weight": torch.zeros(4, 24)}), r"1 unexpected LoRA key\(s\)"),
        (lambda t: t.update({"lora.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(3, 24)}), r"has shape \[3, 24\]"),
        (lambda t: t.update({"lora.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24, dtype=torch.int32)}), "dtype int32, not a floating-point"),
    ],
)
def test_lora_key_mismatch_is_one_line_and_leaves_base_untouched(lora_adapter, change, expect):
    folder, _, _ = lora_adapter
    _rewrite(folder, change)
    base = tiny_model("wan")
    with pytest.raises(AdapterError, match=expect) as e:
        load_adapter(base, folder)
    assert "\n" not in str(e.value)
    assert not hla_layers(base) and not has_adapters(base) and not has_lora(base)
    assert set(base.state_dict()) == set(tiny_model("wan").state_dict())


# peft shortens a list of >= 20 target names to suffixes ("attn1.to_q"); every real recipe is over
# it (Wan2.1-1.3B: 112 targets). Sizes on both sides of it, with layers kept softmax among the blocks.
@pytest.mark.parametrize("layers, kept", [(5, (0,)), (6, (2,)), (6, ()), (12, (0, 7))])
def test_lora_at_any_target_count_saves_and_loads_its_exact_modules(tmp_path, layers, kept):
    converted = [f"blocks.{i}.attn1" for i in range(layers) if i not in kept]
    model = tiny_model("wan", num_layers=layers)
    convert_attention(model, recipe().hla_config(), include=converted)
    modules = add_lora(model, rank=4)
    exact = sorted(f"{c}.{t}" for c in converted for t in ("to_q", "to_k", "to_v", "to_out.0"))
    assert sorted(modules) == exact and lora_config(model)["modules"] == exact
    assert sorted(adapted_modules(model)) == exact
    _perturb_lora(model, 0.05)
    student = _out(model, "wan", "student")
    save_adapter(model, tmp_path / "ad")
    assert read_adapter_info(tmp_path / "ad")["lora"]["modules"] == exact

    loaded = load_adapter(tiny_model("wan", num_layers=layers), tmp_path / "ad")
    assert sorted(adapted_modules(loaded)) == exact
    for i in kept:  # a layer kept softmax has no HLA and no LoRA anywhere in it
        assert not [n for n in adapted_modules(loaded) if n.startswith(f"blocks.{i}.")]
        assert f"blocks.{i}.attn1" not in hla_layers(loaded)
    assert torch.equal(_out(loaded, "wan", "student"), student)
    assert torch.equal(_out(loaded, "wan", "teacher"), _out(tiny_model("wan", num_layers=layers), "wan", "teacher"))


def test_adapters_that_recorded_peft_suffixes_load_as_their_weight_keys_say(tmp_path):
    """Adapters saved before the fix recorded peft's suffixes; their weight keys are exact."""
    model = tiny_model("wan", num_layers=6)
    convert_attention(model, recipe().hla_config())
    add_lora(model, rank=4)
    _perturb_lora(model, 0.05)
    student = _out(model, "wan", "student")
    save_adapter(model, tmp_path / "ad")
    old = ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v"]  # what such an adapter holds

    def suffixes(meta):
        lora = json.loads(meta["lora"])
        meta["lora"] = json.dumps(lora | {"modules": old})

    _rewrite(tmp_path / "ad", change_meta=suffixes)
    loaded = load_adapter(tiny_model("wan", num_layers=6), tmp_path / "ad")
    assert len(adapted_modules(loaded)) == 24 and torch.equal(_out(loaded, "wan", "student"), student)

    def wrong(meta):  # names that cover other modules than the weights: refused, base left as it was
        lora = json.loads(meta["lora"])
        meta["lora"] = json.dumps(lora | {"modules": ["attn1.to_q", "attn2.to_q"]})

    _rewrite(tmp_path / "ad", change_meta=wrong)
    base = tiny_model("wan", num_layers=6)
    with pytest.raises(AdapterError, match="LoRA module 'attn1.to_q' is not a linear layer"):
        load_adapter(base, tmp_path / "ad")
    assert not hla_layers(base) and not has_adapters(base)


@pytest.mark.parametrize(
    "forged, expect",
    [  # found by tests/io/test_adapter_fuzz.py: each escaped as peft's own error, or loaded NaN weights
        ({"rank": False}, "rank must be a positive integer, got False"),
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"alpha": float("nan")}, "unreadable metadata"),  # a bare NaN is not JSON: refused as the header is read
        ({"alpha": "4"}, "alpha must be a positive number"),
        ({"modules": []}, "modules must be a non-empty list of module names"),
        ({"modules": [["blocks.0.attn1.to_q"]]}, "modules must be a non-empty list of module names"),
        # a forged rank would have add_lora allocate rank x features per layer before any check: refused first
        ({"rank": 2**40}, "rank 1099511627776 is not the rank of any saved lora_A weight"),
    ],
)
def test_a_forged_lora_config_is_one_line_and_leaves_base_untouched(lora_adapter, forged, expect):
    folder, _, _ = lora_adapter
    _rewrite(folder, change_meta=lambda meta: meta.update(lora=json.dumps({**json.loads(meta["lora"]), **forged})))
    base = tiny_model("wan")
    with pytest.raises(AdapterError, match=expect) as e:
        load_adapter(base, folder)
    assert "\n" not in str(e.value)
    assert not hla_layers(base) and not has_adapters(base) and not has_lora(base)


def test_lora_adapter_refuses_a_different_base(lora_adapter):
    folder, _, _ = lora_adapter
    other = tiny_model("wan", seed=1)
    with pytest.raises(AdapterError, match="different base"):
        load_adapter(other, folder)
    assert not has_adapters(other)


# -- recipe fields ---------------------------------------------------------------------------------


def test_recipe_lora_fields_and_their_errors():
    rec = recipe()
    assert rec.stage2.train == "lora" and rec.stage2.lora_rank == 4 and rec.stage2.lora_alpha is None
    assert rec.stage2.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"] and rec.stage2.lora_ffn is False
    assert parse_recipe({"name": "x", "model": {"architecture": "WanTransformer3DModel"}}).stage2.lora_lr is None
    for field, value, msg in [
        ("train", "all", "'all' is not one of hla, lora"),
        ("lora_rank", 0, "must be a positive integer"),
        ("lora_alpha", -1, "must be a positive number"),
        ("lora_targets", [], "must name at least one module suffix"),
        ("lora_ffn", "yes", "must be true or false"),
        ("lora_lr", "fast", "must be a positive number"),
    ]:
        with pytest.raises(RecipeError, match=f"^stage2.{field}: {msg}"):
            recipe(**{field: value})
