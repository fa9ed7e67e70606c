"""Fidelity benchmark: convert the benchmark's teacher models with each option, measure what is lost.

    python benchmarks/fidelity/run.py --models wan cogvideox --configs hla hla-lora hybrid-lora \\
        --seeds 0 1 --out results.json [--steps-scale 1.0] [--device cuda] [--resume]
    python benchmarks/fidelity/run.py --tier deep --base shipped --seeds 0 1 2 --out deep.json
    python benchmarks/fidelity/report.py results.json

Two bases (--base): `bench` (default), the benchmark's own recipes/<model>.yaml, and `shipped`, the
built-in recipe a user runs on the real model (bench_recipes.SHIPPED) with only the fields that name the
benchmark's model and its data changed (SHIPPED_CHANGES) and attention.softmax_layers kept as the
same fraction of the blocks; its lr, batch sizes, steps, LoRA and stage 1 stay as shipped. The
`shipped*` configs are the rows on that base. Two tiers (--tier): `fast`, the 6-block teachers of
models/, and `deep`, the 15-block teachers of models-deep/ (one kept layer is 6.7 % of them).

For each model (a folder written by train_models.py, default benchmarks/fidelity/models/<model>)
and seed, train and held-out inputs are drawn from the model's own data distribution
(bench_data.py), written with `hla_convert.stages.calibration.save_inputs` and read back through
`calibration.source: folder`. Each config is a set of recipe overrides (bench_recipes.CONFIGS) on the
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
from bench_recipes import (  # noqa: E402
    BASES,
    CONFIGS,
    DEFAULT_CONFIGS,
    SHIPPED_CONFIGS,
    TIERS,
    HalfOf,
    changed_fields,
    input_plan,
    recipe_for,
    shipped_recipe,
)

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


def onpolicy_pipeline(model_dir: Path, where: Path) -> Path:
    """A pipeline folder around a bare benchmark teacher (its transformer/ a symlink to model_dir)
    with the measure's scheduler, so that `convert` has one for stage 3; built once per model."""
    import diffusers

    pipe = where / f"{model_dir.name}-pipeline"
    if not (pipe / "model_index.json").is_file():
        pipe.mkdir(parents=True, exist_ok=True)
        if not (pipe / "transformer").exists():
            (pipe / "transformer").symlink_to(model_dir.resolve(), target_is_directory=True)
        diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=bd.NUM_TRAIN_TIMESTEPS, shift=SAMPLING_SHIFT).save_pretrained(pipe / "scheduler")
        config = json.loads((model_dir / "config.json").read_text())
        index = {"_class_name": "DiffusionPipeline", "transformer": ["diffusers", config["_class_name"]], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
        (pipe / "model_index.json").write_text(json.dumps(index))
    return pipe


def progress_log(tag: str, every: float = 30.0):
    """A convert() progress callback that prints (flushed) each stage's end with its seconds and a
    training step at most every `every` seconds, so a run cut off by a time limit still says how
    far it got and where its time went (the run's record is only written at its end)."""
    last = [time.time()]
    t0 = time.time()

    def log(event) -> None:
        now = time.time()
        if event.kind == "end":
            print(f"  [{tag}] {event.stage} done in {event.seconds:.1f}s ({now - t0:.0f}s in)", flush=True)
        elif event.kind == "step" and (now - last[0] >= every or event.step == event.total):
            last[0] = now
            loss = event.info.get("loss") if isinstance(event.info, dict) else None
            extra = f", loss {loss:.4g}" if isinstance(loss, float) else ""
            print(f"  [{tag}] {event.stage} {event.step}/{event.total}{extra} ({now - t0:.0f}s in)", flush=True)

    return log


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
        source = model_dir if rec.stage3.steps == 0 else onpolicy_pipeline(model_dir, Path(args.conversions_dir))
        record["cli_equivalent"] = shlex.join(
            ["hla-convert", "convert", str(source), "--recipe", recipe_file, "--out", str(conv_dir), "--device", str(device), "--dtype", args.dtype, "--overwrite"]
        )
        from hla_convert.io.output_guard import RUN_FILE, WORK_DIR

        stage = "convert"
        # --resume also continues a conversion cut off by a time limit from its last checkpoint
        # (hla-convert convert --resume), when its work folder is there
        resume = bool(args.resume) and (conv_dir / WORK_DIR / RUN_FILE).is_file()
        record["resumed"] = resume
        result = hla_convert.convert(
            model=str(source), recipe=recipe_file, out=conv_dir, device=str(device), dtype=args.dtype, overwrite=not resume,
            resume=resume, progress=progress_log(f"{arch} {config} seed {seed}"),
        )
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
            stage3={k: s3.get(k) for k in ("steps", "initial_loss", "final_loss", "skipped", "sampling_steps", "sampler_forwards") if k in s3},
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
    ap.add_argument(
        "--resume", action="store_true",
        help="skip (model, config, seed, steps-scale, dtype) already ok in --out, and continue a conversion cut off in --conversions-dir",
    )
    ap.add_argument(
        "--inputs-dir",
        default=str(Path(tempfile.gettempdir()) / "hla-fidelity-inputs"),
        help="cache of the generated input sets (hundreds of MB; kept out of the results folder)",
    )
    ap.add_argument("--train-samples", type=int, default=None, help="bench base: default 1,024; shipped base: the shipped count (64) unless given or a row sets it")
    ap.add_argument(
        "--calibration-batch", type=int, default=None,
        help="shipped base: samples per forward (calibration.batch_size; default the shipped 1). The stages' batch sizes "
        "(samples a step) stay as shipped: a step sees the same samples in fewer forwards (fewer launches on a small model)",
    )
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
