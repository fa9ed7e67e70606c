"""On a GPU: a converted model uses the Triton kernels by itself and matches the reference path.

1. The embedded demo model, converted by `hla_convert.convert` with its shipped tiny-wan recipe
   (hybrid, bf16, CUDA) and saved; then, in a fresh process, the saved folder loaded back with
   load_converted: the whole denoiser output through the kernels against the same model forced
   onto the PyTorch reference path, the kernel calls counted (no flag is set anywhere), and
   `validate`'s verdict on the folder — what a user of the saved conversion gets.
2. A Wan2.1-1.3B-shaped transformer (dim 1536, 12 heads x 128, 2 blocks, random weights) at the
   480p token count (21 x 60 x 104 latents -> 32,760 tokens): forward and forward+backward time,
   softmax (SDPA) against HLA (F=2, r=32, softplus), bf16.

Usage: python benchmarks/check_converted_model.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


KERNEL_ENTRY_POINTS = ("hadamard_attention", "hybrid_attention", "causal_hadamard_attention")


def check_demo(device: str, work: Path) -> dict:
    """Convert the demo with its shipped recipe on the GPU (`hla_convert.convert`, bf16), then measure
    the saved folder in a fresh process (`--measure-saved`): what a user who loads it gets."""
    import hla_convert

    out = work / "demo-hla"
    t0 = time.perf_counter()
    result = hla_convert.convert(recipe="tiny-wan", out=out, device=device, dtype="bf16", overwrite=True)
    convert_s = time.perf_counter() - t0
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure-saved", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"ok": False, "error": tail[-1] if tail else f"exit {proc.returncode}"}
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"convert_seconds": round(convert_s, 1), "convert_passed": result.passed, **measured}


def measure_saved(out: Path, device: str = "cuda") -> dict:
    """The saved demo conversion through load_converted (bf16, CUDA): the whole denoiser output through
    the kernels (counted: no flag is set anywhere) against the same model forced onto the PyTorch
    reference path, and `validate`'s verdict on the folder."""
    import hla_kernels

    import hla_convert
    from hla_convert.model import layers
    from hla_convert.model.loading import DEMO_MODEL_PATH

    model = hla_convert.load_converted(out, device=device, dtype="bf16")
    g = torch.Generator().manual_seed(0)
    info = json.loads((DEMO_MODEL_PATH / "demo_info.json").read_text())
    shape = info.get("data", info)
    c, f, h, w = (shape.get(k) for k in ("channels", "frames", "height", "width"))
    x = torch.randn(2, c, f, h, w, generator=g).to(device, torch.bfloat16)
    text = torch.randn(2, shape.get("text_len", 8), model.config.text_dim, generator=g).to(device, torch.bfloat16)
    t = torch.tensor([300, 800], device=device)

    calls = {name: 0 for name in KERNEL_ENTRY_POINTS}
    real = {name: getattr(hla_kernels, name) for name in KERNEL_ENTRY_POINTS}

    def counting(name):
        def call(*a, **k):
            calls[name] += 1
            return real[name](*a, **k)

        return call

    for name in KERNEL_ENTRY_POINTS:
        setattr(hla_kernels, name, counting(name))
    try:
        with torch.no_grad():
            out_kernel = model(x, t, text, return_dict=False)[0]
        saved = layers._kernels
        layers._kernels = lambda: None  # force the reference path
        try:
            with torch.no_grad():
                out_ref = model(x, t, text, return_dict=False)[0]
        finally:
            layers._kernels = saved
    finally:
        for name in KERNEL_ENTRY_POINTS:
            setattr(hla_kernels, name, real[name])
    n_layers = sum(1 for layer in layers.hla_layers(model).values() if layer.config.kind != "softmax")
    err = rel(out_kernel, out_ref)
    validated = hla_convert.validate(out, device=device)
    return {
        "layers": n_layers,
        "kernel_calls": {k: v for k, v in calls.items() if v},
        "rel_l2_kernel_vs_reference_bf16": err,
        "finite": bool(torch.isfinite(out_kernel).all()),
        "validate_passed": validated.passed,
        "validate_failures": validated.report.get("failures", []),
        "ok": sum(calls.values()) == n_layers and err < 1e-2 and validated.passed,
    }


