"""Adapter round trip and every way a user can hand us a bad one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hla_convert import HLAConfig, convert_attention, hla_parameters
from hla_convert.io.adapter import ADAPTER_FILE, CONFIG_FILE, AdapterError, fingerprint_weights, load_adapter, read_adapter_info, save_adapter
from helpers import rewrite_adapter as _rewrite
from tiny_models import tiny_wan


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
    from hla_convert.model.lora import has_adapters

    folder, out = saved
    from hla_convert.model.full_tuning import base_store

    info = read_adapter_info(folder)
    assert "lora" not in info and "full" not in info  # an HLA-only adapter: loads with no LoRA, as before LoRA (and full) existed
    model = load_adapter(tiny_wan(), folder)
    assert not has_adapters(model) and base_store(model) is None
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


def wide_wan():
    """A tiny Wan whose FFN weights ([512, 24]) are bigger than the first fingerprint's 4096-value sample."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=512, num_layers=1, rope_max_seq_len=32,
    )


def _bump_one_weight(model, amount=0.5):
    with torch.no_grad():  # the last value: one the first scheme's strided sample never looked at
        model.blocks[0].ffn.net[0].proj.weight[-1, -1] += amount
    return model


def test_fingerprint_sees_any_single_weight_and_a_swap():
    reference = fingerprint_weights(wide_wan())
    assert reference.startswith("sha256-v2:")
    assert fingerprint_weights(_bump_one_weight(wide_wan())) != reference
    assert fingerprint_weights(_bump_one_weight(wide_wan(), 1e-2)) != reference
    swapped = wide_wan()
    with torch.no_grad():  # same values, two places exchanged: only the position-weighted sum sees it
        w = swapped.blocks[0].attn1.to_q.weight
        a, b = w[0, 0].clone(), w[1, 1].clone()
        w[0, 0], w[1, 1] = b, a
    assert not torch.equal(a, b) and fingerprint_weights(swapped) != reference
    # a bf16 copy of the fp32 base is the same base
    assert fingerprint_weights(wide_wan().to(torch.bfloat16)) == reference


def test_a_base_with_one_weight_changed_is_refused(tmp_path):
    model = convert_attention(wide_wan(), HLAConfig(kind="hadamard", feature_dim=4, feature_map="softplus"))
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(AdapterError, match="different base"):
        load_adapter(_bump_one_weight(wide_wan()), tmp_path / "ad")
    assert hla_parameters(load_adapter(wide_wan().to(torch.bfloat16), tmp_path / "ad"))


def test_adapters_with_the_first_fingerprint_scheme_still_load_checked_the_old_way(saved):
    from hla_convert.io.adapter import _legacy_fingerprint

    folder, out = saved
    legacy = _legacy_fingerprint(tiny_wan())
    assert legacy.startswith("sha256:")

    def set_legacy(meta):
        meta["base_fingerprint"] = json.dumps(legacy)

    _rewrite(folder, change_meta=set_legacy)
    model = load_adapter(tiny_wan(), folder)
    with torch.no_grad():
        assert torch.equal(model(**inputs()).sample, out)
    other = tiny_wan()
    with torch.no_grad():
        other.proj_out.weight.mul_(2)
    with pytest.raises(AdapterError, match="different base"):
        load_adapter(other, folder)


def test_wrong_base_is_refused(saved):
    folder, _ = saved
    other = tiny_wan()
    with torch.no_grad():
        other.proj_out.weight.mul_(2)
    with pytest.raises(AdapterError, match="different base"):
        load_adapter(other, folder)


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda t: t.pop("blocks.1.attn1.hla.bias"), "missing 1 key"),
        (lambda t: t.__setitem__("blocks.1.attn1.hla.extra", torch.zeros(1)), "unexpected key"),
        (lambda t: t.__setitem__("blocks.1.attn1.hla.bias", torch.zeros(3)), "has shape"),
        # found probing the dtypes tests/fuzzing.py draws: an I32/U32 header over the float bytes loaded as huge integers
        (lambda t: t.__setitem__("blocks.1.attn1.hla.bias", t["blocks.1.attn1.hla.bias"].view(torch.int32)), "dtype int32, not a floating-point"),
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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_a_corrupt_adapter_naming_the_first_bad_key(saved, value):
    folder, _ = saved

    def poison(tensors):
        for key in ("blocks.1.attn1.hla.weight", "blocks.1.attn1.hla.bias"):
            tensors[key] = torch.full_like(tensors[key], value)
        tensors["blocks.0.attn1.hla.weight"].view(-1)[3] = value

    _rewrite(folder, poison)
    base = tiny_wan()
    with pytest.raises(AdapterError, match=r"corrupt: tensor 'blocks.0.attn1.hla.weight' holds NaN or infinite values"):
        load_adapter(base, folder)
    assert not hla_parameters(base)  # refused before anything was converted


