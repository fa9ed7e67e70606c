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
from .recipe import Recipe, RecipeError

DEMO_RECIPE = "tiny-wan"

# The stages of a conversion, in order; validate runs load, calibrate and validate.
STAGES = ("load", "convert", "calibrate", "distil", "validate", "save")


@dataclass(frozen=True)
class ProgressEvent:
    """What `progress` is called with.

    kind "start" / "end": a stage of STAGES begins / ends (`seconds` set on "end").
    kind "step": the engine's progress inside a stage: `stage` is its sub-stage ("calibration",
    "init", "stage1", "stage2", "stage3", "drift"), `step` of `total` done, `info` e.g. {"loss": ...}.
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


def _check_calibration(recipe: Recipe, model: str | None = None) -> None:
    """The recipe's calibration.path and images, before the model load and before --overwrite clears anything."""
    from .stages.calibration_sources import check_calibration_path

    _bad_recipe(recipe, lambda: check_calibration_path(recipe, model))


def _bad_recipe(recipe: Recipe, check: Callable[[], None]) -> None:
    """Run a check of the recipe against the machine or the model; its error as InputError naming the recipe."""
    from .stages.calibration_sources import CalibrationError
    from .recipe import RecipeError

    try:
        check()
    except (CalibrationError, RecipeError) as exc:
        raise InputError(f"recipe {recipe.name}: {exc}") from None


