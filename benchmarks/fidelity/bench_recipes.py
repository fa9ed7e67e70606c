"""The fidelity benchmark's configs and the recipes they resolve to (run.py runs them, report.py
names them; no torch here, so the report does not need it).

Each config is a set of recipe overrides by dotted field on one of two bases (run.py --base):

- `bench`: the benchmark's own recipes/<model>.yaml (CONFIGS' first rows);
- `shipped`: the built-in recipe of the architecture as a user runs it on the real model (SHIPPED),
  with only the fields that name the benchmark's model and data changed (SHIPPED_CHANGES) and
  attention.softmax_layers kept as the same fraction of the blocks (scaled_softmax_layers); the
  `shipped*` rows (SHIPPED_CONFIGS) each change one lever on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- configs
# Recipe overrides by dotted field, on recipes/<model>.yaml. Adding a config is one line.
LORA = {"stage2.train": "lora"}  # rank 8 on to_q/to_k/to_v/to_out.0, lr = stage2.lr (recipe defaults)
HYBRID = {"attention.kind": "hybrid", "attention.far": "hadamard", "attention.window": [1, 0, 0]}
CONFIGS: dict[str, dict[str, Any]] = {
    "softmax": {"attention.kind": "softmax"},  # sanity: identity conversion, zero drift, loss ratio 1
    "hla": {},  # the base recipe: hadamard, taylor, F = 2, r = 32, stage 2 on the HLA parameters
    "hla-lora": {**LORA},
    "linear-lora": {"attention.kind": "linear", "attention.feature_map": None, **LORA},  # same r^F state
    "hybrid": {**HYBRID},
    "hybrid-lora": {**HYBRID, **LORA},
    "hybrid-linear-lora": {**HYBRID, "attention.far": "linear", "attention.feature_map": None, **LORA},
    "hybrid-lora-tube": {**HYBRID, "attention.window": [0, 8, 8], **LORA},
    "hybrid-lora-chunk": {**HYBRID, "attention.window": [2, 0, 0], "attention.halo": [1, 0, 0], **LORA},
    "hla-softplus-lora": {"attention.feature_map": "softplus", **LORA},  # separate maps per factor
    "hla-f3-lora": {"attention.feature_map": "softplus", "attention.factors": 3, "attention.feature_dim": 16, **LORA},
    "hybrid-lora-temp": {**HYBRID, "attention.learn_temperature": True, **LORA},
    "hybrid-lora-ffn": {**HYBRID, **LORA, "stage2.lora_ffn": True},
    "hybrid-lora-keep2": {**HYBRID, **LORA, "attention.softmax_layers": 2},
    # r / head dim = 1/4 instead of 1/2: what r = 32 instead of 64 is on a 128-dim model (Wan 1.3B)
    "hybrid-lora-keep2-r16": {**HYBRID, **LORA, "attention.softmax_layers": 2, "attention.feature_dim": 16},
    # the levers after keep2 (absolute steps: at --steps-scale 0.5 the default's stage 2 is 300 steps)
    "hybrid-lora-keep2-s2x4": {**HYBRID, **LORA, "attention.softmax_layers": 2, "stage2.steps": 1200},
    "hybrid-lora-keep2-lr32": {**HYBRID, **LORA, "attention.softmax_layers": 2, "stage2.lora_rank": 32},
    "hybrid-lora-keep2-lr32-s2x4": {**HYBRID, **LORA, "attention.softmax_layers": 2, "stage2.lora_rank": 32, "stage2.steps": 1200},
    # not yet run: the next ones after the above (still falling at 1,200 steps; the LoRA rate)
    "hybrid-lora-keep2-lr32-s2x8": {**HYBRID, **LORA, "attention.softmax_layers": 2, "stage2.lora_rank": 32, "stage2.steps": 2400},
    "hybrid-lora-keep2-lr32-s2x4-lrx2": {
        **HYBRID, **LORA, "attention.softmax_layers": 2, "stage2.lora_rank": 32, "stage2.steps": 1200, "stage2.lora_lr": 1.0e-3,
    },
}


class HalfOf:
    """A config value resolved on the run's recipe: half of another field's value (rounded, >= 1
    when that field is > 0), e.g. the on-policy stage at half of stage 2's steps."""

    def __init__(self, path: str):
        self.path = path

    def resolve(self, data: dict) -> int:
        value = data
        for key in self.path.split("."):
            value = value[key]
        return max(1, round(value / 2)) if value else 0

    def __repr__(self) -> str:
        return f"half of {self.path}"


