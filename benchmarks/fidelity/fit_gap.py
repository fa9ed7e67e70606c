"""Drift on the calibration inputs a conversion trained on against drift on held-out inputs: whether
a saved conversion is bound by its calibration set (a large gap: more inputs help) or by what it can
fit at all (no gap: more inputs will not; the attention form, the steps or the trained weights must).

    python benchmarks/fidelity/fit_gap.py CONV_DIR [CONV_DIR ...] --out gap.jsonl [--device cuda]

For each saved conversion (a run.py conversion folder: adapter, recipe.yaml naming its calibration
folder), loaded with `load_converted` as a user gets it: `hla_convert.stages.drift.measure_drift`
(no sampling) on the recipe's "train" split (the inputs stages 1 and 2 saw) and on its "heldout"
split (what the benchmark's drift is measured on). One JSON record per (folder, split): the output
relative L2 against the teacher (mean over samples), per noise bucket, and the attention error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))

import torch  # noqa: E402

SPLITS = ("train", "heldout")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="at most this many inputs (forwards of calibration.batch_size) a split")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hla_convert import load_converted
    from hla_convert.recipe import load_recipe
    from hla_convert.stages import calibration
    from hla_convert.stages.drift import measure_drift

    device = torch.device(args.device)
    for folder in map(Path, args.folders):
        model = load_converted(folder, device=str(device))
        rec = load_recipe(str(folder / "recipe.yaml"))
        rows = {}
        for split in SPLITS:
            items = calibration.build_inputs(model, rec, split, device=device, dtype=model.dtype)[: args.limit]
            report = measure_drift(model, items, rec)  # no scheduler: no sampling
            rows[split] = {
                "folder": str(folder), "split": split, "inputs": len(items), "samples": report.heldout_samples,
                "output_rel_l2": report.output_rel_l2, "buckets": [{k: b[k] for k in ("t_min", "t_max", "samples", "rel_l2")} for b in report.buckets],
                "attention_mean": sum(report.attention.values()) / max(1, len(report.attention)), "device": str(device),
            }  # fmt: skip
        with open(args.out, "a") as f:
            for row in rows.values():
                f.write(json.dumps(row) + "\n")
        tr, ho = rows["train"]["output_rel_l2"], rows["heldout"]["output_rel_l2"]
        print(f"{folder.name:40s} drift on its calibration inputs {tr:.4f}, held out {ho:.4f} (gap {ho - tr:+.4f})", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
