"""The per-layer softmax budget: the worst layers after stage 1 go back to exact softmax, and stay so."""

from __future__ import annotations

import pytest
import torch

from hla_convert import convert_attention, hla_layers, load_adapter, save_adapter, set_attention_mode
from hla_convert.stages.calibration import build_inputs
from hla_convert.model.modes import forward
from hla_convert.stages.distill import distil
from hla_convert.recipe import RecipeError, parse_recipe
from hla_convert.stages.selection import choose_softmax_layers, give_back_to_softmax, measure_layer_errors
from hla_convert.model.surgery import ConversionError
from tiny_models import tiny_model


def recipe(softmax_layers: int = 1, **stage):
    return parse_recipe(
        {
            "name": "t",
            "model": {"architecture": "WanTransformer3DModel"},
            "attention": {"kind": "hadamard", "feature_dim": 8, "softmax_layers": softmax_layers},
            "calibration": {"frames": 5, "height": 32, "width": 32, "samples": 8, "heldout": 4, "batch_size": 4, "text_len": 6},
            "stage1": {"steps": 4, "lr": 5e-3, "batch_size": 4, "checkpoint_every": 2},
            "stage2": {"steps": 2, "lr": 1e-3, "batch_size": 4, "checkpoint_every": 1, **stage},
        }
    )


def test_choose_takes_the_largest_errors_in_model_order():
    errors = {"blocks.0.attn1": 0.3, "blocks.1.attn1": 0.1, "blocks.2.attn1": 0.5, "blocks.3.attn1": 0.3}
    assert choose_softmax_layers(errors, 2) == ["blocks.0.attn1", "blocks.2.attn1"]
    assert choose_softmax_layers(errors, 0) == []


def test_a_nan_or_inf_layer_error_counts_as_the_largest():
    nan = float("nan")
    errors = {"blocks.0.attn1": 0.2, "blocks.1.attn1": 0.9, "blocks.2.attn1": nan, "blocks.3.attn1": 0.1}
    assert choose_softmax_layers(errors, 1) == ["blocks.2.attn1"]  # not wherever the sort left it
    assert choose_softmax_layers(errors, 2) == ["blocks.1.attn1", "blocks.2.attn1"]
    assert choose_softmax_layers({**errors, "blocks.0.attn1": float("inf")}, 2) == ["blocks.0.attn1", "blocks.2.attn1"]


def test_the_worst_layer_goes_back_to_softmax_and_the_adapter_leaves_it_out(tmp_path):
    rec = recipe(1)
    model = tiny_model("wan", num_layers=3)
    base = tiny_model("wan", num_layers=3)
    convert_attention(model, rec.hla_config())
    inputs = build_inputs(model, rec, "train")
    errors = measure_layer_errors(model, inputs)
    assert set(errors) == set(hla_layers(model)) and all(e > 0 for e in errors.values())

    out = distil(model, inputs, rec, work_dir=tmp_path / "work")
    errors = out["selection"]["errors"]  # measured after stage 1, as the choice is
    worst = max(errors, key=errors.get)
    assert out["selection"]["softmax_layers"] == [worst]
    assert worst not in hla_layers(model) and len(hla_layers(model)) == 2
    # the reverted module runs the model's own softmax again: a teacher-mode forward is unchanged
    set_attention_mode(model, "teacher")
    with torch.no_grad():
        assert torch.equal(forward(model, inputs[0]), forward(base, inputs[0]))

    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model("wan", num_layers=3)
    load_adapter(fresh, tmp_path / "adapter")
    assert sorted(hla_layers(fresh)) == sorted(hla_layers(model))
    set_attention_mode(model, "student")
    with torch.no_grad():
        assert torch.allclose(forward(fresh, inputs[0]), forward(model, inputs[0]), atol=1e-6)


def test_a_budget_that_would_revert_every_layer_is_refused():
    rec = recipe(2)
    model = tiny_model("wan", num_layers=2)
    convert_attention(model, rec.hla_config())
    with pytest.raises(ConversionError, match="at least one must stay converted"):
        give_back_to_softmax(model, build_inputs(model, rec, "train"), 2)


def test_softmax_layers_must_be_a_non_negative_integer():
    with pytest.raises(RecipeError, match=r"^attention\.softmax_layers: must be an integer >= 0"):
        recipe(-1)