# Stage 3 (on-policy trajectory distillation, hla_convert.stages.onpolicy) on top of a row above,
# at half of that row's stage-2 steps, sampling with the measure's --sampling-steps (the recipe's
# validation.sampling_steps, stage3.sampling_steps' default), so the sampled-video PSNR is compared
# with and without it at the same stage 2. The teachers are bare transformers: run.py gives stage 3
# the measure's scheduler through a pipeline folder (conversion.onpolicy_pipeline).
ONPOLICY_OF = ("hla-lora", "hybrid-lora-keep2", "hybrid-lora-keep2-lr32-s2x4")
for _row in ONPOLICY_OF:
    CONFIGS[f"{_row}-onpolicy"] = {**CONFIGS[_row], "stage3.steps": HalfOf("stage2.steps")}


# Rows on the shipped recipe (--base shipped). `shipped` is it as a user runs it: 64 calibration
# videos, the real recipe's count; each other row changes one lever.
SHIPPED_CONFIGS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "shipped-cal512": {"calibration.samples": 512},  # what the small calibration set costs
    "shipped-full": {"stage2.train": "full"},  # every base weight instead of LoRA (stage2.train: full)
    # wan2.1-t2v-1.3b trains full since 2026-12-07 (its "shipped" is the row above): LoRA rows say so
    "shipped-lora": {"stage2.train": "lora"},
    "shipped-lora64": {"stage2.train": "lora", "stage2.lora_rank": 64},
    "shipped-lora128": {"stage2.train": "lora", "stage2.lora_rank": 128},
    "shipped-live": {"stage2.teacher": "live"},  # the teacher run live in stage 2, not cached targets
    "shipped-onpolicy": {"stage3.steps": HalfOf("stage2.steps")},  # the on-policy stage, half of stage 2's steps
    # ... with half of its inputs the calibration ones (on trajectories alone it forgot them: drift 0.17 -> 0.26)
    "shipped-onpolicy-mix": {"stage3.steps": HalfOf("stage2.steps"), "stage3.onpolicy_share": 0.5},
    "shipped-select-output": {"attention.softmax_select": "output"},  # kept layers by their effect on the output
    # wan2.1-t2v-1.3b chooses by output since 2026-12-06 (where "shipped" now is the row above): the old choice
    "shipped-select-attention": {"attention.softmax_select": "attention"},
    # windows against the own frame (1 frame = 16 x 16 = 256 keys of 4,096). The shipped Wan and
    # CogVideoX recipes use tiles since 2026-12-07 ([0, 4, 4] on this grid), so each window row
    # clears `tiles` and gives its window in tokens:
    "shipped-frame": {"attention.tiles": None, "attention.window": [1, 0, 0]},  # the own frame (the old default)
    "shipped-chunk2": {"attention.tiles": None, "attention.window": [2, 0, 0]},  # query chunks of 2 frames, keys the same 2 (512)
    "shipped-chunk1-halo1": {"attention.tiles": None, "attention.window": [1, 0, 0], "attention.halo": [1, 0, 0]},  # own frame + 1 frame each side (768 keys)
    # the own frame's size as a spatial tile: 4 x 4 tokens through all 16 frames = 256 keys (what the
    # shipped tiles give on this grid, in tokens: the rows that measured it before it shipped)
    "shipped-tile": {"attention.tiles": None, "attention.window": [0, 4, 4]},
    # twice its keys (4 x 8 tokens through all frames = 512, what chunk2 sees): what more keys buy as a tile
    "shipped-tile2x": {"attention.tiles": None, "attention.window": [0, 4, 8]},
    # the levers on the tile (not yet run), with its window in tokens so that they start from the
    # ninth run's stage-1 checkpoints of shipped-tile (results/2026-12-07_h100_deep4_stage1): the
    # stage-1 fingerprint covers the attention config as written, and tiles [1, 5, 4] is another
    # writing of the same window
    "shipped-tile-s2x2": {"attention.tiles": None, "attention.window": [0, 4, 4], "stage2.steps": 800},
    # the window's shape and size past the tenth run (not yet run): 512 keys as a cube of half the
    # frames instead of a tube through all of them; 4x the tile's keys (1,024, a quarter of the
    # video); the far part at r = 64 under the 4 x 8 tile (r = 32 was chosen on the own frame)
    "shipped-cube": {"attention.tiles": None, "attention.window": [8, 8, 8]},
    "shipped-tile4x": {"attention.tiles": None, "attention.window": [0, 8, 8]},
    # the two levers that got closest to 0.05 on Wan, together: the 8 x 8 tile (0.0510, eleventh run)
    # with 2x the stage-2 steps (0.002-0.004 wherever tried); stage 1 from shipped-tile4x's checkpoints
    "shipped-tile4x-s2x2": {"attention.tiles": None, "attention.window": [0, 8, 8], "stage2.steps": 800},
    "shipped-tile2x-r64": {"attention.tiles": None, "attention.window": [0, 4, 8], "attention.feature_dim": 64},
    # the 4 x 4 tile widened by one token each side (6 x 6 x 16 = 576 keys, about the 4 x 8 tile's 512):
    # whether overlapping windows beat a bigger tile (runs on the PyTorch reference: no halo kernel)
    "shipped-tile-halo1": {"attention.tiles": None, "attention.window": [0, 4, 4], "attention.halo": [0, 1, 1]},
    # stage-2 choices on the tiles, their window in tokens so that they start from the committed
    # stage-1 checkpoints (a recipe's `tiles` fingerprint differently from the same window in tokens):
    # CogVideoX with Wan's stage-2 choices (all weights, layers by output effect) on its 4 x 4 tile
    # (results/2026-12-07_h100_deep4_stage1); LoRA r 64 against full on Wan's 4 x 8 tile (deep5_stage1)
    "shipped-tile-select-output-full": {
        "attention.tiles": None, "attention.window": [0, 4, 4], "attention.softmax_select": "output", "stage2.train": "full",
    },
    "shipped-tile2x-lora64": {"attention.tiles": None, "attention.window": [0, 4, 8], "stage2.train": "lora", "stage2.lora_rank": 64},
    # CogVideoX's 4 x 8 tile split by seed in the tenth run (0.063 on seed 1, 0.083-0.085 on seeds 0
    # and 2), and its kept layer split the same way: by attention error (the CogVideoX recipe's
    # choice) seed 1 kept block 2, seeds 0 and 2 block 13, their errors within 2 %. The same stage 1
    # (deep5_stage1), the kept layer chosen by its effect on the output instead
    "shipped-tile2x-select-output": {"attention.tiles": None, "attention.window": [0, 4, 8], "attention.softmax_select": "output"},
    # the two levers that helped on the tile, together (stage 1 from shipped-tile2x's checkpoints)
    "shipped-tile2x-s2x2": {"attention.tiles": None, "attention.window": [0, 4, 8], "stage2.steps": 800},
    "shipped-tile-onpolicy-mix": {
        "attention.tiles": None, "attention.window": [0, 4, 4], "stage3.steps": HalfOf("stage2.steps"), "stage3.onpolicy_share": 0.5,
    },
    # the next ones after the first deep run (docs/comparison.md "Fifth run"): the stage-2 schedule
    # (the fast tier's base trains 5x the shipped lr; 4x the steps took it 0.112 -> 0.085) and the
    # two levers that helped, together
    "shipped-s2x4": {"stage2.steps": 1600},
    "shipped-lr5x": {"stage2.lr": 5.0e-4},
    "shipped-select-output-full": {"attention.softmax_select": "output", "stage2.train": "full"},
    # the stage-2 levers together (second deep run): the longer schedule with all weights or 5x the lr
    "shipped-s2x4-full": {"stage2.steps": 1600, "stage2.train": "full"},
    "shipped-s2x4-lr5x": {"stage2.steps": 1600, "stage2.lr": 5.0e-4},
    # the stage-2 schedule on the full-tuning default (third deep run): 5x the lr with LoRA (as good
    # as full at 1e-4 on the CPU), and twice the steps, alone and at 2.5x / 5x the lr
    "shipped-lora-lr5x": {"stage2.train": "lora", "stage2.lr": 5.0e-4},
    "shipped-lr2.5x": {"stage2.lr": 2.5e-4},
    "shipped-s2x2": {"stage2.steps": 800},
    "shipped-s2x2-lr5x": {"stage2.steps": 800, "stage2.lr": 5.0e-4},
    "shipped-keep0": {"attention.softmax_layers": 0},
    "shipped-keep2": {"attention.softmax_layers": 2},
}
CONFIGS.update(SHIPPED_CONFIGS)
DEFAULT_CONFIGS = [c for c in CONFIGS if c != "softmax" and not c.startswith("shipped")]
BASES = ("bench", "shipped")
TIERS = {"fast": "models", "deep": "models-deep"}  # bench_models.DEPTHS blocks each


