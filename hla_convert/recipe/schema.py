"""The recipe schema: its sections as dataclasses, their defaults, RecipeError.

Recipes say what to convert, how to calibrate, distil and validate, per model family.

A recipe is a YAML file with the sections below (every field optional unless marked; the
built-in recipes in `recipes/*.yaml`, installed as `hla_convert.builtin_recipes`, write them all
out with the reasoning for their values):

    name, description
    model:        architecture (expected transformer class name or null), hub_id (or null),
                  config (or null): the diffusers config of a single-file MODEL (one .safetensors
                  in the original layout), a local pipeline or transformer folder (relative to the
                  current folder) or a Hub ID in the local cache; --config replaces it, and it
                  is not used for a folder or Hub ID MODEL (hla_convert.model.single_file)
    attention:    kind, factors, feature_dim, feature_map, eps, normalize, far, window, tiles
                  (the window as blocks per axis of the latent grid; null = window, in tokens),
                  halo, learn_temperature, causal_block_frames (HLAConfig fields; the last: latent
                  frames per causal block of a SkyReels-V2 diffusion-forcing model, null = as
                  its config says; must divide the calibration's latent frames),
                  include (glob list or null: the architecture's default), exclude (kept softmax),
                  softmax_layers (converted layers given back to softmax after stage 1),
                  softmax_select (attention | output: chosen by attention error or by their
                  effect on the denoiser output, hla_convert.stages.selection)
    calibration:  source (synthetic | trajectories | folder), synthetic (gaussian | demo_videos),
                  path, images (a folder of png/jpg conditioning images for an image-to-video
                  pipeline's trajectories, cycled over the prompts; null: a seeded synthetic
                  image per prompt), prompts, frames, height, width (pixels), vae_scale_temporal,
                  vae_scale_spatial (null: the architecture's VAE), samples, heldout, batch_size,
                  text_len, trajectory_steps, seed,
                  timesteps: {distribution (uniform | logit_normal), min, max (noise level t in
                  [0, 1]; model timestep = 1000 t), mean, std (logit_normal), shift}
    stage1:       steps, lr, batch_size, checkpoint_every, grad_clip
    stage2:       steps (0 = off), lr, batch_size, checkpoint_every, grad_clip, train (hla | lora
                  | full), teacher (cached | live), gradient_checkpointing, compile (torch.compile of the
                  model's repeated blocks for the student's steps: hla_convert.model.compiling), lora_rank (8),
                  lora_alpha (null = rank), lora_targets (module-name suffixes inside each
                  converted attention module; default to_q, to_k, to_v, to_out.0), lora_ffn (also
                  the feed-forward linears of the blocks holding converted modules), lora_lr
                  (null = lr). "lora" trains peft LoRA adapters on those base linears together
                  with the HLA parameters; the teacher is the same weights with the adapters
                  disabled (hla_convert.model.lora). "full" trains every weight of the blocks
                  holding converted modules (hla_convert.model.full_tuning) with the HLA
                  parameters, all at lr; the lora_* fields are then ignored (no LoRA is added).
                  teacher "cached" (default): the teacher's outputs for the stage-2 inputs are
                  computed once before the first step and kept on the host (the inputs are
                  fixed, so the targets are too: half the compute of "live", which runs the
                  teacher at every step); "full" needs "cached".
    stage3:       steps (0 = off), lr, batch_size, checkpoint_every, grad_clip, sampling_steps
                  (null = validation.sampling_steps, or 10 when that is 0). On-policy trajectory
                  distillation (hla_convert.stages.onpolicy): per input, the STUDENT samples from
                  seeded noise for k steps (k uniform in [0, sampling_steps)) with the model's
                  scheduler, and its prediction at the point reached is matched to the teacher's
                  there, so the errors it makes along its own trajectory (exposure bias) are
                  trained away. It trains what stage 2 trained (the HLA parameters, and the LoRA
                  adapters stage 2 added, at lr x stage2.lora_lr / stage2.lr). Cost per input: k
                  student forwards without gradients (on average (sampling_steps - 1) / 2), one
                  teacher forward and one student forward + backward. Needs a scheduler: refused
                  (before the model load) for a bare transformer. Off in every shipped recipe
                  until the fidelity benchmark (benchmarks/fidelity, the *-onpolicy configs)
                  measures its sampled-video PSNR
    validation:   max_attention_rel_l2, max_output_rel_l2, min_output_cosine, max_latent_rel_l2,
                  min_latent_psnr (null = not checked), sampling_steps (0 = no sampling run),
                  timestep_buckets

A bad field raises RecipeError whose message starts with the field's dotted path and says what is
allowed: "stage1.lr: must be a positive number, got 'fast'". The checks are in recipe.checks,
the Recipe in recipe.recipe, loading (built-in names, files) in recipe.builtin, which (with the
package) re-exports this module's public names.
"""

from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import dataclass, field
from typing import Any

from ..model.architectures import with_field
from ..model.config import HLAConfig

BUILTIN_PACKAGE = "hla_convert.builtin_recipes"

