"""Markdown tables of a fidelity benchmark results file (run.py's JSON lines), for docs/comparison.md.

    python benchmarks/fidelity/report.py results.json [more.json ...] [--write docs/comparison.md] [--markers fidelity-deep]

One table per model: each config's measures as mean ± half the range over its seeds (with two
seeds, the two values are mean - x and mean + x), then the issue's targets per config, the
Hadamard-vs-linear attention-transfer comparison, the configs that failed and the commands and
commits that made the numbers. Runs on the shipped recipe (run.py --base shipped, the `shipped*`
rows) get their own table per model and tier: what each lever buys against the `shipped` row
(output rel L2, sampled-video PSNR, and the GPU seconds of stages 1 + 2 + 3), the window and
layer-choice verdicts at the shipped layer budget, and the per-layer effects the output
selection measured. When a (tier, model, config, seed) appears more than once (a rerun), the last
record wins.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Targets of issue 7 (default recipe, both models).
TARGET_MEAN_REL_L2 = 0.05
TARGET_WORST_BUCKET = 0.10
TARGET_LOSS_RATIO = 1.10
HADAMARD_VS_LINEAR = 0.30  # Hadamard's attention-transfer error at least 30 % below linear's
PAIRS = (("hla-lora", "linear-lora"), ("hybrid-lora", "hybrid-linear-lora"))

COLUMNS = (
    # header, getter, digits
    ("out rel L2", lambda r: r["output"]["rel_l2"], 4),
    ("worst t bucket", lambda r: r["output"]["worst_bucket_rel_l2"], 4),
    ("cosine", lambda r: r["output"]["cosine"], 4),
    ("loss / teacher", lambda r: r["loss"]["ratio"], 3),
    ("attn rel L2 stage 1", lambda r: r["attention"]["stage1_mean"], 3),
    ("attn rel L2 end", lambda r: r["attention"]["final_mean"], 3),
    ("sampled PSNR dB", lambda r: (r.get("sampling") or {}).get("psnr_db"), 1),
    ("sampled rel L2", lambda r: (r.get("sampling") or {}).get("rel_l2"), 4),
    # over more held-out batches (measure.SAMPLED_BATCHES; records since 2026-12-07 evening)
    ("sampled PSNR dB, all batches", lambda r: (r.get("sampled_batches") or {}).get("psnr_db_mean"), 1),
    ("s stage 1 + 2", lambda r: r["seconds"].get("stage1", 0) + r["seconds"].get("stage2", 0), 0),
)


def load(paths: list[str]) -> list[dict]:
    records: dict[tuple, dict] = {}
    for p in paths:
        for n, line in enumerate(Path(p).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                print(f"{p}:{n}: not a JSON record, skipped (a run killed mid-write?)", file=sys.stderr)
                continue
            records[(r.get("tier", "fast"), r["model"], r["config"], r["seed"], r.get("steps_scale"), r.get("dtype", "float32"))] = r
    return list(records.values())


def spread(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), (max(values) - min(values)) / 2


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def cell(values: list, digits: int) -> str:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return "–"
    m, s = spread(vals)
    return f"{m:.{digits}f}" if len(vals) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _get(r: dict, getter):
    try:
        return getter(r)
    except (KeyError, TypeError):
        return None


def table(records: list[dict], model: str, config_order: list[str]) -> list[str]:
    ok = [r for r in records if r["model"] == model and r.get("status") == "ok"]
    configs = [c for c in config_order if any(r["config"] == c for r in ok)]
    lines = [
        "| config | seeds | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for c in configs:
        rs = [r for r in ok if r["config"] == c]
        cells = [cell([_get(r, g) for r in rs], d) for _, g, d in COLUMNS]
        lines.append(f"| {c} | {len(rs)} | " + " | ".join(cells) + " |")
    return lines


def targets(records: list[dict], model: str, config_order: list[str]) -> list[str]:
    ok = [r for r in records if r["model"] == model and r.get("status") == "ok"]
    out = []
    for c in config_order:
        rs = [r for r in ok if r["config"] == c]
        if not rs or c == "softmax":
            continue
        mean = spread([r["output"]["rel_l2"] for r in rs])[0]
        worsts = [r["output"]["worst_bucket_rel_l2"] for r in rs]
        worst = math.nan if any(not _finite(w) for w in worsts) else max(worsts)  # max() skips a NaN after the first
        ratio = spread([r["loss"]["ratio"] for r in rs])[0]
        # a NaN / inf measure (a diverged seed) never meets a target
        met = all(_finite(x) for x in (mean, worst, ratio)) and mean <= TARGET_MEAN_REL_L2 and worst <= TARGET_WORST_BUCKET and ratio <= TARGET_LOSS_RATIO
        if met:
            out.append(f"{c}: meets all three targets (rel L2 {mean:.4f}, worst bucket {worst:.4f}, loss x{ratio:.3f})")
    return out


def hadamard_vs_linear(records: list[dict], model: str) -> list[str]:
    ok = [r for r in records if r["model"] == model and r.get("status") == "ok"]
    out = []
    for had, lin in PAIRS:
        a = [r["attention"]["stage1_mean"] for r in ok if r["config"] == had and r["attention"]["stage1_mean"] is not None]
        b = [r["attention"]["stage1_mean"] for r in ok if r["config"] == lin and r["attention"]["stage1_mean"] is not None]
        if a and b:
            ma, mb = spread(a)[0], spread(b)[0]
            below = 1 - ma / mb if mb else math.nan
            verdict = "meets" if _finite(below) and below >= HADAMARD_VS_LINEAR else "misses"
            out.append(
                f"stage-1 attention rel L2, {had} {ma:.3f} vs {lin} {mb:.3f}: {100 * below:.0f} % below "
                f"({verdict} the >= {100 * HADAMARD_VS_LINEAR:.0f} % target)"
            )
    return out


# The shipped base's rows: (group, what the row changes against `shipped`), in table order.
LEVERS = {
    "shipped": ("", "the shipped recipe: 64 calibration videos, its lr, batch, steps, stage-2 training, softmax_layers by fraction"),
    "shipped-cal512": ("calibration", "512 calibration videos instead of 64"),
    "shipped-full": ("stage 2 trains", "every base weight (full) instead of LoRA"),
    "shipped-lora": ("stage 2 trains", "LoRA rank 32 (wan2.1-t2v-1.3b before 2026-12-07; cogvideox-2b's default)"),
    "shipped-lora64": ("stage 2 trains", "LoRA rank 64"),
    "shipped-lora128": ("stage 2 trains", "LoRA rank 128"),
    "shipped-live": ("teacher", "live teacher in stage 2 instead of cached targets"),
    "shipped-onpolicy": ("on-policy", "stage 3 on the student's own samples, half of stage 2's steps"),
    "shipped-onpolicy-mix": ("on-policy", "stage 3, half of its inputs the calibration ones (onpolicy_share 0.5)"),
    "shipped-select-output": ("layer choice", "kept layers chosen by their effect on the output"),
    "shipped-select-attention": ("layer choice", "kept layers by stage-1 attention error"),
    "shipped-keep0": ("layer choice", "no layer kept softmax"),
    "shipped-s2x4": ("schedule", "4x the stage-2 steps (1,600)"),
    "shipped-lr5x": ("schedule", "5x the stage-2 lr (5e-4)"),
    "shipped-lr2.5x": ("schedule", "2.5x the stage-2 lr (2.5e-4)"),
    "shipped-s2x2": ("schedule", "2x the stage-2 steps (800)"),
    "shipped-s2x2-lr5x": ("schedule", "2x the stage-2 steps at 5x the lr"),
    "shipped-lora-lr5x": ("stage 2 trains", "LoRA rank 32 at 5x the stage-2 lr (5e-4)"),
    "shipped-select-output-full": ("together", "layers by output effect, and full fine-tuning"),
    "shipped-s2x4-full": ("together", "4x the stage-2 steps with every base weight (full)"),
    "shipped-s2x4-lr5x": ("together", "4x the stage-2 steps at 5x the lr"),
    "shipped-keep2": ("layer choice", "2 layers kept softmax"),
    "shipped-chunk2": ("window", "chunks of 2 frames (512 keys)"),
    "shipped-chunk1-halo1": ("window", "own frame + 1 frame each side (768 keys)"),
    "shipped-tile": ("window", "4 x 4 spatial tube through all frames (256 keys, as the own frame; the shipped tiles in tokens)"),
    "shipped-tile2x": ("window", "4 x 8 spatial tube through all frames (512 keys)"),
    "shipped-frame": ("window", "the token's own latent frame (256 keys; the default until 2026-12-07)"),
    "shipped-tile-s2x2": ("schedule", "the tile (in tokens) with 2x the stage-2 steps (800)"),
    "shipped-cube": ("window", "8 x 8 x 8 cube, half the frames (512 keys, as the 4 x 8 tile)"),
    "shipped-tile-halo1": ("window", "4 x 4 tile + 1 token each side, through all frames (576 keys; overlapping windows)"),
    "shipped-tile4x": ("window", "8 x 8 spatial tube through all frames (1,024 keys)"),
    "shipped-tile4x-s2x2": ("schedule", "the 8 x 8 tile (1,024 keys) with 2x the stage-2 steps (800)"),
    "shipped-tile2x-r64": ("far part", "the 4 x 8 tile with r = 64 features (r^2 = 4,096 state features)"),
    "shipped-tile-select-output-full": ("train", "the 4 x 4 tile (in tokens) with all weights trained and layers by output effect"),
    "shipped-tile2x-lora64": ("train", "the 4 x 8 tile (in tokens) with LoRA r 64 instead of all weights"),
    "shipped-tile2x-select-output": ("layer choice", "the 4 x 8 tile (512 keys) with the kept layer chosen by its effect on the output"),
    "shipped-tile2x-s2x2": ("schedule", "the 4 x 8 tile (512 keys) with 2x the stage-2 steps (800)"),
    "shipped-tile-onpolicy-mix": ("on-policy", "the tile (in tokens) with the on-policy stage, half its inputs calibration ones"),
}
# the shipped recipe's window first (tiles since 2026-12-07; the own frame in records before)
WINDOWS = ("shipped", "shipped-frame", "shipped-chunk2", "shipped-chunk1-halo1", "shipped-tile", "shipped-tile2x", "shipped-cube", "shipped-tile-halo1", "shipped-tile4x")


def _seconds(r: dict) -> float | None:
    """Training seconds of stages 1 + 2 + 3; None for a conversion resumed from checkpoints (run.py
    --resume after a time limit: its record holds only the resumed call's part, the rest is in the
    cut-off call's log) or started from another run's stage 1 (run.py --stage1-from)."""
    if r.get("resumed") or r.get("stage1_from"):
        return None
    s = r["seconds"]
    return s.get("stage1", 0) + s.get("stage2", 0) + s.get("stage3", 0)


def _mean_of(rs: list[dict], getter) -> float | None:
    vals = [v for v in (_get(r, getter) for r in rs) if _finite(v)]
    return sum(vals) / len(vals) if vals else None


def _delta(v: float | None, ref: float | None, digits: int) -> str:
    return "–" if v is None or ref is None else f"{v - ref:+.{digits}f}"


def lever_table(records: list[dict], model: str, tier: str) -> list[str]:
    """What each lever buys on the shipped recipe: one row per shipped* config, each measure with its
    difference from the `shipped` row (mean over seeds); the window and layer-choice verdicts."""
    ok = [r for r in records if r["model"] == model and r.get("tier", "fast") == tier and r.get("status") == "ok"]
    by = {c: [r for r in ok if r["config"] == c] for c in dict.fromkeys([*LEVERS, *(r["config"] for r in ok)])}
    by = {c: rs for c, rs in by.items() if rs}
    rel = lambda r: r["output"]["rel_l2"]
    psnr = lambda r: (r.get("sampling") or {}).get("psnr_db")
    ref = by.get("shipped", [])
    ref_rel, ref_psnr, ref_s = _mean_of(ref, rel), _mean_of(ref, psnr), _mean_of(ref, _seconds)
    lines = [
        "| lever | config | what it changes | seeds | calibration | kept softmax | out rel L2 | Δ vs shipped | sampled PSNR dB | Δ dB | wall s stage 1 + 2 + 3 | Δ s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c, rs in by.items():
        group, what = LEVERS.get(c, ("", ""))
        m_rel, m_psnr, m_s = _mean_of(rs, rel), _mean_of(rs, psnr), _mean_of(rs, _seconds)
        cal = sorted({r.get("calibration_samples") for r in rs}, key=str)
        kept = sorted({r.get("softmax_layers") for r in rs}, key=str)
        lines.append(
            f"| {group} | {c} | {what} | {len(rs)} | {', '.join(map(str, cal))} | {', '.join(map(str, kept))} | "
            f"{cell([_get(r, rel) for r in rs], 4)} | {_delta(m_rel, ref_rel, 4) if c != 'shipped' else ''} | "
            f"{cell([_get(r, psnr) for r in rs], 1)} | {_delta(m_psnr, ref_psnr, 1) if c != 'shipped' else ''} | "
            f"{cell([_seconds(r) for r in rs], 0)} | {_delta(m_s, ref_s, 0) if c != 'shipped' else ''} |"
        )
    notes = []
    windows = {c: _mean_of(by[c], rel) for c in WINDOWS if c in by and _mean_of(by[c], rel) is not None}
    if len(windows) > 1:
        best = min(windows, key=windows.get)
        kept = sorted({r.get("softmax_layers") for c in windows for r in by[c]}, key=str)
        blocks = sorted({r.get("blocks") for c in windows for r in by[c]}, key=str)
        notes.append(
            f"window at {', '.join(map(str, kept))} kept softmax layer(s) of {', '.join(map(str, blocks))}: {best} has the lowest output rel L2 "
            f"({', '.join(f'{c} {v:.4f}' for c, v in windows.items())})"
        )
    for r in by.get("shipped-select-output", []):
        sel = r.get("selection_summary") or {}
        for k, rnd in enumerate(sel.get("output_effects") or []):
            top = sorted(rnd["with_softmax"].items(), key=lambda kv: kv[1] if _finite(kv[1]) else math.inf)[:3]
            errs = sel.get("errors") or {}
            by_attention = max(errs, key=lambda n: errs[n] if _finite(errs[n]) else math.inf) if errs else "?"
            notes.append(
                f"seed {r['seed']}, pick {k + 1}: output drift {rnd['drift']:.4f} with every layer converted; given back alone "
                + ", ".join(f"{n} -> {v:.4f}" for n, v in top)
                + f"; picked {rnd['picked']} (attention error would pick {by_attention})"
            )
    return lines + [""] + [f"- {x}" for x in notes]


def render(records: list[dict]) -> str:
    """The shipped-recipe tables (per model and tier), then the benchmark-base tables, then the
    commands that made the numbers and what the columns are."""
    shipped = [r for r in records if r.get("base") == "shipped"]
    bench = [r for r in records if r.get("base") != "shipped"]
    lines: list[str] = []
    for m, tier in dict.fromkeys((r["model"], r.get("tier", "fast")) for r in shipped):
        rs = [r for r in shipped if r["model"] == m and r.get("tier", "fast") == tier]
        blocks = sorted({r.get("blocks") for r in rs if r.get("blocks")})
        lines += [f"### {m}, {tier} tier ({' or '.join(map(str, blocks))} blocks), shipped recipe: what each lever buys", ""]
        lines += lever_table(shipped, m, tier)
        seen = set()
        for r in rs:
            if r.get("status") != "ok" and (r["config"], r.get("error")) not in seen:
                seen.add((r["config"], r.get("error")))
                lines.append(f"- {r['config']} failed: {r.get('error')}")
        lines.append("")
    for tier in dict.fromkeys(r.get("tier", "fast") for r in bench):
        lines += _render_bench([r for r in bench if r.get("tier", "fast") == tier], tier)
    envs = list(dict.fromkeys(((r.get("env") or {}).get("command"), (r.get("env") or {}).get("git_commit"), (r.get("env") or {}).get("device")) for r in records))
    lines += ["Made by:", "", "```", *(f"{cmd}    # commit {commit or '?'}, {device or '?'}" for cmd, commit, device in envs), "```", ""]
    if bench:
        lines.append(
            "Columns: denoiser output relative L2 vs the teacher on held-out inputs (mean over samples, and the worst "
            "of 4 equal t buckets), cosine, denoising loss against the true flow target (student / teacher), mean "
            "per-layer attention relative L2 at the end of stage 1 (its last batch) and on held-out at the end, "
            "videos sampled from the same noise (FlowMatchEuler, shift 1: PSNR, peak-to-peak range of the teacher's "
            "frames, and relative L2), wall seconds of the two training stages. Mean ± half the range over seeds."
        )
    if shipped:
        lines.append(
            "Shipped-recipe tables: the built-in recipe with only the model, its data and softmax_layers (the same "
            "fraction of the blocks) changed, measured from the saved folder in a fresh process; Δ: the row's mean "
            "minus the `shipped` row's; wall s: seconds of stages 1 + 2 + 3 of the conversion on the run's device (see Made by); "
            "– where the conversion was resumed from its checkpoints after a time limit (its stage times are in the cut-off call's log) "
            "or started from the finished stage 1 of another row of the same stage-1 fingerprint (run.py --stage1-from)."
        )
    return "\n".join(lines) + "\n"


def _render_bench(records: list[dict], tier: str) -> list[str]:
    """The benchmark-base tables of one tier, per model."""
    order: list[str] = []
    for r in records:
        if r["config"] not in order:
            order.append(r["config"])
    try:  # the configs' table order (bench_recipes.CONFIGS) when it can be imported
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_recipes import CONFIGS

        order = [c for c in CONFIGS if c in order] + [c for c in order if c not in CONFIGS]
    except Exception:  # noqa: BLE001 - the report must not need torch
        pass
    lines: list[str] = []
    models = list(dict.fromkeys(r["model"] for r in records))
    for m in models:
        scales = sorted({r.get("steps_scale") for r in records if r["model"] == m}, key=str)
        dtypes = sorted({r.get("dtype", "float32") for r in records if r["model"] == m})
        ok = [r for r in records if r["model"] == m and r.get("status") == "ok"]
        head = f"### {m}" + (f", {tier} tier" if tier != "fast" else "")
        if ok:
            # settings that differ between runs are all listed (a row's runs may differ too)
            held = sorted({r["heldout_samples"] for r in ok})
            samp = sorted({(r.get("sampling") or {}).get("steps", 0) for r in ok})
            head += (
                f" ({' or '.join(map(str, held))} held-out samples; {' or '.join(map(str, samp))} sampling steps; "
                f"steps scale {', '.join(map(str, scales))}; {', '.join(dtypes)})"
            )
        lines += [head, ""]
        lines += table(records, m, order)
        lines.append("")
        extra = hadamard_vs_linear(records, m) + targets(records, m, order)
        if not any("meets all three" in x for x in extra):
            extra.append(
                f"no config meets all three targets (mean rel L2 <= {TARGET_MEAN_REL_L2}, worst bucket <= "
                f"{TARGET_WORST_BUCKET}, loss <= {TARGET_LOSS_RATIO}x the teacher's)"
            )
        lines += [f"- {x}" for x in extra]
        errors = [r for r in records if r["model"] == m and r.get("status") != "ok"]
        seen = set()
        for r in errors:
            key = (r["config"], r.get("error"))
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r['config']} failed: {r.get('error')}")
        lines.append("")
    return lines


START, END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"


def markers(name: str) -> tuple[str, str]:
    """The pair of HTML comments a `--markers name` section of the doc lies between."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_between_markers(path: Path, text: str, name: str = "fidelity") -> None:
    """Replace what lies between the `name` markers (START and END by default) in `path` (the rest
    of the file is kept)."""
    start, end = markers(name)
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise ValueError(f"{path}: no {start} ... {end} markers to write between")
    head, rest = doc.split(start, 1)
    tail = rest.split(end, 1)[1]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(f"{head}{start}\n{text}{end}{tail}")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--write", type=Path, default=None, help=f"also write the tables between {START} and {END} in this file")
    ap.add_argument("--markers", default="fidelity", help="which marked section --write replaces: NAME of <!-- NAME:start --> ... <!-- NAME:end --> (the deep tier's: fidelity-deep)")
    args = ap.parse_args(argv)
    missing = [p for p in args.results if not Path(p).is_file()]
    if missing:
        print(f"{missing[0]}: no such results file", file=sys.stderr)
        return 2
    records = load(args.results)
    if not records:
        print("no records in " + ", ".join(args.results), file=sys.stderr)
        return 2
    text = render(records)
    sys.stdout.write(text)
    if args.write:
        try:
            write_between_markers(args.write, text, args.markers)
        except (OSError, ValueError) as e:
            print(str(e), file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
