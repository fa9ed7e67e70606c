"""Atomic writes: readers see the old or the new complete file, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from hla_convert.atomic_files import atomic_write_bytes, write_json_atomic


def test_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_json_atomic(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["report.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["adapter.safetensors"]
    with pytest.raises(ValueError):
        write_json_atomic(path, {"loss": float("nan")})
    assert path.read_bytes() == b"old"


def test_mode_follows_umask_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "x.bin", b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