SOURCES = ("synthetic", "trajectories", "folder")
SYNTHETIC = ("gaussian", "demo_videos")
DISTRIBUTIONS = ("uniform", "logit_normal")
# What stage 2 may train: the HLA parameters, those plus LoRA adapters on base linears (disabled in
# teacher mode), or those plus every base weight of the converted blocks ("full"): the teacher is
# then the cached targets while training, and teacher mode swaps the original weights in from a
# host copy (hla_convert.model.full_tuning), so one copy of the weights stays on the device.
STAGE2_TRAIN = ("hla", "lora", "full")
# Where stage 2's targets come from: computed once before the first step and kept on the host
# ("cached"), or a teacher forward at every step ("live", the behaviour before caching).
STAGE2_TEACHER = ("cached", "live")
# How attention.softmax_layers picks its layers (hla_convert.stages.selection): "attention" the
# largest stage-1 attention error; "output" greedily the layer whose return to softmax lowers the
# denoiser output error against the teacher most.
SOFTMAX_SELECT = ("attention", "output")

# (temporal, spatial) compression of each architecture's VAE: latent frames = (frames - 1) / t + 1 (model.architectures).
VAE_SCALES: dict[str, tuple[int, int]] = with_field("vae_scales")


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
    config: str | None = None  # a single-file MODEL's diffusers config (folder or Hub ID)


# The attention section: HLAConfig's fields (their names, defaults and checks have one home,
# model.config.HLAConfig; tuples are lists here, as YAML writes them) and the recipe's own:
#   include, exclude   which attention modules to convert (globs; null include = the architecture's)
#   softmax_layers     how many converted layers go back to exact softmax after stage 1, worst
#                      attention error first (hla_convert.stages.selection); 0 = none
#   softmax_select     how they are chosen: "attention" (stage-1 attention error) or "output" (their
#                      measured effect on the denoiser output error)
# in the order recipes have always been written in (causal_block_frames last).
HLA_FIELDS = tuple(f.name for f in dataclasses.fields(HLAConfig))
_RECIPE_ATTENTION_FIELDS = [
    ("include", "list[str] | None", field(default=None)),
    ("exclude", "list[str]", field(default_factory=list)),
    ("softmax_layers", "int", field(default=0)),
    ("softmax_select", "str", field(default="attention")),
]


def _attention_fields() -> list[tuple[str, Any, Any]]:
    out = []
    for f in dataclasses.fields(HLAConfig):
        if f.name == "causal_block_frames":
            out += _RECIPE_ATTENTION_FIELDS
        if isinstance(f.default, tuple):
            out.append((f.name, "list[int]", field(default_factory=lambda d=f.default: list(d))))
        else:
            out.append((f.name, f.type, field(default=f.default)))
    return out


AttentionSpec = dataclasses.make_dataclass("AttentionSpec", _attention_fields())
AttentionSpec.__module__ = __name__
AttentionSpec.__doc__ = "The recipe's attention section: HLAConfig's fields, then include, exclude, softmax_layers, softmax_select."


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
    images: str | None = None
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
    teacher: str = "cached"
    gradient_checkpointing: bool = False
    compile: bool = False
    lora_rank: int = 8
    lora_alpha: float | None = None  # null: lora_rank (LoRA scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_ffn: bool = False
    lora_lr: float | None = None  # null: lr


@dataclass
class Stage3Spec:
    steps: int = 0
    lr: float = 1e-4  # stage 2's default: the same parameters and the same loss, on other inputs
    batch_size: int | None = None  # null: calibration.batch_size
    checkpoint_every: int = 50
    grad_clip: float = 1.0
    # the student sampler's steps; null: validation.sampling_steps (the trajectory the sampling
    # check measures), or STAGE3_SAMPLING_STEPS when that is 0
    sampling_steps: int | None = None
    # the share of a step's inputs taken from the student's trajectories; the rest are calibration
    # inputs as stage 2 saw them (teacher-made), so stage 3 does not forget the teacher's inputs
    onpolicy_share: float = 1.0


# stage3.sampling_steps when neither it nor validation.sampling_steps is set: the few-step regime
# the distilled video samplers run in, and the cost of a step stays bounded (k <= 9 extra forwards)
STAGE3_SAMPLING_STEPS = 10


@dataclass
class ValidationSpec:
    max_attention_rel_l2: float | None = None
    max_output_rel_l2: float | None = None
    min_output_cosine: float | None = None
    max_latent_rel_l2: float | None = None
    min_latent_psnr: float | None = None
    sampling_steps: int = 0
    timestep_buckets: int = 4
    # > 0: the sampled-video check also samples with the first k steps by the teacher (at most
    # sampling_steps - 1 of them, so that a recipe copied with fewer sampling steps still runs)
    teacher_steps: int = 0


__all__ = [
    "AttentionSpec",
    "CalibrationSpec",
    "ModelSpec",
    "RecipeError",
    "Stage1Spec",
    "Stage2Spec",
    "Stage3Spec",
    "TimestepSpec",
    "ValidationSpec",
]
