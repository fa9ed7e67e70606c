"""Atomic writes: readers see the old or the new complete file, with ordinary permissions; training
checkpoints written in the background hold the values of the moment they were taken."""

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


def test_a_checkpoint_holds_the_values_it_was_submitted_with_while_training_goes_on(tmp_path, monkeypatch):
    """The background write (CheckpointWriter) returns before the file is written, and the file holds
    the tensors as they were at submit(), not as the optimizer's next step left them."""
    import threading

    import torch

    from hla_convert.stages import checkpoints

    path = tmp_path / "stage2.checkpoint.safetensors"
    release, started = threading.Event(), threading.Event()
    real = checkpoints._write

    def slow(*args, **kwargs):
        started.set()
        assert release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "_write", slow)
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    history = [0.5, 0.4]
    writer = checkpoints.CheckpointWriter()
    writer.submit(path, {"param.w": w}, {"step": 2, "history": history})
    assert started.wait(10) and not path.exists()  # submit() came back with the write in flight
    w.add_(100.0)  # the next optimizer step, in place
    history.append(0.3)  # and the loop's next loss
    release.set()
    writer.wait()
    tensors, state = checkpoints.load_checkpoint(path)
    assert torch.equal(tensors["param.w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert state == {"step": 2, "history": [0.5, 0.4]}
    assert os.listdir(tmp_path) == [path.name]


def test_a_failed_background_write_is_the_run_s_error_and_keeps_the_last_checkpoint(tmp_path):
    import torch

    from hla_convert.stages.checkpoints import CheckpointWriter, load_checkpoint

    path = tmp_path / "stage1.checkpoint.safetensors"
    writer = CheckpointWriter()
    writer.submit(path, {"param.w": torch.ones(3)}, {"step": 50})
    writer.wait()
    with pytest.raises(ValueError):  # a state that is not JSON: refused before anything is written
        writer.submit(path, {"param.w": torch.zeros(3)}, {"step": float("nan")})
    (tmp_path / "blocker").mkdir()
    writer.submit(tmp_path / "blocker", {"param.w": torch.zeros(3)}, {"step": 75})  # a folder there: the write fails
    with pytest.raises(OSError):  # raised by the writing thread, surfaced here
        writer.wait()
    tensors, state = load_checkpoint(path)
    assert state == {"step": 50} and torch.equal(tensors["param.w"], torch.ones(3))
    writer.wait()  # the error was raised once; the writer is usable again
    assert sorted(os.listdir(tmp_path)) == ["blocker", path.name]


def test_the_temporary_file_of_a_killed_write_goes_with_the_next_write(tmp_path):
    import torch

    from hla_convert.atomic_files import stale_temporaries
    from hla_convert.stages.checkpoints import CheckpointWriter

    path = tmp_path / "stage2.checkpoint.safetensors"
    (tmp_path / f".{path.name}.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".other.safetensors.abc.tmp").write_bytes(b"not ours")
    assert stale_temporaries(path) == [tmp_path / f".{path.name}.k1ll3d.tmp"]
    writer = CheckpointWriter()
    writer.submit(path, {"param.w": torch.ones(2)}, {"step": 1})
    writer.wait()
    assert sorted(os.listdir(tmp_path)) == [".other.safetensors.abc.tmp", path.name]


@pytest.mark.gpu
def test_a_checkpoint_of_device_tensors_holds_the_moment_while_the_next_steps_run_on_the_device(tmp_path, monkeypatch):
    """On CUDA the snapshot is a copy into reused pinned host buffers: the optimizer's in-place steps
    queued right after submit() must not reach the file, and the second checkpoint reuses the first
    one's buffers (no fresh 16 GB a checkpoint)."""
    import threading

    import torch

    from hla_convert.stages import checkpoints

    path = tmp_path / "stage2.checkpoint.safetensors"
    release = threading.Event()
    real = checkpoints._write
    seen: list[dict[str, torch.Tensor]] = []

    def slow(p, flat, text):
        seen.append(flat)
        assert release.wait(30)
        return real(p, flat, text)

    monkeypatch.setattr(checkpoints, "_write", slow)
    w = torch.arange(4 << 20, dtype=torch.float32, device="cuda")  # 16 MB: the copy takes a while
    moment = w.cpu()
    writer = checkpoints.CheckpointWriter()
    writer.submit(path, {"param.w": w, "rng.torch": torch.get_rng_state()}, {"step": 1})
    for _ in range(20):  # the next steps, queued behind the copy on the same stream
        w.add_(1.0)
    release.set()
    writer.wait()
    tensors, _ = checkpoints.load_checkpoint(path)
    assert torch.equal(tensors["param.w"], moment)
    assert seen[0]["param.w"].is_pinned()
    moment = w.cpu()
    writer.submit(path, {"param.w": w, "rng.torch": torch.get_rng_state()}, {"step": 2})
    w.zero_()
    writer.wait()
    assert seen[1]["param.w"].data_ptr() == seen[0]["param.w"].data_ptr()  # the buffer reused
    tensors, state = checkpoints.load_checkpoint(path)
    assert torch.equal(tensors["param.w"], moment) and state == {"step": 2}
    writer.close()  # the stage's end: the buffers go
    assert not writer._buffers
