"""What the Hadamard product buys: convert the demo model with each attention kind at equal steps.

Runs the real command line once per kind and seed,

    hla-convert convert --recipe <recipe with calibration.seed = S> --attention KIND --out ROOT/KIND-sS --json

so every kind gets the same recipe (calibration inputs, stage-1/stage-2 steps, learning rates,
held-out inputs) and only the attention core differs: hadamard (HLA, F factors of r features),
linear (first-order linear attention with the same state size r**F) and higher_order (second-order
linear attention of Zhang et al. on r features). It reads each run's JSON document and prints a
Markdown table of attention-transfer error (held-out, per layer) and output drift, mean +- std over
seeds, and which kind wins by how much. `--write docs/comparison.md` writes the table and the
commands into that file.

    python scripts/compare_kinds.py                       # the tiny-wan recipe, its own steps, seeds 0 1 2
    python scripts/compare_kinds.py --steps 60 --seeds 0  # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from hla_convert.model.config import HLAConfig
from hla_convert.recipe import load_recipe

KINDS = ("hadamard", "linear", "higher_order")

# (column, how to read it from a run's JSON document)
METRICS = (
    ("attention rel L2, mean over layers", lambda d: d["drift"]["attention"]["mean"]),
    ("attention rel L2, worst layer", lambda d: d["drift"]["attention"]["max"]),
    ("stage-1 final loss", lambda d: d["drift"]["training"]["stage1"].get("final_loss")),
    ("output rel L2", lambda d: d["drift"]["output"]["rel_l2"]),
    ("output cosine", lambda d: d["drift"]["output"]["cosine"]),
    ("sampled latent rel L2", lambda d: (d["drift"].get("sampling") or {}).get("rel_l2")),
    ("sampled latent PSNR dB", lambda d: (d["drift"].get("sampling") or {}).get("psnr_db")),
)
# The errors (lower is better) that decide which kind wins.
HEADLINE = ("attention rel L2, mean over layers", "attention rel L2, worst layer", "output rel L2", "sampled latent rel L2")


def hla_convert_exe() -> str:
    exe = shutil.which("hla-convert", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if not exe:
        sys.exit("the hla-convert command is not installed in this environment (pip install -e .)")
    return exe


def run(exe: str, recipe: Path, kind: str, out: Path, steps: int | None) -> tuple[list[str], dict, float]:
    cmd = [exe, "convert", "--recipe", str(recipe), "--attention", kind, "--out", str(out), "--overwrite", "--device", "cpu", "--json"]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1 = over the recipe's drift thresholds: still a measurement
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
    return cmd, json.loads(proc.stdout), seconds


def git_commit() -> str:
    """The checkout's commit, for the record."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def hla_parameter_count(out: Path) -> int:
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tiny-wan", help="recipe to run every kind with (default: tiny-wan, the demo's)")
    ap.add_argument("--steps", type=int, default=None, help="stage-1 steps for every kind (default: the recipe's; stage 2 scales)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds (default: 0 1 2)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--out-root", type=Path, default=None, help="where the converted folders go (default: a temporary folder)")
    ap.add_argument("--write", type=Path, default=None, help="write the Markdown report here (e.g. docs/comparison.md)")
    args = ap.parse_args()

    exe = hla_convert_exe()
    root = args.out_root or Path(tempfile.mkdtemp(prefix="hla-compare-"))
    root.mkdir(parents=True, exist_ok=True)
    base = load_recipe(args.recipe)
    results: dict[str, list[dict]] = {k: [] for k in args.kinds}
    commands: list[str] = []
    for seed in args.seeds:
        recipe_path = root / f"{base.name}-seed{seed}.yaml"
        recipe_path.write_text(base.with_overrides(seed=seed).to_yaml())
        for kind in args.kinds:
            out = root / f"{kind}-seed{seed}"
            cmd, doc, seconds = run(exe, recipe_path, kind, out, args.steps)
            doc["_seconds"] = seconds
            doc["_params"] = hla_parameter_count(out)
            results[kind].append(doc)
            commands.append(shlex.join(["hla-convert", *cmd[1:]]))
            print(f"{kind:13s} seed {seed}: attention {doc['drift']['attention']['mean']:.4f}  output {doc['drift']['output']['rel_l2']:.4f}  "
                  f"({seconds:.0f} s)", file=sys.stderr)

    first = next(iter(results.values()))[0]
    steps1 = first["drift"]["training"]["stage1"]["steps"]
    steps2 = first["drift"]["training"]["stage2"]["steps"]
    lines = []
    header = ["kind", "state per head", "HLA params", *[m[0] for m in METRICS], "seconds"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for kind, docs in results.items():
        cfg = HLAConfig.from_dict(docs[0]["attention"])
        state = f"{cfg.state_features} features" if kind != "higher_order" else f"{cfg.feature_dim}x{cfg.feature_dim} + {cfg.feature_dim}xdv"
        row = [f"{kind} ({cfg.feature_map}, r={cfg.feature_dim}" + (f", F={cfg.factors})" if kind != "higher_order" else ")"), state, f"{docs[0]['_params']:,}"]
        row += [fmt([get(d) for d in docs]) for _, get in METRICS]
        row.append(f"{statistics.fmean(d['_seconds'] for d in docs):.0f}")
        lines.append("| " + " | ".join(row) + " |")

    # Who wins each headline metric, and by how much (ratio of means).
    verdicts = []
    for name, get in METRICS:
        if name not in HEADLINE:
            continue
        means = {k: statistics.fmean(v for v in (get(d) for d in docs) if v is not None) for k, docs in results.items()
                 if any(get(d) is not None for d in docs)}
        if len(means) < 2:
            continue
        ranked = sorted(means, key=means.get)
        best, runner_up = ranked[0], ranked[1]
        # Paired by seed: the same calibration and held-out inputs for both kinds.
        wins = sum(get(a) < get(b) for a, b in zip(results[best], results[runner_up]))
        verdicts.append(f"- {name}: **{best}** {means[best]:.4g}; next {runner_up} {means[runner_up]:.4g} "
                        f"({means[runner_up] / max(means[best], 1e-12):.2f}x the error); {best} lower in "
                        f"{wins} of {len(results[best])} seeds")

    env = f"torch {torch.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} threads"
    report = "\n".join(
        [
            "## Results",
            "",
            f"Recipe `{base.name}` ({steps1} stage-1 + {steps2} stage-2 steps{' (--steps ' + str(args.steps) + ')' if args.steps else ''}), "
            f"seeds {' '.join(map(str, args.seeds))} (calibration.seed; mean ± std over seeds), {env}. "
            "Attention errors are measured on held-out inputs, per converted layer, each layer fed the teacher's "
            "inputs; output drift is the denoiser output against the softmax model's on the same held-out inputs.",
            "",
            *lines,
            "",
            *verdicts,
            "",
            f"Commands (one per kind and seed; the recipe files are the named recipe with calibration.seed set), made at {git_commit()}:",
            "",
            "```",
            shlex.join(["python", "scripts/compare_kinds.py", *sys.argv[1:]]),
            *commands,
            "```",
            "",
        ]
    )
    print(report)
    if args.write:
        write_between_markers(args.write, report)


START, END = "<!-- results:start -->", "<!-- results:end -->"


def write_between_markers(path: Path, report: str) -> None:
    """Replace the text between the results markers of `path` (the prose around them stays)."""
    text = path.read_text() if path.is_file() else f"# Attention kinds compared on the demo model\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{report}{END}{tail}")


if __name__ == "__main__":
    main()
