"""Adapter round trip and every way a user can hand us a bad one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hla_convert import HLAConfig, convert_attention, hla_parameters
from hla_convert.adapter import ADAPTER_FILE, CONFIG_FILE, AdapterError, fingerprint_weights, load_adapter, read_adapter_info, save_adapter

from test_loading import tiny_wan


def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g),
        timestep=torch.tensor([400]),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
    )


@pytest.fixture
def saved(tmp_path):
    model = convert_attention(tiny_wan(), HLAConfig(kind="hadamard", feature_dim=4, feature_map="softplus"))
    with torch.no_grad():  # move off the initial values so a no-op load would be caught
        for p in hla_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
        out = model(**inputs()).sample
    save_adapter(model, tmp_path / "ad", base_source="tiny/wan", base_revision="abc")
    return tmp_path / "ad", out


def test_round_trip_is_exact(saved):
    folder, out = saved
    model = load_adapter(tiny_wan(), folder)
    with torch.no_grad():
        assert torch.equal(model(**inputs()).sample, out)


def test_metadata_and_files(saved):
    folder, _ = saved
    info = read_adapter_info(folder)
    assert info["base_source"] == "tiny/wan" and info["base_revision"] == "abc"
    assert info["config"]["kind"] == "hadamard" and info["modules"] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert info["base_fingerprint"] == fingerprint_weights(tiny_wan())
    assert json.loads((folder / CONFIG_FILE).read_text())["base_fingerprint"] == info["base_fingerprint"]
    keys = set(load_file(str(folder / ADAPTER_FILE)))
    assert keys == {f"blocks.{i}.attn1.hla.{n}" for i in range(2) for n in ("weight", "bias")}
    assert not list(folder.glob("*.tmp*")), "temporary files left behind"


def test_fingerprint_ignores_dtype_but_not_weights():
    base = tiny_wan()
    assert fingerprint_weights(base) == fingerprint_weights(tiny_wan().to(torch.bfloat16))
    with torch.no_grad():
        base.blocks[0].ffn.net[0].proj.weight[0, 0] += 1.0
    assert fingerprint_weights(base) != fingerprint_weights(tiny_wan())


def test_wrong_base_is_refused(saved):
    folder, _ = saved
    other = tiny_wan()
    with torch.no_grad():
        other.proj_out.weight.mul_(2)
    with pytest.raises(AdapterError, match="different base"):
        load_adapter(other, folder)


def _rewrite(folder, change):
    path = folder / ADAPTER_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda t: t.pop("blocks.1.attn1.hla.bias"), "missing 1 key"),
        (lambda t: t.__setitem__("blocks.1.attn1.hla.extra", torch.zeros(1)), "unexpected key"),
        (lambda t: t.__setitem__("blocks.1.attn1.hla.bias", torch.zeros(3)), "has shape"),
    ],
)
def test_key_mismatch_is_one_line_and_leaves_base_unconverted(saved, change, expect):
    folder, _ = saved
    _rewrite(folder, change)
    base = tiny_wan()
    with pytest.raises(AdapterError, match=expect) as err:
        load_adapter(base, folder)
    assert "\n" not in str(err.value)
    assert not hla_parameters(base)


def test_truncated_and_corrupt_files(saved):
    folder, _ = saved
    path = folder / ADAPTER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(tiny_wan(), folder)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(tiny_wan(), folder)


def test_not_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="not an hla-convert adapter folder"):
        load_adapter(tiny_wan(), tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / ADAPTER_FILE), metadata={"format": '"other"'})
    with pytest.raises(AdapterError, match="not an hla-convert adapter"):
        load_adapter(tiny_wan(), tmp_path)


def test_save_needs_a_converted_model(tmp_path):
    with pytest.raises(AdapterError, match="no converted attention layers"):
        save_adapter(tiny_wan(), tmp_path)