def time_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def top_kernels(fn, count: int = 8) -> list[tuple[str, float]]:
    """The CUDA kernels that take the most time in one call of fn: [(name, ms)]."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:count]
    return [(e.key[:80], round(e.device_time_total / 1000, 3)) for e in rows]


def bench_wan_shaped(device: str, profile: bool = False) -> dict:
    from diffusers import WanTransformer3DModel

    from hla_convert import HLAConfig, convert_attention, hla_parameters

    torch.manual_seed(0)
    cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )
    model = WanTransformer3DModel(**cfg).to(device, torch.bfloat16).eval()
    x = torch.randn(1, 16, 21, 60, 104, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    t = torch.tensor([500], device=device)
    tokens = 21 * 30 * 52

    def fwd():
        with torch.no_grad():
            model(x, t, text, return_dict=False)

    def fwd_bwd(params):
        def run():
            out = model(x, t, text, return_dict=False)[0]
            out.float().square().mean().backward()
            for p in params:
                p.grad = None

        return run

    for p in model.parameters():
        p.requires_grad_(False)
    res = {"tokens": tokens, "blocks": 2}
    res["softmax_forward_ms"] = time_ms(fwd)
    if profile:
        res["softmax_forward_top_kernels"] = top_kernels(fwd)
    x.requires_grad_(True)
    res["softmax_fwd_bwd_ms"] = time_ms(fwd_bwd([x]))
    x.requires_grad_(False)
    convert_attention(model, HLAConfig(kind="hadamard", factors=2, feature_dim=32, feature_map="softplus"))
    res["hla_forward_ms"] = time_ms(fwd)
    if profile:
        res["hla_forward_top_kernels"] = top_kernels(fwd)
    params = list(hla_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    res["hla_fwd_bwd_ms"] = time_ms(fwd_bwd(params))
    res["speedup_forward"] = res["softmax_forward_ms"] / res["hla_forward_ms"]
    return res


def bench_layers(device: str) -> dict:
    """One converted attention core (HLAAttention.student: feature maps + attention), B=1, H=12,
    D=128, N=32,760, bf16 q/k/v, float32 parameters as after convert_attention: forward and
    forward+backward (gradients into q, k, v and the HLA parameters), against flash SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hla_convert import HLAConfig, HLAAttention

    n, h, d = 32760, 12, 128
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    do = torch.randn_like(v)
    res: dict = {"tokens": n, "heads": h, "head_dim": d}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(*leaves)

    with torch.no_grad():
        res["sdpa_flash_forward_ms"] = time_ms(sdpa)
    res["sdpa_flash_fwd_bwd_ms"] = time_ms(lambda: sdpa().backward(do))
    for name, cfg in {
        "hadamard_r32_softplus": HLAConfig(kind="hadamard", factors=2, feature_dim=32, feature_map="softplus"),
        "hadamard_r64_taylor": HLAConfig(kind="hadamard", factors=2, feature_dim=64, feature_map="taylor"),
        "higher_order_r32": HLAConfig(kind="higher_order", feature_dim=32),
    }.items():
        core = HLAAttention(cfg, h, d).to(device)
        scale = d**-0.5
        with torch.no_grad():
            res[f"{name}_forward_ms"] = time_ms(lambda: core.student(q, k, v, None, scale))
        res[f"{name}_fwd_bwd_ms"] = time_ms(lambda: core.student(*leaves, None, scale).backward(do))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", action="store_true", help="also list the slowest CUDA kernels of each forward")
    ap.add_argument("--work", default=None, help="where the demo conversion is written (default: a temporary folder)")
    ap.add_argument("--measure-saved", default=None, help=argparse.SUPPRESS)  # internal: the fresh process
    args = ap.parse_args()
    if args.measure_saved:
        print(json.dumps(measure_saved(Path(args.measure_saved))))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    device = "cuda"
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="check-converted-") as tmp:
        results["demo"] = check_demo(device, Path(args.work or tmp))
    print("demo:", json.dumps(results["demo"]), flush=True)
    results["layers"] = bench_layers(device)
    print("one attention core:", json.dumps(results["layers"]), flush=True)
    results["wan_1_3b_shaped"] = bench_wan_shaped(device, args.profile)
    print("wan-1.3b-shaped (2 blocks):", json.dumps(results["wan_1_3b_shaped"]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0 if results["demo"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
