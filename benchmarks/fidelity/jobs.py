"""The fidelity benchmark's runs N at a time (run.py --jobs N): a scheduler of worker processes.

Why: a benchmark model this small (15 blocks, 4,096 tokens) is bound by kernel launches, so one run
leaves the GPU mostly idle; eight runs at once on one H100 kept it at 100 % and finished eight runs
in ~500 s instead of ~8 x 4 min (docs/comparison.md, "Fifth run").

Each (model, config, seed) run is one worker: `run.py` with the caller's arguments and that one
run (`--models m --configs c --seeds s --jobs 1`), writing its record to its own file
(`--record-to`, internal). Its conversion folder is the one `--jobs 1` uses
(<conversions-dir>/<model>-<config>-seed<seed>), so either mode's `--resume` continues the other's
cut-off conversions. The parent alone appends to --out: a worker's record is appended (env.command
set to the caller's command) as the worker ends; no two processes write the file.

Each worker's stdout and stderr lines are printed prefixed with `[model config seed]` and written
whole to <out>-logs/<model>-<config>-seed<seed>.log. A worker that exits without a record (a crash:
segfault, OOM kill, an import error) gives a record with status "error" and one line (its exit
status and last output line), as a failing run does.

--stop-after-minutes: no run is started once `elapsed + longest worker so far` passes the limit;
running ones finish. SIGTERM / Ctrl-C: the workers are terminated, no record is written for them,
and their conversion folders keep the last checkpoint for --resume; the parent returns 130.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Run = tuple  # (model, config, seed)


@dataclass
class Worker:
    """One running worker process and what the parent keeps of it (the last output lines)."""

    run: Run
    proc: subprocess.Popen
    record_file: Path
    log_file: Path
    started: float
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    reader: threading.Thread | None = None


def run_name(run: Run) -> str:
    model, config, seed = run
    return f"{model}-{config}-seed{seed}"


def _pump(w: Worker, prefix: str, lock: threading.Lock) -> None:
    """Copy a worker's output lines to our stdout (prefixed) and to its log file, keeping the tail."""
    with open(w.log_file, "w") as log:
        for line in w.proc.stdout:
            line = line.rstrip("\n")
            w.tail.append(line)
            log.write(line + "\n")
            log.flush()
            with lock:
                print(f"{prefix} {line}", flush=True)


def _last_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def crash_line(returncode: int, tail) -> str:
    """One line for a worker that ended without a record: its exit status and last output line."""
    status = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    last = next((ln.strip() for ln in reversed(tail) if ln.strip()), "no output")
    return f"worker: {status}: {last}"


def run_grid(
    runs: list[Run],
    jobs: int,
    out: Path,
    worker_cmd: Callable[[Run, Path], list[str]],
    error_fields: Callable[[Run], dict],
    append: Callable[[Path, dict], None],
    command: str,
    threads: int | None = None,
    stop_after_minutes: float | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> int:
    """Run `runs` (model, config, seed) by up to `jobs` worker processes at once; 0, or 130 interrupted.

    worker_cmd(run, record_file): the worker's command line (it writes its one record to
    record_file). error_fields(run): the fields of an error record for a worker that crashed.
    append(out, record): how a record goes into --out (the parent's only writer). threads: each
    worker's OMP/MKL threads (default: the CPU cores shared out, at least 1). on_record: called
    with each record appended (the progress line).
    """
    work = out.parent / (out.with_suffix("").name + "-jobs")
    logs = out.parent / (out.with_suffix("").name + "-logs")
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    n_threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(n_threads), "MKL_NUM_THREADS": str(n_threads), "PYTHONUNBUFFERED": "1"}
    pending = collections.deque(runs)
    running: list[Worker] = []
    lock = threading.Lock()
    t_start = time.time()
    longest = 0.0
    finished = 0

    def interrupt(signum, frame):  # SIGTERM (a caller's time limit) ends us as Ctrl-C does
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, interrupt) if in_main else None
    try:
        while pending or running:
            while pending and len(running) < jobs:
                elapsed = time.time() - t_start
                if stop_after_minutes is not None and elapsed + longest > stop_after_minutes * 60:
                    with lock:
                        print(f"stopping: {elapsed:.0f}s used, the next run may take {longest:.0f}s (--stop-after-minutes); "
                              f"{len(pending)} not started; --resume continues", flush=True)  # fmt: skip
                    pending.clear()
                    break
                run = pending.popleft()
                record_file = work / f"{run_name(run)}.jsonl"
                record_file.unlink(missing_ok=True)
                proc = subprocess.Popen(
                    worker_cmd(run, record_file), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
                )  # fmt: skip
                w = Worker(run, proc, record_file, logs / f"{run_name(run)}.log", time.time())
                w.reader = threading.Thread(target=_pump, args=(w, f"[{' '.join(map(str, run))}]", lock), daemon=True)
                w.reader.start()
                running.append(w)
            done = [w for w in running if w.proc.poll() is not None]
            if not done:
                time.sleep(0.1)
                continue
            for w in done:
                running.remove(w)
                w.reader.join()
                wall = time.time() - w.started
                longest = max(longest, wall)
                record = _last_record(w.record_file)
                if record is None:
                    record = {**error_fields(w.run), "status": "error", "error": crash_line(w.proc.returncode, w.tail), "seconds": {"total": round(wall, 3)}}
                record.setdefault("env", {})["command"] = command
                record["worker"] = {"log": str(w.log_file), "wall_seconds": round(wall, 3), "jobs": jobs}
                append(out, record)
                w.record_file.unlink(missing_ok=True)
                finished += 1
                if on_record is not None:
                    with lock:
                        on_record(record)
                        left = len(pending) + len(running)
                        print(f"  {finished}/{len(runs)} runs in {time.time() - t_start:.0f}s, {len(running)} running, {left} left", flush=True)
        return 0
    except KeyboardInterrupt:
        # a second signal while the workers are stopped (2026-12-07: `timeout` signals the whole process
        # group, and the handler above raised again inside terminate()) would cut this cleanup short
        # with a traceback and leave workers running: the cleanup finishes first
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for w in running:
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in running:
            try:
                w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        names = ", ".join(run_name(w.run) for w in running) or "none"
        print(f"interrupted: cut off {names}; --resume continues them from their checkpoints", file=sys.stderr, flush=True)
        if in_main:
            signal.signal(signal.SIGINT, old_int)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
