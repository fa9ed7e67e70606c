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

from .common import (
    DEMO_RECIPE,
    STAGES,
    ConversionPlan,
    ConversionResult,
    ProgressEvent,
    ValidationPlan,
    ValidationResult,
    load_recipe_arg,
    override_recipe,
    resolve_recipe,
)
from .converting import convert, plan_conversion, run_conversion
from .validating import plan_validation, run_validation, validate

__all__ = [
    "DEMO_RECIPE",
    "STAGES",
    "ConversionPlan",
    "ConversionResult",
    "ProgressEvent",
    "ValidationPlan",
    "ValidationResult",
    "convert",
    "load_recipe_arg",
    "override_recipe",
    "plan_conversion",
    "plan_validation",
    "resolve_recipe",
    "run_conversion",
    "run_validation",
    "validate",
]
