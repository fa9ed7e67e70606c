"""What in an output folder belongs to hla-convert, and one run per folder at a time.

- The manifest (`.hla-convert-manifest.json`) lists every file a run put in the folder with its
  sha256. `--overwrite` deletes a file only when the manifest lists it and its content still has
  that hash; anything else in the folder (a user's file, a file changed since, a symlink, an
  unknown dot-entry) makes the run refuse before it loads the model, naming the entries.
- Every write into an output folder goes through `check_replaceable` (up front, before the long
  work, for the files a command will write) and `guarded_write` / `check_replaceable` again at
  write time (for files that appeared meanwhile): a file is replaced only when the manifest lists
  it with its content's hash unchanged; a user's own file (a README.md they edited or put there
  while a run went on, a sample.png) makes the command refuse, naming it, and nothing is written.
- The work folder `.hla_work/` is recognised by its identity file (`run.json`, written by the run),
  never by its name alone; a symlink is never followed, whatever its name.
- The lock (`.hla-convert.lock`, created with O_EXCL, holding pid, host and the process start time)
  keeps a second run off a folder while one runs; the lock of a process that no longer exists is
  taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..atomic_files import atomic_write_bytes
from ..errors import OutputError  # noqa: F401 - its home is errors (stages.parallel raises it too)

MANIFEST_FILE = ".hla-convert-manifest.json"
MANIFEST_FORMAT = "hla-convert-output"
LOCK_FILE = ".hla-convert.lock"
WORK_DIR = ".hla_work"
RUN_FILE = "run.json"
RUN_FORMAT = "hla-convert-run"
# the outputs beside the adapter (io.adapter ADAPTER_FILE, CONFIG_FILE): io.output writes them
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "drift_report.json"
CARD_FILE = "README.md"
# The keys of run.json as written before it carried "format": still recognised as a work folder.
_LEGACY_RUN_KEYS = {"model", "revision", "subfolder", "dtype", "recipe_sha256"}
_MAX_MANIFEST_BYTES = 1 << 20
_SHOWN = 4  # entries named in a refusal before "and N more"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- the manifest ------------------------------------------------------------------------------


def read_manifest(out: Path) -> dict[str, list[str]] | None:
    """name -> accepted sha256 list of the files the tool wrote, or None when there is no
    (readable, regular-file) manifest."""
    path = out / MANIFEST_FILE
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_BYTES:
        return None
    from ..json_docs import loads_strict

    try:  # a key given twice is not what the tool wrote: json.loads would keep the last silently
        doc = loads_strict(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested past Python's limit
        return None
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, dict):
        return None
    clean: dict[str, list[str]] = {}
    for name, hashes in files.items():
        hashes = [hashes] if isinstance(hashes, str) else hashes
        if _plain_name(name) and isinstance(hashes, list) and all(isinstance(h, str) for h in hashes):
            clean[name] = hashes
    return clean


def verify_files(out: Path, names: tuple[str, ...], require_manifest: bool = False) -> None:
    """Refuse (OutputError naming the file) any of `names` in `out` whose content is not what the
    manifest lists: what `validate` and `push` trust (adapter, config, recipe, drift report) must be
    as the run wrote it, so an edited drift_report.json ("passed": true) is not believed.

    A manifest that is there but unreadable, or that does not list a file that is there, is
    refused as well. A folder with no manifest at all is a conversion downloaded from the Hub (the
    repository, not the manifest, vouches for it) or one written before the manifest existed: its
    files are not checked, unless `require_manifest` (push: it publishes only what it can verify).
    """
    manifest = read_manifest(out)
    if manifest is None:
        if (out / MANIFEST_FILE).exists() or (out / MANIFEST_FILE).is_symlink():
            raise OutputError(f"{out / MANIFEST_FILE} is not a manifest hla-convert wrote; run the conversion again")
        if require_manifest:
            raise OutputError(
                f"{out} has no {MANIFEST_FILE}: its files cannot be checked against what the run wrote; run the conversion again"
            )
        return
    for name in names:
        path = out / name
        if not path.is_file():
            continue  # a missing file is the caller's to report, in its own words
        if name not in manifest:
            raise OutputError(f"{path} is not listed in {MANIFEST_FILE}: not written by this conversion; run it again")
        if sha256_file(path) not in manifest[name]:
            raise OutputError(
                f"{path} was changed since hla-convert wrote it (its sha256 is not the one {MANIFEST_FILE} lists); "
                "restore it or run the conversion again"
            )


# Subfolders an output folder may hold: one per further expert of a two-expert pipeline
# (model.experts), each with that expert's adapter files; the manifest lists them as "SUB/NAME".
SUBFOLDERS = ("transformer_2",)


def _plain_name(name: Any) -> bool:
    """A file name directly in the folder, or in one of its SUBFOLDERS ("transformer_2/NAME"): no
    other separators, no '.', '..', nothing the tool never writes."""
    if isinstance(name, str) and name.count("/") == 1 and name.split("/")[0] in SUBFOLDERS:
        name = name.split("/")[1]
    return isinstance(name, str) and name not in ("", ".", "..", MANIFEST_FILE, LOCK_FILE, WORK_DIR) and "/" not in name and "\0" not in name and os.sep not in name


def write_manifest(out: Path, files: dict[str, list[str]], staging: Path | None = None) -> None:
    """Write the manifest atomically; through `staging` (a folder on the same file system) so that
    no temporary file ever sits in `out` itself."""
    data = (json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2, sort_keys=True) + "\n").encode()
    if staging is None:
        atomic_write_bytes(out / MANIFEST_FILE, data)
        return
    atomic_write_bytes(staging / MANIFEST_FILE, data)
    os.replace(staging / MANIFEST_FILE, out / MANIFEST_FILE)


# -- the work folder ---------------------------------------------------------------------------


def read_run_file(work: Path) -> dict[str, Any] | None:
    """The identity in work/run.json when `work` is a real folder (not a symlink) holding a regular
    run.json written by hla-convert; None when there is none. Unreadable -> OutputError."""
    try:
        if not stat.S_ISDIR(work.lstat().st_mode):
            return None
        st = (work / RUN_FILE).lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_BYTES:
        return None
    try:
        doc = json.loads((work / RUN_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested past Python's limit
        raise OutputError(f"{work / RUN_FILE} is unreadable ({type(exc).__name__}); start the run again in an empty folder") from None
    if not isinstance(doc, dict):
        return None
    if doc.get("format") == RUN_FORMAT or set(doc) == _LEGACY_RUN_KEYS:
        return {k: v for k, v in doc.items() if k != "format"}
    return None


def run_file_content(run: dict[str, Any]) -> dict[str, Any]:
    return {"format": RUN_FORMAT, **run}


# -- what in a folder is ours ------------------------------------------------------------------


def foreign_entries(out: Path) -> list[str]:
    """Entries of `out` that hla-convert did not write (or that changed since), each with why.

    Ours: the manifest, the lock, a work folder with its identity file, and files the manifest
    lists whose content still has the listed hash. Symlinks are never ours.
    """
    manifest = read_manifest(out) or {}
    problems = []
    with os.scandir(out) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = entry.name
        if entry.is_symlink():
            problems.append(f"{name} (a symlink)")
        elif name == LOCK_FILE and entry.is_file(follow_symlinks=False):
            continue
        elif name == MANIFEST_FILE:
            if read_manifest(out) is None:
                problems.append(f"{name} (not a manifest hla-convert wrote)")
        elif name == WORK_DIR:
            try:
                ours = read_run_file(out / name) is not None
            except OutputError:
                ours = False
            if not ours:
                problems.append(f"{name} (no run.json of hla-convert in it)")
        elif name in SUBFOLDERS and entry.is_dir(follow_symlinks=False):
            with os.scandir(out / name) as inner:
                problems += _foreign_files(out, [f"{name}/{e.name}" for e in inner], manifest)
        elif not entry.is_file(follow_symlinks=False):
            problems.append(f"{name} (not written by hla-convert)")
        elif name not in manifest:
            problems.append(f"{name} (not written by hla-convert)")
        elif sha256_file(out / name) not in manifest[name]:
            problems.append(f"{name} (changed since hla-convert wrote it)")
    return problems


def _foreign_files(out: Path, names: list[str], manifest: dict[str, list[str]]) -> list[str]:
    """Those of `names` (paths in `out`) that are not regular files the manifest lists unchanged."""
    problems = []
    for name in sorted(names):
        path = out / name
        if path.is_symlink():
            problems.append(f"{name} (a symlink)")
        elif not path.is_file() or name not in manifest:
            problems.append(f"{name} (not written by hla-convert)")
        elif sha256_file(path) not in manifest[name]:
            problems.append(f"{name} (changed since hla-convert wrote it)")
    return problems


def unreplaceable(out: Path, names: list[str] | tuple[str, ...]) -> list[str]:
    """Those of `names` that exist in `out` and that hla-convert may not replace, each with why:
    not listed in the manifest, changed since it was written, or not a regular file."""
    manifest = read_manifest(out) or {}
    problems = []
    for name in names:
        path = out / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            problems.append(f"{name} (a symlink)")
        elif not stat.S_ISREG(st.st_mode):
            problems.append(f"{name} (not a regular file)")
        elif name not in manifest:
            problems.append(f"{name} (not written by hla-convert)")
        elif sha256_file(path) not in manifest[name]:
            problems.append(f"{name} (changed since hla-convert wrote it)")
    return problems


def check_replaceable(out: Path, names: list[str] | tuple[str, ...], then: str = "then run the command again") -> None:
    """Refuse (OutputError, one line) to write any of `names` into `out` when one of them exists
    and is not hla-convert's own unchanged file: the manifest rule of --overwrite, for every write."""
    problems = unreplaceable(Path(out), names)
    if problems:
        raise OutputError(f"{out} holds files hla-convert would replace but did not write: {describe(problems)}; move them away, {then}")


