"""One call for a whole conversion, and one to check it again: what `hla-convert convert` and
`hla-convert validate` run (the commands only turn flags into arguments and results into tables,
JSON and exit codes), for scripts and notebooks.

    import sys, hla_convert

    result = hla_convert.convert("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", recipe="wan2.1-t2v-1.3b", out="wan-hla")
    if not result.passed:
        sys.exit(result.report["failures"])

Bad arguments (a bad recipe or recipe field included) raise InputError; an output folder that
cannot be used OutputError; a model, adapter or checkpoint that cannot be used ModelLoadError,
AdapterError, CheckpointError, ...: each a ValueError with a one-line message (the messages name the command
line's flags: --out is `out`, MODEL is `model`). A diverged training run raises DistillError; an
interrupted one (KeyboardInterrupt) keeps OUT/.hla_work, and `resume=True` continues it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model.single_file import is_single_file
from .io.checks import check_arg_types, check_device, check_model_path, folder_arg, hub_notice, note_sampling, shown
from .errors import InputError
from .recipe import Recipe

DEMO_RECIPE = "tiny-wan"

# The stages of a conversion, in order; validate runs load, calibrate and validate.
STAGES = ("load", "convert", "calibrate", "distil", "validate", "save")


@dataclass(frozen=True)
class ProgressEvent:
    """What `progress` is called with.

    kind "start" / "end": a stage of STAGES begins / ends (`seconds` set on "end").
    kind "step": the engine's progress inside a stage: `stage` is its sub-stage ("calibration",
    "init", "stage1", "stage2", "drift"), `step` of `total` done, `info` e.g. {"loss": ...}.
    """

    kind: str
    stage: str
    step: int = 0
    total: int = 0
    seconds: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[ProgressEvent], None]


class _Stages:
    """Times the stages and reports them (and the engine's steps) to a progress callback."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.seconds: dict[str, float] = {}

    def _emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._emit(ProgressEvent("start", name))
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self._emit(ProgressEvent("end", name, 1, 1, seconds=self.seconds[name]))

    def step(self, stage: str, step: int, total: int, info: dict[str, Any] | None = None) -> None:
        """The engine's progress signature (calibration, distill, drift)."""
        self._emit(ProgressEvent("step", stage, int(step), int(total or 0), info=dict(info or {})))


@dataclass
class ConversionResult:
    """What `convert` did. `report` is the drift report also saved as OUT/drift_report.json
    (metrics, thresholds, "passed", "failures", the training summary under "training")."""

    out_dir: Path
    recipe: str
    resumed: bool
    report: dict[str, Any]
    passed: bool
    files: list[str]
    seconds: dict[str, float]
    model: dict[str, Any]  # source, revision, class, demo
    device: str
    dtype: str
    attention: dict[str, Any]  # the HLAConfig the attention was converted with


@dataclass
class ValidationResult:
    """What `validate` measured; `saved_report` is the drift report written at convert time."""

    out_dir: Path
    recipe: str
    base: Any  # the base model the adapter records
    report: dict[str, Any]
    passed: bool
    seconds: dict[str, float]
    saved_report: dict[str, Any]
    device: str


# -- recipes ------------------------------------------------------------------------------------


def resolve_recipe(recipe: str | Recipe | None, model: str | None, config: str | None = None) -> Recipe:
    """`recipe` (a Recipe, a built-in name or a YAML path), or the built-in recipe made for MODEL
    (the demo's, or one whose model.hub_id is MODEL, or for a single file, is its --config)."""
    from .recipe import builtin_recipes, load_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if recipe is not None:
        return load_recipe_arg(recipe)
    if model is None:
        return load_recipe_arg(DEMO_RECIPE)
    check_model_path(model)
    for name in builtin_recipes():
        candidate = load_recipe(name)
        if candidate.model.hub_id and candidate.model.hub_id in (model, config):
            return candidate
    raise InputError(
        f"no built-in recipe is made for {shown(model)}; pass --recipe NAME|PATH (built-in: {', '.join(builtin_recipes())})"
    )


def load_recipe_arg(name_or_path: str) -> Recipe:
    """A recipe by name or path; a bad one is an InputError saying which recipe and which field."""
    from .recipe import RecipeError, load_recipe

    try:
        return load_recipe(name_or_path)
    except RecipeError as exc:
        raise InputError(f"recipe {name_or_path}: {exc}" if exc.field else str(exc)) from None


def _check_calibration(recipe: Recipe) -> None:
    """The recipe's calibration.path, before the model load and before --overwrite clears anything."""
    from .stages.calibration_sources import check_calibration_path

    _bad_recipe(recipe, lambda: check_calibration_path(recipe))


def _bad_recipe(recipe: Recipe, check: Callable[[], None]) -> None:
    """Run a check of the recipe against the machine or the model; its error as InputError naming the recipe."""
    from .stages.calibration_sources import CalibrationError
    from .recipe import RecipeError

    try:
        check()
    except (CalibrationError, RecipeError) as exc:
        raise InputError(f"recipe {recipe.name}: {exc}") from None


def override_recipe(recipe: Recipe, where: str, **kwargs: Any) -> Recipe:
    from .recipe import RecipeError

    try:
        return recipe.with_overrides(**kwargs)
    except RecipeError as exc:
        raise InputError(f"{where}: {exc}") from None


# -- convert ------------------------------------------------------------------------------------


@dataclass
class ConversionPlan:
    """A conversion whose arguments have been checked (nothing loaded, nothing written yet)."""

    model: str | None
    recipe: Recipe
    out: Path
    device: str
    dtype: str | None
    revision: str | None
    subfolder: str | None
    resume: bool
    overwrite: bool
    run: dict[str, Any]
    config: str | None = None  # a single-file MODEL's diffusers config (--config, or the recipe's model.config)


def plan_conversion(
    model: str | None = None,
    recipe: str | Recipe | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    steps: int | None = None,
    attention: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    causal_block_frames: int | None = None,
    config: str | None = None,
) -> ConversionPlan:
    """Refuse everything that can be refused before the (slow) model load; see `convert`."""
    from .model.loading import parse_dtype
    from .io.output import run_identity

    check_arg_types(
        model=(model, (str,)), recipe=(recipe, (str, Recipe)), out=(out, (str, os.PathLike)), device=(device, (str,)),
        dtype=(dtype, (str,)), revision=(revision, (str,)), subfolder=(subfolder, (str,)), steps=(steps, (int,)),
        attention=(attention, (str,)), causal_block_frames=(causal_block_frames, (int,)), config=(config, (str,)),
    )
    if out is None:
        raise InputError("--out is missing; give the output folder")
    out = folder_arg("--out", str(out))
    check_model_path(model)
    single = is_single_file(model)
    if config is not None and not single:
        raise InputError(f"--config applies to a single-file MODEL (a .safetensors checkpoint), not to {shown(model or 'the demo model')}")
    rec = resolve_recipe(recipe, model, config)
    if single and config is None:
        config = rec.model.config  # None: resolve_model says that --config is needed
    fields = {} if causal_block_frames is None else {"attention.causal_block_frames": causal_block_frames}
    rec = override_recipe(rec, f"recipe {rec.name}", steps=steps, kind=attention, fields=fields)
    parse_dtype(dtype)
    dev = check_device(device)
    _check_calibration(rec)
    run = run_identity(model, revision, subfolder, rec, dtype, config)
    return ConversionPlan(model, rec, out, dev, dtype, revision, subfolder, resume, overwrite, run, config)


def run_conversion(plan: ConversionPlan, progress: Progress | None = None) -> ConversionResult:
    """Load -> convert -> calibrate -> distil -> validate -> save, under OUT's lock.

    Under `accelerate launch` (several processes, hla_convert.stages.parallel) every process runs every
    stage in lockstep, each on its accelerate device (plan.device is not used) and its share of
    each training step; the main process alone takes the lock and writes, the others wait for it.
    `progress` is called in every process (the command line shows the main process's)."""
    from .stages import calibration, distill, drift
    from .model.loading import load_transformer
    from .io.output import WORK_DIR, check_output, save_output, start_run
    from .io.output_guard import output_lock
    from .stages.parallel import Parallel
    from .model.pipeline_loading import load_scheduler
    from .model.surgery import convert_attention

    par = Parallel.from_environment()
    p, rec, out, dev = plan, plan.recipe, plan.out, plan.device if par is None else par.device
    writer = _main_only(par)
    stages = _Stages(progress)
    with output_lock(out) if par is None or par.is_main else contextlib.nullcontext():
        writer(lambda: check_output(out, p.run, p.overwrite, p.resume))  # under the lock: nothing else changes it now
        with stages.stage("load"), hub_notice(p.model):
            # FSDP: the whole model on the host first; each process keeps its shard on the device
            where = "cpu" if par is not None and par.fsdp else dev
            loaded = load_transformer(p.model, revision=p.revision, subfolder=p.subfolder, dtype=p.dtype, device=where, config=p.config)
        net = loaded.transformer
        with stages.stage("convert"):
            config = rec.hla_config()
            convert_attention(net, config, include=rec.attention.include, exclude=rec.attention.exclude)
            if par is not None and par.fsdp:
                from .model.layers import hla_parameters

                units = par.shard_frozen_base(net, list(hla_parameters(net).values()))  # and moves the rest to dev
                par.note(f"FSDP: the frozen base is sharded over {par.count} processes ({units} blocks); HLA / LoRA stay whole")
            _bad_recipe(rec, lambda: distill.check_lora_rank(net, rec))  # before --overwrite clears anything
        work = writer(lambda: start_run(out, p.run, p.overwrite, p.resume)) or out / WORK_DIR
        with stages.stage("calibrate"):
            inputs = calibration.build_input_sets(
                net, rec, pipeline_dir=loaded.pipeline_dir, device=dev, dtype=net.dtype, progress=stages.step
            )
            train, heldout = inputs["train"], inputs["heldout"]
        with stages.stage("distil"):
            trained = distill.distil(net, train, rec, work_dir=work, resume=p.resume, progress=stages.step, parallel=par)
        with stages.stage("validate"):
            scheduler = load_scheduler(loaded)
            report = drift.measure_drift(net, heldout, rec, scheduler=scheduler, progress=stages.step).to_dict()
            note_sampling(report, rec, scheduler, "MODEL is a bare transformer: no pipeline scheduler to sample with")
        report["training"] = {k: trained[k] for k in ("stage1", "selection", "stage2")}
        if par is not None:
            report["training"]["parallel"] = {"processes": par.count, "fsdp": par.fsdp}
        with stages.stage("save"), par.full_weights(net) if par is not None else contextlib.nullcontext():
            saved = writer(lambda: save_output(out, net, loaded, rec, report))
            files = saved.files if par is None else par.share_object(saved.files if saved is not None else None)
    return ConversionResult(
        out_dir=out.absolute(),
        recipe=rec.name,
        resumed=p.resume,
        report=report,
        passed=bool(report.get("passed")),
        files=files,
        seconds=stages.seconds,
        model={"source": loaded.source, "revision": loaded.revision, "class": type(net).__name__, "demo": loaded.is_demo},
        device=str(dev),
        dtype=str(net.dtype).removeprefix("torch."),
        attention=config.to_dict(),
    )


def convert(
    model: str | None = None,
    recipe: str | Recipe | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    steps: int | None = None,
    attention: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    causal_block_frames: int | None = None,
    config: str | None = None,
) -> ConversionResult:
    """Convert MODEL's self-attention to HLA, distil it, measure the drift, save the adapter in `out`.

    model: Hub ID or diffusers folder (pipeline or bare transformer), or a single-file checkpoint
    (one .safetensors in the family's original layout, e.g. Wan-AI's); None = the embedded demo.
    config: a single-file model's diffusers config, a local pipeline or transformer folder or a
    Hub ID in the local cache (default: the recipe's model.config); recorded in the adapter.
    recipe: a Recipe, a built-in name or a YAML path; None = the built-in recipe made for MODEL.
    steps: stage-1 steps (stage 2 scaled in proportion); attention: override the attention kind.
    causal_block_frames: override the recipe's attention.causal_block_frames (SkyReels-V2
    diffusion forcing: latent frames per causal block, set on the model before calibration).
    device: default cuda when available, else cpu; dtype: "float32", "bf16", ... (default: the
    checkpoint's). resume continues the interrupted run in `out`; overwrite replaces the
    hla-convert output there (never other files). progress(ProgressEvent) is called at each
    stage's start and end and at the engine's steps.

    Returns the result whether or not the drift is within the recipe's thresholds: check `passed`.
    """
    plan = plan_conversion(model, recipe, out, device, dtype, revision, subfolder, steps, attention, resume, overwrite, causal_block_frames, config)
    return run_conversion(plan, progress)


def _main_only(par: Any) -> Callable[[Callable[[], Any]], Any]:
    """How run_conversion writes: directly with one process; under a launch, on the main process
    while the others wait (its errors raised everywhere), None as the others' result."""
    if par is None:
        return lambda fn: fn()
    return par.main_first


# -- validate -----------------------------------------------------------------------------------


@dataclass
class ValidationPlan:
    out: Path
    info: dict[str, Any]
    saved_report: dict[str, Any]
    recipe: Recipe
    base: str | None
    source: Any
    revision: str | None
    subfolder: str | None
    device: str
    dtype: str | None
    config: str | None = None


def plan_validation(
    out: str | Path,
    base: str | None = None,
    thresholds: Mapping[str, float] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    config: str | None = None,
) -> ValidationPlan:
    """Read and check the output folder and the arguments before anything loads; see `validate`."""
    from .io.hub import resolve_output_dir
    from .model.loading import parse_dtype
    from .io.output import base_of, read_output

    check_arg_types(
        dir=(out, (str, os.PathLike)), base=(base, (str,)), device=(device, (str,)), dtype=(dtype, (str,)), revision=(revision, (str,)),
        config=(config, (str,)),
    )
    directory = resolve_output_dir(folder_arg("DIR", str(out)), revision)  # a Hub ID: its cached snapshot
    info, recipe_path, saved = read_output(directory)
    check_model_path(base, "--base")
    fields = {k if k.startswith("validation.") else f"validation.{k}": v for k, v in (thresholds or {}).items() if v is not None}
    rec = load_recipe_arg(str(recipe_path))
    rec = override_recipe(rec, "threshold options", fields=fields)
    source, revision, subfolder, config = base_of(info, base, config)
    parse_dtype(dtype)
    dev = check_device(device)
    return ValidationPlan(directory, info, saved, rec, base, source, revision, subfolder, dev, dtype, config)


def run_validation(plan: ValidationPlan, progress: Progress | None = None) -> ValidationResult:
    from .stages import calibration, drift
    from .io.adapter import load_adapter
    from .model.loading import load_transformer
    from .model.pipeline_loading import load_scheduler

    p, rec, dev = plan, plan.recipe, plan.device
    stages = _Stages(progress)
    with stages.stage("load"), hub_notice(p.source):
        loaded = load_transformer(p.source, revision=p.revision, subfolder=p.subfolder, dtype=p.dtype, device=dev, config=p.config)
        net = load_adapter(loaded.transformer, p.out).to(dev)
    with stages.stage("calibrate"):
        heldout = calibration.build_inputs(
            net, rec, "heldout", pipeline_dir=loaded.pipeline_dir, device=dev, dtype=net.dtype, progress=stages.step
        )
    with stages.stage("validate"):
        scheduler = load_scheduler(loaded)
        report = drift.measure_drift(net, heldout, rec, scheduler=scheduler, progress=stages.step).to_dict()
        why = "--base is a bare transformer" if p.base else "the base is a bare transformer"
        note_sampling(report, rec, scheduler, f"{why}: no pipeline scheduler to sample with (pass a pipeline folder or Hub ID)")
    return ValidationResult(
        out_dir=p.out.absolute(),
        recipe=rec.name,
        base=p.info.get("base_source"),
        report=report,
        passed=bool(report.get("passed")),
        seconds=stages.seconds,
        saved_report=p.saved_report,
        device=str(dev),
    )


def validate(
    out: str | Path,
    base: str | None = None,
    thresholds: Mapping[str, float] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
    revision: str | None = None,
    config: str | None = None,
) -> ValidationResult:
    """Measure a saved conversion's drift again, against its base model, on the recipe's held-out inputs.

    out: a folder written by `convert`, or a conversion pushed to the Hub ("ORG/NAME", at
    `revision`). base: load the base model from here instead of the one the
    adapter records (its weights must match the recorded fingerprint). thresholds: override the
    saved recipe's, e.g. {"max_output_rel_l2": 0.3} (names of the recipe's validation section).
    config: the diffusers config of a single-file base (default: the one recorded at conversion).
    """
    return run_validation(plan_validation(out, base, thresholds, device, dtype, revision, config), progress)


__all__ = [
    "ConversionPlan",
    "ConversionResult",
    "InputError",
    "ProgressEvent",
    "STAGES",
    "ValidationPlan",
    "ValidationResult",
    "convert",
    "plan_conversion",
    "plan_validation",
    "run_conversion",
    "run_validation",
    "validate",
]
