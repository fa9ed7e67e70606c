"""What the conversion modules share: the stages and their progress events, the results and
plans, and reading the recipe a call names (a name, a YAML path, or the model's built-in)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.checks import check_model_path, shown
from ..errors import InputError
from ..recipe import Recipe

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
    from ..recipe import builtin_recipes, load_recipe

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
    from ..recipe import RecipeError, load_recipe

    try:
        return load_recipe(name_or_path)
    except RecipeError as exc:
        raise InputError(f"recipe {name_or_path}: {exc}" if exc.field else str(exc)) from None


def _check_calibration(recipe: Recipe, model: str | None = None) -> None:
    """The recipe's calibration.path and images, before the model load and before --overwrite clears anything."""
    from ..stages.calibration_sources import check_calibration_path

    _bad_recipe(recipe, lambda: check_calibration_path(recipe, model))


def _bad_recipe(recipe: Recipe, check: Callable[[], None]) -> None:
    """Run a check of the recipe against the machine or the model; its error as InputError naming the recipe."""
    from ..stages.calibration_sources import CalibrationError
    from ..recipe import RecipeError

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
    from ..model.loading import resolve_model
    from ..stages.onpolicy import check_stage3_scheduler

    ref = resolve_model(model, revision, subfolder)
    _bad_recipe(recipe, lambda: check_stage3_scheduler(recipe, ref.is_demo or ref.pipeline_dir is not None))


def override_recipe(recipe: Recipe, where: str, **kwargs: Any) -> Recipe:
    from ..recipe import RecipeError

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

    def result(self, report: dict[str, Any], seconds: dict[str, float], device: Any) -> ValidationResult:
        """What `validate` returns for this folder: the drift report measured on `device`."""
        return ValidationResult(
            out_dir=self.out.absolute(),
            recipe=self.recipe.name,
            base=self.info.get("base_source"),
            report=report,
            passed=bool(report.get("passed")),
            seconds=seconds,
            saved_report=self.saved_report,
            device=str(device),
        )
