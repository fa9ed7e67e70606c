"""Checking a recipe mapping (as read from YAML) field by field into a Recipe: `check_recipe`.

Each field has a check that returns its value or raises RecipeError naming the field's dotted
path and what is allowed; `_check_together` holds the checks that involve more than one field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..model.architectures import with_field
from ..model.config import ConfigError, HLAConfig
from .schema import (
    DISTRIBUTIONS,
    SOURCES,
    SOFTMAX_SELECT,
    STAGE2_TEACHER,
    STAGE2_TRAIN,
    STAGE3_SAMPLING_STEPS,
    SYNTHETIC,
    VAE_SCALES,
    HLA_FIELDS,
    AttentionSpec,
    CalibrationSpec,
    ModelSpec,
    RecipeError,
    Stage1Spec,
    Stage2Spec,
    Stage3Spec,
    TimestepSpec,
    ValidationSpec,
    _r,
)

# -- field checks ----------------------------------------------------------------------------------


def _number(path: str, v: Any, *, positive: bool = False, nonneg: bool = False, lo: float | None = None, hi: float | None = None) -> float:
    what = "a positive number" if positive else "a number >= 0" if nonneg else "a number"
    if lo is not None and hi is not None:
        what = f"a number in [{lo}, {hi}]"
    if isinstance(v, bool) or v is None:
        raise RecipeError(path, f"must be {what}, got {_r(v)}")
    if isinstance(v, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            raise RecipeError(path, f"must be {what}, got {_r(v)}") from None
    try:
        finite = isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise RecipeError(path, f"must be {what}, got {_r(v)}")
    if (positive and v <= 0) or (nonneg and v < 0) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RecipeError(path, f"must be {what}, got {_r(v)}")
    return float(v)


def _integer(path: str, v: Any, minimum: int = 1) -> int:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise RecipeError(path, f"must be {what}, got {_r(v)}")
    if v < minimum:
        raise RecipeError(path, f"must be {what}, got {_r(v)}")
    if v > _MAX_INT:
        raise RecipeError(path, f"must be at most {_MAX_INT}, got {_r(v)}")
    return v


_MAX_INT = 2**31 - 1  # counts and sizes past this are typos, and would overflow torch's int32 paths


def _at_most(maximum: int, why: str, minimum: int = 1):
    """An integer check with an upper bound and the reason for it (said in the message): a value
    past it would allocate more than a machine holds, or loop for hours, before anything is said."""

    def check(path: str, v: Any) -> int:
        v = _integer(path, v, minimum)
        if v > maximum:
            raise RecipeError(path, f"must be at most {maximum:,} ({why}), got {_r(v)}")
        return v

    return check


# Upper bounds of recipe fields, with the reason a message gives (see _at_most).
MAX_SAMPLES = 1_000_000  # calibration inputs are held in memory
MAX_PIXELS_SIDE = 2_048  # video DiTs are trained at up to 1280 x 720 (Wan), 1360 x 768 (CogVideoX 1.5)
MAX_FRAMES = 1_025  # pixel frames: Wan samples 81, HunyuanVideo 129; the attention is quadratic in them
MAX_SAMPLING_STEPS = 1_000  # a sampling trajectory is kept whole per held-out input
MAX_TRAIN_TIMESTEPS = 1_000  # the flow-matching / DDPM schedulers of these models train on 1000 timesteps
MAX_LORA_RANK = 1_024  # checked against the targets' in/out features once the model is loaded
MAX_BATCH = 1_024
MAX_STEP_BATCH = 65_536  # inputs per optimizer step: accumulated calibration batches, each a forward pass
MAX_TEXT_LEN = 4_096  # text tokens: the models' encoders take 128 (LTX) to 512 (Wan's UMT5)
MAX_SHIFT = 1_000.0  # flow-matching timestep shift: the models use 1 to 17; past ~1e38 it overflows to NaN timesteps


def _at_most_number(maximum: float, why: str):
    """A positive number with an upper bound and its reason (see _at_most)."""

    def check(path: str, v: Any) -> float:
        v = _number(path, v, positive=True)
        if v > maximum:
            raise RecipeError(path, f"must be at most {maximum:,g} ({why}), got {_r(v)}")
        return v

    return check


def _choice(path: str, v: Any, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        raise RecipeError(path, f"{_r(v)} is not one of {', '.join(allowed)}")
    return v


def _optional_str(path: str, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise RecipeError(path, f"must be a non-empty string or null, got {_r(v)}")
    return v


def _string_list(path: str, v: Any, nullable: bool) -> list[str] | None:
    if v is None:
        if nullable:
            return None
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise RecipeError(path, f"must be a list of non-empty strings{' or null' if nullable else ''}, got {_r(v)}")
    return list(v)


def _nonempty_list(path: str, v: Any) -> list[str]:
    out = _string_list(path, v, nullable=False)
    if not out:
        raise RecipeError(path, "must name at least one module suffix, e.g. [to_q, to_k, to_v, to_out.0]")
    return out


def _bool(path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise RecipeError(path, f"must be true or false, got {_r(v)}")
    return v


def _optional(check):
    def run(path: str, v: Any):
        return None if v is None else check(path, v)

    return run


def _section(path: str, data: Any, cls: type, checks: dict[str, Any]) -> Any:
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and not isinstance(data, type):  # a default nested section
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise RecipeError(path, f"must be a mapping of fields ({', '.join(checks)}), got {type(data).__name__}")
    unknown = [k for k in data if k not in checks]
    if unknown:
        raise RecipeError(f"{path}.{unknown[0]}", f"unknown field; allowed: {', '.join(checks)}")
    defaults = cls()
    values = {}
    for name, check in checks.items():
        value = data.get(name, getattr(defaults, name))
        values[name] = check(f"{path}.{name}", value)
    return cls(**values)


_MODEL = {"architecture": _optional_str, "hub_id": _optional_str, "config": _optional_str}

def _hla_field(type_name: str):
    """The YAML reading of an HLAConfig field: numbers YAML reads as strings ("1e-6") or integral
    floats become the field's type; everything else goes to HLAConfig as written. The checks are
    HLAConfig's own (_check_hla_config), one home per field."""

    def read(path: str, v: Any) -> Any:
        if isinstance(v, bool):
            return v
        if "float" in type_name and isinstance(v, (int, float, str)):
            try:
                return float(v)
            except (ValueError, OverflowError):
                return v
        if "int" in type_name and "tuple" not in type_name and isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    return read


