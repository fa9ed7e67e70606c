"""Distillation on one GPU against several: `hla-convert convert` under `accelerate launch`, timed.

Builds a Wan2.1 transformer from its published config (random bf16 weights, no download), saves
it with save_pretrained, and converts it with the shape's built-in recipe under one
`accelerate launch` per run, the same global batch in every run:

    run "1"      accelerate launch --num_processes 1            (the one-process path a user gets)
    run "2"      accelerate launch --multi_gpu --num_processes 2 (data parallel)
    run "fsdp2"  accelerate launch --config_file configs/accelerate/fsdp_wan14b.yaml --num_processes 2

Each run is `hla-convert convert MODEL --recipe RECIPE --dtype bf16 --out OUT --json` through
benchmarks/parallel_worker.py (which records each process's peak GPU memory). The recipe is the
built-in one with only these changes, so that a run takes minutes: calibration.source synthetic
(a bare transformer has no pipeline to take trajectories from), calibration.samples / heldout
fewer, stage1.steps / stage2.steps the --steps given. Attention, batch sizes, learning rates,
LoRA, gradient checkpointing and softmax_layers are the recipe's.

Per run (one JSON record each, the file rewritten after every run; the launch's whole stdout and
stderr next to its output folder, --work's out-SHAPE-RUN.stdout.log / .stderr.log): seconds per
step of each stage (median of the steps after the first, from the drift report's
training.stageN.step_seconds), the stage seconds, each process's peak GPU memory, the exit code, the wall time. Per pair of runs
("compare"): the final adapter tensors' max |a - b| and relative L2 ||a - b|| / ||a||, HLA and LoRA
apart, the softmax layers each chose, and the speed-up in seconds per step.

    python benchmarks/bench_parallel.py OUT.json --shape 1.3b --runs 1,2 --steps 10,6
    python benchmarks/bench_parallel.py OUT.json --shape 14b --runs fsdp2 --steps 2,1 --heldout 1
    python benchmarks/bench_parallel.py OUT.json --smoke      # tiny Wan, 2 gloo processes, CPU

--work DIR keeps the saved model between commands (default: benchmarks/.parallel_work, git-ignored);
--prepare-only builds and saves the model and stops.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_wan import SMOKE_CONFIG, WAN_1_3B_CONFIG, build_transformer, environment  # noqa: E402

from hla_convert.atomic_files import atomic_write_text  # noqa: E402

# Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json as published
WAN_14B_CONFIG: dict[str, Any] = {
    **WAN_1_3B_CONFIG, "attention_head_dim": 128, "ffn_dim": 13824, "num_attention_heads": 40, "num_layers": 40,
}  # fmt: skip
SHAPES: dict[str, tuple[dict[str, Any], str]] = {
    "1.3b": (WAN_1_3B_CONFIG, "wan2.1-t2v-1.3b"),
    "14b": (WAN_14B_CONFIG, "wan2.1-t2v-14b"),
    "smoke": (SMOKE_CONFIG, "wan2.1-t2v-1.3b"),
}
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_wan14b.yaml"


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def prepare_model(shape: str, folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The shape's transformer saved in `folder` (kept: a second command reuses it)."""
    if (folder / "config.json").is_file():
        return {"model": str(folder), "built": False}
    config, _ = SHAPES[shape]
    device = torch.device("cuda" if torch.cuda.is_available() and shape != "smoke" else "cpu")
    t0 = time.perf_counter()
    model = build_transformer(config, device, dtype)
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    os.replace(tmp, folder)
    saved = time.perf_counter() - t0 - built
    log(f"{shape}: {params / 1e9:.2f} B parameters built in {built:.0f} s, saved in {saved:.0f} s")
    return {"model": str(folder), "built": True, "parameters": params, "build_s": round(built, 1), "save_s": round(saved, 1)}


