"""Fidelity benchmark: convert the benchmark's teacher models with each option, measure what is lost.

    python benchmarks/fidelity/run.py --models wan cogvideox --configs hla hla-lora hybrid-lora \\
        --seeds 0 1 --out results.json [--steps-scale 1.0] [--device cuda] [--resume]
    python benchmarks/fidelity/run.py --tier deep --base shipped --seeds 0 1 2 --out deep.json
    python benchmarks/fidelity/run.py --tier deep --base shipped --models wan cogvideox \\
        --configs shipped shipped-select-output --seeds 0 1 --jobs 8 --out deep.json --resume
    python benchmarks/fidelity/report.py results.json

Two bases (--base): `bench` (default), the benchmark's own recipes/<model>.yaml, and `shipped`, a
built-in recipe for the real model (bench_recipes.SHIPPED: the speed-first -fast recipes, the defaults
until 2026-12-07 (night); the defaults now are the rows shipped-tile4x-s2x2 on wan and shipped-tile4x
on cogvideox) with only the fields that name the
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

--jobs N runs up to N of the grid's (model, config, seed) runs at once, each in its own `run.py`
process (one run, its own conversion folder, OMP_NUM_THREADS small), on the one device: a benchmark
model this small is bound by kernel launches, so eight runs share one H100 well (docs/comparison.md,
"Fifth run"). This process alone appends the workers' records to --out as each ends; their lines are
printed prefixed `[model config seed]` and kept in <out>-logs/. --resume and --stop-after-minutes
mean what they mean with one process: no run starts once the time is up, and a worker cut off
(SIGTERM, Ctrl-C: the workers are ended with it) leaves its conversion for --resume. A worker that
crashes gives a record with status "error" and one line. --jobs 1 (default) runs them here, one by one.

--stage1-from DIR... starts a run from the finished stage 1 of an earlier run with the same stage-1
fingerprint (stage1_reuse.py: rows that differ only after stage 1 pay for it once); its record says
so ("stage1_from") and report.py shows no wall time for it.

The pieces: input_sets.py (the inputs), measure.py (the measures), conversion.py (one run), jobs.py
(the worker processes of --jobs); this file holds the grid, the results file and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # hla_convert from this checkout when it is not installed

import torch  # noqa: E402

import bench_data as bd  # noqa: E402, F401 - tests/fidelity/test_fidelity_rows.py reads run.bd
import bench_models as bm  # noqa: E402
import jobs  # noqa: E402
from bench_recipes import BASES, CONFIGS, DEFAULT_CONFIGS, SHIPPED_CONFIGS, TIERS  # noqa: E402
from conversion import DTYPES, run_one  # noqa: E402
from measure import measure  # noqa: E402


def git_commit() -> str:
    """$GIT_COMMIT when set (a copied tree whose .git is stale, as on the lent GPU), else git's."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty and out else "")
    except (OSError, subprocess.SubprocessError):
        return ""


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
    ap.add_argument(
        "--stage1-from", nargs="+", default=None, metavar="DIR",
        help="conversion folders of earlier runs (their --conversions-dir): a run whose stage 1 has the fingerprint of a "
        "finished stage-1 checkpoint there starts from it (stage1_reuse.py); the record says so (stage1_from)",
    )
    ap.add_argument(
        "--jobs", type=int, default=1,
        help="run up to this many (model, config, seed) runs at once, each in its own run.py process (jobs.py); "
        "a small model is bound by kernel launches, so several share one GPU well",
    )
    ap.add_argument("--record-to", default=None, help=argparse.SUPPRESS)  # internal (--jobs): a worker's record goes here, not to --out
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
    if args.jobs < 1:
        print("--jobs must be >= 1", file=sys.stderr)
        return 2
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
    argv = list(argv if argv is not None else sys.argv[1:])
    command = shlex.join(["python", "benchmarks/fidelity/run.py", *argv])
    runs = pending_runs(args, done)
    if runs is None:
        return 2
    if args.jobs > 1:
        return run_in_workers(args, argv, out, runs, command)
    env = {
        "command": command,
        "git_commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    t_start = time.time()
    longest = 0.0
    ran: list[float] = []
    for arch, config, seed in runs:
        elapsed = time.time() - t_start
        if args.stop_after_minutes is not None and elapsed + longest > args.stop_after_minutes * 60:
            print(f"stopping: {elapsed:.0f}s used, the next run may take {longest:.0f}s (--stop-after-minutes); --resume continues", flush=True)
            return 0
        record = run_one(arch, config, seed, Path(args.models_dir) / arch, cache, args, device)
        record["env"] = env
        append(Path(args.record_to) if args.record_to else out, record)
        longest = max(longest, record["seconds"]["total"])
        ran.append(record["seconds"]["total"])
        print(summary(record), flush=True)
        left = len(runs) - len(ran)
        if left:
            est = left * sum(ran[-4:]) / len(ran[-4:])
            print(f"  {len(ran)}/{len(runs)} runs in {time.time() - t_start:.0f}s; about {est / 60:.1f} min for the {left} left at this rate", flush=True)
    return 0


def pending_runs(args, done: set[tuple]) -> list[tuple[str, str, int]] | None:
    """The grid's (model, config, seed) runs not in `done` (--resume), in run order; each finished one
    says so. None, after one line on stderr, when a model of --models has no trained folder."""
    runs = []
    for arch in args.models:
        model_dir = Path(args.models_dir) / arch
        if not (model_dir / bm.INFO_FILE).is_file():
            print(f"{model_dir}: no trained {arch} model ({bm.INFO_FILE} missing); run benchmarks/fidelity/train_models.py first", file=sys.stderr)
            return None
        for seed in args.seeds:
            for config in args.configs:
                if (args.tier, arch, config, seed, args.steps_scale, args.dtype) in done:
                    print(f"{arch:10s} {config:20s} seed {seed}: done already (--resume)", flush=True)
                else:
                    runs.append((arch, config, seed))
    return runs


def run_in_workers(args, argv: list[str], out: Path, runs: list[tuple[str, str, int]], command: str) -> int:
    """--jobs N: the runs (pending_runs), each by a `run.py` worker process, N at a time (jobs.py)."""

    def worker_cmd(run: tuple, record_file: Path) -> list[str]:  # the caller's arguments, narrowed to one run
        arch, config, seed = run
        one = ["--models", arch, "--configs", config, "--seeds", str(seed), "--jobs", "1", "--record-to", str(record_file)]
        return [sys.executable, str(HERE / "run.py"), *argv, *one]

    def error_fields(run: tuple) -> dict:
        keys = ("tier", "base", "steps_scale", "dtype")
        return {"model": run[0], "config": run[1], "seed": run[2], **{k: getattr(args, k) for k in keys}}

    return jobs.run_grid(
        runs, args.jobs, out, worker_cmd, error_fields, append, command,
        threads=args.threads, stop_after_minutes=args.stop_after_minutes, on_record=lambda r: print(summary(r), flush=True),
    )  # fmt: skip


def summary(record: dict) -> str:
    """The one line a finished run prints: its headline measures and where its time went."""
    arch, config, seed, s = record["model"], record["config"], record["seed"], record["seconds"]
    if record["status"] != "ok":
        return f"{arch:10s} {config:20s} seed {seed}: ERROR {record['error']} ({s['total']:.1f}s)"
    return (
        f"{arch:10s} {config:20s} seed {seed}: out rel L2 {record['output']['rel_l2']:.4f} "
        f"(worst bucket {record['output']['worst_bucket_rel_l2']:.4f}), loss x{record['loss']['ratio']:.3f}, "
        f"attn s1 {_fmt(record['attention']['stage1_mean'])} end {record['attention']['final_mean']:.3f}, "
        + (f"PSNR {record['sampling']['psnr_db']:.1f} dB, " if record.get("sampling") else "")
        + (f"over {wide['batches']} batches {wide['psnr_db_mean']:.1f} dB, " if (wide := record.get("sampled_batches")) else "")
        + f"{s['total']:.1f}s (stage1 {s['stage1']:.1f}, stage2 {s['stage2']:.1f}, stage3 {s['stage3']:.1f}, measured in a fresh process {s['measure_fresh_process']:.1f})"
    )


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