_RECIPE_ATTENTION = {
    "include": lambda p, v: _string_list(p, v, nullable=True),
    "exclude": lambda p, v: _string_list(p, v, nullable=False),
    "softmax_layers": lambda p, v: _integer(p, v, 0),
    "softmax_select": lambda p, v: _choice(p, v, SOFTMAX_SELECT),
}
_HLA_TYPES = {f.name: str(f.type) for f in dataclasses.fields(HLAConfig)}
_ATTENTION = {
    f.name: _RECIPE_ATTENTION[f.name] if f.name in _RECIPE_ATTENTION else _hla_field(_HLA_TYPES[f.name])
    for f in dataclasses.fields(AttentionSpec)
}

_TIMESTEPS = {
    "distribution": lambda p, v: _choice(p, v, DISTRIBUTIONS),
    "min": lambda p, v: _number(p, v, lo=0.0, hi=1.0),
    "max": lambda p, v: _number(p, v, lo=0.0, hi=1.0),
    "mean": _number,
    "std": lambda p, v: _number(p, v, positive=True),
    "shift": _at_most_number(MAX_SHIFT, "video models shift timesteps by 1 to 17; far past it the timesteps are NaN"),
}

_CALIBRATION = {
    "source": lambda p, v: _choice(p, v, SOURCES),
    "synthetic": lambda p, v: _choice(p, v, SYNTHETIC),
    "path": _optional_str,
    "images": _optional_str,
    "prompts": lambda p, v: _string_list(p, v, nullable=True),
    "frames": _at_most(MAX_FRAMES, "pixel frames of a video DiT's clip"),
    "height": _at_most(MAX_PIXELS_SIDE, "pixels; what video DiTs are trained at is well below it"),
    "width": _at_most(MAX_PIXELS_SIDE, "pixels; what video DiTs are trained at is well below it"),
    "vae_scale_temporal": _optional(_integer),
    "vae_scale_spatial": _optional(_integer),
    "samples": _at_most(MAX_SAMPLES, "the calibration inputs are held in memory"),
    "heldout": _at_most(MAX_SAMPLES, "the held-out inputs are held in memory"),
    "batch_size": _at_most(MAX_BATCH, "inputs per forward pass"),
    "text_len": _at_most(MAX_TEXT_LEN, "text tokens; the models' text encoders take 128 to 512"),
    "trajectory_steps": _at_most(MAX_SAMPLING_STEPS, "scheduler steps of a captured trajectory"),
    "seed": lambda p, v: _integer(p, v, 0),
    "timesteps": lambda p, v: _section(p, v, TimestepSpec, _TIMESTEPS),
}

