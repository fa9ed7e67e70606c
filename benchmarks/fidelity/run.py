"""Fidelity benchmark: convert the benchmark's teacher models with each option, measure what is lost.

    python benchmarks/fidelity/run.py --models wan cogvideox --configs hla hla-lora hybrid-lora \\
        --seeds 0 1 --out results.json [--steps-scale 1.0] [--device cuda] [--resume]
    python benchmarks/fidelity/run.py --tier deep --base shipped --seeds 0 1 2 --out deep.json
    python benchmarks/fidelity/report.py results.json

Two bases (--base): `bench` (default), the benchmark's own recipes/<model>.yaml, and `shipped`, the
built-in recipe a user runs on the real model (SHIPPED below) with only the fields that name the
benchmark's model and its data changed (SHIPPED_CHANGES) and attention.softmax_layers kept as the
same fraction of the blocks; its lr, batch sizes, steps, LoRA and stage 1 stay as shipped. The
`shipped*` configs are the rows on that base. Two tiers (--tier): `fast`, the 6-block teachers of
models/, and `deep`, the 15-block teachers of models-deep/ (one kept layer is 6.7 % of them).

For each model (a folder written by train_models.py, default benchmarks/fidelity/models/<model>)
and seed, train and held-out inputs are drawn from the model's own data distribution
(bench_data.py), written with `hla_convert.stages.calibration.save_inputs` and read back through
`calibration.source: folder`. Each config is a set of recipe overrides (CONFIGS below) on the
model's base recipe (recipes/<model>.yaml). The conversion is `hla_convert.convert` — what
`hla-convert convert <model folder> --recipe <yaml> --out X` runs — into an output folder under
--conversions-dir; the resolved recipe of every run is written beside the results. Every measure
below is taken from that folder loaded back with `load_converted` in a fresh Python process
(`--measure`, internal), as a user of the saved conversion gets it; the in-memory drift the
conversion saw is kept under "in_process" for comparison.

Measures per (model, config, seed), on >= 32 held-out samples with t evenly spread:
- denoiser output rel L2 and cosine vs the teacher, per t bucket and mean (measure_drift);
- denoising loss against the true flow target (noise - x0), student / teacher, per bucket and mean;
- per-layer attention rel L2 at the end of stage 1 (its summary) and on held-out at the end;
- sampled videos from the same noise (FlowMatchEuler, shift 1, 20 steps): final-frame rel L2, PSNR;
- wall seconds per stage.

One JSON record per line, appended and flushed as each run ends (a run killed by a time limit keeps
the finished ones; --resume skips them). A config whose recipe fields do not exist yet, or whose
conversion fails, becomes a record with "status": "error" and one line saying why; the rest go on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # hla_convert from this checkout when it is not installed

import torch  # noqa: E402

import bench_data as bd  # noqa: E402
import bench_models as bm  # noqa: E402

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


# Rows on the shipped recipe (--base shipped). `shipped` is it as a user runs it: 64 calibration
# videos, the real recipe's count; each other row changes one lever.
SHIPPED_CONFIGS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "shipped-cal512": {"calibration.samples": 512},  # what the small calibration set costs
    "shipped-full": {"stage2.train": "full"},  # every base weight instead of LoRA (stage2.train: full)
    "shipped-lora64": {"stage2.lora_rank": 64},
    "shipped-lora128": {"stage2.lora_rank": 128},
    "shipped-live": {"stage2.teacher": "live"},  # the teacher run live in stage 2, not cached targets
    "shipped-onpolicy": {"stage3.steps": HalfOf("stage2.steps")},  # the on-policy stage, half of stage 2's steps
    "shipped-select-output": {"attention.softmax_select": "output"},  # kept layers by their effect on the output
    # windows of 2 and 3 latent frames against the own frame (1 frame = 16 x 16 = 256 keys of 4,096):
    "shipped-chunk2": {"attention.window": [2, 0, 0]},  # query chunks of 2 frames, keys the same 2 (512)
    "shipped-chunk1-halo1": {"attention.halo": [1, 0, 0]},  # own frame + 1 frame each side (768 keys)
    # the own frame's size as a spatial tile: 4 x 4 tokens through all 16 frames = 256 keys
    "shipped-tile": {"attention.window": [0, 4, 4]},
    "shipped-keep0": {"attention.softmax_layers": 0},
    "shipped-keep2": {"attention.softmax_layers": 2},
}
CONFIGS.update(SHIPPED_CONFIGS)
DEFAULT_CONFIGS = [c for c in CONFIGS if c != "softmax" and not c.startswith("shipped")]
BASES = ("bench", "shipped")
TIERS = {"fast": "models", "deep": "models-deep"}  # bench_models.DEPTHS blocks each

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLING_SHIFT = 1.0  # the teachers are trained with t ~ U(0, 1): no shift


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty and out else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- inputs


def write_inputs(arch: str, model, spec: bd.VideoSpec, seed: int, n_train: int, n_heldout: int, batch: int, folder: Path) -> None:
    """Train/held-out inputs of one (model, seed) as the `folder` calibration source, plus the true
    flow targets of the held-out split (heldout_targets.safetensors: target [N, 3, F, H, W], t [N]).

    Train: t ~ U(0, 1). Held-out: t evenly spread over (0, 1) in a seeded order, so each of the
    4 buckets has n/4 samples. Separate seed streams: held-out inputs are never training inputs.
    """
    from safetensors.torch import save_file

    from hla_convert.stages.calibration import save_inputs

    rope = bm.rotary_emb(model, spec) if arch == "cogvideox" else None
    for split, n, stream in (("train", n_train, 1), ("heldout", n_heldout, 2)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * stream)
        t_all = None
        if split == "heldout":
            t_all = ((torch.arange(n, dtype=torch.float32) + 0.5) / n)[torch.randperm(n, generator=g)]
        items, targets, ts = [], [], []
        for i in range(0, n, batch):
            b = min(batch, n - i)
            x0, text, t, noise = bd.sample_training_batch(b, spec, g, None if t_all is None else t_all[i : i + b])
            x_t, timestep, target = bd.flow_matching(x0, t, noise)
            items.append(bm.model_inputs(arch, x_t, timestep, text, rope))
            targets.append(target)
            ts.append(t)
        save_inputs(items, folder / split)
        if split == "heldout":
            save_file({"target": torch.cat(targets).contiguous(), "t": torch.cat(ts).contiguous()}, str(folder / "heldout_targets.safetensors"))
    (folder / "DONE").write_text(json.dumps({"arch": arch, "seed": seed, "train": n_train, "heldout": n_heldout, "batch": batch}))


def inputs_folder(cache: Path, arch: str, model, spec, seed: int, n_train: int, n_heldout: int, batch: int) -> Path:
    folder = cache / f"{arch}-seed{seed}-n{n_train}-h{n_heldout}-b{batch}-{spec.frames}x{spec.height}x{spec.width}"
    if not (folder / "DONE").is_file():
        write_inputs(arch, model, spec, seed, n_train, n_heldout, batch, folder)
    return folder


# ----------------------------------------------------------------------------------------------- measures


@torch.no_grad()
def true_target_losses(arch: str, model, heldout: list[dict], targets: torch.Tensor, t: torch.Tensor, buckets: int) -> dict:
    """Denoising MSE against the true flow target, teacher and student, per sample -> mean and buckets."""
    from hla_convert.model.modes import forward
    from hla_convert.model.modes import set_attention_mode

    per = {"teacher": [], "student": []}
    i = 0
    try:
        for item in heldout:
            b = item["hidden_states"].shape[0]
            target = targets[i : i + b].to(item["hidden_states"].device)
            i += b
            for mode in per:
                set_attention_mode(model, mode)
                pred = bm.model_output(arch, forward(model, item)).float()
                per[mode].append((pred - target).pow(2).flatten(1).mean(1).cpu())
    finally:
        set_attention_mode(model, "student")
    teacher, student = torch.cat(per["teacher"]), torch.cat(per["student"])
    idx = (t * buckets).long().clamp(0, buckets - 1)
    out_buckets = []
    for k in range(buckets):
        sel = idx == k
        if bool(sel.any()):
            tl, sl = float(teacher[sel].mean()), float(student[sel].mean())
            out_buckets.append({"t_min": k / buckets, "t_max": (k + 1) / buckets, "samples": int(sel.sum()), "teacher": tl, "student": sl, "ratio": sl / tl})
    tl, sl = float(teacher.mean()), float(student.mean())
    return {"teacher": tl, "student": sl, "ratio": sl / tl, "buckets": out_buckets}


# ----------------------------------------------------------------------------------------------- recipes

# The built-in recipe of each architecture and the number of blocks of the model it is for (the
# diffusers transformer/config.json num_layers of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and of
# THUDM/CogVideoX-2b: 30 each; the recipes' comments say so too).
SHIPPED: dict[str, tuple[str, int]] = {"wan": ("wan2.1-t2v-1.3b", 30), "cogvideox": ("cogvideox-2b", 30)}
# The only fields --base shipped changes (besides a row's own overrides, and stage1/2.steps when
# --steps-scale is given): what names the benchmark's model and its inputs. Batch sizes stay as
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
    return int(n), int(CONFIGS[config].get("calibration.batch_size", cal.batch_size))


def resolved_overrides(config: str, data: dict) -> dict[str, Any]:
    """The config's overrides with HalfOf values resolved on the recipe dict `data`."""
    return {k: v.resolve(data) if isinstance(v, HalfOf) else v for k, v in CONFIGS[config].items()}


