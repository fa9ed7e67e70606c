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
                 stage 2: 2 student forward/backwards). Stage 2 runs twice: `teacher: cached` (the
                 recipe's: the teacher targets computed once before step 1, `cache_s`, so a step
                 is the student's forward/backward alone) and `teacher: live` (a no_grad teacher
                 forward before each student forward/backward); both records carry `teacher`.

Softmax = torch's default SDPA backend (diffusers' native attention). Converted = the recipe's
attention (wan2.1-t2v-1.3b: hybrid, far hadamard, taylor r=32, window [1,0,0]) with its
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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json as published (diffusers 0.33+).
WAN_1_3B_CONFIG: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
# --smoke: the same architecture, 2 small layers
SMOKE_CONFIG: dict[str, Any] = {
    **WAN_1_3B_CONFIG, "attention_head_dim": 32, "ffn_dim": 64, "freq_dim": 32, "num_attention_heads": 2,
    "num_layers": 2, "text_dim": 32, "rope_max_seq_len": 64,
}  # fmt: skip

# name -> (frames, height, width) in pixels; the latent is 16 x ((f-1)/4+1) x h/8 x w/8
RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
SMOKE_RESOLUTIONS = {"480p": (9, 64, 64), "720p": (9, 64, 96)}
TEXT_LEN, SMOKE_TEXT_LEN = 512, 8
RECIPE = "wan2.1-t2v-1.3b"
PARTS = ("forward", "forward_backward", "sampling", "distill")


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# -- environment --------------------------------------------------------------------------------


def environment(device: torch.device, commit: str) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent is an answer
            return None

    source = "argument"
    if not commit:
        source = "git (the device's .git may be stale: pass --commit or GIT_COMMIT there)"
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            commit, source = "", "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "commit_source": source,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
    }


