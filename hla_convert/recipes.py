"""Recipes: what to convert, how to calibrate, distil and validate, per model family.

A recipe is a YAML file with the sections below (every field optional unless marked; the
built-in recipes in `recipes/*.yaml`, installed as `hla_convert.builtin_recipes`, write them all
out with the reasoning for their values):

    name, description
    model:        architecture (expected transformer class name or null), hub_id (or null)
    attention:    kind, factors, feature_dim, feature_map, eps, normalize, far, window, halo,
                  learn_temperature (HLAConfig fields),
                  include (glob list or null: the architecture's default), exclude (kept softmax)
    calibration:  source (synthetic | trajectories | folder), synthetic (gaussian | demo_videos),
                  path, prompts, frames, height, width (pixels), vae_scale_temporal,
                  vae_scale_spatial (null: the architecture's VAE), samples, heldout, batch_size,
                  text_len, trajectory_steps, seed,
                  timesteps: {distribution (uniform | logit_normal), min, max (noise level t in
                  [0, 1]; model timestep = 1000 t), mean, std (logit_normal), shift}
    stage1:       steps, lr, batch_size, checkpoint_every, grad_clip
    stage2:       steps (0 = off), lr, batch_size, checkpoint_every, grad_clip, train (hla | lora),
                  gradient_checkpointing, lora_rank (8), lora_alpha (null = rank), lora_targets
                  (module-name suffixes inside each converted attention module; default to_q,
                  to_k, to_v, to_out.0), lora_ffn (also the feed-forward linears of the blocks
                  holding converted modules), lora_lr (null = lr). "lora" trains peft LoRA
                  adapters on those base linears together with the HLA parameters; the teacher
                  is the same weights with the adapters disabled (hla_convert.lora)
    validation:   max_attention_rel_l2, max_output_rel_l2, min_output_cosine, max_latent_rel_l2,
                  min_latent_psnr (null = not checked), sampling_steps (0 = no sampling run),
                  timestep_buckets

A bad field raises RecipeError whose message starts with the field's dotted path and says what is
allowed: "stage1.lr: must be a positive number, got 'fast'".
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import FAR_KINDS, KINDS, ConfigError, HLAConfig, _KIND_FEATURE_MAPS

BUILTIN_PACKAGE = "hla_convert.builtin_recipes"

SOURCES = ("synthetic", "trajectories", "folder")
SYNTHETIC = ("gaussian", "demo_videos")
DISTRIBUTIONS = ("uniform", "logit_normal")
# What stage 2 may train: the HLA parameters, or those plus LoRA adapters on base linears. Never
# the base weights themselves: the teacher is the same weights in "teacher" mode (one copy,
# DESIGN.md), so that would move the teacher too; LoRA adapters are disabled in teacher mode.
STAGE2_TRAIN = ("hla", "lora")

# (temporal, spatial) compression of each architecture's VAE: latent frames = (frames - 1) / t + 1.
VAE_SCALES: dict[str, tuple[int, int]] = {
    "WanTransformer3DModel": (4, 8),
    "WanVACETransformer3DModel": (4, 8),
    "SkyReelsV2Transformer3DModel": (4, 8),
    "CogVideoXTransformer3DModel": (4, 8),
    "ConsisIDTransformer3DModel": (4, 8),
    "HunyuanVideoTransformer3DModel": (4, 8),
    "HunyuanVideoFramepackTransformer3DModel": (4, 8),
    "LTXVideoTransformer3DModel": (8, 32),
    "MochiTransformer3DModel": (6, 8),
    "AllegroTransformer3DModel": (4, 8),
}


class RecipeError(ValueError):
    """A bad recipe field. The message starts with the field's dotted path; `.field` holds it."""

    def __init__(self, field_path: str, message: str):
        self.field = field_path = _clip(str(field_path), 120)
        text = f"{field_path}: {message}" if field_path else str(message)
        super().__init__(_clip(" ".join(text.split()), _MAX_MESSAGE))


# A message never carries a whole input: values are shown through _r (a bounded repr), and a whole
# message is cut at _MAX_MESSAGE characters whatever a check put in it.
_MAX_MESSAGE = 400
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def _r(value: Any) -> str:
    """repr(value), bounded (at most ~80 characters per string, a few items per level): safe on any input."""
    return _clip(_REPR.repr(value), 120)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- sections --------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    architecture: str | None = None
    hub_id: str | None = None