# ----------------------------------------------------------------------------------------------- recipes

# The built-in recipe of each architecture the shipped* rows change, and the number of blocks of the
# model it is for (the diffusers transformer/config.json num_layers of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
# and of THUDM/CogVideoX-2b: 30 each; the recipes' comments say so too). The speed-first recipes, the
# defaults until 2026-12-07 (night), so that every row and record keeps its meaning: the defaults now
# (wan2.1-t2v-1.3b, cogvideox-2b: fidelity first) are the rows shipped-tile4x-s2x2 and shipped-tile4x
# (tests/fidelity/test_fidelity_rows.py holds them to it).
SHIPPED: dict[str, tuple[str, int]] = {"wan": ("wan2.1-t2v-1.3b-fast", 30), "cogvideox": ("cogvideox-2b-fast", 30)}
# The only fields --base shipped changes (besides a row's own overrides, stage1/2.steps when
# --steps-scale is given and validation.sampling_steps / teacher_steps when --sampling-steps is):
# what names the benchmark's model and its inputs. Batch sizes stay as
# shipped: the inputs are written in batches of the shipped calibration.batch_size.
SHIPPED_CHANGES = (
    "model.hub_id",
    "calibration.source",
    "calibration.path",
    "calibration.samples",
    "calibration.heldout",
    "calibration.seed",
    "calibration.frames",
    "calibration.height",
    "calibration.width",
    "calibration.text_len",
    "calibration.vae_scale_temporal",
    "calibration.vae_scale_spatial",
    "attention.softmax_layers",
)