def write_recipe(shape: str, path: Path, steps: tuple[int, int], samples: int, heldout: int) -> dict[str, Any]:
    """The built-in recipe with the changes the module docstring lists, as a YAML file."""
    from hla_convert.recipe import load_recipe, recipe_text

    _, name = SHAPES[shape]
    data = yaml.safe_load(recipe_text(name))
    changes: dict[str, Any] = {
        "name": f"{name}-bench",
        "calibration.source": "synthetic",
        "calibration.samples": samples,
        "calibration.heldout": heldout,
        "stage1.steps": steps[0],
        "stage2.steps": steps[1],
        # LoRA, as the rows RESULTS.md records (wan2.1-t2v-1.3b trains full since 2026-12-07; full is
        # refused under FSDP, the 14B shape's launch)
        "stage2.train": "lora",
    }
    if shape == "smoke":  # a few hundred tokens on the CPU
        changes.update({"calibration.frames": 5, "calibration.height": 32, "calibration.width": 32,
                        "calibration.text_len": 8, "attention.feature_dim": 16, "attention.softmax_layers": 1,
                        "stage1.batch_size": 4, "stage2.batch_size": 2})  # fmt: skip
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_recipe(str(path))  # refuses a bad change here rather than in every process
    return changes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(run: str) -> list[str]:
    if run == "1":
        return ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if run.isdigit():
        return ["--multi_gpu", "--num_processes", run, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if run.startswith("fsdp") and run[4:].isdigit():
        return ["--config_file", str(FSDP_CONFIG), "--num_processes", run[4:]]
    raise SystemExit(f"--runs: {run!r} is not 1, 2, ... or fsdp2, fsdp4, ...")


def _median_after_first(values: list[float]) -> float | None:
    return statistics.median(values[1:] or values) if values else None


def run_once(run: str, model: Path, recipe: Path, out: Path, dtype: str, timeout: int) -> dict[str, Any]:
    """One `accelerate launch` of the conversion; what it measured."""
    shutil.rmtree(out, ignore_errors=True)  # this script's own scratch folder
    peaks = out.with_name(out.name + ".peaks")
    shutil.rmtree(peaks, ignore_errors=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args(run), "--main_process_port", str(_free_port()),
           str(HERE / "parallel_worker.py"), "convert", str(model), "--recipe", str(recipe), "--dtype", dtype,
           "--out", str(out), "--json"]  # fmt: skip
    env = dict(os.environ, HLA_PEAK_DIR=str(peaks), PYTHONUNBUFFERED="1")
    log(f"run {run}: {' '.join(cmd[3:])}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = None, exc.stdout or "", exc.stderr or ""
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {"run": run, "command": "accelerate launch " + " ".join(cmd[3:]), "exit_code": code, "wall_s": round(wall, 1)}
    for name, text in (("stdout", stdout), ("stderr", stderr)):  # every process's, whole (the record keeps a tail)
        record[f"{name}_log"] = str(atomic_write_text(out.with_name(f"{out.name}.{name}.log"), text))
    record["processes"] = [json.loads(p.read_text()) for p in sorted(peaks.glob("rank*.json"))]
    report_path = out / "drift_report.json"
    if not report_path.is_file():
        record["error"] = "no drift_report.json; the end of stderr: " + stderr[-3000:]
        return record
    report = json.loads(report_path.read_text())
    try:  # the main process's --json document (the others print nothing)
        record["stage_seconds"] = json.loads(stdout[stdout.index("{") :]).get("seconds")
    except ValueError:
        record["stage_seconds"] = None
    training = report.get("training", {})
    for stage in ("stage1", "stage2"):
        s = training.get(stage) or {}
        record[stage] = {
            "steps_run": s.get("steps_run"),
            "seconds_per_step": _median_after_first(s.get("step_seconds") or []),
            "step_seconds": s.get("step_seconds"),
            "seconds": s.get("seconds"),
            "initial_loss": s.get("initial_loss"),
            "final_loss": s.get("final_loss"),
        }
    record["softmax_layers"] = (training.get("selection") or {}).get("softmax_layers")
    record["output_rel_l2"] = (report.get("output") or {}).get("rel_l2")
    record["adapter"] = str(out / "adapter_model.safetensors")
    record["stderr_tail"] = stderr[-1500:]
    return record


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Final adapter tensors of two runs, and the speed-up of b over a."""
    from safetensors.torch import load_file

    result: dict[str, Any] = {"runs": [a["run"], b["run"]]}
    for stage in ("stage1", "stage2"):
        sa, sb = (a.get(stage) or {}).get("seconds_per_step"), (b.get(stage) or {}).get("seconds_per_step")
        result[f"{stage}_speedup"] = round(sa / sb, 3) if sa and sb else None
    if not (Path(a.get("adapter", "")).is_file() and Path(b.get("adapter", "")).is_file()):
        result["error"] = "an adapter is missing"
        return result
    ta, tb = load_file(a["adapter"]), load_file(b["adapter"])
    common = sorted(set(ta) & set(tb))
    for group, names in (("hla", [n for n in common if "lora" not in n]), ("lora", [n for n in common if "lora" in n])):
        if not names:
            continue
        diff = [(ta[n].double() - tb[n].double()) for n in names]
        num = sum(float(d.pow(2).sum()) for d in diff)
        den = sum(float(ta[n].double().pow(2).sum()) for n in names)
        result[group] = {
            "tensors": len(names),
            "max_abs_diff": max(float(d.abs().max()) for d in diff),
            "rel_l2_diff": (num / den) ** 0.5 if den else None,
        }
    result["only_in_one"] = sorted(set(ta) ^ set(tb))
    result["same_softmax_layers"] = a.get("softmax_layers") == b.get("softmax_layers")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON results file")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.3b")
    ap.add_argument("--runs", default="1,2", help="comma-separated: 1, 2, ... (data parallel), fsdp2, ...")
    ap.add_argument("--steps", default="10,6", help="stage-1 and stage-2 steps")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (training inputs)")
    ap.add_argument("--heldout", type=int, default=2, help="held-out samples for the drift check")
    ap.add_argument("--work", default=str(HERE / ".parallel_work"))
    ap.add_argument("--timeout", type=int, default=540, help="seconds per run")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny Wan on the CPU: --shape smoke --runs 1,2 --steps 2,1")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.runs, args.steps, args.samples, args.heldout = "smoke", "1,2", "2,1", 4, 1
    steps = tuple(int(s) for s in args.steps.split(","))
    if len(steps) != 2:
        raise SystemExit("--steps: two numbers, stage 1 and stage 2, e.g. 10,6")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for r in runs:
        launch_args(r)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and args.shape != "smoke"
    device = torch.device("cuda" if gpu else "cpu")

    results: dict[str, Any] = {
        "benchmark": "bench_parallel",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device, args.commit or "unknown"),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu else [],
        "shape": args.shape,
        "records": [],
    }

    def save() -> None:
        atomic_write_text(args.out, json.dumps(results, indent=1))

    model = work / f"model-{args.shape}"
    results["model"] = prepare_model(args.shape, model, torch.bfloat16 if gpu else torch.float32)
    save()
    if args.prepare_only:
        return 0
    recipe = work / f"recipe-{args.shape}.yaml"
    results["recipe_changes"] = write_recipe(args.shape, recipe, steps, args.samples, args.heldout)
    done: list[dict[str, Any]] = []
    for run in runs:
        record = run_once(run, model, recipe, work / f"out-{args.shape}-{run}", "bf16" if gpu else "float32", args.timeout)
        log(json.dumps({k: record.get(k) for k in ("run", "exit_code", "wall_s", "stage1", "stage2", "processes", "error")})[:2000])
        results["records"].append(record)
        for earlier in done:
            results["records"].append({"measurement": "compare", **compare(earlier, record)})
            log(json.dumps(results["records"][-1]))
        done.append(record)
        save()
    return 0 if all("error" not in r for r in results["records"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