def _check_stage3_model(recipe: Recipe, model: str | None, revision: str | None, subfolder: str | None) -> None:
    """Stage 3 samples with the pipeline's scheduler: refuse stage3.steps > 0 for a bare transformer
    from its config files alone, before the model load (a pipeline whose model_index.json names
    no scheduler is refused once it is loaded, still before anything is written)."""
    if recipe.stage3.steps <= 0:
        return
    from .model.loading import resolve_model
    from .stages.onpolicy import check_stage3_scheduler

    ref = resolve_model(model, revision, subfolder)
    _bad_recipe(recipe, lambda: check_stage3_scheduler(recipe, ref.is_demo or ref.pipeline_dir is not None))


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
    experts: tuple[str, ...] = ()  # a two-expert pipeline's transformers (model.experts), else ()
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
    images: str | os.PathLike | None = None,
    config: str | None = None,
) -> ConversionPlan:
    """Refuse everything that can be refused before the (slow) model load; see `convert`."""
    from .model.loading import parse_dtype
    from .io.output import run_identity

    check_arg_types(
        model=(model, (str,)), recipe=(recipe, (str, Recipe)), out=(out, (str, os.PathLike)), device=(device, (str,)),
        dtype=(dtype, (str,)), revision=(revision, (str,)), subfolder=(subfolder, (str,)), steps=(steps, (int,)),
        attention=(attention, (str,)), causal_block_frames=(causal_block_frames, (int,)), images=(images, (str, os.PathLike)),
        config=(config, (str,)),
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
    fields: dict[str, Any] = {} if causal_block_frames is None else {"attention.causal_block_frames": causal_block_frames}
    if images is not None:  # absolute in the saved recipe.yaml, so `validate` finds them from any folder
        fields["calibration.images"] = str(Path(images).expanduser().absolute())
    rec = override_recipe(rec, f"recipe {rec.name}", steps=steps, kind=attention, fields=fields)
    parse_dtype(dtype)
    dev = check_device(device)
    _check_calibration(rec, model)
    _check_stage3_model(rec, model, revision, subfolder)
    run = run_identity(model, revision, subfolder, rec, dtype, config)
    experts = () if single else _experts_of(model, revision, subfolder)
    if experts and rec.stage3.steps > 0:
        # stage 3 samples a trajectory from noise, which runs both experts; each expert trains alone
        raise RecipeError("stage3.steps", "on-policy distillation (stage 3) is not supported on a two-expert pipeline (transformer_2) yet; set stage3.steps: 0")
    return ConversionPlan(model, rec, out, dev, dtype, revision, subfolder, resume, overwrite, run, experts, config)


def _experts_of(model: str | None, revision: str | None, subfolder: str | None) -> tuple[str, ...]:
    """The experts of a two-expert pipeline (Wan2.2 A14B), () otherwise; a MODEL that cannot be
    resolved is left to the load, which says why in its own words."""
    from .model.experts import expert_names
    from .model.loading import ModelLoadError

    try:
        return expert_names(model, revision, subfolder)
    except ModelLoadError:
        return ()


def run_conversion(plan: ConversionPlan, progress: Progress | None = None) -> ConversionResult:
    """Load -> convert -> calibrate -> distil -> validate -> save, under OUT's lock.

    Under `accelerate launch` (several processes, hla_convert.stages.parallel) every process runs every
    stage in lockstep, each on its accelerate device (plan.device is not used) and its share of
    each training step; the main process alone takes the lock and writes, the others wait for it.
    `progress` is called in every process (the command line shows the main process's).
    A two-expert pipeline (plan.experts) converts each expert in turn: _run_experts."""
    if plan.experts:
        return _run_experts(plan, progress)
    from .stages import calibration, distill, drift
    from .model.loading import load_transformer
    from .io.output import WORK_DIR, check_output, save_output, start_run
    from .io.output_guard import output_lock
    from .stages.parallel import Parallel
    from .model.pipeline_loading import load_scheduler
    from .model.surgery import convert_attention
    from .stages.onpolicy import check_stage3_scheduler

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
            _bad_recipe(rec, lambda: distill.check_stage2_parallel(rec, par))  # train: full under FSDP, before sharding
            if par is not None and par.fsdp:
                from .model.layers import hla_parameters

                units = par.shard_frozen_base(net, list(hla_parameters(net).values()))  # and moves the rest to dev
                par.note(f"FSDP: the frozen base is sharded over {par.count} processes ({units} blocks); HLA / LoRA stay whole")
            _bad_recipe(rec, lambda: distill.check_lora_rank(net, rec))  # before --overwrite clears anything
            scheduler = load_scheduler(loaded)  # stage 3's sampler and the drift check's
            _bad_recipe(rec, lambda: check_stage3_scheduler(rec, scheduler is not None))
        work = writer(lambda: start_run(out, p.run, p.overwrite, p.resume)) or out / WORK_DIR
        with stages.stage("calibrate"):
            inputs = calibration.build_input_sets(
                net, rec, pipeline_dir=loaded.pipeline_dir, device=dev, dtype=net.dtype, progress=stages.step
            )
            train, heldout = inputs["train"], inputs["heldout"]
        with stages.stage("distil"):
            trained = distill.distil(
                net, train, rec, work_dir=work, resume=p.resume, progress=stages.step, parallel=par, scheduler=scheduler
            )
        with stages.stage("validate"):
            report = drift.measure_drift(net, heldout, rec, scheduler=scheduler, progress=stages.step).to_dict()
            note_sampling(report, rec, scheduler, "MODEL is a bare transformer: no pipeline scheduler to sample with")
        report["training"] = {k: trained[k] for k in ("stage1", "selection", "stage2", "stage3")}
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


def _run_experts(plan: ConversionPlan, progress: Progress | None) -> ConversionResult:
    """A two-expert pipeline (model.experts): load both, record both experts' teacher inputs in one
    pass of trajectories (each expert's calibration = the inputs the pipeline served it), then
    distil and measure each expert in turn with only it on the device (the others wait on the CPU;
    training state in .hla_work/EXPERT, so a killed run resumes into the expert it was on), then the
    whole-pipeline sampling check with all of them, and one save (io.output: one adapter per expert)."""
    from .stages import calibration, distill, drift
    from .stages.calibration_sources import load_pipeline
    from .stages.experts import experts_report, pipeline_check
    from .stages.parallel import Parallel
    from .model.experts import boundary_timestep, load_experts
    from .io.output import check_output, save_output, start_run
    from .io.output_guard import output_lock
    from .model.surgery import convert_attention

    if Parallel.from_environment() is not None:
        raise InputError("a two-expert pipeline (transformer_2) converts in one process for now; run it without accelerate launch")
    p, rec, out, dev = plan, plan.recipe, plan.out, plan.device
    stages = _Stages(progress)
    with output_lock(out):
        check_output(out, p.run, p.overwrite, p.resume)
        with stages.stage("load"), hub_notice(p.model):
            loaded = load_experts(p.model, revision=p.revision, dtype=p.dtype, device="cpu")  # each goes to the device in turn
            pipeline_dir = loaded[p.experts[0]].pipeline_dir
            boundary = boundary_timestep(pipeline_dir, p.revision)
        nets = {name: one.transformer for name, one in loaded.items()}
        with stages.stage("convert"):
            config = rec.hla_config()
            for net in nets.values():
                convert_attention(net, config, include=rec.attention.include, exclude=rec.attention.exclude)
                _bad_recipe(rec, lambda net=net: distill.check_lora_rank(net, rec))
        work = start_run(out, p.run, p.overwrite, p.resume)
        dtype = nets[p.experts[0]].dtype
        with stages.stage("calibrate"):
            for net in nets.values():  # the teacher trajectories run the whole pipeline
                net.to(dev)
            inputs = calibration.build_expert_input_sets(nets, rec, boundary, pipeline_dir, device=dev, dtype=dtype, progress=stages.step)
            for net in nets.values():
                net.to("cpu")
        reports: dict[str, dict[str, Any]] = {}
        training: dict[str, dict[str, Any]] = {}
        for name, net in nets.items():
            net.to(dev)
            with stages.stage("distil"):
                trained = distill.distil(net, inputs[name]["train"], rec, work_dir=work / name, resume=p.resume, progress=stages.step)
                training[name] = {k: trained[k] for k in ("stage1", "selection", "stage2")}
            with stages.stage("validate"):
                reports[name] = drift.measure_drift(net, inputs[name]["heldout"], rec, progress=stages.step).to_dict()
                reports[name]["training"] = training[name]
            net.to("cpu")
        with stages.stage("validate"):
            check = _pipeline_check(nets, pipeline_dir, rec, dev, load_pipeline, pipeline_check)
            report = experts_report(reports, check, rec, boundary)
        report["training"] = training
        with stages.stage("save"):
            first, rest = p.experts[0], p.experts[1:]
            saved = save_output(out, nets[first], loaded[first], rec, report, experts={n: (nets[n], loaded[n]) for n in rest})
    return ConversionResult(
        out_dir=out.absolute(),
        recipe=rec.name,
        resumed=p.resume,
        report=report,
        passed=bool(report.get("passed")),
        files=saved.files,
        seconds=stages.seconds,
        model={"source": loaded[first].source, "revision": loaded[first].revision, "class": type(nets[first]).__name__, "demo": False, "experts": list(p.experts)},
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        attention=config.to_dict(),
    )


def _pipeline_check(nets: dict[str, Any], pipeline_dir: str, rec: Recipe, dev: str, load_pipeline: Any, pipeline_check: Any) -> dict[str, Any] | None:
    """The whole-pipeline sampling check (stages.experts.pipeline_check) with every expert on the device."""
    names = list(nets)
    for net in nets.values():
        net.to(dev)
    try:
        pipe = load_pipeline(nets[names[0]], pipeline_dir, dev, **{n: nets[n] for n in names[1:]})
        return pipeline_check(pipe, nets, rec)
    finally:
        for net in nets.values():
            net.to("cpu")


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
    images: str | os.PathLike | None = None,
    config: str | None = None,
) -> ConversionResult:
    """Convert MODEL's self-attention to HLA, distil it, measure the drift, save the adapter in `out`.

    model: Hub ID or diffusers folder (pipeline or bare transformer), or a single-file checkpoint
    (one .safetensors in the family's original layout, e.g. Wan-AI's); None = the embedded demo.
    config: a single-file model's diffusers config, a local pipeline or transformer folder or a
    Hub ID in the local cache (default: the recipe's model.config); recorded in the adapter.
    recipe: a Recipe, a built-in name or a YAML path; None = the built-in recipe made for MODEL.
    steps: stage-1 steps (stages 2 and 3 scaled in proportion); attention: override the attention kind.
    causal_block_frames: override the recipe's attention.causal_block_frames (SkyReels-V2
    diffusion forcing: latent frames per causal block, set on the model before calibration).
    images: a folder of png / jpg images conditioning an image-to-video pipeline's calibration
    trajectories (recipe field calibration.images; default: the recipe's, null = synthetic images).
    device: default cuda when available, else cpu; dtype: "float32", "bf16", ... (default: the
    checkpoint's). resume continues the interrupted run in `out`; overwrite replaces the
    hla-convert output there (never other files). progress(ProgressEvent) is called at each
    stage's start and end and at the engine's steps.

    Returns the result whether or not the drift is within the recipe's thresholds: check `passed`.
    """
    plan = plan_conversion(
        model, recipe, out, device, dtype, revision, subfolder, steps, attention, resume, overwrite, causal_block_frames, images, config
    )
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

    from .io.output import experts_of

    if experts_of(plan.info):
        return _validate_experts(plan, progress)
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


