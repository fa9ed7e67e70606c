"""A single-file checkpoint as MODEL (hla_convert.model.single_file, model.loading): one .safetensors
in Wan-AI's original layout, loaded by diffusers' from_single_file with a local diffusers config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hla_convert.io.adapter import fingerprint_weights
from hla_convert.model.loading import ModelLoadError, load_transformer, resolve_model
from hla_convert.model.single_file import checkpoint_architecture
from helpers import save_wan_config, save_wan_single_file, wan_original_layout
from tiny_models import tiny_cogvideox, tiny_wan


def test_the_test_layout_is_what_diffusers_converts_back_to_the_same_weights():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = tiny_wan().state_dict()
    original = wan_original_layout(state, "model.diffusion_model.")
    assert "model.diffusion_model.blocks.0.self_attn.q.weight" in original and "model.diffusion_model.head.modulation" in original
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_single_file_loads_the_same_weights_as_the_diffusers_folder(tmp_path, prefix):
    model = tiny_wan(seed=3)
    path = save_wan_single_file(model, tmp_path / "wan.safetensors", prefix)
    config = save_wan_config(model, tmp_path / "config")
    assert checkpoint_architecture(path) == "WanTransformer3DModel"
    loaded = load_transformer(str(path), config=str(config))
    assert (loaded.source, loaded.config, loaded.pipeline_dir) == (str(path.resolve()), str(config.resolve()), None)
    state = loaded.transformer.state_dict()
    assert set(state) == set(model.state_dict()) and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert fingerprint_weights(loaded.transformer) == fingerprint_weights(model)


def test_a_pipeline_folder_as_config_gives_its_transformer_config_and_its_pipeline(tmp_path):
    model = tiny_wan()
    pipe = tmp_path / "pipe"
    save_wan_config(model, pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}))
    path = save_wan_single_file(model, tmp_path / "wan.safetensors")
    ref = resolve_model(str(path), config=str(pipe))
    assert (ref.config, ref.config_subfolder, ref.pipeline_dir) == (str(pipe.resolve()), "transformer", str(pipe.resolve()))
    loaded = load_transformer(str(path), config=str(pipe))
    assert fingerprint_weights(loaded.transformer) == fingerprint_weights(model)


def _bad_files(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (file, what the one-line error says)."""
    model = tiny_wan()
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "unknown.safetensors"))
    partial = wan_original_layout(model.state_dict())
    del partial["blocks.1.ffn.2.weight"]
    save_file(partial, str(tmp_path / "partial.safetensors"))
    extra = wan_original_layout(model.state_dict()) | {"img_emb.proj.1.weight": torch.zeros(2, 2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    save_wan_single_file(model, tmp_path / "ok.safetensors")
    (tmp_path / "wan.ckpt").write_bytes(b"x")
    return {
        "garbage": ("garbage.safetensors", "is not a safetensors file"),
        "unknown": ("unknown.safetensors", "holds no known architecture's original single-file layout"),
        "partial": ("partial.safetensors", "lacks 1 weight(s)"),
        "extra": ("extra.safetensors", "holds 1 tensor(s) more"),
        "no_config": ("ok.safetensors", "give its diffusers config with --config"),
        "other_class": ("ok.safetensors", "describes a CogVideoXTransformer3DModel, but"),
        "not_safetensors": ("wan.ckpt", "is a file; MODEL must be a folder, a Hub ID or a .safetensors checkpoint"),
        "bad_config": ("ok.safetensors", "is neither an existing folder nor a Hub ID"),
    }


@pytest.mark.parametrize("case", ["garbage", "unknown", "partial", "extra", "no_config", "other_class", "not_safetensors", "bad_config"])
def test_what_is_not_a_usable_single_file_is_one_line(tmp_path, case):
    name, says = _bad_files(tmp_path)[case]
    config = str(save_wan_config(tiny_wan(), tmp_path / "config"))
    if case in ("no_config", "not_safetensors"):
        config = None
    elif case == "other_class":
        config = str(save_wan_config(tiny_cogvideox(), tmp_path / "cog"))
    elif case == "bad_config":
        config = str(tmp_path / "no such folder")
    with pytest.raises(ModelLoadError) as info:
        load_transformer(str(tmp_path / name), config=config)
    assert says in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_config_is_refused_for_a_folder_model(tmp_path):
    folder = tmp_path / "wan"
    tiny_wan().save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="--config applies to a single-file MODEL"):
        resolve_model(str(folder), config=str(folder))
