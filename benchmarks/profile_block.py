"""Where one Wan2.1-1.3B transformer block spends its time: a torch.profiler breakdown.

One block of the published 1.3B config (dim 1536, 12 heads x 128, ffn 8960; bench_wan.py's
WAN_1_3B_CONFIG) at 480p/81f (32,760 video tokens in self-attention, 512 text tokens as the
cross-attention keys), bf16 on CUDA, profiled in three variants:

  softmax    the teacher: diffusers' own WanAttnProcessor, torch's default SDPA backend
  hybrid     a converted layer with the shipped recipe's attention (wan2.1-t2v-1.3b: hybrid,
             far hadamard, taylor r=32, window [1,0,0]); forward_backward trains what stage 2
             trains (the HLA parameters and the recipe's LoRA on to_q/to_k/to_v/to_out.0)
  kept       a layer of the converted model given back to softmax (attention.softmax_layers):
             reverted, so diffusers' processor again; no trainable parameters of its own

each as `forward` (no_grad, inference) and `forward_backward` (the block's input requires grad as
in the middle of a model; loss = mean(out^2)). The softmax side's forward_backward carries the
same LoRA as the hybrid's, as bench_wan.py's does.

The blocks come from a 2-layer WanTransformer3DModel (block 0 converted, block 1 converted and
reverted, as the recipe's softmax_layers are); their inputs (hidden states, projected text, the
timestep modulation, RoPE) are captured from one model forward, which also sets the token grid
the hybrid window needs.

Per variant and pass, two tables (times per iteration, median of nothing: the profiler's sum over
--reps iterations after --warmup, divided by --reps):

  ops     by op name: self CUDA time (self CPU time on the CPU) and calls
  groups  attention core / feature maps / QKV+out projections / norms+rope / FFN /
          copies+casts / other, in ms and % of the total; the groups sum to the total

Grouping: an op whose name is an attention core (SDPA and its flash / efficient / cuDNN / math
kernels, the hla_kernels custom ops) is "attention core"; one that copies or casts
(aten::copy_, to, _to_copy, contiguous, clone, cat) is "copies+casts" wherever it runs; any
other op goes to the innermost module region it ran in (record_function ranges the script puts
on to_q/to_k/to_v/to_out.0 and the added k/v projections, norm_q/norm_k/norm1-3, ffn, the HLA
core's feature maps and the core itself; the rest of an attention module's processor is RoPE and
reshapes: "norms+rope"); a backward op goes where the forward op that made its autograd node went
(matched by the autograd sequence number). Ops outside every region (the block's modulation
arithmetic, the residual adds) are "other".

    python benchmarks/profile_block.py OUT.json [--variants softmax,hybrid,kept]
        [--passes forward,forward_backward] [--warmup 3] [--reps 5] [--top 25] [--commit SHA]
    python benchmarks/profile_block.py OUT.json --smoke    # tiny block, CPU is fine (the tests)

Writes OUT.json (env, args, one record per variant and pass) and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_wan, when loaded by path

import bench_wan

VARIANTS = ("softmax", "hybrid", "kept")
PASSES = ("forward", "forward_backward")
GROUPS = ("attention core", "feature maps", "QKV+out projections", "norms+rope", "FFN", "copies+casts", "other")

# op names (lower case substrings) that are the attention core wherever they run
CORE_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "hla_kernels::", "_hyb_", "_hla_")
# ops that copy or cast, exactly (their self time: aten::to / contiguous mostly hand it to copy_)
COPY_OPS = frozenset({"aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat", "aten::_cat"})
REGION = "prof::"  # record_function names the script opens: prof::<group>
BACKWARD = "autograd::engine::evaluate_function"

# module name suffix (inside a block) -> group of its region
MODULE_GROUPS = (
    (("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"), "QKV+out projections"),
    (("norm_q", "norm_k", "norm_added_k", "norm1", "norm2", "norm3"), "norms+rope"),
    (("ffn",), "FFN"),
    (("attn1", "attn2"), "norms+rope"),  # what the processor does besides its submodules: RoPE, reshapes
)


# -- regions --------------------------------------------------------------------------------------


@contextlib.contextmanager
def regions(block: torch.nn.Module) -> Iterator[None]:
    """record_function ranges around the block's modules and its HLA cores' feature maps / core."""
    from hla_convert.model.layers import HLAAttention

    handles, patched = [], []
    for name, mod in block.named_modules():
        group = next((g for names, g in MODULE_GROUPS if any(name == n or name.endswith("." + n) for n in names)), None)
        if group is None:
            continue
        stack: list[Any] = []

        def pre(_m, _a, label=REGION + group, stack=stack):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            stack.append(rf)

        def post(_m, _a, _o, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    for mod in block.modules():
        if isinstance(mod, HLAAttention):
            for attr, group in (("features", "feature maps"), ("student", "attention core")):
                patched.append((mod, attr))
                setattr(mod, attr, _ranged(getattr(mod, attr), REGION + group))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mod, attr in patched:
            delattr(mod, attr)  # the bound method of the class again


def _ranged(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return run


# -- grouping -------------------------------------------------------------------------------------


def _region(evt: Any) -> str | None:
    """The group of the innermost prof:: range around a forward event, or None."""
    p = evt.cpu_parent
    while p is not None:
        if p.name.startswith(REGION):
            return p.name[len(REGION) :]
        p = p.cpu_parent
    return None


def _by_name(name: str) -> str | None:
    low = name.lower()
    if any(c in low for c in CORE_OPS):
        return "attention core"
    if name in COPY_OPS:
        return "copies+casts"
    return None


def _backward_root(evt: Any) -> Any | None:
    p = evt
    while p is not None:
        if p.name.startswith(BACKWARD):
            return p
        p = p.cpu_parent
    return None


def group_events(events: list[Any], cuda: bool) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """(ms per group, {op name: {self_ms, calls}}) over the profiler's CPU-side events: each op's
    self device time (CUDA) or self CPU time is counted once, in one group and under its name."""
    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    forward_group: dict[int, str] = {}  # autograd sequence number -> the group of the op that made the node
    for e in cpu_events:
        if e.sequence_nr >= 0 and _backward_root(e) is None and e.sequence_nr not in forward_group:
            forward_group[e.sequence_nr] = _by_name(e.name) or _region(e) or "other"
    groups = dict.fromkeys(GROUPS, 0.0)
    ops: dict[str, dict[str, Any]] = defaultdict(lambda: {"self_ms": 0.0, "calls": 0})
    for e in cpu_events:
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if not e.name.startswith(REGION):
            ops[e.name]["calls"] += 1
        if us <= 0:
            continue
        group = _by_name(e.name)
        if group is None:
            root = _backward_root(e)
            if root is not None:
                group = forward_group.get(root.sequence_nr, "other")
            elif e.name.startswith(REGION):  # the range's own time (Python around the ops: the CPU only)
                group = e.name[len(REGION) :]
            else:
                group = _region(e) or "other"
        groups[group] += us / 1000
        ops[e.name]["self_ms"] += us / 1000
    return groups, dict(ops)


# -- the run --------------------------------------------------------------------------------------


def profile(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[Any]:
    """The profiler's events of `reps` calls of fn, after `warmup` unprofiled ones."""
    from torch.profiler import ProfilerActivity

    for _ in range(warmup):
        fn()
    bench_wan._sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        bench_wan._sync(device)
    return list(prof.events())


