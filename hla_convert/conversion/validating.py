"""validate(): a saved conversion checked again against its base on held-out inputs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..io.checks import check_arg_types, check_device, check_model_path, folder_arg, hub_notice, note_sampling
from .common import Progress, ValidationPlan, ValidationResult, _Stages, load_recipe_arg, override_recipe
from .experts import _validate_experts


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
    from ..io.hub import resolve_output_dir
    from ..model.loading import parse_dtype
    from ..io.converted import base_of, read_output

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
    from ..stages import calibration, drift
    from ..io.adapter import load_adapter
    from ..model.loading import load_transformer
    from ..model.pipeline_loading import load_scheduler

    from ..io.output import experts_of

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
    return p.result(report, stages.seconds, dev)


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


__all__ = ["plan_validation", "run_validation", "validate"]