def scaled_softmax_layers(shipped_count: int, shipped_layers: int, bench_layers: int) -> int:
    """The shipped recipe's softmax_layers as the same fraction of the benchmark model's blocks:
    round(count / shipped_layers x bench_layers), at least 1 when the shipped count is > 0 (2 of
    Wan2.1-1.3B's 30 -> 1 of 15)."""
    if shipped_count <= 0:
        return 0
    return max(1, round(shipped_count / shipped_layers * bench_layers))


def shipped_recipe(arch: str):
    from hla_convert.recipe import load_recipe

    return load_recipe(SHIPPED[arch][0])


def input_plan(arch: str, config: str, args) -> tuple[int, int]:
    """(training samples, samples per saved batch) of a run's inputs. Bench base: --train-samples,
    --batch-size. Shipped base: the row's calibration.samples, else --train-samples if given, else
    the shipped recipe's (64); batches of the shipped calibration.batch_size."""
    if args.base == "bench":
        return args.train_samples, args.batch_size
    cal = shipped_recipe(arch).calibration
    n = CONFIGS[config].get("calibration.samples", args.train_samples or cal.samples)
    batch = getattr(args, "calibration_batch", None) or cal.batch_size
    return int(n), int(CONFIGS[config].get("calibration.batch_size", batch))


def resolved_overrides(config: str, data: dict) -> dict[str, Any]:
    """The config's overrides with HalfOf values resolved on the recipe dict `data`."""
    out = {k: v.resolve(data) if isinstance(v, HalfOf) else v for k, v in CONFIGS[config].items()}
    if out.get("stage3.steps") and "stage3.sampling_steps" not in out:
        # the on-policy stage samples as the measure does (a recipe resolves a null
        # stage3.sampling_steps when it is loaded, before --sampling-steps is applied)
        out["stage3.sampling_steps"] = data["validation"]["sampling_steps"]
    return out