_STAGE1 = {
    "steps": lambda p, v: _integer(p, v, 0),
    "lr": lambda p, v: _number(p, v, positive=True),
    "batch_size": _optional(_at_most(MAX_STEP_BATCH, "inputs per optimizer step, each calibration batch of them a forward pass")),
    "checkpoint_every": _integer,
    "grad_clip": lambda p, v: _number(p, v, positive=True),
}

_STAGE2 = {
    **_STAGE1,
    "train": lambda p, v: _choice(p, v, STAGE2_TRAIN),
    "teacher": lambda p, v: _choice(p, v, STAGE2_TEACHER),
    "gradient_checkpointing": _bool,
    "compile": _bool,
    "lora_rank": _at_most(MAX_LORA_RANK, "LoRA ranks are 4 to 128 in practice; it must also fit the targets' features"),
    "lora_alpha": _optional(lambda p, v: _number(p, v, positive=True)),
    "lora_targets": lambda p, v: _nonempty_list(p, v),
    "lora_ffn": _bool,
    "lora_lr": _optional(lambda p, v: _number(p, v, positive=True)),
}

_STAGE3 = {
    **_STAGE1,
    "sampling_steps": _optional(_at_most(MAX_SAMPLING_STEPS, "scheduler steps of the student's sampler")),
    "onpolicy_share": lambda p, v: _number(p, v, lo=0.0, hi=1.0),
}

_VALIDATION = {
    "max_attention_rel_l2": _optional(lambda p, v: _number(p, v, nonneg=True)),
    "max_output_rel_l2": _optional(lambda p, v: _number(p, v, nonneg=True)),
    "min_output_cosine": _optional(lambda p, v: _number(p, v, lo=-1.0, hi=1.0)),
    "max_latent_rel_l2": _optional(lambda p, v: _number(p, v, nonneg=True)),
    "min_latent_psnr": _optional(_number),
    "sampling_steps": _at_most(MAX_SAMPLING_STEPS, "scheduler steps; every step's latents are kept per held-out input", 0),
    "timestep_buckets": _at_most(MAX_TRAIN_TIMESTEPS, "no more buckets than the scheduler's training timesteps"),
    "teacher_steps": _at_most(MAX_SAMPLING_STEPS, "sampling steps run by the teacher (model.teacher_steps)", 0),
}

_TOP = ("name", "description", "model", "attention", "calibration", "stage1", "stage2", "stage3", "validation")


