"""Wan2.1-T2V-1.3B end to end: softmax against the converted model, in one run.

Builds the 1.3B transformer from its published config (random bf16 weights, no download) and
measures, one JSON record per measurement:

  forward        whole transformer forward (inference, no_grad), batch 1, 512 text tokens, at
                 480p/81f (latent 16x21x60x104, 32,760 tokens) and 720p/81f (16x21x90x160, 75,600).
  forward_backward  as stage 2 trains: backward into the trainable parameters only (the HLA
                 parameters and the recipe's LoRA on attn1 to_q/to_k/to_v/to_out.0, r=8 in the runs
                 RESULTS.md records, r=32 since; the softmax side trains the same LoRA), gradient
                 checkpointing as the recipe says.
  sampling       one full WanPipeline call (built from configs: the 1.3B transformer plus small
                 UMT5 / VAE stand-ins, UniPC flow shift 3, guidance 5 -> 2 transformer calls a
                 step), seconds per video at each of --resolutions (480p/81f: 32,760 tokens,
                 720p/81f: 21x45x80 = 75,600) with --sample-steps steps, softmax and converted in
                 the same run, each also compiled under --compile; `loop_s` is the denoising loop
                 alone (the stand-in VAE's decode is not the real one's cost).
  stage1, stage2 distillation steps through hla_convert.stages.distill.attention_transfer /
                 output_distillation on synthetic 480p inputs, seconds per step (median after the
                 first) and peak memory, with the recipe's batch sizes (stage 1: 4 forwards a step,
                 stage 2: 2 student forward/backwards). Stage 2 runs three times: with LoRA and
                 `teacher: cached` (the targets computed once before step 1, `cache_s`, so a step
                 is the student's forward/backward alone), with LoRA and `teacher: live` (a
                 no_grad teacher forward before each student forward/backward), and `train: full`
                 cached (the recipe's since 2026-12-07: every weight of the blocks, fp32 masters);
                 the records carry `train` and `teacher`.

Softmax = torch's default SDPA backend (diffusers' native attention). Converted = the recipe's
attention (wan2.1-t2v-1.3b: hybrid, far hadamard, taylor r=32, the window as the recipe gives it:
tiles [1, 5, 2] since 2026-12-07, [0, 6, 26] at 480p; `--attention tiles=null --attention
window=1,0,0` is the own frame the records before then used) with its
`softmax_layers` layers given back to softmax (the first ones: which layers does not change
the time). GPU times are medians of CUDA events, peak memory is torch.cuda.max_memory_allocated.

    python benchmarks/bench_wan.py OUT.json [--parts forward,forward_backward,sampling,distill]
        [--resolutions 480p,720p] [--attention feature_dim=32 ...] [--compile [model|blocks]]
        [--compile-backend inductor]
        [--sample-steps 10] [--reps 5] [--commit SHA]
    python benchmarks/bench_wan.py OUT.json --smoke     # 2 tiny layers, tiny grid, CPU is fine

--attention FIELD=VALUE overrides the recipe's attention section (e.g. feature_dim=32,
window=1,0,0, kind=hadamard, softmax_layers=0). --compile also times torch.compile of the
transformer for both sides, in forward, forward_backward and sampling (model:
torch.compile(transformer); blocks: diffusers' compile_repeated_blocks, one compiled block reused
30 times; --compile-backend picks dynamo's backend, default inductor); compiled records carry
dynamo's graph and graph-break counts.

On the lent GPU (benchmarks/RESULTS.md, last section: wheels carried in .whl/, PYTHONPATH, the
two links). The sampling stand-ins need transformers and tokenizers; without them both sampling
records say why and the rest runs. Split so, each command should stay under the 10-minute limit
(the sampling split is an estimate from the forward times: 720p sampling is not measured yet;
a sampling run makes a warm-up video and a timed one per side, resolution and compile mode):

    GIT_COMMIT=<sha> python3 benchmarks/bench_wan.py $OUT/wan_fwd.json --parts forward,forward_backward
    GIT_COMMIT=<sha> python3 benchmarks/bench_wan.py $OUT/wan_distill.json --parts distill
    GIT_COMMIT=<sha> python3 benchmarks/bench_wan.py $OUT/wan_sample480.json --parts sampling --resolutions 480p --compile blocks
    GIT_COMMIT=<sha> python3 benchmarks/bench_wan.py $OUT/wan_sample720.json --parts sampling --resolutions 720p
    GIT_COMMIT=<sha> python3 benchmarks/bench_wan.py $OUT/wan_sample720c.json --parts sampling --resolutions 720p --compile blocks
    GIT_COMMIT=<sha> python3 benchmarks/bench_wan.py $OUT/wan_compile.json --parts forward,forward_backward --compile blocks

(the last two also time the eager runs again: the compiled records' baseline from the same run)

This file holds the run and the command line; the model, its inputs and the stand-in pipeline are
in wan_bench/model.py, the clocks and measurements in wan_bench/timing.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # wan_bench/, also when loaded by path
from wan_bench.model import (  # noqa: E402
    RESOLUTIONS,
    SMOKE_CONFIG,
    SMOKE_RESOLUTIONS,
    SMOKE_TEXT_LEN,
    TEXT_LEN,
    WAN_1_3B_CONFIG,
    attention_lora_modules,
    build_transformer,
    compiled,
    convert,
    latent_shape,
    load_bench_recipe,
    model_inputs,
    stand_in_pipeline,
    tokens_of,
    uncompile_blocks,
)
from wan_bench.timing import (  # noqa: E402
    environment,
    time_distill,
    time_forward,
    time_forward_backward,
    time_sampling,
)
from wan_bench.timing import _sync  # noqa: E402, F401 - profile_block.py calls bench_wan._sync

PARTS = ("forward", "forward_backward", "sampling", "distill")


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# -- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hla_convert.stages.distill import _stage2_lora
    from hla_convert.model.layers import hla_parameters
    from hla_convert.model.lora import add_lora, lora_parameters, remove_lora
    from torch._dynamo.utils import counters

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = SMOKE_CONFIG if args.smoke else WAN_1_3B_CONFIG
    table = SMOKE_RESOLUTIONS if args.smoke else RESOLUTIONS
    text_len = SMOKE_TEXT_LEN if args.smoke else TEXT_LEN
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    for p in parts:
        if p not in PARTS:
            raise SystemExit(f"--parts: {p!r} is not one of {', '.join(PARTS)}")
    for r in resolutions:
        if r not in table:
            raise SystemExit(f"--resolutions: {r!r} is not one of {', '.join(table)}")
    recipe = load_bench_recipe(args.attention)
    if args.smoke:  # head_dim 32 in the smoke model; of its 2 layers, 1 stays converted
        given = {o.partition("=")[0].strip() for o in args.attention}
        fields = {"attention.feature_dim": 8, "attention.softmax_layers": 1}
        recipe = recipe.with_overrides(fields={k: v for k, v in fields.items() if k.split(".")[1] not in given})
    compile_modes = [None] + ([args.compile] if args.compile else [])
    env = environment(device, args.commit)
    records: list[dict[str, Any]] = []
    warmup, reps = (1, 2) if args.smoke else (args.warmup, args.reps)

    log(f"building the Wan2.1-1.3B transformer ({'smoke' if args.smoke else 'published config'}) on {device}")
    model = build_transformer(config, device, dtype)
    inputs = {r: model_inputs(model, table[r], text_len, device, dtype) for r in resolutions}
    lora_spec = recipe.stage2

    def record(side: str, measurement: str, res: str | None, how: str | None, result: dict[str, Any], **extra: Any) -> None:
        rec = {"measurement": measurement, "model": side, "resolution": res, "compile": how, **extra, **result, **env}
        if res is not None:
            rec["tokens"] = tokens_of(model, table[res])
            rec["latent"] = list(latent_shape(table[res], model.config.in_channels))
        records.append(rec)
        skip = (*env, "times_ms", "step_s", "attention", "softmax_layers", "latent")
        log(json.dumps({k: rec[k] for k in rec if k not in skip}))

    def attempt(side: str, measurement: str, res: str, how: str | None, extra: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        # one failed measurement (a compile error, out of memory) is recorded, the run goes on
        if how is not None:
            counters.clear()
        try:
            result = fn()
            if how is not None:  # what dynamo made of it: graph breaks cost the fusion around them
                result["dynamo_graphs"] = counters["stats"].get("unique_graphs", 0)
                result["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
        except Exception as exc:  # noqa: BLE001
            if device.type == "cuda":
                torch.cuda.empty_cache()
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            result = {"error": f"{type(exc).__name__}: {' | '.join(lines[:3])[:500]}"}
        record(side, measurement, res, how, result, **extra)

    def side_measurements(side: str, trainable: Callable[[], dict[str, torch.nn.Parameter]], extra: dict[str, Any]) -> None:
        for how in compile_modes:
            fn = compiled(model, how, args.compile_backend)
            try:
                if "forward" in parts:
                    for r in resolutions:
                        attempt(side, "forward", r, how, extra, lambda: time_forward(fn, inputs[r], device, warmup, reps))
                if "forward_backward" in parts:
                    params = trainable()
                    for r in resolutions:
                        attempt(side, "forward_backward", r, how, extra, lambda: time_forward_backward(
                            fn, model, inputs[r], params, lora_spec.gradient_checkpointing, device, warmup, reps))
            finally:
                if how == "blocks":
                    uncompile_blocks(model)
                torch._dynamo.reset()

    # softmax: the model as built; LoRA on the same attention projections for forward_backward
    def softmax_trainable():
        if not lora_parameters(model):
            add_lora(model, rank=lora_spec.lora_rank, alpha=lora_spec.lora_alpha, modules=attention_lora_modules(model))
        return lora_parameters(model)

    side_measurements("softmax", softmax_trainable, {})
    remove_lora(model)
    pipe: list[Any] = []  # the pipeline, or the exception that building it raised (no transformers ...)
    if "sampling" in parts:
        try:
            pipe.append(stand_in_pipeline(model, device, dtype, args.smoke))
        except Exception as exc:  # noqa: BLE001 - recorded by both sampling measurements
            pipe.append(exc)

    def sampling_measurements(side: str, extra: dict[str, Any]) -> None:
        """One video per resolution, as is and compiled: the pipeline holds the model itself, so
        a compiled run compiles it in place (and undoes that after)."""
        for how in compile_modes:
            for r in resolutions:

                def sample(r=r, how=how) -> dict[str, Any]:
                    if isinstance(pipe[0], Exception):
                        raise pipe[0]
                    try:
                        compiled(model, how, args.compile_backend, in_place=True)
                        return time_sampling(pipe[0], table[r], args.sample_steps, device)
                    finally:
                        if how is not None:
                            uncompile_blocks(model)

                attempt(side, "sampling", r, how, extra, sample)

    if "sampling" in parts:
        sampling_measurements("softmax", {})

    # converted: the recipe's attention
    conv = convert(model, recipe)
    attn = dict(recipe.attention.__dict__)
    extra = {"attention": attn, **conv}
    log(f"converted {conv['converted_layers']} layers ({attn['kind']}, r={attn['feature_dim']}), softmax: {conv['softmax_layers']}")

    def converted_trainable():
        if not lora_parameters(model):
            _stage2_lora(model, recipe)  # the recipe's stage-2 LoRA on the converted layers
        return hla_parameters(model) | lora_parameters(model)

    if "sampling" in parts:  # before LoRA: the converted model as inference runs it
        sampling_measurements("converted", extra)
        pipe.clear()
    side_measurements("converted", converted_trainable, extra)
    if "distill" in parts:
        remove_lora(model)  # stage 2 adds its own
        try:
            # --compile: stage 2 once more as `stage2.compile: true` runs it (the library's compile)
            backend = args.compile_backend if args.compile else None
            stages = time_distill(model, recipe, table["480p"], text_len, device, dtype, args.distill_steps, backend, tuple(args.distill_skip))
        except Exception as exc:  # noqa: BLE001 - recorded, as attempt() does
            stages = [{"measurement": "distill", "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}]
        for rec in stages:
            m = rec.pop("measurement")
            record("converted", m, "480p", rec.pop("compile", None), rec, **extra)
    return {"env": env, "args": vars(args), "records": records}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--resolutions", default="480p,720p", help="for forward, forward_backward and sampling (distill: 480p)")
    ap.add_argument("--attention", action="append", default=[], metavar="FIELD=VALUE", help="recipe attention override (repeatable)")
    ap.add_argument("--compile", nargs="?", const="model", choices=("model", "blocks"), help="also time compiled models")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile (eager, aot_eager: tests)")
    ap.add_argument("--sample-steps", type=int, default=10, help="sampling steps per video")
    ap.add_argument("--distill-steps", type=int, default=4, help="steps per distillation stage (the first is warm-up, the last holds the final checkpoint)")
    ap.add_argument("--distill-skip", nargs="*", default=[], choices=("stage1", "live"), help="distill runs to leave out")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", ""), help="git commit to record (default: $GIT_COMMIT, else git)")
    ap.add_argument("--smoke", action="store_true", help="2 tiny layers, tiny grids, few steps (CPU is fine)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sample_steps = min(args.sample_steps, 2)
        args.distill_steps = min(args.distill_steps, 2)
    result = run(args)
    from hla_convert.atomic_files import atomic_write_text

    out = atomic_write_text(args.out, json.dumps(result, indent=1))  # written whole or not at all
    log(f"wrote {len(result['records'])} records to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
