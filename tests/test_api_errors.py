"""The Python API's promise on bad arguments (issue 18, finding 8): the documented one-line
ValueError subclasses (InputError, AdapterError, ...), raised before anything slow, never a
TypeError / AttributeError / AssertionError from deep inside."""

from __future__ import annotations

import pytest
import torch

import hla_convert
from hla_convert import HLAConfig, InputError, convert_attention, save_adapter
from tiny_models import tiny_wan


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) <= 600, text
    return text


@pytest.mark.parametrize(
    "kwargs, expect",
    [
        (dict(recipe=123, out="o"), "--recipe must be a str or Recipe, not int"),
        (dict(model=5, out="o"), "MODEL must be a str, not int"),
        (dict(out=7), "--out must be a str or PathLike, not int"),
        (dict(out="o", steps="many"), "--steps must be a int, not str"),
        (dict(out="o", steps=True), "--steps must be a int, not bool"),
        (dict(out="o", device=0), "--device must be a str, not int"),
        (dict(out="o", attention=["hadamard"]), "--attention must be a str, not list"),
    ],
)
def test_convert_refuses_arguments_of_the_wrong_type(tmp_path, monkeypatch, kwargs, expect):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=expect) as err:
        hla_convert.convert(**kwargs)
    _one_line(err)
    assert not (tmp_path / "o").exists()


def test_validate_refuses_arguments_of_the_wrong_type(tmp_path):
    with pytest.raises(InputError, match="DIR must be a str or PathLike, not int"):
        hla_convert.validate(5)
    with pytest.raises(InputError, match="--base must be a str, not int"):
        hla_convert.validate(str(tmp_path), base=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_load_converted_refuses_a_missing_device_before_loading(tmp_path):
    # was: the whole load, then an AssertionError from torch's .to("cuda")
    with pytest.raises(InputError, match="no CUDA device") as err:
        hla_convert.load_converted(tmp_path / "nothing-here", device="cuda")
    _one_line(err)


@pytest.fixture
def adapter_recording(tmp_path):
    def make(base_source):
        model = convert_attention(tiny_wan(), HLAConfig(kind="hadamard", feature_dim=4, feature_map="softplus"))
        save_adapter(model, tmp_path / "ad", base_source=base_source)
        return tmp_path / "ad"

    return make


def test_load_converted_refuses_an_unusable_recorded_base_in_one_line(adapter_recording):
    folder = adapter_recording("x" * 5000)  # past the file system's name limit: was a 5,035-character OSError
    with pytest.raises(InputError, match="no usable base model") as err:
        hla_convert.load_converted(folder)
    _one_line(err)
    with pytest.raises(InputError, match="--base must be a str, not int"):
        hla_convert.load_converted(folder, base=1)