def check_recipe(data: Any, recipe_cls: type) -> Any:
    """Validate a recipe mapping (as read from YAML) into a `recipe_cls` (recipe.recipe.Recipe, which
    imports this module); RecipeError names the bad field."""
    if not isinstance(data, dict):
        raise RecipeError("", f"a recipe must be a mapping with the sections {', '.join(_TOP)}, got {type(data).__name__}")
    unknown = [k for k in data if k not in _TOP]
    if unknown:
        raise RecipeError(str(unknown[0]), f"unknown section; allowed: {', '.join(_TOP)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecipeError("name", f"must be a non-empty string, got {_r(name)}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise RecipeError("description", f"must be a string, got {_r(description)}")
    model = _section("model", data.get("model"), ModelSpec, _MODEL)
    attention = _section("attention", data.get("attention"), AttentionSpec, _ATTENTION)
    _check_hla_config(attention)
    calibration = _section("calibration", data.get("calibration"), CalibrationSpec, _CALIBRATION)
    stage1 = _section("stage1", data.get("stage1"), Stage1Spec, _STAGE1)
    stage2 = _section("stage2", data.get("stage2"), Stage2Spec, _STAGE2)
    stage3 = _section("stage3", data.get("stage3"), Stage3Spec, _STAGE3)
    validation = _section("validation", data.get("validation"), ValidationSpec, _VALIDATION)
    recipe = recipe_cls(name.strip(), description.strip(), model, attention, calibration, stage1, stage2, stage3, validation)
    _check_together(recipe)
    return recipe


def _check_hla_config(attention: Any) -> HLAConfig:
    """The attention section's HLAConfig fields, checked by HLAConfig itself; its ConfigError
    ("feature_dim: must be ...") becomes RecipeError("attention.feature_dim", "must be ...")."""
    try:
        return HLAConfig(**{name: getattr(attention, name) for name in HLA_FIELDS})
    except ConfigError as e:
        raise RecipeError(f"attention.{str(e).split(':', 1)[0]}", str(e).split(": ", 1)[1]) from None


def _check_together(r: Any) -> None:
    """Checks that involve more than one field (the attention section's: _check_hla_config)."""
    c = r.calibration
    arch = r.model.architecture
    for attr, i in (("vae_scale_temporal", 0), ("vae_scale_spatial", 1)):
        if getattr(c, attr) is None:
            if arch not in VAE_SCALES:
                raise RecipeError(
                    f"calibration.{attr}",
                    f"required when model.architecture ({_r(arch)}) is not one with a known VAE: {', '.join(VAE_SCALES)}",
                )
            setattr(c, attr, VAE_SCALES[arch][i])
    if (c.frames - 1) % c.vae_scale_temporal:
        raise RecipeError(
            "calibration.frames",
            f"must be 1 + a multiple of vae_scale_temporal ({c.vae_scale_temporal}), e.g. {c.vae_scale_temporal * ((c.frames - 1) // c.vae_scale_temporal) + 1}, got {c.frames}",
        )
    for attr in ("height", "width"):
        if getattr(c, attr) % c.vae_scale_spatial:
            raise RecipeError(f"calibration.{attr}", f"must be a multiple of vae_scale_spatial ({c.vae_scale_spatial}), got {getattr(c, attr)}")
    cbf = r.attention.causal_block_frames
    if cbf is not None:
        from ..model.block_causal import latent_frames_problem

        causal = with_field("causal_blocks")  # SkyReels-V2 diffusion forcing (model.architectures)
        if arch is not None and arch not in causal:
            raise RecipeError(
                "attention.causal_block_frames",
                f"only SkyReels-V2 diffusion-forcing models ({', '.join(causal)}) have causal frame blocks; model.architecture is {_r(arch)}: leave it null",
            )
        problem = latent_frames_problem(c.latent_shape()[0], cbf)
        if problem is not None:
            raise RecipeError("attention.causal_block_frames", f"{problem} of calibration.frames = {c.frames}")
    if c.images is not None and c.source != "trajectories":
        raise RecipeError(
            "calibration.images",
            f"conditions an image-to-video pipeline's trajectories: only source trajectories uses it, source is {_r(c.source)}",
        )
    if c.source == "folder" and not c.path:
        raise RecipeError("calibration.path", "source 'folder' needs the folder of cached *.safetensors inputs")
    if c.timesteps.min >= c.timesteps.max:
        raise RecipeError("calibration.timesteps.max", f"must be greater than min ({c.timesteps.min}), got {c.timesteps.max}")
    if r.stage2.train == "full" and r.stage2.teacher != "cached":
        raise RecipeError(
            "stage2.teacher",
            "must be cached with stage2.train full: the trained base weights are the teacher's, so a live teacher "
            f"would swap the originals in from the host at every step; got {_r(r.stage2.teacher)}",
        )
    # Fields given as null take their value from another field here; r.derived remembers which, so
    # that to_dict writes them as null again and a copy with that other field overridden
    # (with_overrides) derives them anew instead of keeping a stale value.
    derived = set()
    if r.stage3.sampling_steps is None:
        r.stage3.sampling_steps = r.validation.sampling_steps or STAGE3_SAMPLING_STEPS
        derived.add("stage3.sampling_steps")
    for stage in ("stage1", "stage2", "stage3"):
        spec = getattr(r, stage)
        if spec.batch_size is None:
            spec.batch_size = c.batch_size
            derived.add(f"{stage}.batch_size")
    r.derived = frozenset(derived)
    for stage in ("stage1", "stage2", "stage3"):
        spec = getattr(r, stage)
        bs = spec.batch_size
        if bs % c.batch_size:
            raise RecipeError(
                f"{stage}.batch_size",
                f"must be a multiple of calibration.batch_size ({c.batch_size}): a step accumulates whole calibration batches, got {bs}",
            )


__all__ = ["check_recipe"]
