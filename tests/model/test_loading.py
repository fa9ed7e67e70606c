"""Loading MODEL from a Hub ID or a local folder, through the same code a user runs."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from hla_convert.model.loading import ModelLoadError, load_transformer, parse_dtype
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


# -- configs and files that would hang or exhaust memory --------------------------------------


def _demo_copy_with(tmp_path, **config):
    import json
    import shutil

    from hla_convert.model.loading import DEMO_MODEL_PATH

    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_PATH, folder)
    doc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(doc | config))
    return folder


@pytest.mark.parametrize("field, value", [("num_layers", 100_000_000), ("ffn_dim", 10**9), ("num_attention_heads", 1_000_000)])
def test_a_config_past_any_video_transformer_is_refused_before_building_it(tmp_path, field, value):
    from hla_convert.model.loading import ModelLoadError, load_transformer
    from helpers import assert_one_line_error, invoke

    folder = _demo_copy_with(tmp_path, **{field: value})
    with pytest.raises(ModelLoadError, match=f"{field} = {value:,} is past"):
        load_transformer(str(folder))
    assert_one_line_error(invoke("inspect", folder, "--recipe", "tiny-wan"), contains=field)  # inspect "reads the config only": bounded too


def test_a_fifo_config_is_refused_without_blocking(tmp_path):
    import os

    from hla_convert.model.loading import ModelLoadError, resolve_model

    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "config.json")
    with pytest.raises(ModelLoadError, match="FIFO, not a regular file"):
        resolve_model(str(folder))


def _demo_copy(tmp_path, **config):
    """A folder copy of the embedded demo model with its config.json changed."""
    import shutil
    from importlib.resources import files

    folder = tmp_path / "demo"
    shutil.copytree(str(files("hla_convert.demo_model")), folder, ignore=shutil.ignore_patterns("__*"))
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(data | config))
    return str(folder)


def test_a_config_value_of_the_wrong_type_is_one_model_load_error(tmp_path):
    # issue 18: num_layers "three" was a TypeError from inside diffusers (exit 3)
    with pytest.raises(ModelLoadError, match="could not load WanTransformer3DModel") as err:
        load_transformer(_demo_copy(tmp_path, num_layers="three"))
    assert "\n" not in str(err.value)


def test_a_refused_load_prints_nothing_but_the_error_line(tmp_path):
    # issue 18: diffusers' "config attributes ... will be ignored" came before the error line
    import os
    import shutil
    import subprocess
    import sys

    folder = _demo_copy(tmp_path, bogus_key=1, patch_size=[1, 2])
    exe = shutil.which("hla-convert", path=os.path.dirname(sys.executable))
    proc = subprocess.run(
        [exe, "convert", folder, "--recipe", "tiny-wan", "--out", str(tmp_path / "o"), "--steps", "0", "--device", "cpu"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "hla-convert: error:" not in ln]
    assert not any("config attributes" in ln or "Warning" in ln for ln in lines), proc.stderr
