"""Property-based fuzz of the adapter reader (hla_convert.io.adapter): whatever an adapter folder
holds, read_adapter_info and load_adapter raise AdapterError with one line or load it, and a refused
adapter leaves the base unconverted; never another exception, a hang or gigabytes of memory. The
grid complements the random search where it samples thinly: every adapter metadata key set to each
of WRONG_TYPES in turn. Profile, bounds and strategies: tests/fuzzing.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from hla_convert import hla_parameters
from hla_convert.io.adapter import ADAPTER_FILE, AdapterError, load_adapter, read_adapter_info
from fuzzing import (
    WRONG_TYPES,
    TinyBase,
    adapter_metadata,
    adapter_tensors,
    bounded_memory,
    corrupted,
    count_event,
    fuzz,
    make_adapter,
    only,
    path_names,
    random_metadata,
    random_safetensors,
)


@pytest.fixture(scope="module")
def base():
    return TinyBase()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base):
    """(the bytes of a real adapter_model.safetensors, its header length): made once per module."""
    return make_adapter(tmp_path_factory.mktemp("fuzz_adapter_src"), base)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_adapter")


def _read_then_load(folder: Path, data: bytes, base, check_base: bool = True) -> None:
    (folder / ADAPTER_FILE).write_bytes(data)
    if only(AdapterError, read_adapter_info, folder) is None:
        count_event("refused by read_adapter_info")
        return
    model = base.fresh()
    if only(AdapterError, load_adapter, model, folder, check_base=check_base) is None:
        count_event("refused by load_adapter")
        assert not hla_parameters(model), "a refused adapter left the base converted"
    else:
        count_event("loaded")


@fuzz(200)
@given(st.data())
def test_corrupted_adapter_bytes_are_an_adapter_error_or_an_adapter(adapter, adapter_dir, base, data):
    raw, header_len = adapter
    _read_then_load(adapter_dir, data.draw(corrupted(raw, header_len)), base, check_base=data.draw(st.booleans()))


@fuzz(200)
@given(st.data())
def test_random_safetensors_headers_are_an_adapter_error(adapter, adapter_dir, base, data):
    raw, header_len = adapter
    _read_then_load(adapter_dir, data.draw(random_safetensors(adapter_metadata(raw, header_len))), base)


@fuzz(200)
@given(st.data())
def test_random_metadata_on_real_tensors_is_an_adapter_error_or_an_adapter(adapter, adapter_dir, base, data):
    """A well-formed safetensors file (the adapter's own tensors, maybe a LoRA weight or two) whose
    metadata values are random: this reaches the checks past the header (config, modules, lora)."""
    raw, header_len = adapter
    tensors = adapter_tensors(raw)
    if data.draw(st.booleans()):
        tensors["lora.blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(data.draw(st.integers(1, 4)), 24)
    meta = data.draw(random_metadata(adapter_metadata(raw, header_len)))
    _read_then_load(adapter_dir, safetensors_bytes(tensors, metadata=meta), base, check_base=data.draw(st.booleans()))


def test_each_metadata_key_with_each_wrong_type_is_an_adapter_error_or_an_adapter(adapter, adapter_dir, base):
    """The grid the random search samples thinly: every metadata key (and lora, extra) set to each
    of WRONG_TYPES in turn, on the real tensors, loaded with and without the base check."""
    raw, header_len = adapter
    meta = adapter_metadata(raw, header_len)
    tensors = adapter_tensors(raw)
    for key in [*sorted(meta), "lora", "extra"]:
        for value in WRONG_TYPES:
            data = safetensors_bytes(tensors, metadata={**meta, key: json.dumps(value)})
            for check_base in (True, False):
                _read_then_load(adapter_dir, data, base, check_base=check_base)


@fuzz(100)
@given(name=path_names)
@example(name="x" * 5000)  # found: ENAMETOOLONG from is_file() escaped as an OSError
def test_random_adapter_folder_names_are_an_adapter_error(name):
    only(AdapterError, read_adapter_info, name)