def guarded_write(out: Path, name: str, data: bytes, then: str = "then run the command again") -> Path:
    """Write `data` as out/name atomically, after check_replaceable([name]); the caller holds the lock."""
    check_replaceable(out, [name], then)
    return atomic_write_bytes(Path(out) / name, data)


def describe(entries: list[str]) -> str:
    shown = ", ".join(entries[:_SHOWN])
    return shown + (f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else "")


def clear_ours(out: Path) -> None:
    """Delete what hla-convert wrote in `out` (foreign_entries must be empty); the manifest goes
    last, so a run killed while clearing leaves only files it still lists."""
    import shutil

    problems = foreign_entries(out)
    if problems:
        raise OutputError(f"--out {out} holds entries hla-convert did not write: {describe(problems)}; refusing to overwrite it")
    manifest = read_manifest(out) or {}
    for name in sorted(manifest):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / name)
    for sub in SUBFOLDERS:  # emptied above (foreign_entries: only listed files in it)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            (out / sub).rmdir()
    work = out / WORK_DIR
    if work.exists() and not work.is_symlink():
        shutil.rmtree(work)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / MANIFEST_FILE)


# -- the lock ----------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()[19] if ")" in text else None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return not (started and now and now != started)


def _lock_content() -> bytes:
    pid = os.getpid()
    return json.dumps({"pid": pid, "host": socket.gethostname(), "started": _start_time(pid)}).encode()