@pytest.mark.parametrize(
    "change_meta, expect",
    [
        (lambda m: m.__setitem__("format_version", "true"), "format version True"),  # true == 1 in Python
        (lambda m: m.__setitem__("config", m["config"].replace('"factors": 2', '"factors": 2.0')), "factors: must be a positive integer"),
        (lambda m: m.__setitem__("config", m["config"].replace('"normalize": true', '"normalize": 1')), "normalize: must be true or false"),
        (lambda m: m.__setitem__("config", m["config"].replace('"learn_temperature": false', '"learn_temperature": 0')), "learn_temperature"),
        (lambda m: m.__setitem__("config", m["config"].replace('"eps": 1e-06', '"eps": true')), "eps: must be a positive number"),
        (lambda m: m.__setitem__("config", m["config"].replace('"eps": 1e-06', '"eps": 1e999')), "eps: must be a positive number"),
        (lambda m: m.__setitem__("config", m["config"].replace('{"kind"', '{"feature_dim": 8, "kind"')), "duplicate key 'feature_dim'"),
    ],
)
def test_metadata_of_the_wrong_type_or_with_a_duplicate_key_is_refused(saved, change_meta, expect):
    folder, _ = saved
    _rewrite(folder, change_meta=change_meta)
    with pytest.raises(AdapterError, match=expect):
        read_adapter_info(folder)  # before any model is loaded
    base = tiny_wan()
    with pytest.raises(AdapterError, match=expect):
        load_adapter(base, folder)
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


def test_metadata_nested_thousands_deep_is_unreadable_not_a_recursion_error(saved):
    """Found by tests/io/test_adapter_fuzz.py: json.loads of a 100,000-deep metadata value raised RecursionError."""
    folder, _ = saved
    _rewrite(folder, change_meta=lambda meta: meta.update(base_class="[" * 100_000 + "]" * 100_000))
    with pytest.raises(AdapterError, match="unreadable metadata"):
        read_adapter_info(folder)


@pytest.mark.parametrize(
    "key, value, expect",
    [  # found by tests/io/test_adapter_fuzz.py: the first four raised TypeError in load_adapter; the others loaded
        ("modules", 5, "'modules' must be a non-empty list of module names, got 5"),
        ("modules", None, "'modules' must be a non-empty list of module names, got None"),
        ("modules", [5], "'modules' must be a non-empty list of module names"),
        ("modules", [[1]], "'modules' must be a non-empty list of module names"),
        ("base_fingerprint", 5, "'base_fingerprint' must be a string, got 5"),
        ("lora", 5, "'lora' must be a mapping, got 5"),
        ("extra", [1], "'extra' must be a mapping, got \\[1\\]"),  # an AttributeError in `validate`
    ],
)
def test_metadata_values_of_the_wrong_type_are_refused_when_read(saved, key, value, expect):
    folder, _ = saved
    _rewrite(folder, change_meta=lambda meta: meta.update({key: json.dumps(value)}))
    with pytest.raises(AdapterError, match=expect) as err:
        read_adapter_info(folder)
    assert "\n" not in str(err.value)
    base = tiny_wan()
    with pytest.raises(AdapterError, match=expect):
        load_adapter(base, folder, check_base=False)
    assert not hla_parameters(base)


@pytest.mark.parametrize(
    "change",
    [  # found by tests/io/test_adapter_fuzz.py: metadata text went into AdapterError whole, newlines included
        {"base_source": "a\nb", "base_fingerprint": "sha256-v2:forged"},
        {"base_source": "x" * 3000, "base_fingerprint": "sha256-v2:forged"},
        {"modules": ["x" * 3000]},
        {"config": {"kind": "x" * 3000}},
    ],
)
def test_metadata_text_in_an_error_is_one_bounded_line(saved, change):
    folder, _ = saved
    _rewrite(folder, change_meta=lambda meta: meta.update({k: json.dumps(v) for k, v in change.items()}))
    with pytest.raises(AdapterError) as err:
        load_adapter(tiny_wan(), folder)
    assert "\n" not in str(err.value) and len(str(err.value)) <= 600, str(err.value)[:200]


