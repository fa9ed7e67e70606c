"""The `hla-convert` command line: parse, call the stages in order, render progress and tables.

Every command shares these exit codes (EXIT_* below), so scripts can trust them:

    0  ok
    1  drift: the converted model's output drift is over the recipe's thresholds
    2  bad input: usage, unknown recipe or recipe field, unknown or unreachable model, an --out
       that cannot be used, a corrupt or mismatched adapter or checkpoint
    3  the run failed: training diverged (NaN/inf loss: the checkpoints so far stay in
       DIR/.hla_work; change the recipe and run again) or the model could not run (fix the cause,
       then `--resume` continues from the last checkpoint)
    130 interrupted (Ctrl-C, SIGTERM); `--resume` continues from the last checkpoint

Errors are one line on stderr (prefix "hla-convert: error:"), never a traceback; set
HLA_CONVERT_DEBUG=1 to get the traceback of a failed run. Progress goes to stderr, tables and
`--json` documents to stdout (with `--json`, stdout holds that one document and nothing else).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException, UsageError

from .cli_checks import EXIT_BAD_INPUT, CommandFailed
from .cli_checks import check_device as _check_device
from .cli_checks import check_model_path as _check_model_path
from .cli_checks import check_recorded_base as _check_recorded_base
from .cli_checks import folder_arg as _folder_arg
from .cli_checks import hub_notice as _hub_notice
from .cli_checks import note_sampling as _note_sampling
from .cli_checks import shown as _shown

EXIT_OK = 0
EXIT_DRIFT = 1
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130

DEMO_RECIPE = "tiny-wan"

_EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 drift over the recipe's thresholds; 2 bad input (usage, recipe, model, "
    "--out, adapter); 3 the run failed (training diverged, or the model could not run); 130 interrupted "
    "(--resume continues from the last checkpoint)."
)


class _Group(TyperGroup):
    """Usage errors as one line and exit 2 (click's own code), like every other bad input; with
    --json anywhere on the command line, also as the one JSON document on stdout."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        words = [str(a) for a in (sys.argv[1:] if args is None else args)]
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx is not None else "hla-convert"
            message = exc.format_message()
            if message:  # empty when the help was shown for a bare `hla-convert`
                message = _clip(f"{message} (see {cmd} --help)")
                _error_line(message)
            code = EXIT_BAD_INPUT
            _usage_document(words, exc.ctx, code, message or "no command given")
        except ClickException as exc:
            _error_line(_clip(exc.format_message()))
            code = exc.exit_code
            _usage_document(words, None, code, _clip(exc.format_message()))
        except typer.Abort:
            _error_line("interrupted")
            code = EXIT_INTERRUPTED
            _usage_document(words, None, code, "interrupted")
        code = code if isinstance(code, int) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return code


def _usage_document(words: list[str], ctx: Any, code: int, message: str) -> None:
    """The --json document of a command line that never reached its command (click refused it)."""
    if "--json" not in words or "--help" in words:
        return
    command = ctx.info_name if ctx is not None and ctx.parent is not None else next((w for w in words if w in _COMMANDS), None)
    doc = {"command": command, "exit_code": code, "error": " ".join(message.split())}
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


_COMMANDS = ("convert", "validate", "inspect", "recipes")
_MAX_MESSAGE = 600  # characters of an error line: a message never carries a whole input


def _clip(text: str, limit: int = _MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


app = typer.Typer(
    cls=_Group,
    name="hla-convert",
    help=(
        "Convert a softmax-attention video diffusion transformer (diffusers) to Hadamard Linear "
        "Attention: swap the self-attention core, distil it on calibration inputs, check the output "
        "drift and save a safetensors adapter.\n\n" + _EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def main() -> None:
    """Console-script entry point (`hla-convert`)."""
    # A SIGTERM (a job scheduler, `timeout`, `kill`) ends a run like Ctrl-C: one line, exit 130,
    # the work folder kept for --resume.
    signal.signal(signal.SIGTERM, _interrupt)
    app()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _error_line(message: str) -> None:
    text = _clip(message)
    print(f"hla-convert: error: {text}", file=sys.stderr, flush=True)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _stdout() -> Console:
    return Console(highlight=False, soft_wrap=False)


# -- errors -> exit codes -------------------------------------------------------------------------


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from .adapter import AdapterError
    from .calibration import CalibrationError
    from .checkpoints import CheckpointError
    from .config import ConfigError
    from .loading import ModelLoadError
    from .output import OutputError
    from .recipes import RecipeError
    from .surgery import ConversionError

    return (AdapterError, CalibrationError, CheckpointError, ConfigError, ModelLoadError, OutputError, RecipeError, ConversionError)


def _run_failed_types() -> tuple[type[BaseException], ...]:
    from .distill import DistillError

    return (DistillError,)


class _StopAfterSteps(KeyboardInterrupt):
    """--stop-after-steps (tests): the same path as a Ctrl-C or a killed run."""


@contextlib.contextmanager
def _command(name: str, json_mode: bool, resume_hint: Callable[[], str | None] | None = None) -> Iterator[dict[str, Any]]:
    """Run a command body: map exceptions to exit codes, keep stdout clean in --json mode.

    The body fills the yielded dict (the --json document) and sets its "exit_code". resume_hint()
    gives the command that continues an unfinished run, or None when there is nothing to continue.
    """
    doc: dict[str, Any] = {"command": name, "exit_code": EXIT_OK}
    real_stdout = sys.stdout
    _quiet_hub_retries()
    code = EXIT_OK
    try:
        # In --json mode anything a library prints goes to stderr: stdout is the document alone.
        with contextlib.redirect_stdout(sys.stderr) if json_mode else contextlib.nullcontext():
            yield doc
        code = doc["exit_code"]
    except CommandFailed as exc:
        code, doc["error"] = exc.code, str(exc)
    except KeyboardInterrupt:
        hint = resume_hint() if resume_hint else None
        code, doc["error"] = EXIT_INTERRUPTED, "interrupted" + (f"; continue with: {hint}" if hint else "")
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        if isinstance(exc, (typer.Exit, SystemExit)):
            raise
        if isinstance(exc, _bad_input_types()):
            code, doc["error"] = EXIT_BAD_INPUT, str(exc)
        else:
            code, doc["error"] = EXIT_RUN_FAILED, _failure_message(exc, resume_hint)
            if os.environ.get("HLA_CONVERT_DEBUG"):
                traceback.print_exc(file=sys.stderr)
    doc["exit_code"] = code
    if "error" in doc:
        doc["error"] = _clip(doc["error"])
        _error_line(doc["error"])
    if json_mode:
        real_stdout.write(json.dumps(_finite(doc), indent=2, default=str, allow_nan=False) + "\n")
        real_stdout.flush()
    if code != EXIT_OK:
        raise typer.Exit(code)


def _finite(obj: Any) -> Any:
    """The document with NaN/inf floats as the strings "nan", "inf", "-inf": JSON has no such numbers,
    and a diverged metric must not cost the document."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _quiet_hub_retries() -> None:
    """huggingface_hub logs every retry of an unreachable Hub as a warning; the load error that
    follows is the one line that matters."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover
        return
    hub_logging.set_verbosity_error()


def _failure_message(exc: BaseException, resume_hint: Callable[[], str | None] | None) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, _run_failed_types()):
        # Training diverged (the engine's message says where and which checkpoint is kept). The same
        # recipe would diverge again from that checkpoint, so no --resume hint.
        return f"the run failed: {first}; change the recipe (e.g. a lower learning rate) and run again with --overwrite"
    hint = resume_hint() if resume_hint else None
    debug = "" if os.environ.get("HLA_CONVERT_DEBUG") else " (HLA_CONVERT_DEBUG=1 shows the traceback)"
    return f"the run failed: {type(exc).__name__}: {first}{debug}" + (f"; once fixed, continue with: {hint}" if hint else "")


# -- progress -------------------------------------------------------------------------------------

_ENGINE_STAGES = {
    "calibration": "calibration inputs",
    "init": "initialise feature maps",
    "stage1": "attention transfer",
    "stage2": "output distillation",
    "drift": "held-out drift",
}


# What of the engine's progress info fits on a bar's line.
_SHOWN_INFO = ("loss", "split", "sampling")


class StageProgress:
    """Progress on stderr: one Rich bar per stage and per engine sub-stage on a terminal; plain
    lines (each stage's end, training every ~10%) where stderr is a log file or a CI pipe, since a
    live display there shows nothing until the end.

    `callback(stage, step, total, info)` is the engine's progress signature. stop_after_steps (tests)
    raises a KeyboardInterrupt once that many training steps (stage 1 + stage 2) have run: the same
    path as a Ctrl-C or a killed run.
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
        self._logged: dict[str, int] = {}
        self._train_steps: dict[str, int] = {}
        self.stop_after_steps = stop_after_steps

    def __enter__(self) -> "StageProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        task = self.progress.add_task(name, total=1, info="")
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.progress.update(task, completed=1, info=f"{self.seconds[name]:.1f}s")
        if not self.live:
            self.console.print(f"{name}: done in {self.seconds[name]:.1f}s")

    def callback(self, stage: str, step: int, total: int, info: dict[str, Any] | None = None) -> None:
        label = _ENGINE_STAGES.get(stage, stage)
        total = max(int(total or 1), 1)
        text = " ".join(f"{k} {_short(v)}" for k, v in (info or {}).items() if k in _SHOWN_INFO)
        task = self._sub.get(stage)
        if task is None:
            task = self._sub[stage] = self.progress.add_task("  " + label, total=total, info="")
        self.progress.update(task, completed=step, total=total, info=text)
        if not self.live and stage in ("stage1", "stage2"):
            tenth = step * 10 // total
            if tenth > self._logged.get(stage, 0) or step == total:
                self._logged[stage] = tenth
                self.console.print(f"  {label}: step {step}/{total} {text}")
        if stage in ("stage1", "stage2"):
            self._train_steps[stage] = step
            if self.stop_after_steps is not None and sum(self._train_steps.values()) >= self.stop_after_steps:
                raise _StopAfterSteps()


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- rendering ------------------------------------------------------------------------------------


def _drift_table(report: dict[str, Any], saved: dict[str, Any] | None = None) -> Table:
    """The drift report as a table; `saved` adds the values measured at convert time (validate)."""
    from .output import drift_rows

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


def _print_verdict(con: Console, report: dict[str, Any]) -> None:
    if report.get("passed"):
        con.print("[green]drift within the recipe's thresholds[/green]")
        return
    failures = report.get("failures") or []
    con.print(f"[red]drift over the recipe's thresholds ({len(failures)} check(s) failed):[/red]")
    for failure in failures:
        con.print(f"  - {failure}", highlight=False)


# -- shared option handling -----------------------------------------------------------------------


def _resolve_recipe(recipe: str | None, model: str | None):
    """--recipe, or the built-in recipe made for MODEL (the demo's, or one whose model.hub_id is MODEL)."""
    from .recipes import builtin_recipes, load_recipe

    if recipe is not None:
        return _load_recipe(recipe)
    if model is None:
        return _load_recipe(DEMO_RECIPE)
    _check_model_path(model)
    for name in builtin_recipes():
        candidate = load_recipe(name)
        if candidate.model.hub_id and candidate.model.hub_id == model:
            return candidate
    raise CommandFailed(
        f"no built-in recipe is made for {_shown(model)}; pass --recipe NAME|PATH (built-in: {', '.join(builtin_recipes())})",
        EXIT_BAD_INPUT,
    )


def _load_recipe(name_or_path: str):
    from .recipes import RecipeError, load_recipe

    try:
        return load_recipe(name_or_path)
    except RecipeError as exc:
        where = f"recipe {name_or_path}"
        raise CommandFailed(f"{where}: {exc}" if exc.field else str(exc), EXIT_BAD_INPUT) from None


def _override(recipe, where: str, **kwargs):
    from .recipes import RecipeError

    try:
        return recipe.with_overrides(**kwargs)
    except RecipeError as exc:
        raise CommandFailed(f"{where}: {exc}", EXIT_BAD_INPUT) from None


# -- commands -------------------------------------------------------------------------------------

ModelArg = Annotated[
    str | None,
    typer.Argument(
        metavar="[MODEL]",
        help="Hub ID (owner/name) or local diffusers folder: a full pipeline or a bare transformer. "
        "Left out: the embedded demo model (a tiny Wan transformer).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there (progress and errors stay on stderr).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="torch device, e.g. cuda, cuda:1, cpu. Default: cuda when available, else cpu.", show_default=False)]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="Weights dtype: float32, bfloat16 (bf16) or float16 (fp16). Default: the checkpoint's own.", show_default=False),
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) of MODEL.", show_default=False)]
SubfolderOpt = Annotated[
    str | None,
    typer.Option("--subfolder", help="Subfolder of MODEL holding the transformer (found by itself for pipelines).", show_default=False),
]


@app.command(
    epilog=(
        "Examples:\n\n"
        "  hla-convert convert --out demo-hla\n\n"
        "  hla-convert convert Wan-AI/Wan2.1-T2V-1.3B-Diffusers --recipe wan2.1-t2v-1.3b --out wan-hla --dtype bf16\n\n"
        "  hla-convert convert ./my-pipeline --recipe my-recipe.yaml --out wan-hla --resume\n\n" + _EXIT_CODES_HELP
    )
)
def convert(
    model: ModelArg = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            "-r",
            help="Built-in recipe name (see `hla-convert recipes`) or the path of a recipe YAML. Default: the "
            "built-in recipe made for MODEL (tiny-wan for the demo).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: adapter_model.safetensors, hla_config.json, recipe.yaml, drift_report.json, "
            "README.md (model card). Must be empty or missing, unless --overwrite or --resume.",
            show_default=False,
        ),
    ] = ...,  # type: ignore[assignment]
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=0, help="Stage-1 (attention transfer) steps; stage 2 is scaled in proportion (0: no training in either stage). Default: the recipe's.", show_default=False),
    ] = None,
    attention: Annotated[
        str | None,
        typer.Option(
            "--attention",
            help="Override the recipe's attention kind: hadamard, linear (same state size), higher_order, hybrid "
            "(exact softmax in a local window of the latent grid + HLA outside; the recipe's attention.window, "
            "halo, far) or softmax (identity conversion). For comparisons.",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    subfolder: SubfolderOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last checkpoint (same MODEL, recipe and options).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the hla-convert output already in --out (other files are never deleted).")] = False,
    json_out: JsonOpt = False,
    stop_after_steps: Annotated[int | None, typer.Option("--stop-after-steps", hidden=True, min=1)] = None,
) -> None:
    """Convert MODEL's self-attention to HLA, distil it, check the drift, save the adapter.

    Stages, each with a progress bar: load -> convert -> calibrate -> distil (attention transfer,
    then output distillation) -> validate (held-out drift) -> save. Training checkpoints go to
    OUT/.hla_work while the run lasts; after the save that folder is removed. A run that was
    killed or interrupted keeps it, and `--resume` continues from the last checkpoint.
    """
    def resume_hint() -> str | None:
        from .output import RUN_FILE, WORK_DIR

        if not (Path(out) / WORK_DIR / RUN_FILE).is_file():
            return None
        options = {
            "--recipe": recipe, "--steps": steps, "--attention": attention, "--device": device,
            "--dtype": dtype, "--revision": revision, "--subfolder": subfolder,
        }
        words = ["hla-convert", "convert", *([model] if model else []), "--out", str(out)]
        words += [w for k, v in options.items() if v is not None for w in (k, str(v))]
        return shlex.join([*words, "--resume"])

    with _command("convert", json_out, resume_hint) as doc:
        from . import calibration, distill, drift
        from .loading import load_transformer, parse_dtype
        from .pipeline_loading import load_scheduler
        from .output import check_output, run_identity, save_output, start_run
        from .surgery import convert_attention

        from .output_guard import output_lock

        # Everything that can be refused is refused here, before the (slow) model load.
        out = _folder_arg("--out", out)
        _check_model_path(model)
        rec = _resolve_recipe(recipe, model)
        rec = _override(rec, f"recipe {rec.name}", steps=steps, kind=attention)
        parse_dtype(dtype)
        dev = _check_device(device)
        run = run_identity(model, revision, subfolder, rec, dtype)
        doc.update(out_dir=str(out.absolute()), recipe=rec.name, resumed=resume)
        with output_lock(out), StageProgress(_stderr(), stop_after_steps) as bars:
            check_output(out, run, overwrite, resume)  # under the lock: nothing else changes it now
            with bars.stage("load"), _hub_notice(model):
                loaded = load_transformer(model, revision=revision, subfolder=subfolder, dtype=dtype, device=dev)
            net = loaded.transformer
            with bars.stage("convert"):
                config = rec.hla_config()
                convert_attention(net, config, include=rec.attention.include, exclude=rec.attention.exclude)
            work = start_run(out, run, overwrite, resume)
            with bars.stage("calibrate"):
                inputs = calibration.build_input_sets(
                    net, rec, pipeline_dir=loaded.pipeline_dir, device=dev, dtype=net.dtype, progress=bars.callback
                )
                train, heldout = inputs["train"], inputs["heldout"]
            with bars.stage("distil"):
                trained = distill.distil(net, train, rec, work_dir=work, resume=resume, progress=bars.callback)
            with bars.stage("validate"):
                scheduler = load_scheduler(loaded)
                report = drift.measure_drift(net, heldout, rec, scheduler=scheduler, progress=bars.callback).to_dict()
                _note_sampling(report, rec, scheduler, "MODEL is a bare transformer: no pipeline scheduler to sample with")
            report["training"] = {k: trained[k] for k in ("stage1", "selection", "stage2")}
            with bars.stage("save"):
                saved = save_output(out, net, loaded, rec, report)
        doc.update(
            model={"source": loaded.source, "revision": loaded.revision, "class": type(net).__name__, "demo": loaded.is_demo},
            device=str(dev),
            dtype=str(net.dtype).removeprefix("torch."),
            attention=config.to_dict(),
            drift=report,
            passed=bool(report.get("passed")),
            files=saved.files,
            seconds=bars.seconds,
        )
        if not json_out:
            con = _stdout()
            con.print(_drift_table(report))
            _print_verdict(con, report)
            con.print(f"saved to {out}/ ({', '.join(saved.files)})")
        doc["exit_code"] = EXIT_OK if report.get("passed") else EXIT_DRIFT


def _threshold(flag: str, text: str) -> Any:
    return typer.Option(flag, help=f"Override the recipe's {text}.", show_default=False)


@app.command(epilog="Example:\n\n  hla-convert validate demo-hla --json\n\n" + _EXIT_CODES_HELP)
def validate(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="An output folder written by `hla-convert convert`.", show_default=False)],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Load the base model from here (Hub ID or folder) instead of the one the adapter records.", show_default=False),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    max_attention_rel_l2: Annotated[float | None, _threshold("--max-attention-rel-l2", "max attention relative L2")] = None,
    max_output_rel_l2: Annotated[float | None, _threshold("--max-output-rel-l2", "max output relative L2")] = None,
    min_output_cosine: Annotated[float | None, _threshold("--min-output-cosine", "min output cosine")] = None,
    max_latent_rel_l2: Annotated[float | None, _threshold("--max-latent-rel-l2", "max sampled-latent relative L2")] = None,
    min_latent_psnr: Annotated[float | None, _threshold("--min-latent-psnr", "min sampled-latent PSNR (dB)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-check a saved conversion against its base model on the recipe's held-out inputs.

    Loads the base the adapter records (or --base), checks its weight fingerprint, loads the HLA
    weights, measures the drift again and compares it with the thresholds of the saved recipe.yaml
    (each overridable here). Exit 0 within the thresholds, 1 over them, 2 for a bad folder.
    """
    with _command("validate", json_out) as doc:
        from . import calibration, drift
        from .adapter import load_adapter
        from .loading import load_transformer, parse_dtype
        from .output import base_of, read_output
        from .pipeline_loading import load_scheduler

        directory = _folder_arg("DIR", directory)
        info, recipe_path, saved = read_output(directory)
        _check_model_path(base, "--base")
        thresholds = {
            f"validation.{k}": v
            for k, v in dict(
                max_attention_rel_l2=max_attention_rel_l2,
                max_output_rel_l2=max_output_rel_l2,
                min_output_cosine=min_output_cosine,
                max_latent_rel_l2=max_latent_rel_l2,
                min_latent_psnr=min_latent_psnr,
            ).items()
            if v is not None
        }
        rec = _load_recipe(str(recipe_path))
        rec = _override(rec, "threshold options", fields=thresholds)
        source, revision, subfolder = (base, None, None) if base else base_of(info)
        if not base:
            _check_recorded_base(info, source, revision, subfolder)
        parse_dtype(dtype)
        dev = _check_device(device)
        doc.update(out_dir=str(directory.absolute()), recipe=rec.name, base=info.get("base_source"))
        with StageProgress(_stderr()) as bars:
            with bars.stage("load"), _hub_notice(source):
                loaded = load_transformer(source, revision=revision, subfolder=subfolder, dtype=dtype, device=dev)
                net = load_adapter(loaded.transformer, directory).to(dev)
            with bars.stage("calibrate"):
                heldout = calibration.build_inputs(
                    net, rec, "heldout", pipeline_dir=loaded.pipeline_dir, device=dev, dtype=net.dtype, progress=bars.callback
                )
            with bars.stage("validate"):
                scheduler = load_scheduler(loaded)
                report = drift.measure_drift(net, heldout, rec, scheduler=scheduler, progress=bars.callback).to_dict()
                why = "--base is a bare transformer" if base else "the base is a bare transformer"
                _note_sampling(report, rec, scheduler, f"{why}: no pipeline scheduler to sample with (pass a pipeline folder or Hub ID)")
        doc.update(drift=report, passed=bool(report.get("passed")), seconds=bars.seconds)
        if not json_out:
            con = _stdout()
            con.print(_drift_table(report, saved=saved or None))
            _print_verdict(con, report)
        doc["exit_code"] = EXIT_OK if report.get("passed") else EXIT_DRIFT


@app.command(epilog="Example:\n\n  hla-convert inspect Wan-AI/Wan2.1-T2V-1.3B-Diffusers --frames 81 --height 480 --width 832\n\n" + _EXIT_CODES_HELP)
def inspect(
    model: ModelArg = None,
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", "-r", help="Recipe deciding which modules convert and to what (default: the one made for MODEL).", show_default=False),
    ] = None,
    frames: Annotated[int | None, typer.Option("--frames", "-f", min=1, help="Video frames (pixels). Default: the recipe's calibration size.", show_default=False)] = None,
    height: Annotated[int | None, typer.Option("--height", min=1, help="Video height in pixels. Default: the recipe's.", show_default=False)] = None,
    width: Annotated[int | None, typer.Option("--width", min=1, help="Video width in pixels. Default: the recipe's.", show_default=False)] = None,
    revision: RevisionOpt = None,
    subfolder: SubfolderOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Attention modules, which the recipe converts, tokens and attention FLOPs before/after.

    Lists MODEL's attention modules (self and cross), marks the ones the recipe converts, counts
    the tokens one self-attention sees at the given video size (default: the recipe's calibration
    size) and the self-attention FLOPs per forward with softmax and after conversion.
    Only the model's config is read: no weights are loaded or downloaded.
    """
    with _command("inspect", json_out) as doc:
        from .pipeline_loading import inspect_model

        _check_model_path(model)
        rec = _resolve_recipe(recipe, model)
        sizes = {f"calibration.{k}": v for k, v in dict(frames=frames, height=height, width=width).items() if v is not None}
        rec = _override(rec, "video size options", fields=sizes)
        with _hub_notice(model):
            report = inspect_model(model, rec, revision=revision, subfolder=subfolder)
        doc.update(report)
        if not json_out:
            _print_inspection(report)


def _print_inspection(r: dict[str, Any]) -> None:
    con = _stdout()
    v = r["video"]
    con.print(f"[bold]{r['model']}[/bold] ({r['class']}), recipe [bold]{r['recipe']}[/bold]")
    con.print(
        f"video {v['frames']} x {v['height']} x {v['width']} px -> latent {' x '.join(map(str, v['latent']))} "
        f"-> {r['tokens']:,} tokens per self-attention"
        + (f" (+ {r['text_tokens']} text tokens in joint attention)" if r.get("text_tokens") else "")
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
            _gflops(m["flops_before"]),
            _gflops(m["flops_after"]),
        )
    con.print(table)
    f = r["flops"]
    con.print(
        f"self-attention FLOPs per forward: {_gflops(f['before'])} G softmax -> {_gflops(f['after'])} G converted "
        f"({f['speedup']:.1f}x fewer); {len(r['converted'])} of {len(r['modules'])} attention modules convert"
    )


def _gflops(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:,.3f}"


@app.command()
def recipes(
    name: Annotated[str | None, typer.Argument(metavar="[NAME]", help="A built-in recipe to print in full (YAML, with its comments).", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the built-in recipes, or print one.

    A recipe says which attention modules convert and to what, how calibration inputs are made, how
    long each distillation stage runs and the drift thresholds. Copy one, edit it and pass its path
    to `convert --recipe`.
    """
    with _command("recipes", json_out) as doc:
        from .recipes import RecipeError, builtin_recipes, recipe_text

        if name is None:
            listing = builtin_recipes()
            doc["recipes"] = listing
            if not json_out:
                table = Table(title="Built-in recipes", title_justify="left")
                table.add_column("name")
                table.add_column("description")
                for n, d in listing.items():
                    table.add_row(n, d)
                _stdout().print(table)
            return
        if name not in builtin_recipes():
            _load_recipe(name)  # a path or an unknown name: the recipe loader says which
        try:
            text = recipe_text(name)
        except RecipeError as exc:
            raise CommandFailed(str(exc), EXIT_BAD_INPUT) from None
        doc.update(name=name, yaml=text)
        if not json_out:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")


__all__ = ["app", "main", "StageProgress", "EXIT_OK", "EXIT_DRIFT", "EXIT_BAD_INPUT", "EXIT_RUN_FAILED", "EXIT_INTERRUPTED"]
