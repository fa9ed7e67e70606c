"""Calibration inputs: seeded, train != heldout, every architecture, folder round trip, pipeline trajectories."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from hla_convert.stages.calibration import (
    CalibrationError,
    build_inputs,
    load_input_file,
    noise_levels,
    save_inputs,
)
from hla_convert.recipe import parse_recipe
from tiny_models import save_tiny_wan_pipeline, tiny_model

CLASSES = {
    "wan": "WanTransformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel",
    "hunyuan": "HunyuanVideoTransformer3DModel",
    "ltx": "LTXVideoTransformer3DModel",
}


def tiny_recipe(arch: str = "wan", **calibration):
    size = dict(frames=5, height=64, width=64) if arch != "ltx" else dict(frames=9, height=128, width=128)
    cal = dict(size, samples=6, heldout=3, batch_size=2, text_len=6, seed=0)
    cal.update(calibration)
    return parse_recipe({"name": "t", "model": {"architecture": CLASSES[arch]}, "calibration": cal})


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _same_items(xs, ys) -> bool:
    return len(xs) == len(ys) and all(x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys))


@pytest.mark.parametrize("arch", list(CLASSES))
def test_synthetic_inputs_are_seeded_and_fit_the_model(arch):
    model = tiny_model(arch)
    recipe = tiny_recipe(arch)
    train = build_inputs(model, recipe, "train")
    assert [it["hidden_states"].shape[0] for it in train] == [2, 2, 2]
    assert _same_items(train, build_inputs(model, recipe, "train"))
    held = build_inputs(model, recipe, "heldout")
    assert len(held) == 2 and held[1]["hidden_states"].shape[0] == 1
    assert not torch.equal(held[0]["hidden_states"], train[0]["hidden_states"][: held[0]["hidden_states"].shape[0]])
    assert not _same_items(train, build_inputs(model, tiny_recipe(arch, seed=1), "train"))
    for item in train + held:
        out = model(**item, return_dict=False)[0]
        assert torch.isfinite(out).all()
        t = noise_levels(item)
        assert t.shape == (item["hidden_states"].shape[0],) and bool(((t >= 0) & (t <= 1)).all())


def test_timestep_distribution_and_dtype():
    model = tiny_model("wan")
    recipe = tiny_recipe(samples=64, batch_size=64, timesteps=dict(distribution="logit_normal", min=0.2, max=0.6, shift=3.0))
    (item,) = build_inputs(model, recipe, "train", dtype=torch.float64)
    assert item["hidden_states"].dtype == torch.float64
    t = noise_levels(item)
    lo, hi = 3 * 0.2 / (1 + 2 * 0.2), 3 * 0.6 / (1 + 2 * 0.6)  # the shifted range
    assert t.min() >= lo - 1e-6 and t.max() <= hi + 1e-6


@pytest.mark.skipif(importlib.util.find_spec("hla_convert.stages.demo_data") is None, reason="demo data not installed")
def test_demo_videos_are_noised_procedural_videos():
    from diffusers import WanTransformer3DModel

    from hla_convert.stages import demo_data as dd
    from hla_convert.recipe import load_recipe

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=dd.DEMO_CHANNELS,
        out_channels=dd.DEMO_CHANNELS, text_dim=dd.DEMO_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    ).eval()
    recipe = load_recipe("tiny-wan").with_overrides(fields={"calibration.samples": 4, "calibration.batch_size": 4, "stage1.batch_size": 4, "stage2.batch_size": 4})
    (item,) = build_inputs(model, recipe, "train")
    assert item["hidden_states"].shape == (4, dd.DEMO_CHANNELS, dd.DEMO_FRAMES, dd.DEMO_HEIGHT, dd.DEMO_WIDTH)
    assert item["encoder_hidden_states"].shape == (4, dd.DEMO_TEXT_LEN, dd.DEMO_TEXT_DIM)
    # low-noise samples are close to a clean video in [-1, 1]
    t = noise_levels(item)
    clean = item["hidden_states"][t.argmin()]
    assert t.min() > 0.2 or clean.abs().max() < 1 + 3 * float(t.min()) * 5
    with pytest.raises(CalibrationError, match="demo_videos"):
        build_inputs(tiny_model("wan"), recipe, "train")


@pytest.mark.parametrize("arch", ["cogvideox", "ltx"])  # a tuple (RoPE) and plain values (num_frames) in the files
def test_folder_round_trip(tmp_path, arch):
    model = tiny_model(arch)
    recipe = tiny_recipe(arch)
    train, held = build_inputs(model, recipe, "train"), build_inputs(model, recipe, "heldout")
    save_inputs(train, tmp_path / "cache" / "train")
    save_inputs(held, tmp_path / "cache" / "heldout")
    from_folder = recipe.with_overrides(source="folder", path=str(tmp_path / "cache"))
    assert _same_items(build_inputs(model, from_folder, "train"), train)
    assert _same_items(build_inputs(model, from_folder, "heldout"), held)
    assert not list((tmp_path / "cache" / "train").glob("*.tmp"))


def test_folder_errors_name_file_and_key(tmp_path):
    model = tiny_model("wan")
    recipe = tiny_recipe()
    (item,) = build_inputs(model, recipe.with_overrides(fields={"calibration.samples": 2}), "train")
    folder = tmp_path / "cache"
    bad = dict(item, hidden_states=item["hidden_states"][:, :3])
    save_inputs([item, bad], folder / "train")
    rec = recipe.with_overrides(source="folder", path=str(folder))
    with pytest.raises(CalibrationError, match=r"00001\.safetensors: hidden_states: expected shape \[B, 4, F, H, W\]"):
        build_inputs(model, rec, "train")
    save_inputs([{k: v for k, v in item.items() if k != "timestep"}], folder / "train")
    with pytest.raises(CalibrationError, match=r"00000\.safetensors: timestep: missing"):
        build_inputs(model, rec, "train")
    save_inputs([dict(item, guidance=torch.ones(2))], folder / "train")
    with pytest.raises(CalibrationError, match=r"00000\.safetensors: guidance: not an input of WanTransformer3DModel"):
        build_inputs(model, rec, "train")
    save_inputs([dict(item, encoder_hidden_states=torch.zeros(2, 6, 7))], folder / "train")
    with pytest.raises(CalibrationError, match=r"encoder_hidden_states: expected shape \[B, L, 16\]"):
        build_inputs(model, rec, "train")
    with pytest.raises(CalibrationError, match="has no heldout/ folder"):
        build_inputs(model, rec, "heldout")
    (folder / "train" / "00000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match="00000.safetensors: not a readable safetensors file"):
        load_input_file(folder / "train" / "00000.safetensors")


def test_trajectories_need_a_pipeline():
    with pytest.raises(CalibrationError, match="calibration.source: 'trajectories' needs"):
        build_inputs(tiny_model("wan"), tiny_recipe(source="trajectories"), "train")


def test_trajectory_capture_from_a_tiny_pipeline(tmp_path):
    pytest.importorskip("transformers")
    from hla_convert import convert_attention
    from hla_convert.model.layers import hla_layers

    model = tiny_model("wan")
    save_tiny_wan_pipeline(tmp_path / "pipe", model)
    convert_attention(model, tiny_recipe().hla_config())
    recipe = tiny_recipe(source="trajectories", samples=10, heldout=4, batch_size=4, trajectory_steps=3)
    train = build_inputs(model, recipe, "train", pipeline_dir=str(tmp_path / "pipe"))
    assert [it["hidden_states"].shape[0] for it in train] == [4, 4, 2]
    assert set(train[0]) == {"hidden_states", "timestep", "encoder_hidden_states"}
    assert train[0]["hidden_states"].shape[1:] == (4, 2, 8, 8)  # 5 frames, 64 px -> 2 x 8 x 8 latent
    assert train[0]["encoder_hidden_states"].shape[1:] == (6, 16)
    assert all(layer.mode == "student" for layer in hla_layers(model).values())  # modes restored
    # timesteps are the scheduler's (3 steps with shift 3), not a sampled distribution
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(3)
    assert set(torch.cat([it["timestep"] for it in train]).tolist()) <= set(sched.timesteps.tolist())
    assert _same_items(train, build_inputs(model, recipe, "train", pipeline_dir=str(tmp_path / "pipe")))
    held = build_inputs(model, recipe, "heldout", pipeline_dir=str(tmp_path / "pipe"))
    assert sum(it["hidden_states"].shape[0] for it in held) == 4
    assert not any(torch.equal(h["encoder_hidden_states"][0], t["encoder_hidden_states"][i]) for h in held for t in train for i in range(t["hidden_states"].shape[0]))
    out = model(**train[0], return_dict=False)[0]
    assert out.shape == train[0]["hidden_states"].shape


def test_both_splits_load_the_pipeline_once(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from hla_convert.stages import calibration

    model = tiny_model("wan")
    save_tiny_wan_pipeline(tmp_path / "pipe", model)
    recipe = tiny_recipe(source="trajectories", samples=6, heldout=2, batch_size=2, trajectory_steps=2)
    loads = []
    real = calibration.load_pipeline
    monkeypatch.setattr(calibration, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    sets = calibration.build_input_sets(model, recipe, pipeline_dir=str(tmp_path / "pipe"))
    assert len(loads) == 1
    for split in ("train", "heldout"):
        assert _same_items(sets[split], build_inputs(model, recipe, split, pipeline_dir=str(tmp_path / "pipe")))


def test_trajectories_of_a_model_with_lora_are_the_base_models(tmp_path):
    """`validate` records its held-out trajectories from the loaded conversion: the teacher must be the
    base model, LoRA off (with LoRA on, the held-out inputs and so the drift differed from convert's)."""
    pytest.importorskip("transformers")
    from hla_convert import convert_attention
    from hla_convert.model.lora import add_lora, lora_parameters, tuner_layers

    model = tiny_model("wan")
    save_tiny_wan_pipeline(tmp_path / "pipe", model)
    # one run of 3 steps, both guidance halves: 6 inputs, all kept; steps 2 and 3 follow the model
    recipe = tiny_recipe(source="trajectories", samples=6, heldout=6, batch_size=2, trajectory_steps=3)
    base = build_inputs(model, recipe, "heldout", pipeline_dir=str(tmp_path / "pipe"))
    convert_attention(model, recipe.hla_config())
    add_lora(model, rank=2)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.add_(0.2)
    assert _same_items(base, build_inputs(model, recipe, "heldout", pipeline_dir=str(tmp_path / "pipe")))
    assert all(not m.disable_adapters for _, m in tuner_layers(model))  # LoRA on again afterwards


def test_a_tuple_count_past_the_files_tensors_is_refused_at_once(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    (path,) = save_inputs([{"hidden_states": torch.zeros(1, 2)}], tmp_path)
    save_file(load_file(path), path, metadata={"hla_convert_inputs": json.dumps({"tuples": {"rope": 10**10}, "values": {}})})
    with pytest.raises(CalibrationError, match=r"rope has 10000000000 parts; the file holds 1 tensors"):
        load_input_file(path)


def test_calibration_files_that_are_not_regular_are_refused_before_the_run(tmp_path):
    import os

    from hla_convert.stages.calibration_sources import check_calibration_path

    recipe = tiny_recipe().with_overrides(source="folder", path=str(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "heldout").mkdir()
    save_inputs([{"hidden_states": torch.zeros(1, 2)}], tmp_path / "heldout")
    os.mkfifo(tmp_path / "train" / "00000.safetensors")
    with pytest.raises(CalibrationError, match="00000.safetensors is a FIFO, not a regular file"):
        check_calibration_path(recipe)
    with pytest.raises(CalibrationError, match="is a FIFO"):
        load_input_file(tmp_path / "train" / "00000.safetensors")


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda it: dict(it, hidden_states=it["hidden_states"].to(torch.int64)), "hidden_states: must be a floating-point tensor, got int64"),
        (lambda it: dict(it, hidden_states=it["hidden_states"][..., :1, :1]), "are not whole 1 x 2 x 2 patches"),
        (lambda it: dict(it, hidden_states=it["hidden_states"][..., :3]), "are not whole 1 x 2 x 2 patches"),
        (lambda it: dict(it, hidden_states=it["hidden_states"].clone().fill_(float("nan"))), "hidden_states: holds NaN or infinite values"),
        (lambda it: dict(it, encoder_hidden_states=it["encoder_hidden_states"] * float("inf")), "encoder_hidden_states: holds NaN"),
        (lambda it: dict(it, timestep="late"), "timestep: must be a number, a [B] or a [B, tokens] tensor, got str 'late'"),
        (lambda it: dict(it, timestep=torch.zeros(1, 2, 3)), "timestep: must be a number, a [B] or a [B, tokens] tensor"),
        # the fresh hostile pass: a tensor input given as JSON "values" or as tuple parts (exit 3 from the model)
        (lambda it: dict(it, encoder_hidden_states=[1, 2, 3]), "encoder_hidden_states: must be a tensor for WanTransformer3DModel.forward, got tuple"),
        (lambda it: dict(it, encoder_hidden_states=(it["encoder_hidden_states"], it["encoder_hidden_states"].clone())), "encoder_hidden_states: must be a tensor"),
    ],
)
def test_folder_inputs_that_the_model_cannot_take_are_refused_by_name(tmp_path, change, expect):
    # issue 18: these were exit 3 from inside the model, NaN ones "loss is nan ... lower learning rate"
    model = tiny_model("wan")
    recipe = tiny_recipe()
    (item,) = build_inputs(model, recipe.with_overrides(fields={"calibration.samples": 2}), "train")
    save_inputs([change(item)], tmp_path / "cache" / "train")
    with pytest.raises(CalibrationError, match=re.escape(expect)):
        build_inputs(model, recipe.with_overrides(source="folder", path=str(tmp_path / "cache")), "train")


def test_every_architecture_row_names_a_synthetic_builder_that_exists():
    """A family's synthetic inputs are one key in its model.architectures row: a key without a
    builder (a typo in a new row) would only fail at the first calibration."""
    from hla_convert.model.architectures import ARCHITECTURES
    from hla_convert.stages.calibration_synthetic import BUILDERS

    keys = {row.synthetic for row in ARCHITECTURES.values() if row.synthetic is not None}
    assert keys == set(BUILDERS)