def _create_lock(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        os.write(fd, _lock_content())
    finally:
        os.close(fd)


def _stale(path: Path) -> tuple[bool, str]:
    """(is the lock at `path` left by a process that is gone, who holds it in words)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            raw = os.read(fd, 4096)  # a lock is a few dozen bytes: never read a whole odd file
        finally:
            os.close(fd)
        holder = json.loads(raw.decode("utf-8"))
        pid, host, started = int(holder["pid"]), str(holder["host"]), holder.get("started")
    except FileNotFoundError:
        return True, "nobody"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False, "an unreadable lock"
    who = f"pid {pid} on {host}"
    if host != socket.gethostname():
        return False, who  # another machine's process: it cannot be checked from here
    if pid == os.getpid():
        return True, who  # a lock this process left (a container that reuses its pid)
    return not _alive(pid, started), who


def lock_holder(out: Path) -> str | None:
    """Who holds `out`'s lock, in words ("pid 123 on host"), or None when no live run holds it."""
    path = out / LOCK_FILE
    if not path.is_file() or path.is_symlink():
        return None
    stale, who = _stale(path)
    return None if stale else who


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `out`'s lock while the block runs: create `out` when missing (removed again on the way
    out if it is still empty), refuse a folder that cannot be written and one another live run holds."""
    created = False
    try:
        if not out.is_dir():
            if out.exists() or out.is_symlink():
                raise OutputError(f"--out {out} exists and is not a folder")
            out.mkdir(parents=True)
            created = True
    except (OSError, ValueError) as exc:
        raise OutputError(f"--out {out} cannot be created ({_reason(exc)})") from None
    except RecursionError:  # pathlib creates missing parents recursively, one frame per folder
        raise OutputError(f"--out {out} cannot be created (more missing parent folders than Python can nest)") from None
    path = out / LOCK_FILE
    try:
        try:
            _create_lock(path)
        except FileExistsError:
            stale, who = _stale(path)
            if not stale:
                raise OutputError(
                    f"--out {out} is in use by another hla-convert run ({who}, lock {path}); wait for it, "
                    "or delete the lock if that run is gone"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            try:
                _create_lock(path)
            except FileExistsError:
                raise OutputError(f"--out {out} is in use by another hla-convert run (lock {path})") from None
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise OutputError(f"--out {out} is not writable ({_reason(exc)})") from None
    except OutputError:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: a run that wrote nothing leaves nothing


def _reason(exc: Exception) -> str:
    code = getattr(exc, "errno", None)
    return os.strerror(code) if code else str(exc) or type(exc).__name__


__all__ = [
    "OutputError",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "WORK_DIR",
    "check_replaceable",
    "clear_ours",
    "foreign_entries",
    "guarded_write",
    "lock_holder",
    "output_lock",
    "read_manifest",
    "read_run_file",
    "sha256_file",
    "unreplaceable",
    "verify_files",
    "write_manifest",
]