def capture_block_inputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of every block's call in one forward of the model (no_grad)."""
    got: list[tuple[tuple, dict]] = []
    hooks = [b.register_forward_pre_hook(lambda _m, a, k: got.append((a, k)), with_kwargs=True) for b in model.blocks]
    try:
        with torch.no_grad():
            model(**inputs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return got


def run_block(block, args, kwargs, params: dict[str, torch.nn.Parameter], backward: bool) -> Callable[[], None]:
    """One call of the block: no_grad forward, or forward + backward into its input and `params`."""
    from hla_convert.stages.distill import _only_trainable

    x0, rest = args[0], args[1:]

    def fwd() -> None:
        with torch.no_grad():
            block(x0, *rest, **kwargs)

    def fwd_bwd() -> None:
        x = x0.detach().requires_grad_(True)
        with _only_trainable(block, params), torch.enable_grad():
            block(x, *rest, **kwargs).float().square().mean().backward()
        for p in params.values():
            p.grad = None

    return fwd_bwd if backward else fwd


def record(variant: str, pass_: str, events: list[Any], cuda: bool, reps: int, top: int) -> dict[str, Any]:
    groups, ops = group_events(events, cuda)
    total = sum(groups.values())
    per = 1.0 / reps
    rows = sorted(ops.items(), key=lambda kv: -kv[1]["self_ms"])
    return {
        "variant": variant,
        "pass": pass_,
        "time": "self CUDA" if cuda else "self CPU",
        "total_ms": total * per,
        "groups": {g: {"ms": ms * per, "pct": 100 * ms / total if total else 0.0} for g, ms in groups.items()},
        "ops": [{"name": n, "self_ms": o["self_ms"] * per, "calls": o["calls"] / reps} for n, o in rows if o["self_ms"] > 0 or o["calls"]][:top],
    }


def markdown(rec: dict[str, Any]) -> str:
    lines = [f"### {rec['variant']} {rec['pass']}: {rec['total_ms']:.3f} ms ({rec['time']} time per iteration)", ""]
    lines += ["| group | ms | % |", "|---|---:|---:|"]
    lines += [f"| {g} | {v['ms']:.3f} | {v['pct']:.1f} |" for g, v in rec["groups"].items()]
    lines += ["", "| op | self ms | calls |", "|---|---:|---:|"]
    lines += [f"| `{o['name'][:90]}` | {o['self_ms']:.3f} | {o['calls']:g} |" for o in rec["ops"]]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hla_convert import convert_attention, revert_attention
    from hla_convert.model.layers import hla_parameters
    from hla_convert.model.lora import add_lora, lora_parameters, remove_lora
    from hla_convert.stages.distill import _stage2_lora

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    variants = _subset(args.variants, VARIANTS, "--variants")
    passes = _subset(args.passes, PASSES, "--passes")
    base = bench_wan.SMOKE_CONFIG if args.smoke else bench_wan.WAN_1_3B_CONFIG
    res = (bench_wan.SMOKE_RESOLUTIONS if args.smoke else bench_wan.RESOLUTIONS)["480p"]
    text_len = bench_wan.SMOKE_TEXT_LEN if args.smoke else bench_wan.TEXT_LEN
    recipe = bench_wan.load_bench_recipe(args.attention)
    if args.smoke:  # head dim 32 in the smoke model
        given = {o.partition("=")[0].strip() for o in args.attention}
        if "feature_dim" not in given:
            recipe = recipe.with_overrides(fields={"attention.feature_dim": 8})
    warmup, reps = (1, 1) if args.smoke else (args.warmup, args.reps)
    env = bench_wan.environment(device, args.commit)

    model = bench_wan.build_transformer({**base, "num_layers": 2}, device, dtype)
    inputs = bench_wan.model_inputs(model, res, text_len, device, dtype)
    captured = capture_block_inputs(model, inputs)
    blocks = {"softmax": 0, "hybrid": 0, "kept": 1}
    records: list[dict[str, Any]] = []

    def measure(variant: str, trainable: Callable[[], dict[str, torch.nn.Parameter]]) -> None:
        block = model.blocks[blocks[variant]]
        a, k = captured[blocks[variant]]
        for pass_ in passes:
            params = trainable() if pass_ == "forward_backward" else {}
            with regions(block):
                events = profile(run_block(block, a, k, params, pass_ == "forward_backward"), device, warmup, reps)
            rec = {**record(variant, pass_, events, cuda, reps, args.top), "tokens": bench_wan.tokens_of(model, res), "text_len": text_len, **env}
            rec["trainable_parameters"] = sum(p.numel() for p in params.values())
            records.append(rec)
            print(markdown(rec), flush=True)

    lora = recipe.stage2
    if "softmax" in variants:

        def softmax_lora() -> dict[str, torch.nn.Parameter]:  # the hybrid's LoRA, on block 0's attn1
            if not lora_parameters(model):
                mods = [m for m in bench_wan.attention_lora_modules(model) if m.startswith("blocks.0.")]
                add_lora(model, rank=lora.lora_rank, alpha=lora.lora_alpha, modules=mods)
            return lora_parameters(model)

        measure("softmax", softmax_lora)
        remove_lora(model)
    # both blocks converted, block 1 given back to softmax: the recipe's softmax_layers
    convert_attention(model, recipe.hla_config(), include=["blocks.0.attn1", "blocks.1.attn1"])
    revert_attention(model, ["blocks.1.attn1"])
    with torch.no_grad():
        model(**inputs, return_dict=False)  # the pre-hook tells the core this input's token grid
    if "hybrid" in variants:
        measure("hybrid", lambda: hla_parameters(model) | (lora_parameters(model) or _stage2_lora(model, recipe)[0]))
        remove_lora(model)
    if "kept" in variants:
        measure("kept", dict)
    return {"env": env, "args": vars(args), "attention": dict(recipe.attention.__dict__), "records": records}


def _subset(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    got = [p.strip() for p in text.split(",") if p.strip()]
    for p in got:
        if p not in allowed:
            raise SystemExit(f"{flag}: {p!r} is not one of {', '.join(allowed)}")
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated subset of {','.join(PASSES)}")
    ap.add_argument("--attention", action="append", default=[], metavar="FIELD=VALUE", help="recipe attention override (repeatable)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25, help="ops per table")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", ""), help="git commit to record (default: $GIT_COMMIT, else git)")
    ap.add_argument("--smoke", action="store_true", help="tiny block and grid (CPU is fine)")
    args = ap.parse_args(argv)
    result = run(args)
    from hla_convert.atomic_files import atomic_write_text

    out = atomic_write_text(args.out, json.dumps(result, indent=1))
    bench_wan.log(f"wrote {len(result['records'])} records to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