def _validate_experts(plan: ValidationPlan, progress: Progress | None) -> ValidationResult:
    """validate on a two-expert folder: each expert's drift on the held-out inputs it serves (one
    pass of trajectories records them all) and the whole-pipeline check, as _run_experts measured them."""
    from .stages import calibration, drift
    from .stages.calibration_sources import load_pipeline
    from .stages.experts import experts_report, pipeline_check
    from .io.adapter import load_adapter
    from .io.output import expert_dir, experts_of
    from .model.experts import boundary_timestep, load_experts

    p, rec, dev = plan, plan.recipe, plan.device
    names = experts_of(p.info)
    stages = _Stages(progress)
    with stages.stage("load"), hub_notice(p.source):
        if p.source is None:
            raise InputError("--base: a two-expert conversion needs its pipeline (folder or Hub ID)")
        loaded = load_experts(p.source, revision=p.revision, dtype=p.dtype, device="cpu")
        if list(loaded) != names:
            raise InputError(f"--base {shown(p.source)}: its experts {', '.join(loaded)} are not the folder's {', '.join(names)}")
        nets = {name: load_adapter(loaded[name].transformer, expert_dir(p.out, p.info, name)) for name in names}
        pipeline_dir = loaded[names[0]].pipeline_dir
        boundary = boundary_timestep(pipeline_dir, p.revision)
    dtype = nets[names[0]].dtype
    with stages.stage("calibrate"):
        for net in nets.values():
            net.to(dev)
        inputs = calibration.build_expert_input_sets(nets, rec, boundary, pipeline_dir, device=dev, dtype=dtype, progress=stages.step, splits=("heldout",))
        for net in nets.values():
            net.to("cpu")
    reports = {}
    with stages.stage("validate"):
        for name, net in nets.items():
            net.to(dev)
            reports[name] = drift.measure_drift(net, inputs[name]["heldout"], rec, progress=stages.step).to_dict()
            net.to("cpu")
        check = _pipeline_check(nets, pipeline_dir, rec, dev, load_pipeline, pipeline_check)
        report = experts_report(reports, check, rec, boundary)
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
