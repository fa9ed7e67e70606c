"""The output folder: --overwrite deletes only what hla-convert wrote (its manifest, its work folder),
never follows a symlink, one run per folder (the lock), a killed save is resumable."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hla_convert.io.output import check_output, start_run

from hla_convert.io.converted import read_output
from hla_convert.io.output_guard import LOCK_FILE, MANIFEST_FILE, OutputError, guarded_write, output_lock, write_manifest
from hla_convert.recipe import load_recipe
from helpers import assert_one_line_error, console_script, invoke

RUN = {"model": "m", "revision": None, "subfolder": None, "dtype": None, "recipe_sha256": "x"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def finished_folder(root: Path) -> Path:
    """A folder as a finished run leaves it: outputs listed in the manifest with their hashes."""
    out = root / "out"
    out.mkdir()
    files = {"README.md": "card", "adapter_model.safetensors": "weights", "recipe.yaml": "name: r\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    write_manifest(out, {name: [sha(text)] for name, text in files.items()})
    return out


def unfinished_work(out: Path) -> Path:
    work = out / ".hla_work"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"format": "hla-convert-run", **RUN}))
    (work / "stage1.checkpoint.safetensors").write_text("ckpt")
    return work


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory, fast_recipe) -> Path:
    """conftest's fast recipe at half the demo's frames (4: 256 tokens), 2 held-out samples and 1
    sampling step, for the tests here that run whole conversions to see what they leave in --out
    (the folder, the lock, the manifest), not what they train or measure."""
    path = tmp_path_factory.mktemp("small-recipe") / "small.yaml"
    fields = {"calibration.frames": 4, "calibration.heldout": 2, "validation.sampling_steps": 1}
    path.write_text(load_recipe(str(fast_recipe)).with_overrides(fields=fields).to_yaml())
    return path


# -- what --overwrite deletes -------------------------------------------------------------------


def test_overwrite_clears_only_listed_files_with_their_hash_and_the_identified_work_folder(tmp_path):
    out = finished_folder(tmp_path)
    unfinished_work(out)
    work = start_run(out, RUN, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".hla_work"]
    assert sorted(p.name for p in work.iterdir()) == ["run.json"]


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda out: (out / "README.md").write_text("my own notes"), "README.md (changed since hla-convert wrote it)"),
        (lambda out: (out / "notes.txt").write_text("mine"), "notes.txt (not written by hla-convert)"),
        (lambda out: (out / "drift_report.json").write_text("{}"), "drift_report.json (not written by hla-convert)"),
        (lambda out: ((out / ".notes.tmp").mkdir(), (out / ".notes.tmp" / "data.txt").write_text("d")), ".notes.tmp"),
        (lambda out: (out / ".adapter_model.safetensors.abc.tmp").write_text("x"), ".adapter_model.safetensors.abc.tmp"),
        (lambda out: ((out / ".hla_work").mkdir(), (out / ".hla_work" / "mine.txt").write_text("x")), ".hla_work (no run.json"),
        (lambda out: (out / MANIFEST_FILE).write_text("{}"), "not a manifest"),
    ],
)
def test_overwrite_refuses_anything_it_did_not_write_and_deletes_nothing(tmp_path, make, named):
    out = finished_folder(tmp_path)
    make(out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for attempt in (lambda: check_output(out, RUN, overwrite=True), lambda: start_run(out, RUN, overwrite=True)):
        with pytest.raises(OutputError, match="did not write") as err:
            attempt()
        assert named in str(err.value) and "\n" not in str(err.value)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_symlinks_are_refused_never_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.md").write_text("keep")
    unfinished_work(elsewhere)  # a valid work folder, but reached through a link
    for name, target in (("README.md", elsewhere / "precious.md"), (".hla_work", elsewhere / ".hla_work")):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / name).symlink_to(target)
        write_manifest(out, {"README.md": [sha("keep")]})  # even a manifest listing the target's hash
        with pytest.raises(OutputError, match=f"{name} \\(a symlink\\)"):
            start_run(out, RUN, overwrite=True)
    with pytest.raises(OutputError, match="symlink"):  # nor is a linked work folder resumed
        check_output(tmp_path / "out-.hla_work", RUN, resume=True)
    assert (elsewhere / "precious.md").read_text() == "keep"
    assert (elsewhere / ".hla_work" / "stage1.checkpoint.safetensors").is_file()


def test_a_folder_without_manifest_is_refused_with_the_reason(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("w")
    with pytest.raises(OutputError, match=f"no {MANIFEST_FILE}"):
        check_output(out, RUN, overwrite=True)


def test_a_manifest_with_a_duplicate_key_is_not_trusted(tmp_path):
    # the fresh hostile pass: a second "recipe.yaml" entry carrying the hash of an edited recipe
    # was read last-wins, so validate and push trusted the edit
    from hla_convert.io.output_guard import verify_files

    out = finished_folder(tmp_path)
    (out / "recipe.yaml").write_text("name: edited\n")
    listed = json.loads((out / MANIFEST_FILE).read_text())["files"]
    entries = [f'"{name}": {json.dumps(hashes)}' for name, hashes in listed.items()]
    entries.append(f'"recipe.yaml": ["{sha("name: edited" + chr(10))}"]')  # the same key again, last
    (out / MANIFEST_FILE).write_text('{"format": "hla-convert-output", "files": {' + ", ".join(entries) + "}}")
    with pytest.raises(OutputError, match="is not a manifest hla-convert wrote"):
        verify_files(out, ("recipe.yaml",))
    with pytest.raises(OutputError):  # nor does --overwrite take it as the list of what it may delete
        check_output(out, RUN, overwrite=True)
    assert (out / "recipe.yaml").read_text() == "name: edited\n"


def test_cli_overwrite_keeps_user_files_and_refuses_before_loading(tmp_path, fast_recipe):
    # the reproduction of the issue: both entries survive, the run stops before loading (one line)
    out = tmp_path / "o"
    (out / ".notes.tmp").mkdir(parents=True)
    (out / ".notes.tmp" / "data.txt").write_text("data")
    (out / "README.md").write_text("mine")
    result = invoke("convert", "--recipe", fast_recipe, "--out", out, "--overwrite", "--device", "cpu", "--json")
    line = assert_one_line_error(result, contains="did not write")
    assert ".notes.tmp" in line and "README.md" in line
    assert json.loads(result.stdout)["exit_code"] == 2
    assert (out / "README.md").read_text() == "mine" and (out / ".notes.tmp" / "data.txt").read_text() == "data"
    assert not (out / LOCK_FILE).exists()


# -- every write keeps the manifest rule --------------------------------------------------------


def test_guarded_write_replaces_only_unchanged_listed_files(tmp_path):
    out = finished_folder(tmp_path)
    guarded_write(out, "recipe.yaml", b"name: new\n")  # listed, unchanged: replaced
    guarded_write(out, "hla_config.json", b"{}")  # not there: written
    (out / "README.md").write_text("my edits")  # listed, changed since
    (out / "sample.png").write_bytes(b"my picture")  # never written by the tool
    for name in ("README.md", "sample.png"):
        with pytest.raises(OutputError, match=f"{name} .*move them away"):
            guarded_write(out, name, b"tool")
    assert (out / "README.md").read_text() == "my edits" and (out / "sample.png").read_bytes() == b"my picture"


def test_resume_refuses_outputs_put_into_the_folder_while_it_was_stopped(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    unfinished_work(out)
    check_output(out, RUN, resume=True)  # nothing of the user's there: fine
    (out / "recipe.yaml").write_text("mine")
    with pytest.raises(OutputError, match="recipe.yaml .*--resume"):
        check_output(out, RUN, resume=True)
    assert (out / "recipe.yaml").read_text() == "mine"


def test_a_readme_written_into_out_while_it_trains_is_kept_and_resume_finishes(tmp_path, small_recipe, monkeypatch):
    from hla_convert.stages import distill

    out = tmp_path / "o"
    real = distill.distil

    def user_writes_meanwhile(*args, **kwargs):
        (out / "README.md").write_text("my notes")
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "distil", user_writes_meanwhile)
    result = invoke("convert", "--recipe", small_recipe, "--out", out, "--device", "cpu")
    assert result.exit_code == 2 and "Traceback" not in result.stderr  # after the progress lines: one error line
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("hla-convert: error: ") and "README.md (not written by hla-convert)" in line and "--resume" in line
    assert (out / "README.md").read_text() == "my notes" and not (out / "adapter_model.safetensors").exists()
    monkeypatch.setattr(distill, "distil", real)
    (out / "README.md").rename(tmp_path / "notes.md")
    assert invoke("convert", "--recipe", small_recipe, "--out", out, "--device", "cpu", "--resume").exit_code == 0
    assert not (out / ".hla_work").exists() and read_output(out)


def test_a_missing_calibration_path_is_refused_before_overwrite_deletes_anything(tmp_path, fast_recipe):
    out = finished_folder(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    recipe = tmp_path / "folder.yaml"
    recipe.write_text(load_recipe(str(fast_recipe)).with_overrides(source="folder", path=str(tmp_path / "nowhere")).to_yaml())
    line = assert_one_line_error(invoke("convert", "--recipe", recipe, "--out", out, "--overwrite", "--device", "cpu"), contains="calibration.path")
    assert "nowhere" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_lora_rank_past_the_targets_features_is_refused_before_overwrite_deletes_anything(tmp_path, fast_recipe):
    out = finished_folder(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    recipe = tmp_path / "rank.yaml"
    recipe.write_text(load_recipe(str(fast_recipe)).with_overrides(fields={"stage2.lora_rank": 200}).to_yaml())
    result = invoke("convert", "--recipe", recipe, "--out", out, "--overwrite", "--device", "cpu")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the load's progress line
    assert line.startswith("hla-convert: error: ") and "stage2.lora_rank: must be at most 128" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- --out that cannot be written ---------------------------------------------------------------


def test_unwritable_out_is_bad_input_before_loading(tmp_path, fast_recipe):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", tmp_path / "afile" / "out"), contains="cannot be created")
    assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", "/proc/hla-convert-test"), contains="--out")
    assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", tmp_path / "afile"), contains="not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_out_is_bad_input(tmp_path, fast_recipe):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", ro / "out"), contains="--out")
        assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", ro), contains="not writable")
    finally:
        ro.chmod(0o700)


# -- the lock ---------------------------------------------------------------------------------


def _write_lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": None}))


def test_a_live_lock_is_refused_and_a_dead_one_taken_over(tmp_path, fast_recipe):
    out = tmp_path / "o"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, sleeper.pid)
        line = assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", out), contains="in use by another")
        assert f"pid {sleeper.pid}" in line and LOCK_FILE in line
        assert (out / LOCK_FILE).exists()  # someone else's lock stays
    finally:
        sleeper.kill()
        sleeper.wait()
    with output_lock(out):  # the process is gone: its lock is stale
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()
    _write_lock(tmp_path / "other", 1, host="another-host")  # cannot be checked from here: kept
    with pytest.raises(OutputError, match="pid 1 on another-host"):
        with output_lock(tmp_path / "other"):
            pass


def test_a_second_run_cannot_take_the_folder_mid_run(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; from pathlib import Path; from hla_convert.io.output_guard import output_lock\n"
         f"with output_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            with output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()


# -- a save killed half-way ---------------------------------------------------------------------


def test_a_killed_save_is_listed_resumable_and_validate_points_to_resume(tmp_path, small_recipe, monkeypatch):
    import hla_convert.io.output as output

    out = tmp_path / "o"
    real = output.write_manifest
    calls = []

    def killed_after_the_renames(*args, **kwargs):  # the second manifest write follows the renames
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(output, "write_manifest", killed_after_the_renames)
    stopped = invoke("convert", "--recipe", small_recipe, "--out", out, "--device", "cpu")
    assert stopped.exit_code == 130, stopped.stderr
    monkeypatch.setattr(output, "write_manifest", real)
    assert (out / "adapter_model.safetensors").is_file() and (out / ".hla_work").is_dir()
    assert_one_line_error(invoke("validate", out, "--device", "cpu"), contains="--resume")
    with pytest.raises(OutputError, match="--resume"):
        read_output(out)
    check_output(out, RUN, overwrite=True)  # every file there is listed: --overwrite may clear it
    resumed = invoke("convert", "--recipe", small_recipe, "--out", out, "--device", "cpu", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert not (out / ".hla_work").exists()
    assert invoke("validate", out, "--device", "cpu").exit_code == 0


def test_odd_locks_are_refused_without_reading_them_whole(tmp_path):
    for name, make in (
        ("garbage", lambda p: p.write_text("not json")),
        ("folder", lambda p: p.mkdir()),
        ("link", lambda p: p.symlink_to("/dev/zero")),
    ):
        out = tmp_path / name
        out.mkdir()
        make(out / LOCK_FILE)
        with pytest.raises(OutputError, match="in use by another hla-convert run"):
            with output_lock(out):
                pass
        assert (out / LOCK_FILE).exists() or (out / LOCK_FILE).is_symlink()


def test_validate_waits_for_a_running_conversion(tmp_path):
    out = finished_folder(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": None}))
        with pytest.raises(OutputError, match=f"being written by a running hla-convert \\(pid {sleeper.pid}"):
            read_output(out)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_a_kill_9_leaves_a_stale_lock_that_resume_takes_over(tmp_path, small_recipe):
    import signal
    import time

    out = tmp_path / "o"
    proc = subprocess.Popen([console_script(), "convert", "--recipe", str(small_recipe), "--out", str(out), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / ".hla_work" / "stage1.checkpoint.safetensors").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    if not (out / LOCK_FILE).exists():
        pytest.skip("the run finished before it could be killed")
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by the kill
    resumed = invoke("convert", "--recipe", small_recipe, "--out", out, "--device", "cpu", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert not (out / LOCK_FILE).exists() and not (out / ".hla_work").exists()


def test_work_files_nested_past_the_recursion_limit_are_bad_input_not_a_crash(tmp_path):
    # issue 18: JSON nested 100,000 deep made json.loads raise RecursionError (exit 3)
    from hla_convert.io.output_guard import LOCK_FILE, OutputError, lock_holder, read_run_file

    deep = "[" * 100_000 + "]" * 100_000
    work = tmp_path / ".hla_work"
    work.mkdir()
    (work / "run.json").write_text(deep)
    with pytest.raises(OutputError, match="is unreadable"):
        read_run_file(work)
    (tmp_path / LOCK_FILE).write_text(deep)
    assert lock_holder(tmp_path) == "an unreadable lock"
