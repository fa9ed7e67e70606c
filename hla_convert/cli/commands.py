"""The `hla-convert` command line: flags in, tables / JSON / exit codes out. `convert` and
`validate` call hla_convert.conversion (the Python API) and render its progress events and result
(cli.display); cli.run maps a command's exceptions to exit codes and one line on stderr. `sample`
and `push` are in cli.share, the options the commands share in cli.options (docs/architecture.md).

Every command shares these exit codes (EXIT_* in cli.run), so scripts can trust them:

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

import io
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console as _Console
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException, UsageError

from ..conversion import DEMO_RECIPE, load_recipe_arg, override_recipe, resolve_recipe  # noqa: F401 - DEMO_RECIPE: the default
from ..io.checks import check_model_path as _check_model_path
from ..io.checks import hub_notice as _hub_notice
from .checks import EXIT_BAD_INPUT, CommandFailed
from .display import StageProgress, _StopAfterSteps  # noqa: F401 - _StopAfterSteps: part of the CLI's surface
from .display import drift_table as _drift_table
from .display import print_inspection as _print_inspection
from .display import print_verdict as _print_verdict
from .display import stderr_console as _stderr
from .display import stdout_console as _stdout
from .options import EXIT_CODES_HELP, ConfigOpt, DeviceOpt, DirRevisionOpt, DtypeOpt, HubDirArg, JsonOpt, ModelArg, RevisionOpt, SubfolderOpt
from .run import EXIT_DRIFT, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED
from .run import clip as _clip
from .run import command as _command
from .run import early_document as _early_document
from .run import error_line as _error_line
from .run import write_stdout as _write_stdout
from .share import check_sampleable as _check_sampleable
from .share import register as _register_share_commands
from .share import sample_into as _sample_into

_EXIT_CODES_HELP = EXIT_CODES_HELP


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
    command = ctx.info_name if ctx is not None and ctx.parent is not None else None
    _early_document(words, command, code, message)


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


# -- shared option handling -----------------------------------------------------------------------


_resolve_recipe = resolve_recipe
_load_recipe = load_recipe_arg
_override = override_recipe


# -- commands -------------------------------------------------------------------------------------



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
        typer.Option("--steps", min=0, help="Stage-1 (attention transfer) steps; stages 2 and 3 are scaled in proportion (0: no training at all). Default: the recipe's.", show_default=False),
    ] = None,
    attention: Annotated[
        str | None,
        typer.Option(
            "--attention",
            help="Override the recipe's attention kind: hadamard, linear (same state size), higher_order, hybrid "
            "(exact softmax in a local window of the latent grid + HLA outside; the recipe's attention.window "
            "or tiles, halo, far) or softmax (identity conversion). For comparisons.",
            show_default=False,
        ),
    ] = None,
    causal_block_frames: Annotated[
        int | None,
        typer.Option(
            "--causal-block-frames",
            min=1,
            help="SkyReels-V2 diffusion forcing: latent frames per causal block (the DF pipelines' causal_block_size), "
            "set on the model before calibration and saved with the adapter. Default: the recipe's "
            "attention.causal_block_frames (null: the checkpoint's num_frame_per_block).",
            show_default=False,
        ),
    ] = None,
    images: Annotated[
        str | None,
        typer.Option(
            "--images",
            help="Image-to-video pipelines (WanImageToVideoPipeline): a folder of png / jpg images, read in sorted order "
            "and cycled over the calibration prompts, to condition the calibration trajectories on (recipe field "
            "calibration.images). Default: the recipe's; null there: a seeded synthetic image per prompt.",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    subfolder: SubfolderOpt = None,
    config: ConfigOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last checkpoint (same MODEL, recipe and options).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the hla-convert output already in --out (other files are never deleted).")] = False,
    sample_too: Annotated[
        bool,
        typer.Option(
            "--sample",
            help="Then sample the conversion as `hla-convert sample OUT` does (seed 0, the recipe's sampling steps): "
            "OUT/sample.mp4 and sample.png, shown in the model card. MODEL must be the demo or a pipeline.",
        ),
    ] = False,
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
        from ..io.output import RUN_FILE, WORK_DIR

        if not (Path(out) / WORK_DIR / RUN_FILE).is_file():
            return None
        options = {
            "--recipe": recipe, "--steps": steps, "--attention": attention, "--causal-block-frames": causal_block_frames,
            "--images": images, "--device": device,
            "--dtype": dtype, "--revision": revision, "--subfolder": subfolder, "--config": config,
        }
        words = ["hla-convert", "convert", *([model] if model else []), "--out", str(out)]
        words += [w for k, v in options.items() if v is not None for w in (k, str(v))]
        return shlex.join([*words, "--resume"])

    from ..stages.parallel import quiet_unless_main

    # under accelerate launch every process runs this; only the main one shows progress and results
    with quiet_unless_main() as quiet, _command("convert", json_out, resume_hint) as doc:
        from ..conversion import plan_conversion, run_conversion

        # Everything that can be refused is refused here, before the (slow) model load.
        plan = plan_conversion(
            model, recipe, out, device, dtype, revision, subfolder, steps, attention, resume, overwrite, causal_block_frames, images, config
        )
        if sample_too:
            _check_sampleable(model, revision, subfolder, plan.config)
        doc.update(out_dir=str(plan.out.absolute()), recipe=plan.recipe.name, resumed=resume)
        with StageProgress(_stderr() if not quiet else _Console(file=io.StringIO()), stop_after_steps) as bars:
            result = run_conversion(plan, progress=bars)
        doc.update(
            model=result.model,
            device=result.device,
            dtype=result.dtype,
            attention=result.attention,
            drift=result.report,
            passed=result.passed,
            files=result.files,
            seconds=result.seconds,
        )
        doc["exit_code"] = EXIT_OK if result.passed else EXIT_DRIFT  # set first: it stands if stdout's reader has gone
        if not json_out:
            con = _stdout()
            con.print(_drift_table(result.report))
            _print_verdict(con, result.report)
            con.print(f"saved to {plan.out}/ ({', '.join(result.files)})")
        if sample_too and not quiet:  # one process samples (no collectives in it) and writes
            from ..io.sampling import SampleError

            try:
                sampled, video = _sample_into(plan.out, None, seed=0, device=plan.device)
            except SampleError as exc:
                raise CommandFailed(f"the conversion is saved in {plan.out}, but its sample failed: {exc}", EXIT_BAD_INPUT) from None
            doc["sample"] = sampled.summary()
            if not json_out:
                _stdout().print(f"sample: {video} and {video.with_suffix('.png')} (mean PSNR {doc['sample']['psnr_db_mean']:.1f} dB)")


def _threshold(flag: str, text: str) -> Any:
    return typer.Option(flag, help=f"Override the recipe's {text}.", show_default=False)


@app.command(epilog="Example:\n\n  hla-convert validate demo-hla --json\n\n  hla-convert validate my-org/wan-hla --revision v1\n\n" + _EXIT_CODES_HELP)
def validate(
    directory: HubDirArg,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Load the base model from here (Hub ID, folder, or a single-file .safetensors with --config) instead of "
            "the one the adapter records.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    max_attention_rel_l2: Annotated[float | None, _threshold("--max-attention-rel-l2", "max attention relative L2")] = None,
    max_output_rel_l2: Annotated[float | None, _threshold("--max-output-rel-l2", "max output relative L2")] = None,
    min_output_cosine: Annotated[float | None, _threshold("--min-output-cosine", "min output cosine")] = None,
    max_latent_rel_l2: Annotated[float | None, _threshold("--max-latent-rel-l2", "max sampled-latent relative L2")] = None,
    min_latent_psnr: Annotated[float | None, _threshold("--min-latent-psnr", "min sampled-latent PSNR (dB)")] = None,
    revision: DirRevisionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-check a saved conversion against its base model on the recipe's held-out inputs.

    Loads the base the adapter records (or --base), checks its weight fingerprint, loads the HLA
    weights, measures the drift again and compares it with the thresholds of the saved recipe.yaml
    (each overridable here). Exit 0 within the thresholds, 1 over them, 2 for a bad folder.
    """
    with _command("validate", json_out) as doc:
        from ..conversion import plan_validation, run_validation

        thresholds = dict(
            max_attention_rel_l2=max_attention_rel_l2,
            max_output_rel_l2=max_output_rel_l2,
            min_output_cosine=min_output_cosine,
            max_latent_rel_l2=max_latent_rel_l2,
            min_latent_psnr=min_latent_psnr,
        )
        with _hub_notice(directory):
            plan = plan_validation(directory, base, thresholds, device, dtype, revision, config)
        doc.update(out_dir=str(plan.out.absolute()), recipe=plan.recipe.name, base=plan.info.get("base_source"))
        with StageProgress(_stderr()) as bars:
            result = run_validation(plan, progress=bars)
        doc.update(drift=result.report, passed=result.passed, seconds=result.seconds)
        doc["exit_code"] = EXIT_OK if result.passed else EXIT_DRIFT
        if not json_out:
            con = _stdout()
            con.print(_drift_table(result.report, saved=result.saved_report or None))
            _print_verdict(con, result.report)


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
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Attention modules, which the recipe converts, tokens and attention FLOPs before/after.

    Lists MODEL's attention modules (self and cross), marks the ones the recipe converts, counts
    the tokens one self-attention sees at the given video size (default: the recipe's calibration
    size) and the self-attention FLOPs per forward with softmax and after conversion.
    Only the model's config is read: no weights are loaded or downloaded.
    """
    with _command("inspect", json_out) as doc:
        from ..model.pipeline_loading import inspect_model

        _check_model_path(model)
        rec = _resolve_recipe(recipe, model, config)
        sizes = {f"calibration.{k}": v for k, v in dict(frames=frames, height=height, width=width).items() if v is not None}
        rec = _override(rec, "video size options", fields=sizes)
        with _hub_notice(model):
            report = inspect_model(model, rec, revision=revision, subfolder=subfolder, config=config)
        doc.update(report)
        if not json_out:
            _print_inspection(report)


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
        from ..recipe import RecipeError, builtin_recipes, recipe_text

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
            _write_stdout(text if text.endswith("\n") else text + "\n")



_register_share_commands(app)  # sample, push

__all__ = ["app", "StageProgress", "EXIT_OK", "EXIT_DRIFT", "EXIT_BAD_INPUT", "EXIT_RUN_FAILED", "EXIT_INTERRUPTED"]
