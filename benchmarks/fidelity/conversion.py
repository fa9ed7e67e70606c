"""One run of the fidelity benchmark (run.py runs the grid): convert, distil and measure one (model,
config, seed) into a record. The conversion is `hla_convert.convert` into an output folder, measured
from that folder in a fresh process (`run.py --measure`); a failure is a record with status "error".
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import bench_data as bd
import bench_models as bm
from bench_recipes import CONFIGS, HalfOf, changed_fields, input_plan, recipe_for, shipped_recipe
from input_sets import built_once, inputs_folder
from measure import SAMPLING_SHIFT
from stage1_reuse import KEPT_DIR, finished_stage1, keep_stage1, seed_work_folder

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def onpolicy_pipeline(model_dir: Path, where: Path) -> Path:
    """A pipeline folder around a bare benchmark teacher (its transformer/ a symlink to model_dir)
    with the measure's scheduler, so that `convert` has one for stage 3; built once per model."""
    import diffusers

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "transformer").symlink_to(model_dir.resolve(), target_is_directory=True)
        diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=bd.NUM_TRAIN_TIMESTEPS, shift=SAMPLING_SHIFT).save_pretrained(tmp / "scheduler")
        config = json.loads((model_dir / "config.json").read_text())
        index = {"_class_name": "DiffusionPipeline", "transformer": ["diffusers", config["_class_name"]], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
        (tmp / "model_index.json").write_text(json.dumps(index))

    return built_once(where / f"{model_dir.name}-pipeline", "model_index.json", build)  # once per model, also under --jobs


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


def both(*hooks):
    """One progress callback calling each of `hooks` in turn."""

    def call(event) -> None:
        for hook in hooks:
            hook(event)

    return call


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
        saved = finished_conversion(conv_dir, rec) if args.resume and not resume else None
        kept_as = Path(args.conversions_dir) / KEPT_DIR / f"{arch}-{config}-seed{seed}.safetensors"  # for --stage1-from
        if saved is not None:  # saved whole before a time limit cut its measure: measure it, do not convert again
            print(f"  [{arch} {config} seed {seed}] conversion: saved already in {conv_dir}, measured", flush=True)
            record["reused_saved_conversion"] = True
            report_saved, passed = saved, bool(saved.get("passed"))
        else:
            if not resume and getattr(args, "stage1_from", None):  # a finished stage 1 of the same fingerprint
                ckpt = finished_stage1(args.stage1_from, arch, seed, rec, math.ceil(n_train / batch))
                if ckpt is not None:
                    seed_work_folder(conv_dir, str(source), rec, args.dtype, ckpt)
                    record["stage1_from"] = str(ckpt)
                    resume = True
                print(f"  [{arch} {config} seed {seed}] stage 1: {'from ' + str(ckpt) if ckpt else 'no finished one of this fingerprint, trained here'}", flush=True)
            result = hla_convert.convert(
                model=str(source), recipe=recipe_file, out=conv_dir, device=str(device), dtype=args.dtype, overwrite=not resume,
                resume=resume, progress=both(progress_log(f"{arch} {config} seed {seed}"), keep_stage1(conv_dir, kept_as)),
            )
            sync(device)
            seconds.update({f"convert_{k}": v for k, v in result.seconds.items()})
            report_saved, passed = result.report, result.passed
        record["output_dir"] = str(conv_dir)
        training = report_saved.get("training", {})
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
            sampled_batches=measured.get("sampled_batches"),  # the same, over more held-out batches (measure.SAMPLED_BATCHES)
            in_process={"output_rel_l2": report_saved["output"]["rel_l2"], "passed": passed},
            stage1={k: s1.get(k) for k in ("steps", "initial_loss", "final_loss", "skipped", "resumed_from") if k in s1},
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


def finished_conversion(conv_dir: Path, rec) -> dict | None:
    """The drift report (with its training summary) of a conversion saved whole in conv_dir by this
    recipe (no work folder left, its recipe.yaml the same recipe), else None. A run cut off by a
    time limit after `convert` saved its folder but before the measure ended is measured from it
    under --resume instead of converted again."""
    from hla_convert.io.output_guard import MANIFEST_FILE, WORK_DIR
    from hla_convert.recipe import load_recipe

    report, saved_recipe = conv_dir / "drift_report.json", conv_dir / "recipe.yaml"
    whole = all((conv_dir / name).is_file() for name in (MANIFEST_FILE, "hla_config.json", report.name, saved_recipe.name))
    if (conv_dir / WORK_DIR).exists() or not whole:
        return None
    try:
        if load_recipe(str(saved_recipe)).to_dict() != rec.to_dict():
            return None
        return json.loads(report.read_text())
    except Exception:  # noqa: BLE001 - an unreadable folder is converted again (with overwrite)
        return None


def measure_saved(conv_dir: Path, arch: str, inputs: Path, args, device: torch.device) -> dict:
    """Run `--measure` in a fresh Python process on the saved folder; its JSON result."""
    cmd = [sys.executable, str(HERE / "run.py"), "--measure", str(conv_dir), "--measure-arch", arch, "--measure-inputs", str(inputs),
           "--device", str(device), "--dtype", args.dtype, "--out", "-"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(f"measuring the saved folder failed: {tail[-1] if tail else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mean(d: dict) -> float | None:
    vals = [v for v in d.values() if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None
