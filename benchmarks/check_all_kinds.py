"""Every attention kind and feature map through a whole `hla-convert convert` on one device.

For each variant below, a copy of the tiny-wan recipe with that attention section (and a few
steps) runs through the real command line (`python -m hla_convert convert ... --json`) on
the demo model, on the given device. A variant passes when the run exits 0 or 1 (1 = drift over
the demo's thresholds, expected with this few steps) and every drift number it reports is finite.
Exit 3 (the run failed), a traceback or a NaN fails the check: this is the guard for defects such
as the CUDA-only "mat2 is on cpu" failure of the non-taylor feature-map initialisation.

Usage: python benchmarks/check_all_kinds.py [--device cuda] [--json OUT.json] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# name -> (attention overrides, stage2 overrides)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "softmax": ({"kind": "softmax"}, {}),
    "hadamard-taylor": ({"kind": "hadamard", "feature_map": "taylor", "factors": 2}, {}),
    "hadamard-softplus": ({"kind": "hadamard", "feature_map": "softplus", "factors": 2}, {}),
    "hadamard-softplus-f3": ({"kind": "hadamard", "feature_map": "softplus", "factors": 3, "feature_dim": 8}, {}),
    "hadamard-taylor-temp": ({"kind": "hadamard", "feature_map": "taylor", "learn_temperature": True}, {}),
    "linear-elu": ({"kind": "linear", "feature_map": "elu", "factors": 2}, {}),
    "linear-softplus": ({"kind": "linear", "feature_map": "softplus", "factors": 2}, {}),
    "higher_order-softplus": ({"kind": "higher_order", "feature_map": "softplus"}, {}),
    "higher_order-elu": ({"kind": "higher_order", "feature_map": "elu"}, {}),
    "hybrid-hadamard": ({"kind": "hybrid", "far": "hadamard", "feature_map": "taylor", "window": [1, 0, 0]}, {}),
    "hybrid-hadamard-softplus": ({"kind": "hybrid", "far": "hadamard", "feature_map": "softplus", "window": [0, 4, 4]}, {}),
    "hybrid-linear": ({"kind": "hybrid", "far": "linear", "feature_map": "elu", "window": [2, 0, 0], "halo": [1, 0, 0]}, {}),
    "hadamard-lora": ({"kind": "hadamard", "feature_map": "taylor"}, {"train": "lora"}),
    "hybrid-lora": ({"kind": "hybrid", "far": "hadamard", "feature_map": "taylor", "window": [1, 0, 0]}, {"train": "lora", "lora_ffn": True}),
}


def finite_numbers(obj) -> list[float]:
    """Every float in a JSON document."""
    if isinstance(obj, float):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in finite_numbers(v)]
    return []


def run_variant(name: str, attention: dict, stage2: dict, device: str, workdir: Path) -> dict:
    from hla_convert.recipe import recipe_text

    base = yaml.safe_load(recipe_text("tiny-wan"))
    base["name"] = f"check-{name}"
    base["attention"].update(attention)
    base["stage1"].update(steps=10, checkpoint_every=5)
    base["stage2"].update(steps=6, checkpoint_every=3, **stage2)
    base["validation"]["sampling_steps"] = 4
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(base, sort_keys=False))
    out = workdir / name
    cmd = [sys.executable, "-m", "hla_convert", "convert", "--recipe", str(recipe), "--out", str(out),
           "--overwrite", "--device", device, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - t0
    rec = {"variant": name, "exit_code": proc.returncode, "seconds": round(seconds, 1)}
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        doc = None
    if doc is None:
        rec.update(ok=False, why="no JSON document on stdout", stderr_tail=proc.stderr[-2000:])
        return rec
    drift = doc.get("drift") or {}
    nums = finite_numbers(drift)
    bad = [x for x in nums if not math.isfinite(x)]
    rec.update(
        device=doc.get("device"),
        output_rel_l2=(drift.get("output") or {}).get("rel_l2"),
        attention_max=(drift.get("attention") or {}).get("max"),
        ok=proc.returncode in (0, 1) and not bad,
    )
    if not rec["ok"]:
        rec["why"] = doc.get("error") or ("non-finite drift numbers" if bad else f"exit {proc.returncode}")
        rec["stderr_tail"] = proc.stderr[-2000:]
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    args = ap.parse_args()
    names = args.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s): {', '.join(unknown)}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            att, st2 = VARIANTS[name]
            rec = run_variant(name, att, st2, args.device, Path(tmp))
            records.append(rec)
            status = "ok " if rec["ok"] else "FAIL"
            print(f"{status} {name:28s} exit {rec['exit_code']}  {rec['seconds']:6.1f} s  "
                  f"out {rec.get('output_rel_l2')}  {rec.get('why', '')}", flush=True)
            if not rec["ok"]:
                print(rec.get("stderr_tail", ""), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    failed = [r["variant"] for r in records if not r["ok"]]
    print(f"{len(records) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