def test_not_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="not an hla-convert adapter folder"):
        load_adapter(tiny_wan(), tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / ADAPTER_FILE), metadata={"format": '"other"'})
    with pytest.raises(AdapterError, match="not an hla-convert adapter"):
        load_adapter(tiny_wan(), tmp_path)


def test_save_needs_a_converted_model(tmp_path):
    with pytest.raises(AdapterError, match="no converted attention layers"):
        save_adapter(tiny_wan(), tmp_path)


@pytest.mark.parametrize(
    "key, value, expect",
    [
        ("modules", "5", "'modules' must be a non-empty list of module names, got 5"),
        ("modules", "null", "'modules' must be a non-empty list of module names, got None"),
        ("modules", "[]", "non-empty list of module names"),
        ("modules", "[1, 2]", "non-empty list of module names"),
        ("config", '"hadamard"', "'config' must be a mapping, got 'hadamard'"),
        ("base_fingerprint", "5", "'base_fingerprint' must be a string, got 5"),
        ("lora", "[1]", "'lora' must be a mapping, got \\[1\\]"),
        ("extra", "[1]", "'extra' must be a mapping, got \\[1\\]"),
        ("extra", "[" * 100_000 + "]" * 100_000, "unreadable metadata"),  # nested past Python's recursion limit
    ],
)
def test_metadata_of_the_wrong_type_is_one_adapter_error(saved, key, value, expect):
    # An edited header must be refused where it is read, not as a TypeError / RecursionError deep in the load.
    folder, _ = saved
    _rewrite(folder, change_meta=lambda meta: meta.__setitem__(key, value))
    base = tiny_wan()
    for read in (lambda: read_adapter_info(folder), lambda: load_adapter(base, folder)):
        with pytest.raises(AdapterError, match=expect) as err:
            read()
        assert "\n" not in str(err.value) and len(str(err.value)) < 600
    assert not hla_parameters(base)


# -- train: full ---------------------------------------------------------------------------------


@pytest.fixture
def full_saved(tmp_path):
    """An adapter of a model whose converted blocks' base weights moved, as stage 2 `train: full`
    leaves it (originals in the host store, trained values in the Parameters); (folder, student output)."""
    from hla_convert.model.full_tuning import attach_base_store, full_tuning_parameters

    model = convert_attention(tiny_wan(), HLAConfig(kind="hadamard", feature_dim=4, feature_map="softplus"))
    trained = full_tuning_parameters(model)
    attach_base_store(model, trained)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in [*hla_parameters(model).values(), *trained.values()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out = model(**inputs()).sample
    save_adapter(model, tmp_path / "full", base_source="tiny/wan")
    return tmp_path / "full", out


def test_full_adapter_round_trip_restores_the_trained_blocks_and_keeps_the_base_as_teacher(full_saved):
    from hla_convert.model.modes import attention_mode

    folder, out = full_saved
    info = read_adapter_info(folder)
    assert info["full"]["train"] == "full" and info["full"]["blocks"] == ["blocks.0", "blocks.1"]
    assert info["base_fingerprint"] == fingerprint_weights(tiny_wan())  # of the original base, not the trained weights
    tensors = load_file(str(folder / ADAPTER_FILE))
    full_keys = {k for k in tensors if k.startswith("full.")}
    assert "full.blocks.0.attn1.to_q.weight" in full_keys and "full.blocks.1.ffn.net.2.weight" in full_keys
    assert not any(".hla." in k or "patch_embedding" in k for k in full_keys)
    model = load_adapter(tiny_wan(), folder)
    with torch.no_grad():
        assert torch.equal(model(**inputs()).sample, out)  # whole tensors: exact
        with attention_mode(model, "teacher"):
            teacher = model(**inputs()).sample
        assert torch.equal(teacher, tiny_wan()(**inputs()).sample)
        assert torch.equal(model(**inputs()).sample, out)


def test_full_adapter_refuses_another_base_and_a_missing_full_weight_in_one_line(full_saved):
    folder, _ = full_saved
    other = tiny_wan(seed=1)
    with pytest.raises(AdapterError, match="different base") as err:
        load_adapter(other, folder)
    assert "\n" not in str(err.value) and not hla_parameters(other)
    _rewrite(folder, lambda t: t.pop("full.blocks.1.ffn.net.2.weight"))
    base = tiny_wan()
    with pytest.raises(AdapterError, match=r"missing 1 key\(s\), e\.g\. full\.blocks\.1\.ffn\.net\.2\.weight"):
        load_adapter(base, folder)
    assert not hla_parameters(base)