def recipe_for(arch: str, config: str, seed: int, folder: Path, spec, args, bench_layers: int | None = None):
    """The base recipe (--base) with the config's overrides, the run's inputs, seed and step scale.
    Shipped base: bench_layers (the benchmark model's blocks) scales attention.softmax_layers."""
    if args.base == "shipped":
        return shipped_recipe_for(arch, config, seed, folder, spec, args, bench_layers)
    from hla_convert.recipe import load_recipe

    base = load_recipe(str(HERE / "recipes" / f"{arch}.yaml"))
    fields = {
        "calibration.frames": spec.frames,
        "calibration.height": spec.height,
        "calibration.width": spec.width,
        "calibration.text_len": spec.text_len,
        "calibration.samples": args.train_samples,
        "calibration.heldout": args.heldout_samples,
        "calibration.batch_size": args.batch_size,
        "stage1.batch_size": args.batch_size,
        "stage2.batch_size": args.batch_size,
        "stage1.steps": max(1, round(base.stage1.steps * args.steps_scale)),
        "stage2.steps": max(1, round(base.stage2.steps * args.steps_scale)) if base.stage2.steps else 0,
        "validation.sampling_steps": args.sampling_steps,
    }
    fields.update(resolved_overrides(config, base.with_overrides(fields=fields).to_dict()))
    return base.with_overrides(source="folder", path=str(folder), seed=seed, fields=fields)


def shipped_recipe_for(arch: str, config: str, seed: int, folder: Path, spec, args, bench_layers: int | None):
    """The shipped recipe of `arch` on the benchmark model and its inputs: SHIPPED_CHANGES only,
    then the row's overrides; stage1/stage2 steps scaled only by an explicit --steps-scale."""
    if bench_layers is None:
        raise ValueError("--base shipped needs the benchmark model's number of blocks")
    base = shipped_recipe(arch)
    n_train, per_forward = input_plan(arch, config, args)
    fields: dict[str, Any] = {
        "model.hub_id": None,
        "calibration.samples": n_train,
        "calibration.heldout": args.heldout_samples,
        "calibration.frames": spec.frames,
        "calibration.height": spec.height,
        "calibration.width": spec.width,
        "calibration.text_len": spec.text_len,
        "calibration.vae_scale_temporal": 1,  # no VAE: the pixels are the latents
        "calibration.vae_scale_spatial": 1,
        "attention.softmax_layers": scaled_softmax_layers(base.attention.softmax_layers, SHIPPED[arch][1], bench_layers),
    }
    if per_forward != base.calibration.batch_size:
        # --calibration-batch: samples per forward only; the stages' batch sizes (samples a step)
        # stay as shipped, so a step sees the same samples in fewer, larger forwards
        fields["calibration.batch_size"] = per_forward
    if args.steps_scale is not None:
        fields["stage1.steps"] = max(1, round(base.stage1.steps * args.steps_scale))
        fields["stage2.steps"] = max(1, round(base.stage2.steps * args.steps_scale)) if base.stage2.steps else 0
    if args.sampling_steps is not None:
        fields["validation.sampling_steps"] = args.sampling_steps
        # the teacher's share of the sampling check's steps stays as shipped (2 of 10 -> 4 of 20)
        fields["validation.teacher_steps"] = scaled_teacher_steps(base.validation.teacher_steps, base.validation.sampling_steps, args.sampling_steps)
    fields.update(resolved_overrides(config, base.with_overrides(fields=fields).to_dict()))
    return base.with_overrides(source="folder", path=str(folder), seed=seed, fields=fields)


def scaled_teacher_steps(shipped_k: int, shipped_steps: int, steps: int) -> int:
    """validation.teacher_steps as the same share of `steps` sampling steps as shipped (k of
    shipped_steps), below `steps` (a step must stay converted), 0 when off or no sampling."""
    if shipped_k <= 0 or shipped_steps <= 0 or steps <= 1:
        return 0
    return min(steps - 1, max(1, round(shipped_k / shipped_steps * steps)))


def changed_fields(before: dict, after: dict, prefix: str = "") -> dict[str, list]:
    """{dotted field: [before, after]} of every field that differs between two recipe dicts (a
    field only one of them has counts, as [value or None])."""
    out: dict[str, list] = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(changed_fields(a, b, path + "."))
        elif a != b:
            out[path] = [a, b]
    return out
