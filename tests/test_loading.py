"""Loading MODEL from a Hub ID or a local folder, through the same code a user runs."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from hla_convert.loading import ModelLoadError, load_transformer, parse_dtype
from tiny_models import tiny_wan


def test_bare_transformer_folder_round_trip(tmp_path):
    model = tiny_wan()
    model.save_pretrained(tmp_path / "wan")
    loaded = load_transformer(str(tmp_path / "wan"))
    assert type(loaded.transformer) is WanTransformer3DModel
    assert loaded.pipeline_dir is None and loaded.source == str((tmp_path / "wan").resolve())
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.transformer.state_dict().items()):
        assert n == m and torch.equal(a, b)


def test_pipeline_folder_uses_its_transformer(tmp_path):
    model = tiny_wan()
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(
        json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]})
    )
    loaded = load_transformer(str(tmp_path / "pipe"), dtype="bf16")
    assert loaded.pipeline_dir == str((tmp_path / "pipe").resolve())
    assert loaded.subfolder == "transformer"
    assert loaded.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_explicit_subfolder(tmp_path):
    tiny_wan().save_pretrained(tmp_path / "repo" / "dit")
    loaded = load_transformer(str(tmp_path / "repo"), subfolder="dit")
    assert type(loaded.transformer) is WanTransformer3DModel


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda p: str(p / "nope"), "neither an existing folder nor a Hub ID"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "neither a diffusers pipeline folder"),
        (lambda p: (p / "f.txt").write_text("x") and str(p / "f.txt"), "is a file"),
        (lambda p: ((p / "bad").mkdir(), (p / "bad" / "config.json").write_text("{not json"))[0] or str(p / "bad"), "not readable JSON"),
        (
            lambda p: ((p / "cls").mkdir(), (p / "cls" / "config.json").write_text('{"_class_name": "NoSuchModel"}'))[0] or str(p / "cls"),
            "not a diffusers model class",
        ),
    ],
)
def test_bad_local_models_give_one_line(tmp_path, make, expect):
    with pytest.raises(ModelLoadError) as err:
        load_transformer(make(tmp_path))
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_truncated_weights_give_one_line(tmp_path):
    tiny_wan().save_pretrained(tmp_path / "wan")
    weights = next((tmp_path / "wan").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError) as err:
        load_transformer(str(tmp_path / "wan"))
    assert "could not load WanTransformer3DModel" in str(err.value) and "\n" not in str(err.value)


def test_unreachable_hub_id_gives_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError) as err:
        load_transformer("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert "could not reach the Hugging Face Hub for 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'" in str(err.value)
    assert "\n" not in str(err.value)


def test_dtype_names():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ModelLoadError, match="dtype 'int8'"):
        parse_dtype("int8")