@dataclass
class AttentionSpec:
    kind: str = "hadamard"
    factors: int = 2
    feature_dim: int = 32
    feature_map: str | None = None
    eps: float = 1e-6
    normalize: bool = True
    # hybrid only: the far kind, the softmax window and its halo on the latent token grid
    far: str = "hadamard"
    window: list[int] = field(default_factory=lambda: [1, 0, 0])
    halo: list[int] = field(default_factory=lambda: [0, 0, 0])
    learn_temperature: bool = False
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    # how many converted layers go back to exact softmax after stage 1, worst attention error first
    # (hla_convert.selection); 0 = none
    softmax_layers: int = 0


@dataclass
class TimestepSpec:
    distribution: str = "uniform"
    min: float = 0.0
    max: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0


@dataclass
class CalibrationSpec:
    source: str = "synthetic"
    synthetic: str = "gaussian"
    path: str | None = None
    prompts: list[str] | None = None
    frames: int = 1
    height: int = 64
    width: int = 64
    vae_scale_temporal: int | None = None
    vae_scale_spatial: int | None = None
    samples: int = 16
    heldout: int = 4
    batch_size: int = 1
    text_len: int = 16
    trajectory_steps: int = 8
    seed: int = 0
    timesteps: TimestepSpec = field(default_factory=TimestepSpec)

    def latent_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) of the latent the VAE would make of frames x height x width pixels."""
        vt, vs = self.vae_scale_temporal or 1, self.vae_scale_spatial or 1
        return (self.frames - 1) // vt + 1, self.height // vs, self.width // vs


@dataclass
class Stage1Spec:
    steps: int = 200
    lr: float = 1e-3
    batch_size: int | None = None  # null: calibration.batch_size
    checkpoint_every: int = 50
    grad_clip: float = 1.0


@dataclass
class Stage2Spec:
    steps: int = 0
    lr: float = 1e-4
    batch_size: int | None = None  # null: calibration.batch_size
    checkpoint_every: int = 50
    grad_clip: float = 1.0
    train: str = "hla"
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    lora_alpha: float | None = None  # null: lora_rank (LoRA scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_ffn: bool = False
    lora_lr: float | None = None  # null: lr


@dataclass
class ValidationSpec:
    max_attention_rel_l2: float | None = None
    max_output_rel_l2: float | None = None
    min_output_cosine: float | None = None
    max_latent_rel_l2: float | None = None
    min_latent_psnr: float | None = None
    sampling_steps: int = 0
    timestep_buckets: int = 4


@dataclass
class Recipe:
    name: str
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    stage1: Stage1Spec = field(default_factory=Stage1Spec)
    stage2: Stage2Spec = field(default_factory=Stage2Spec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)

    def hla_config(self) -> HLAConfig:
        a = self.attention
        return HLAConfig(
            kind=a.kind, factors=a.factors, feature_dim=a.feature_dim, feature_map=a.feature_map, eps=a.eps, normalize=a.normalize,
            far=a.far, window=tuple(a.window), halo=tuple(a.halo), learn_temperature=a.learn_temperature,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        return parse_recipe(data)

    def with_overrides(
        self,
        steps: int | None = None,
        kind: str | None = None,
        stage2_steps: int | None = None,
        source: str | None = None,
        path: str | None = None,
        seed: int | None = None,
        fields: dict[str, Any] | None = None,
    ) -> "Recipe":
        """A validated copy with command-line overrides applied.

        steps:        stage-1 steps. Stage 2 is scaled by the same factor (rounded, at least 1 when
                      it was on, 0 stays 0), so `--steps` shortens or lengthens the whole run in
                      proportion; steps=0 turns both stages off. Pass stage2_steps to set it outright.
        kind:         attention kind (the comparison benchmark's `--attention`). The feature map
                      falls back to the new kind's default when the old one is not allowed for it.
        source, path: calibration source and its path (folder of cached inputs, or pipeline).
        seed:         calibration seed.
        fields:       any other field by dotted path, e.g. {"stage1.lr": 3e-4}.
        """
        data = self.to_dict()
        if steps is not None:
            old1, old2 = data["stage1"]["steps"], data["stage2"]["steps"]
            _set_path(data, "stage1.steps", steps)
            if stage2_steps is None and isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0 and old2:
                # steps 0 means no training at all: stage 2 goes to 0 too
                data["stage2"]["steps"] = 0 if steps == 0 else max(1, round(old2 * steps / max(old1, 1)))
        if stage2_steps is not None:
            _set_path(data, "stage2.steps", stage2_steps)
        if kind is not None:
            data["attention"]["kind"] = kind
            maps_of = data["attention"].get("far") if kind == "hybrid" else kind  # hybrid: its far kind's maps
            if maps_of in _KIND_FEATURE_MAPS and data["attention"]["feature_map"] not in _KIND_FEATURE_MAPS[maps_of]:
                data["attention"]["feature_map"] = None
        if source is not None:
            data["calibration"]["source"] = source
        if path is not None:
            data["calibration"]["path"] = str(path)
        if seed is not None:
            data["calibration"]["seed"] = seed
        for key, value in (fields or {}).items():
            _set_path(data, key, value)
        return parse_recipe(data)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise RecipeError(".".join(parts[: i + 1]), f"not a section; sections: {', '.join(k for k, v in node.items() if isinstance(v, dict))}")
        node = node[part]
    if parts[-1] not in node:
        raise RecipeError(dotted, f"unknown field; allowed: {', '.join(node)}")
    node[parts[-1]] = value


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


def _grid_triple(path: str, v: Any) -> list[int]:
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        return list(v)
    raise RecipeError(path, f"must be 3 integers >= 0 ([frames, height, width] in latent tokens, 0 = whole extent), got {_r(v)}")


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


_MODEL = {"architecture": _optional_str, "hub_id": _optional_str}

_ATTENTION = {
    "kind": lambda p, v: _choice(p, v, KINDS),
    "factors": lambda p, v: _integer(p, v),
    "feature_dim": lambda p, v: _integer(p, v, 2),
    "feature_map": _optional_str,
    "eps": lambda p, v: _number(p, v, positive=True),
    "normalize": _bool,
    "far": lambda p, v: _choice(p, v, FAR_KINDS),
    "window": _grid_triple,
    "halo": _grid_triple,
    "learn_temperature": _bool,
    "include": lambda p, v: _string_list(p, v, nullable=True),
    "exclude": lambda p, v: _string_list(p, v, nullable=False),
    "softmax_layers": lambda p, v: _integer(p, v, 0),
}

_TIMESTEPS = {
    "distribution": lambda p, v: _choice(p, v, DISTRIBUTIONS),
    "min": lambda p, v: _number(p, v, lo=0.0, hi=1.0),
    "max": lambda p, v: _number(p, v, lo=0.0, hi=1.0),
    "mean": _number,
    "std": lambda p, v: _number(p, v, positive=True),
    "shift": lambda p, v: _number(p, v, positive=True),
}

_CALIBRATION = {
    "source": lambda p, v: _choice(p, v, SOURCES),
    "synthetic": lambda p, v: _choice(p, v, SYNTHETIC),
    "path": _optional_str,
    "prompts": lambda p, v: _string_list(p, v, nullable=True),
    "frames": _integer,
    "height": _integer,
    "width": _integer,
    "vae_scale_temporal": _optional(_integer),
    "vae_scale_spatial": _optional(_integer),
    "samples": _integer,
    "heldout": _integer,
    "batch_size": _integer,
    "text_len": _integer,
    "trajectory_steps": _integer,
    "seed": lambda p, v: _integer(p, v, 0),
    "timesteps": lambda p, v: _section(p, v, TimestepSpec, _TIMESTEPS),
}

_STAGE1 = {
    "steps": lambda p, v: _integer(p, v, 0),
    "lr": lambda p, v: _number(p, v, positive=True),
    "batch_size": _optional(_integer),
    "checkpoint_every": _integer,
    "grad_clip": lambda p, v: _number(p, v, positive=True),
}

_STAGE2 = {
    **_STAGE1,
    "train": lambda p, v: _choice(p, v, STAGE2_TRAIN),
    "gradient_checkpointing": _bool,
    "lora_rank": _integer,
    "lora_alpha": _optional(lambda p, v: _number(p, v, positive=True)),
    "lora_targets": lambda p, v: _nonempty_list(p, v),
    "lora_ffn": _bool,
    "lora_lr": _optional(lambda p, v: _number(p, v, positive=True)),
}

_VALIDATION = {
    "max_attention_rel_l2": _optional(lambda p, v: _number(p, v, nonneg=True)),
    "max_output_rel_l2": _optional(lambda p, v: _number(p, v, nonneg=True)),
    "min_output_cosine": _optional(lambda p, v: _number(p, v, lo=-1.0, hi=1.0)),
    "max_latent_rel_l2": _optional(lambda p, v: _number(p, v, nonneg=True)),
    "min_latent_psnr": _optional(_number),
    "sampling_steps": lambda p, v: _integer(p, v, 0),
    "timestep_buckets": _integer,
}

_TOP = ("name", "description", "model", "attention", "calibration", "stage1", "stage2", "validation")


def parse_recipe(data: Any) -> Recipe:
    """Validate a recipe mapping (as read from YAML) into a Recipe; RecipeError names the bad field."""
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
    calibration = _section("calibration", data.get("calibration"), CalibrationSpec, _CALIBRATION)
    stage1 = _section("stage1", data.get("stage1"), Stage1Spec, _STAGE1)
    stage2 = _section("stage2", data.get("stage2"), Stage2Spec, _STAGE2)
    validation = _section("validation", data.get("validation"), ValidationSpec, _VALIDATION)
    recipe = Recipe(name.strip(), description.strip(), model, attention, calibration, stage1, stage2, validation)
    _check_together(recipe)
    return recipe


def _check_together(r: Recipe) -> None:
    """Checks that involve more than one field."""
    try:
        r.hla_config()
    except ConfigError as e:
        raise RecipeError(f"attention.{str(e).split(':', 1)[0]}", str(e).split(": ", 1)[1]) from None
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
    if c.source == "folder" and not c.path:
        raise RecipeError("calibration.path", "source 'folder' needs the folder of cached *.safetensors inputs")
    if c.timesteps.min >= c.timesteps.max:
        raise RecipeError("calibration.timesteps.max", f"must be greater than min ({c.timesteps.min}), got {c.timesteps.max}")
    for stage in ("stage1", "stage2"):
        spec = getattr(r, stage)
        if spec.batch_size is None:
            spec.batch_size = c.batch_size
        bs = spec.batch_size
        if bs % c.batch_size:
            raise RecipeError(
                f"{stage}.batch_size",
                f"must be a multiple of calibration.batch_size ({c.batch_size}): a step accumulates whole calibration batches, got {bs}",
            )


# -- loading ---------------------------------------------------------------------------------------


def _builtin_files() -> dict[str, Any]:
    root = importlib.resources.files(BUILTIN_PACKAGE)
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe name -> its one-line description, sorted by name."""
    out = {}
    for name, res in sorted(_builtin_files().items()):
        data = yaml.safe_load(res.read_text(encoding="utf-8")) or {}
        out[name] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def recipe_text(name: str) -> str:
    """The YAML text (comments included) of a built-in recipe, or of a recipe file."""
    files = _builtin_files()
    if name in files:
        return files[name].read_text(encoding="utf-8")
    if _looks_like_path(name):
        from .recipe_yaml import read_recipe_file

        return read_recipe_file(name)
    raise RecipeError("", _unknown_message(name, files))


def _looks_like_path(s: str) -> bool:
    return s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s or Path(s).is_file()


def _unknown_message(name: str, files: dict[str, Any]) -> str:
    return f"unknown recipe {_r(name)}; built-in recipes: {', '.join(sorted(files))} (or give the path of a YAML file)"


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe YAML file by path (read within the bounds of
    hla_convert.recipe_yaml: size, alias-expanded nodes, depth)."""
    from .recipe_yaml import parse_yaml, read_recipe_file

    files = _builtin_files()
    if name_or_path in files:
        text, origin = files[name_or_path].read_text(encoding="utf-8"), f"built-in recipe {name_or_path}"
    elif _looks_like_path(name_or_path):
        text, origin = read_recipe_file(name_or_path), _r(str(name_or_path))
    else:
        raise RecipeError("", _unknown_message(name_or_path, files))
    data = parse_yaml(text, origin)
    if data is None:
        raise RecipeError("", f"recipe file {origin} is empty (no YAML document in it)")
    return parse_recipe(data)


__all__ = [
    "AttentionSpec",
    "CalibrationSpec",
    "ModelSpec",
    "Recipe",
    "RecipeError",
    "Stage1Spec",
    "Stage2Spec",
    "TimestepSpec",
    "ValidationSpec",
    "builtin_recipes",
    "load_recipe",
    "parse_recipe",
    "recipe_text",
]