# -- timing -------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict[str, Any]:
    """Median time of fn (CUDA events on a GPU, perf_counter on the CPU) and the peak memory of
    the timed calls (GB allocated by torch, None on the CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "times_ms": [round(t, 3) for t in times], "peak_mem_gb": peak_gb(device)}


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# -- the model and its inputs -------------------------------------------------------------------


def build_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """WanTransformer3DModel from `config` with random weights drawn on the device, cast to dtype."""
    from diffusers import WanTransformer3DModel

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**kwargs)
    # as from_pretrained(torch_dtype=dtype) loads it: the class's _keep_in_fp32_modules stay float32
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not keep.intersection(name.split(".")):
                t.data = t.data.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def latent_shape(res: tuple[int, int, int], channels: int) -> tuple[int, int, int, int, int]:
    f, h, w = res
    return (1, channels, (f - 1) // 4 + 1, h // 8, w // 8)


def model_inputs(model, res, text_len, device, dtype, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    cfg = model.config
    x = torch.randn(latent_shape(res, cfg.in_channels), generator=g)
    text = torch.randn(1, text_len, cfg.text_dim, generator=g)
    return {
        "hidden_states": x.to(device, dtype),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": text.to(device, dtype),
    }


def tokens_of(model, res) -> int:
    _, _, f, h, w = latent_shape(res, model.config.in_channels)
    pt, ph, pw = model.config.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def load_bench_recipe(overrides: list[str]):
    """The recipe with --attention FIELD=VALUE overrides (YAML values: 32, true, 1,0,0 -> [1, 0, 0])."""
    import yaml

    from hla_convert.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    fields: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--attention {item!r}: expected FIELD=VALUE, e.g. feature_dim=32")
        parsed = yaml.safe_load(f"[{value}]") if "," in value else yaml.safe_load(value)
        fields[f"attention.{key.strip()}"] = parsed
    try:
        return recipe.with_overrides(fields=fields)
    except ValueError as exc:  # RecipeError: one line naming the field
        raise SystemExit(f"--attention: {exc}") from None


def attention_lora_modules(model) -> list[str]:
    """The recipe's stage-2 LoRA targets on every block's self-attention (the softmax side's LoRA)."""
    names = dict(model.named_modules())
    return [f"{b}.{t}" for b in (n for n in names if n.endswith(".attn1")) for t in ("to_q", "to_k", "to_v", "to_out.0") if f"{b}.{t}" in names]


def convert(model, recipe) -> dict[str, Any]:
    """The recipe's attention on the model, its softmax_layers given back to softmax (the first ones)."""
    from hla_convert import convert_attention, revert_attention
    from hla_convert.model.layers import hla_layers

    a = recipe.attention
    convert_attention(model, recipe.hla_config(), include=a.include, exclude=a.exclude)
    back = list(hla_layers(model))[: a.softmax_layers]
    if back:
        revert_attention(model, back)
    return {"softmax_layers": back, "converted_layers": len(hla_layers(model))}


def compiled(model, how: str | None, backend: str = "inductor", in_place: bool = False):
    """The callable to time: the model itself, torch.compile(model), or the model with its repeated
    blocks compiled in place (diffusers' regional compilation). in_place: "model" compiles the
    model object itself (nn.Module.compile), so that a pipeline holding it calls the compiled one;
    undo either in-place form with uncompile_blocks."""
    if how is None:
        return model
    torch._dynamo.reset()
    # Under gradient checkpointing a converted block's forward has side effects dynamo will not
    # replay in the recompute (the processor enters its routing TorchFunctionMode, the core counts
    # its calls); without this the whole forward falls back to eager (tests/model/test_compile.py).
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # newer torch only
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if how == "model" and not in_place:
        return torch.compile(model, backend=backend)
    if how == "model":
        model.compile(backend=backend)
    else:
        model.compile_repeated_blocks(backend=backend)
    return model


def uncompile_blocks(model) -> None:
    """Undo compile_repeated_blocks (nn.Module.compile sets _compiled_call_impl)."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


# -- measurements ---------------------------------------------------------------------------------


def time_forward(fn, inputs, device, warmup, reps) -> dict[str, Any]:
    def run():
        with torch.no_grad():
            fn(**inputs, return_dict=False)

    return measure(run, device, warmup, reps)


def time_forward_backward(fn, model, inputs, params, checkpointing, device, warmup, reps) -> dict[str, Any]:
    from hla_convert.stages.distill import _only_trainable

    def run():
        out = fn(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
        for p in params.values():
            p.grad = None

    was = bool(getattr(model, "is_gradient_checkpointing", False))
    if checkpointing and not was:
        model.enable_gradient_checkpointing()
    try:
        with _only_trainable(model, params), torch.enable_grad():
            res = measure(run, device, warmup, reps)
    finally:
        if checkpointing and not was:
            model.disable_gradient_checkpointing()
    res["trainable_parameters"] = sum(p.numel() for p in params.values())
    res["gradient_checkpointing"] = bool(checkpointing)
    return res


def stand_in_pipeline(transformer, device, dtype, smoke: bool):
    """WanPipeline around `transformer` with a 1-layer UMT5 (its d_model = text_dim), a word-level
    tokenizer built here, a small AutoencoderKLWan (same 4x/8x compression, z_dim 16) and Wan's
    UniPC flow scheduler (shift 3)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": 3 + i for i in range(253)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(1)
    d = transformer.config.text_dim
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(vocab), d_model=d, d_kv=64, d_ff=256, num_layers=1, num_heads=max(1, d // 64 // 8))
    ).to(device, dtype).eval()
    vae = AutoencoderKLWan(base_dim=4 if smoke else 16, z_dim=transformer.config.in_channels, num_res_blocks=1).to(device).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_sampling(pipe, res, steps, device) -> dict[str, Any]:
    f, h, w = res
    marks: list[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        _sync(device)
        marks.append(time.perf_counter())
        return kwargs

    def run():
        marks.clear()
        g = torch.Generator(device="cpu").manual_seed(0)
        t0 = time.perf_counter()
        pipe(
            prompt="w1 w2 w3 w4", negative_prompt="w5 w6", height=h, width=w, num_frames=f, num_inference_steps=steps,
            guidance_scale=5.0, generator=g, output_type="np", callback_on_step_end=on_step,
        )
        _sync(device)
        return t0, time.perf_counter()

    run()  # warm-up (first kernels, allocator)
    reset_peak(device)
    t0, t1 = run()
    step_s = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    return {
        "seconds_per_video": t1 - t0,
        "loop_s": marks[-1] - t0,
        "steps": steps,
        "median_step_s": statistics.median(step_s[1:] or step_s),
        "guidance_scale": 5.0,
        "peak_mem_gb": peak_gb(device),
    }


def time_distill(model, recipe, res, text_len, device, dtype, steps: int) -> list[dict[str, Any]]:
    """Stage 1, then stage 2 with its teacher live and cached, as the library runs them: `steps`
    steps each on synthetic inputs. The cached run's first step also holds the targets' cache
    (`cache_s`), which the median after the first step leaves out."""
    from hla_convert.stages.distill import attention_transfer, output_distillation

    items = [model_inputs(model, res, text_len, device, dtype, seed=10 + i) for i in range(4)]
    recipe = recipe.with_overrides(
        fields={"stage1.steps": steps, "stage2.steps": steps, "stage1.checkpoint_every": 10**6, "stage2.checkpoint_every": 10**6}
    )
    accumulate = recipe.stage2.batch_size // recipe.calibration.batch_size
    runs = [("stage1", attention_transfer, recipe, None)] + [
        ("stage2", output_distillation, recipe.with_overrides(fields={"stage2.teacher": how}), how) for how in ("live", "cached")
    ]
    out = []
    for stage, run, recipe, how in runs:
        marks: list[float] = []

        def progress(_stage, _done, _total, _info):
            _sync(device)
            marks.append(time.perf_counter())

        reset_peak(device)
        with tempfile.TemporaryDirectory() as work:
            t0 = time.perf_counter()
            summary = run(model, items, recipe, work_dir=work, progress=progress)
        step_s = [b - a for a, b in zip([t0] + marks[:-1], marks)]
        spec = getattr(recipe, stage)
        out.append({
            "measurement": stage,
            "steps": len(step_s),
            "seconds_per_step": statistics.median(step_s[1:] or step_s),
            "step_s": [round(s, 4) for s in step_s],
            "forwards_per_step": spec.batch_size // recipe.calibration.batch_size,
            "gradient_checkpointing": bool(stage == "stage2" and recipe.stage2.gradient_checkpointing),
            "lora": summary.get("lora"),
            "final_loss": summary.get("final_loss"),
            "peak_mem_gb": peak_gb(device),
        })  # fmt: skip
        if how is not None:  # stage 2: how the targets came, and the teacher forwards a step costs
            teacher = summary.get("teacher") or {}
            out[-1].update({
                "teacher": teacher.get("mode", how),
                "teacher_forwards_per_step": accumulate if how == "live" else 0,
                "cache_s": teacher.get("seconds"),
                "cached_targets": teacher.get("targets"),
            })  # fmt: skip
    return out


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
            stages = time_distill(model, recipe, table["480p"], text_len, device, dtype, args.distill_steps)
        except Exception as exc:  # noqa: BLE001 - recorded, as attempt() does
            stages = [{"measurement": "distill", "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}]
        for rec in stages:
            m = rec.pop("measurement")
            record("converted", m, "480p", None, rec, **extra)
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
    ap.add_argument("--distill-steps", type=int, default=3, help="steps per distillation stage (the first is warm-up)")
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