def recipe_for(arch: str, config: str, seed: int, folder: Path, spec: bd.VideoSpec, args, bench_layers: int | None = None):
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


def shipped_recipe_for(arch: str, config: str, seed: int, folder: Path, spec: bd.VideoSpec, args, bench_layers: int | None):
    """The shipped recipe of `arch` on the benchmark model and its inputs: SHIPPED_CHANGES only,
    then the row's overrides; stage1/stage2 steps scaled only by an explicit --steps-scale."""
    if bench_layers is None:
        raise ValueError("--base shipped needs the benchmark model's number of blocks")
    base = shipped_recipe(arch)
    n_train, _ = input_plan(arch, config, args)
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
    if args.steps_scale is not None:
        fields["stage1.steps"] = max(1, round(base.stage1.steps * args.steps_scale))
        fields["stage2.steps"] = max(1, round(base.stage2.steps * args.steps_scale)) if base.stage2.steps else 0
    if args.sampling_steps is not None:
        fields["validation.sampling_steps"] = args.sampling_steps
    fields.update(resolved_overrides(config, base.with_overrides(fields=fields).to_dict()))
    return base.with_overrides(source="folder", path=str(folder), seed=seed, fields=fields)


def run_one(arch: str, config: str, seed: int, model_dir: Path, cache: Path, args, device: torch.device) -> dict:
    """Convert, distil and measure one (model, config, seed); the record (status "error" on failure).

    The conversion is `hla_convert.convert` (what `hla-convert convert` runs) into an output folder;
    every number of the record's output/loss/attention/sampling comes from that folder loaded back
    with `load_converted` in a fresh process (`measure_saved`), as a user gets it. The training
    summary and wall times are the conversion's own.
    """
    import hla_convert

    record: dict[str, Any] = {
        "model": arch, "config": config, "seed": seed, "tier": args.tier, "base": args.base, "steps_scale": args.steps_scale,
        "dtype": args.dtype, "overrides": {k: repr(v) if isinstance(v, HalfOf) else v for k, v in CONFIGS[config].items()},
    }  # fmt: skip
    seconds: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_run = time.perf_counter()
    stage = "recipe"
    try:
        _, model, spec, info = bm.load_model(model_dir, dtype=DTYPES[args.dtype], device="cpu")
        t0 = time.perf_counter()
        stage = "inputs"
        n_train, batch = input_plan(arch, config, args)
        folder = inputs_folder(cache, arch, model, spec, seed, n_train, args.heldout_samples, batch)
        bench_layers = int(model.config.num_layers)
        del model  # convert loads the teacher itself, from model_dir
        seconds["make_inputs"] = time.perf_counter() - t0
        stage = "recipe"
        rec = recipe_for(arch, config, seed, folder, spec, args, bench_layers)
        record["recipe"] = rec.to_dict()
        record["blocks"] = bench_layers
        record["calibration_samples"] = rec.calibration.samples
        record["softmax_layers"] = rec.attention.softmax_layers
        if args.base == "shipped":  # what differs from the shipped recipe, field by field
            record["changed_from_shipped"] = changed_fields(shipped_recipe(arch).to_dict(), record["recipe"])
        recipe_file = Path(args.out).with_suffix("").as_posix() + f"-recipes/{arch}-{config}-seed{seed}.yaml"
        Path(recipe_file).parent.mkdir(parents=True, exist_ok=True)
        Path(recipe_file).write_text(f"# {config} on {arch}: benchmarks/fidelity/run.py, resolved\n" + rec.to_yaml())
        record["recipe_file"] = recipe_file
        conv_dir = Path(args.conversions_dir) / f"{arch}-{config}-seed{seed}"
        record["cli_equivalent"] = shlex.join(
            ["hla-convert", "convert", str(model_dir), "--recipe", recipe_file, "--out", str(conv_dir), "--device", str(device), "--dtype", args.dtype, "--overwrite"]
        )
        stage = "convert"
        result = hla_convert.convert(model=str(model_dir), recipe=recipe_file, out=conv_dir, device=str(device), dtype=args.dtype, overwrite=True)
        sync(device)
        record["output_dir"] = str(conv_dir)
        seconds.update({f"convert_{k}": v for k, v in result.seconds.items()})
        training = result.report.get("training", {})
        s1, s2, s3 = training.get("stage1") or {}, training.get("stage2") or {}, training.get("stage3") or {}
        seconds["stage1"] = float(s1.get("seconds", 0.0))
        seconds["stage2"] = float(s2.get("seconds", 0.0))
        seconds["stage3"] = float(s3.get("seconds", 0.0))  # the on-policy stage, where the recipe has one
        if device.type == "cuda":  # teacher + student share one copy of the weights (LoRA: adapters off)
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            torch.cuda.empty_cache()
        stage = "measure"
        t0 = time.perf_counter()
        measured = measure_saved(conv_dir, arch, folder, args, device)
        seconds["measure_fresh_process"] = time.perf_counter() - t0
        report = measured["report"]
        out = report["output"]
        record.update(
            status="ok",
            measured_from="saved folder, load_converted in a fresh process",
            teacher={"dir": str(model_dir), "heldout_loss": info.get("heldout_loss", {}).get("mean"), "training_steps": info.get("training", {}).get("steps")},
            heldout_samples=report["heldout_samples"],
            output={
                "rel_l2": out["rel_l2"],
                "cosine": out["cosine"],
                "worst_bucket_rel_l2": max((b["rel_l2"] for b in out["buckets"]), default=0.0),
                "buckets": out["buckets"],
            },
            loss=measured["loss"],
            attention={
                "stage1_train": s1.get("layers", {}),  # per layer at the last stage-1 step (its batch)
                "stage1_mean": _mean(s1.get("layers", {})),
                "final_heldout": report["attention"]["per_layer"],  # layers still converted
                "final_mean": report["attention"]["mean"],
                "final_max": report["attention"]["max"],
            },
            sampling=report["sampling"],
            in_process={"output_rel_l2": result.report["output"]["rel_l2"], "passed": result.passed},
            stage1={k: s1.get(k) for k in ("steps", "initial_loss", "final_loss", "skipped") if k in s1},
            stage2={k: s2.get(k) for k in ("steps", "initial_loss", "final_loss", "skipped") if k in s2},
            stage3={k: s3.get(k) for k in ("steps", "initial_loss", "final_loss", "skipped") if k in s3},
            selection=(training.get("selection") or {}).get("softmax_layers", []) if isinstance(training.get("selection"), dict) else [],
            # how they were chosen and every measured per-layer effect (attention errors; with
            # softmax_select output, each layer's output drift when given back)
            selection_summary=training.get("selection") if isinstance(training.get("selection"), dict) else {},
            trainable=measured["trainable"],
        )
    except Exception as e:  # noqa: BLE001 - one config failing must not end the grid
        record.update(status="error", error=f"{stage}: {one_line(e)}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    seconds["total"] = time.perf_counter() - t_run
    record["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return record


def measure_saved(conv_dir: Path, arch: str, inputs: Path, args, device: torch.device) -> dict:
    """Run `--measure` in a fresh Python process on the saved folder; its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(conv_dir), "--measure-arch", arch, "--measure-inputs", str(inputs),
           "--device", str(device), "--dtype", args.dtype, "--out", "-"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(f"measuring the saved folder failed: {tail[-1] if tail else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(conv_dir: Path, arch: str, inputs: Path, device: torch.device, dtype: str) -> dict:
    """What a user of the saved folder gets: load_converted, then on the benchmark's held-out inputs
    (the recipe saved in the folder, source: folder) the drift, the sampled videos and the denoising
    loss against the true flow target."""
    import diffusers
    from safetensors.torch import load_file

    from hla_convert import load_converted
    from hla_convert.stages import calibration
    from hla_convert.stages import drift
    from hla_convert.recipe import load_recipe

    model = load_converted(conv_dir, device=str(device), dtype=dtype)
    rec = load_recipe(str(conv_dir / "recipe.yaml"))
    heldout = calibration.build_inputs(model, rec, "heldout", device=device, dtype=model.dtype)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=bd.NUM_TRAIN_TIMESTEPS, shift=SAMPLING_SHIFT)
    report = drift.measure_drift(model, heldout, rec, scheduler=scheduler).to_dict()
    tgt = load_file(str(inputs / "heldout_targets.safetensors"))
    loss = true_target_losses(arch, model, heldout, tgt["target"], tgt["t"], rec.validation.timestep_buckets)
    return {
        "report": report,
        "loss": loss,
        "trainable": {
            "hla": sum(p.numel() for n, p in model.named_parameters() if ".hla." in f".{n}"),
            "lora": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        },
    }


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


def _mean(d: dict) -> float | None:
    vals = [v for v in d.values() if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def finished(path: Path) -> set[tuple]:
    done = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                if r.get("status") == "ok":
                    done.add((r.get("tier", "fast"), r["model"], r["config"], r["seed"], r.get("steps_scale"), r.get("dtype", "float32")))
    return done


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(bm.ARCHITECTURES), choices=bm.ARCHITECTURES)
    ap.add_argument("--configs", nargs="+", default=None, help=f"any of: {', '.join(CONFIGS)} (default: every non-softmax row of the --base)")
    ap.add_argument("--base", choices=BASES, default="bench", help="bench: recipes/<model>.yaml; shipped: the built-in recipe as users run it (the shipped* configs)")
    ap.add_argument("--tier", choices=list(TIERS), default="fast", help="fast: the 6-block teachers of models/; deep: the 15-block ones of models-deep/")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", required=True, help="results file (JSON lines, appended)")
    ap.add_argument("--models-dir", default=None, help="folder with <model>/ from train_models.py (default: the --tier's)")
    ap.add_argument("--steps-scale", type=float, default=None, help="multiplies both stages' steps (bench base: default 1; shipped base: only when given)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resume", action="store_true", help="skip (model, config, seed, steps-scale, dtype) already ok in --out")
    ap.add_argument(
        "--inputs-dir",
        default=str(Path(tempfile.gettempdir()) / "hla-fidelity-inputs"),
        help="cache of the generated input sets (hundreds of MB; kept out of the results folder)",
    )
    ap.add_argument("--train-samples", type=int, default=None, help="bench base: default 1,024; shipped base: the shipped count (64) unless given or a row sets it")
    ap.add_argument("--heldout-samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None, help="bench base only (default 8); the shipped base keeps its batch sizes")
    ap.add_argument("--sampling-steps", type=int, default=None, help="bench base: default 20; shipped base: the shipped recipe's unless given")
    ap.add_argument("--stop-after-minutes", type=float, default=None, help="start no new run after this long (fit a time limit)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the teacher's weights and activations (HLA and LoRA parameters stay float32)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--conversions-dir",
        default=str(Path(tempfile.gettempdir()) / "hla-fidelity-conversions"),
        help="where each run's output folder is written (the folder that is measured; replaced by the next run of the same name)",
    )
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: measure one saved folder, JSON to stdout
    ap.add_argument("--measure-arch", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--measure-inputs", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = measure(Path(args.measure), args.measure_arch, Path(args.measure_inputs), torch.device(args.device), args.dtype)
        print(json.dumps(result))
        return 0
    shipped = args.base == "shipped"
    if args.configs is None:
        args.configs = list(SHIPPED_CONFIGS) if shipped else list(DEFAULT_CONFIGS)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        print(f"unknown config {unknown[0]!r}; configs: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    wrong = [c for c in args.configs if c.startswith("shipped") != shipped]
    if wrong:
        print(f"config {wrong[0]!r} is for --base {'bench' if shipped else 'shipped'} (the shipped* configs are the shipped base's rows)", file=sys.stderr)
        return 2
    if args.batch_size is not None and shipped:
        print("--batch-size is for --base bench: the shipped base keeps the shipped recipe's batch sizes", file=sys.stderr)
        return 2
    if not shipped:  # the bench base's defaults; the shipped base keeps the shipped recipe's
        args.steps_scale = 1.0 if args.steps_scale is None else args.steps_scale
        args.train_samples = 1024 if args.train_samples is None else args.train_samples
        args.batch_size = 8 if args.batch_size is None else args.batch_size
        args.sampling_steps = 20 if args.sampling_steps is None else args.sampling_steps
    if args.models_dir is None:
        args.models_dir = str(HERE / TIERS[args.tier])
    if args.heldout_samples < 4 or (args.train_samples is not None and args.train_samples < 1):
        print("--heldout-samples must be >= 4 and --train-samples >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(args.inputs_dir)
    done = finished(out) if args.resume else set()
    env = {
        "command": shlex.join(["python", "benchmarks/fidelity/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    t_start = time.time()
    longest = 0.0
    todo = sum(1 for a in args.models for sd in args.seeds for c in args.configs if (args.tier, a, c, sd, args.steps_scale, args.dtype) not in done)
    ran: list[float] = []
    for arch in args.models:
        model_dir = Path(args.models_dir) / arch
        if not (model_dir / bm.INFO_FILE).is_file():
            print(f"{model_dir}: no trained {arch} model ({bm.INFO_FILE} missing); run benchmarks/fidelity/train_models.py first", file=sys.stderr)
            return 2
        for seed in args.seeds:
            for config in args.configs:
                if (args.tier, arch, config, seed, args.steps_scale, args.dtype) in done:
                    print(f"{arch:10s} {config:20s} seed {seed}: done already (--resume)", flush=True)
                    continue
                elapsed = time.time() - t_start
                if args.stop_after_minutes is not None and elapsed + longest > args.stop_after_minutes * 60:
                    print(f"stopping: {elapsed:.0f}s used, the next run may take {longest:.0f}s (--stop-after-minutes); --resume continues", flush=True)
                    return 0
                record = run_one(arch, config, seed, model_dir, cache, args, device)
                record["env"] = env
                append(out, record)
                longest = max(longest, record["seconds"]["total"])
                ran.append(record["seconds"]["total"])
                s = record["seconds"]
                if record["status"] == "ok":
                    print(
                        f"{arch:10s} {config:20s} seed {seed}: out rel L2 {record['output']['rel_l2']:.4f} "
                        f"(worst bucket {record['output']['worst_bucket_rel_l2']:.4f}), loss x{record['loss']['ratio']:.3f}, "
                        f"attn s1 {_fmt(record['attention']['stage1_mean'])} end {record['attention']['final_mean']:.3f}, "
                        + (f"PSNR {record['sampling']['psnr_db']:.1f} dB, " if record.get("sampling") else "")
                        + f"{s['total']:.1f}s (stage1 {s['stage1']:.1f}, stage2 {s['stage2']:.1f}, stage3 {s['stage3']:.1f}, measured in a fresh process {s['measure_fresh_process']:.1f})",
                        flush=True,
                    )
                else:
                    print(f"{arch:10s} {config:20s} seed {seed}: ERROR {record['error']} ({s['total']:.1f}s)", flush=True)
                left = todo - len(ran)
                if left:
                    est = left * sum(ran[-4:]) / len(ran[-4:])
                    print(f"  {len(ran)}/{todo} runs in {time.time() - t_start:.0f}s; about {est / 60:.1f} min for the {left} left at this rate", flush=True)
    return 0


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
