"""What the command line shows: progress on stderr (StageProgress, the adapter from
hla_convert.conversion's progress events to Rich bars or plain log lines) and the tables on stdout."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


class _StdoutConsole(Console):
    """Rich ends the process with exit 1 when stdout's reader has gone (`hla-convert recipes | head -1`);
    here the rest of the output is dropped quietly and the command's own exit code stands
    (run.write_stdout says why)."""

    def on_broken_pipe(self) -> None:  # noqa: D102
        from .run import silence_stdout

        self.quiet = True
        silence_stdout()


def stdout_console() -> Console:
    return _StdoutConsole(highlight=False, soft_wrap=False)


class _StopAfterSteps(KeyboardInterrupt):
    """--stop-after-steps (tests): the same path as a Ctrl-C or a killed run."""


# -- progress -------------------------------------------------------------------------------------

_ENGINE_STAGES = {
    "calibration": "calibration inputs",
    "init": "initialise feature maps",
    "stage1": "attention transfer",
    "stage2": "output distillation",
    "stage3": "on-policy distillation",
    "drift": "held-out drift",
}


_TRAINING = ("stage1", "stage2", "stage3")  # the sub-stages that count towards stop_after_steps

# What of the engine's progress info fits on a bar's line.
_SHOWN_INFO = ("loss", "split", "sampling")


class StageProgress:
    """Progress on stderr: one Rich bar per stage and per engine sub-stage on a terminal; plain
    lines (each stage's end, training every ~10%) where stderr is a log file or a CI pipe, since a
    live display there shows nothing until the end.

    Called with hla_convert.conversion's ProgressEvents (`convert`, `validate`), or used through
    `stage(name)` and `callback(stage, step, total, info)` (the engine's progress signature).
    stop_after_steps (tests) raises a KeyboardInterrupt once that many training steps (stages 1 to
    3) have run: the same path as a Ctrl-C or a killed run.
    """

    def __init__(self, console: Console, stop_after_steps: int | None = None):
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description:<26}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=not self.live,
        )
        self.seconds: dict[str, float] = {}
        self._sub: dict[str, int] = {}
        self._stages: dict[str, int] = {}
        self._logged: dict[str, int] = {}
        self._train_steps: dict[str, int] = {}
        self.stop_after_steps = stop_after_steps

    def __enter__(self) -> "StageProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, event: Any) -> None:
        """A hla_convert.conversion.ProgressEvent: a stage's start or end, or an engine step."""
        if event.kind == "start":
            self._stages[event.stage] = self.progress.add_task(event.stage, total=1, info="")
        elif event.kind == "end":
            self._end(self._stages.pop(event.stage), event.stage, event.seconds)
        else:
            self.callback(event.stage, event.step, event.total, event.info)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        task = self.progress.add_task(name, total=1, info="")
        start = time.perf_counter()
        yield
        self._end(task, name, round(time.perf_counter() - start, 3))

    def _end(self, task: int, name: str, seconds: float) -> None:
        self.seconds[name] = seconds
        self.progress.update(task, completed=1, info=f"{seconds:.1f}s")
        if not self.live:
            self.console.print(f"{name}: done in {seconds:.1f}s")

    def callback(self, stage: str, step: int, total: int, info: dict[str, Any] | None = None) -> None:
        label = _ENGINE_STAGES.get(stage, stage)
        total = max(int(total or 1), 1)
        text = " ".join(f"{k} {_short(v)}" for k, v in (info or {}).items() if k in _SHOWN_INFO)
        task = self._sub.get(stage)
        if task is None:
            task = self._sub[stage] = self.progress.add_task("  " + label, total=total, info="")
        self.progress.update(task, completed=step, total=total, info=text)
        if not self.live and stage in _TRAINING:
            tenth = step * 10 // total
            if tenth > self._logged.get(stage, 0) or step == total:
                self._logged[stage] = tenth
                self.console.print(f"  {label}: step {step}/{total} {text}")
        if stage in _TRAINING:
            self._train_steps[stage] = step
            if self.stop_after_steps is not None and sum(self._train_steps.values()) >= self.stop_after_steps:
                raise _StopAfterSteps()


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- rendering ------------------------------------------------------------------------------------

def drift_table(report: dict[str, Any], saved: dict[str, Any] | None = None) -> Table:
    """The drift report as a table; `saved` adds the values measured at convert time (validate)."""
    from ..io.model_card import drift_rows

    table = Table(title="Output drift (held-out)", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if saved is not None:
        table.add_column("at convert", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("")
    before = {m: v for m, v, _, _ in drift_rows(saved)} if saved else {}
    for metric, value, limit, verdict in drift_rows(report):
        style = "red" if verdict == "FAIL" else "green" if verdict == "pass" else ""
        cells = [metric, value] + ([before.get(metric, "-")] if saved is not None else []) + [limit, verdict]
        table.add_row(*cells, style=style)
    return table


def print_verdict(con: Console, report: dict[str, Any]) -> None:
    if report.get("passed"):
        con.print("[green]drift within the recipe's thresholds[/green]")
        return
    failures = report.get("failures") or []
    con.print(f"[red]drift over the recipe's thresholds ({len(failures)} check(s) failed):[/red]")
    for failure in failures:
        con.print(f"  - {failure}", highlight=False)


def print_inspection(r: dict[str, Any]) -> None:
    con = stdout_console()
    v = r["video"]
    con.print(f"[bold]{r['model']}[/bold] ({r['class']}), recipe [bold]{r['recipe']}[/bold]")
    con.print(
        f"video {v['frames']} x {v['height']} x {v['width']} px -> latent {' x '.join(map(str, v['latent']))} "
        f"-> {r['tokens']:,} tokens per self-attention"
        + (f" (+ {r['text_tokens']} text tokens in joint attention)" if r.get("text_tokens") else "")
    )
    w = r.get("window")
    if w:
        halo = f" + halo {' x '.join(map(str, w['halo']))}" if any(w["halo"]) else ""
        con.print(
            f"softmax window: {w['asked'].replace('=', ' ')} -> {' x '.join(map(str, w['box']))} tokens (frames x height x width) of the "
            f"{' x '.join(map(str, w['grid']))} latent grid{halo}: {w['keys']:,} video keys a query ({100 * w['share']:.1f} %)"
        )
    table = Table(title="Attention modules", title_justify="left")
    table.add_column("module", no_wrap=True, min_width=max(len(m["name"]) for m in r["modules"]))
    for col, just in (("type", "left"), ("heads x dim", "right"), ("converts to", "left"), ("GFLOP before", "right"), ("GFLOP after", "right")):
        table.add_column(col, justify=just)
    for m in r["modules"]:
        table.add_row(
            m["name"],
            m["type"],
            f"{m['heads']} x {m['head_dim']}",
            m["converts_to"] or "-",
            gflops(m["flops_before"]),
            gflops(m["flops_after"]),
        )
    con.print(table)
    f = r["flops"]
    con.print(
        f"self-attention FLOPs per forward: {gflops(f['before'])} G softmax -> {gflops(f['after'])} G converted "
        f"({f['speedup']:.1f}x fewer); {len(r['converted'])} of {len(r['modules'])} attention modules convert"
    )


def gflops(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:,.3f}"
