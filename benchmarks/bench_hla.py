"""Hadamard linear attention on the GPU: Triton kernels vs softmax SDPA vs the PyTorch reference.

    python benchmarks/bench_hla.py results.json                 # checks + table at N = 8192, 32760, 75600
    python benchmarks/bench_hla.py results.json --sweep         # also sweep the kernels' launch configs
    python benchmarks/bench_hla.py results.json --ns 32760 --no-check --no-baselines

Shape: B = 1, H = 12, head dim D = 128, bf16, HLA order F = 2 with r = 32 softplus features
phi_f(x) = softplus(x W_f + b_f), W_f [D, r]. Every row is the median of triton.testing.do_bench
(CUDA events, L2 flushed between runs) after warm-up. "fwd+bwd" is the forward plus
torch.autograd.grad of every input. Peak extra memory = peak allocated during one call minus
what was allocated before it (outputs and gradients included).

FLOP counts (per head): HLA forward = state 2 N r^2 dv + readout 2 N r^2 dv; backward = dq, dT
(2 N r^2 dv each) + dk/dv (4 N r^2 dv). Softmax attention forward = 4 N^2 D, backward 2.5x that
(flash recomputation counted as in the FlashAttention papers). The floor is FLOPs over the
measured bf16 matmul rate.

Correctness (GPU, real shapes): the kernels against the float64 efficient reference
(hla_convert.ops.hadamard_attention on float64 copies), forward and gradients, fp32 and bf16,
with a key mask; relative error ||x - ref|| / ||ref|| per tensor.

Writes the JSON to the path given and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _reference_ops():
    """hla_convert.ops.hadamard without importing the rest of hla_convert (diffusers and all)."""
    try:
        from hla_convert.ops import hadamard as ref

        return ref
    except Exception:
        import types

        for name in [m for m in sys.modules if m == "hla_convert" or m.startswith("hla_convert.")]:
            del sys.modules[name]
        pkg = types.ModuleType("hla_convert")
        pkg.__path__ = [str(ROOT / "hla_convert")]
        sys.modules["hla_convert"] = pkg
        import hla_convert.ops.hadamard as ref

        return ref


def _kernels():
    from gpu_timing import import_kernels

    hla_kernels = import_kernels()
    from hla_kernels import _runtime as rt
    from hla_kernels import hadamard as hk

    return hla_kernels, hk, rt


REF = _reference_ops()
HLA, HK, RT = _kernels()

import triton  # noqa: E402
from gpu_timing import bench, log, peak_extra_mb, rel  # noqa: E402

B, H, D, R = 1, 12, 128, 32
DEV = "cuda"


# --------------------------------------------------------------------------------------- inputs
def make_inputs(n, dtype=torch.bfloat16, r=R, seed=0, mask_frac=0.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    xq = torch.randn(B, H, n, D, device=DEV, generator=g).to(dtype)
    xk = torch.randn(B, H, n, D, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, H, n, D, device=DEV, generator=g).to(dtype)
    # two feature maps, each shared by queries and keys: phi_f(x) = softplus(x W_f + b_f)
    w = [(torch.randn(D, r, device=DEV, generator=g) / D**0.5).to(dtype) for _ in range(2)]
    bias = [(0.1 * torch.randn(r, device=DEV, generator=g)).to(dtype) for _ in range(2)]
    mask = None
    if mask_frac > 0:
        mask = torch.rand(B, n, device=DEV, generator=g) >= mask_frac
    return xq, xk, v, w, bias, mask


def features(x, w, bias):
    return [F.softplus(x @ wf + bf) for wf, bf in zip(w, bias)]


# ------------------------------------------------------------------------------------ ceilings
def ceilings():
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    mm = 2 * 8192**3 / ms / 1e9
    x = torch.randn(2**28, device=DEV)  # 1 GiB
    y = torch.empty_like(x)
    ms_c = bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / ms_c / 1e6
    del a, b, x, y
    return {"bf16_matmul_tflops": mm, "copy_gbs": bw}


# --------------------------------------------------------------------------------- correctness
def check(n, dtype, grads, mask_frac=0.1, seed=1):
    xq, xk, v, w, bias, mask = make_inputs(n, dtype, seed=seed, mask_frac=mask_frac)
    with torch.no_grad():
        q, k = features(xq, w, bias), features(xk, w, bias)
    do = torch.randn_like(v)
    leaves = [t.detach().clone().requires_grad_(grads) for t in (*q, *k, v)]
    RT.POISON_OUTPUTS = True
    try:
        out = HLA.hadamard_attention(leaves[:2], leaves[2:4], leaves[4], mask)
        res = {"n": n, "dtype": str(dtype).replace("torch.", ""), "masked_frac": mask_frac}
        gk = torch.autograd.grad(out, leaves, do) if grads else None
    finally:
        RT.POISON_OUTPUTS = False
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in (*q, *k, v)]
    ref = REF.hadamard_attention(ref_leaves[:2], ref_leaves[2:4], ref_leaves[4], mask)
    res["out"] = rel(out, ref)
    if grads:
        gr = torch.autograd.grad(ref, ref_leaves, do.double())
        for name, a, b_ in zip(("dq1", "dq2", "dk1", "dk2", "dv"), gk, gr):
            res[name] = rel(a, b_)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    errs = [e for key, e in res.items() if key in ("out", "dq1", "dq2", "dk1", "dk2", "dv")]
    res["pass"] = all(e == e and e < tol for e in errs)
    return res


# ------------------------------------------------------------------------------------- sweeps
SWEEP = {
    "dq": [
        dict(BLOCK_M=128, G=2, num_warps=8, num_stages=3, PREFETCH=False),
        dict(BLOCK_M=128, G=2, num_warps=8, num_stages=3, PREFETCH=True),
    ],
}
# Earlier sweeps (benchmarks/RESULTS.md) settled the other configs. A sweep only times: a config
# it picks has not been through the checks, which run first, with the defaults.


def kernel_parts(n, dtype=torch.bfloat16, r=R):
    """Closures that run each kernel alone on realistic inputs, and their FLOPs."""
    xq, xk, v, w, bias, _ = make_inputs(n, dtype, r=r, seed=2)
    with torch.no_grad():
        q1, q2 = features(xq, w, bias)
        k1, k2 = features(xk, w, bias)
    do = torch.randn_like(v)
    mod = HK.kernels(False)
    dot = RT.dot_setup((q1, q2, k1, k2, v), False)
    t = HK._state(mod, k1, k2, v, None, False, dot)
    z = HK._zstate(mod, k1, k2, None, False)
    t_dot = RT.to_dot(t, dot)
    out, den = HK._readout(mod, q1, q2, t_dot, z, v.dtype, 1e-6, False, dot)
    _, _, wb = HK._dq(mod, q1, q2, t_dot, z, do, den, False, dot)
    rows = (H * n, n, 1)
    dt = HK._state(mod, q1, q2, do, (wb[0], rows), False, dot, name="dstate")
    dz = HK._zstate(mod, q1, q2, (wb[1], rows), False)
    dt_dot = RT.to_dot(dt, dot)
    unit = 2 * B * H * n * r * r * D
    return {
        "state": (lambda: HK._state(mod, k1, k2, v, None, False, dot), unit),
        "zstate": (lambda: HK._zstate(mod, k1, k2, None, False), 2 * B * H * n * r * r),
        "readout": (lambda: HK._readout(mod, q1, q2, t_dot, z, v.dtype, 1e-6, False, dot), unit),
        "dq": (lambda: HK._dq(mod, q1, q2, t_dot, z, do, den, False, dot), unit),
        "dstate": (lambda: HK._state(mod, q1, q2, do, (wb[0], rows), False, dot, name="dstate"), unit),
        "dkdv": (lambda: HK._dkdv(mod, k1, k2, v, None, dt_dot, dz, False, dot), 2 * unit),
    }


def time_parts(n):
    parts = kernel_parts(n)
    out = {}
    for name, (fn, flops) in parts.items():
        ms = bench(fn)
        out[name] = {"ms": ms, "tflops": flops / ms / 1e9}
    return out


def sweep(n):
    parts = kernel_parts(n)
    results = {}
    for name, configs in SWEEP.items():
        fn, flops = parts[name]
        best = None
        rows = []
        for cfg in configs:
            old = HK.GPU_CONFIG[name]
            HK.GPU_CONFIG[name] = dict(old, **cfg)
            try:
                fn()
                torch.cuda.synchronize()
                ms = bench(fn, warmup=10, rep=50)
                row = dict(cfg, ms=ms, tflops=flops / ms / 1e9)
            except Exception as e:  # a config the compiler or the GPU refuses
                row = dict(cfg, error=f"{type(e).__name__}: {str(e)[:200]}")
            HK.GPU_CONFIG[name] = old
            rows.append(row)
            log(f"  sweep {name}: {row}")
            if "ms" in row and (best is None or row["ms"] < best["ms"]):
                best = row
        results[name] = rows
        if best is not None:
            HK.GPU_CONFIG[name] = dict(HK.GPU_CONFIG[name], **{k: v for k, v in best.items() if k not in ("ms", "tflops")})
    return results


# ------------------------------------------------------------------------------------- methods
def hla_flops(n, r=R, bwd=False):
    unit = 2 * B * H * n * r * r * D
    return unit * (6 if bwd else 2)


def sdpa_flops(n, bwd=False):
    f = 4 * B * H * n * n * D
    return f * (3.5 if bwd else 1.0)


def run_methods(n, baselines, mm_tflops):
    xq, xk, v, w, bias, _ = make_inputs(n)
    with torch.no_grad():
        qf, kf = features(xq, w, bias), features(xk, w, bias)
    do = torch.randn_like(v)
    rows = []

    def add(method, mode, fn, flops, note=""):
        try:
            fn()
            torch.cuda.synchronize()
            big = n > 40000 and method in ("sdpa_flash", "torch_reference")
            ms = bench(fn, warmup=25 if not big else 50, rep=100 if not big else 400)
            mem = peak_extra_mb(fn)
            row = {"n": n, "method": method, "mode": mode, "ms": ms, "peak_extra_mb": mem}
            if flops:
                row["tflops"] = flops / ms / 1e9
                row["floor_ms"] = flops / (mm_tflops * 1e9)
            if note:
                row["note"] = note
        except Exception as e:
            row = {"n": n, "method": method, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        rows.append(row)
        log("  ", row)
        torch.cuda.empty_cache()

    # HLA kernel, features given
    leaves = [t.detach().clone().requires_grad_() for t in (*qf, *kf, v)]
    add("hla_kernel", "fwd", lambda: HLA.hadamard_attention(qf, kf, v), hla_flops(n))
    add("hla_kernel", "fwd+bwd",
        lambda: torch.autograd.grad(HLA.hadamard_attention(leaves[:2], leaves[2:4], leaves[4]), leaves, do),
        hla_flops(n, bwd=True))

    # feature maps by torch (what fusing them into the kernels could save at most)
    xl = [xq.detach().clone().requires_grad_(), xk.detach().clone().requires_grad_()]
    wl = [t.detach().clone().requires_grad_() for t in (*w, *bias)]

    def feats_fwd():
        return features(xl[0], wl[:2], wl[2:]) + features(xl[1], wl[:2], wl[2:])

    add("features_torch", "fwd", lambda: [t.detach() for t in feats_fwd()], 4 * 2 * B * H * n * D * R)
    def feats_fb():
        f = feats_fwd()
        return torch.autograd.grad(f, xl + wl, [torch.ones_like(t) for t in f])

    add("features_torch", "fwd+bwd", feats_fb, 3 * 4 * 2 * B * H * n * D * R)

    def hla_end_to_end():
        f = feats_fwd()
        return HLA.hadamard_attention(f[:2], f[2:], v)

    add("hla_kernel+features", "fwd", hla_end_to_end, hla_flops(n))
    vl = v.detach().clone().requires_grad_()

    def hla_e2e_bwd():
        f = features(xl[0], wl[:2], wl[2:]) + features(xl[1], wl[:2], wl[2:])
        o = HLA.hadamard_attention(f[:2], f[2:], vl)
        return torch.autograd.grad(o, xl + wl + [vl], do)

    add("hla_kernel+features", "fwd+bwd", hla_e2e_bwd, hla_flops(n, bwd=True))

    if baselines:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ql, kl, vl2 = (t.detach().clone().requires_grad_() for t in (xq, xk, v))

        def sdpa_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(xq, xk, v)

        def sdpa_fb():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(ql, kl, vl2)
            return torch.autograd.grad(o, (ql, kl, vl2), do)

        add("sdpa_flash", "fwd", sdpa_fwd, sdpa_flops(n))
        add("sdpa_flash", "fwd+bwd", sdpa_fb, sdpa_flops(n, bwd=True))

        rl = [t.detach().clone().requires_grad_() for t in (*qf, *kf, v)]
        add("torch_reference", "fwd", lambda: REF.hadamard_attention(qf, kf, v), hla_flops(n))
        add("torch_reference", "fwd+bwd",
            lambda: torch.autograd.grad(REF.hadamard_attention(rl[:2], rl[2:4], rl[4]), rl, do),
            hla_flops(n, bwd=True))

        # HLA-MATH section 2, second-order higher-order linear attention, plain torch on q, k, v
        hl = [t.detach().clone().requires_grad_() for t in (xq, xk, v)]
        add("hoa2_torch", "fwd", lambda: hoa2(xq, xk, v), hoa2_flops(n))
        add("hoa2_torch", "fwd+bwd", lambda: torch.autograd.grad(hoa2(*hl), hl, do), 3 * hoa2_flops(n))
    return rows


def hoa2(q, k, v, eps=1e-6):
    """o_i = q_i^T S^K C^QV / (q_i^T S^K m^Q + eps): 3 N-long GEMMs and small [D, D] ones."""
    s = k.transpose(-1, -2) @ k  # [D, D]   S^K
    c = q.transpose(-1, -2) @ v  # [D, dv]  C^QV
    m = q.float().sum(-2, keepdim=True).transpose(-1, -2)  # [D, 1] m^Q
    sf = s.float()
    wmat = torch.cat([sf @ c.float(), sf @ m], dim=-1).to(q.dtype)  # [D, dv + 1]
    nd = (q @ wmat).float()
    return (nd[..., :-1] / (nd[..., -1:] + eps)).to(q.dtype)


def hoa2_flops(n):
    return 3 * 2 * B * H * n * D * D


# ---------------------------------------------------------------------------------------- main
def fmt_table(rows):
    lines = [f"{'N':>6} {'method':<22} {'mode':<8} {'ms':>9} {'TFLOP/s':>8} {'floor ms':>9} {'peak MB':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['n']:>6} {r['method']:<22} {r['mode']:<8} ERROR {r['error'][:60]}")
            continue
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        fl = f"{r['floor_ms']:.3f}" if "floor_ms" in r else ""
        lines.append(f"{r['n']:>6} {r['method']:<22} {r['mode']:<8} {r['ms']:>9.3f} {tf:>8} {fl:>9} {r['peak_extra_mb']:>9.0f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--ns", default="8192,32760,75600", help="sequence lengths")
    ap.add_argument("--sweep", action="store_true", help="sweep launch configs per kernel at the middle N first")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    ap.add_argument("--no-baselines", action="store_true", help="only the HLA kernel and features")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", ""), help="git commit to record")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="only run the kernel's forward+backward 3 times at this N (for ncu), then exit")
    args = ap.parse_args()
    if args.profile:
        xq, xk, v, w, bias, _ = make_inputs(args.profile)
        with torch.no_grad():
            leaves = [t.requires_grad_() for t in features(xq, w, bias) + features(xk, w, bias)] + [v.requires_grad_()]
        do = torch.randn_like(v)
        for _ in range(3):
            torch.autograd.grad(HLA.hadamard_attention(leaves[:2], leaves[2:4], leaves[4]), leaves, do)
        torch.cuda.synchronize()
        return
    ns = [int(x) for x in args.ns.split(",")]
    t0 = time.time()
    commit = args.commit
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        except Exception:
            commit = "unknown"
    info = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "shape": {"B": B, "H": H, "D": D, "r": R, "F": 2, "dtype": "bfloat16"},
    }
    log(json.dumps(info))
    result = {"info": info}

    def save():
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))

    result["ceilings"] = ceilings()
    log("ceilings", result["ceilings"])
    mm = result["ceilings"]["bf16_matmul_tflops"]
    save()

    if not args.no_check:
        checks = []
        plan = [(2048, torch.float32, True), (8192, torch.float32, True), (8192, torch.bfloat16, True),
                (8192, torch.float16, True), (32760, torch.bfloat16, True), (75600, torch.bfloat16, False)]
        for n, dt, grads in plan:
            try:
                c = check(n, dt, grads)
            except Exception as e:
                traceback.print_exc()
                c = {"n": n, "dtype": str(dt), "error": f"{type(e).__name__}: {e}"[:300], "pass": False}
            checks.append(c)
            log("check", c)
            torch.cuda.empty_cache()
        result["checks"] = checks
        save()

    if args.sweep:
        mid = 32760 if 32760 in ns else ns[len(ns) // 2]
        result["sweep"] = sweep(mid)
        result["chosen_config"] = HK.GPU_CONFIG
        log("chosen", json.dumps(HK.GPU_CONFIG))
        save()

    parts = {}
    for n in ns:
        parts[n] = time_parts(n)
        log("parts", n, parts[n])
    result["parts"] = parts
    save()

    rows = []
    for n in ns:
        rows += run_methods(n, not args.no_baselines, mm)
        result["rows"] = rows
        save()
    result["config"] = HK.GPU_CONFIG
    result["elapsed_s"] = time.time() - t0
    save()
    log("\n" + json.dumps(info))
    log(f"ceilings: bf16 matmul {mm:.0f} TFLOP/s, copy {result['ceilings']['copy_gbs']:.0f} GB/s")
    if "checks" in result:
        for c in result["checks"]:
            errs = " ".join(f"{k}={c[k]:.1e}" for k in ("out", "dq1", "dq2", "dk1", "dk2", "dv") if k in c)
            log(f"check N={c['n']} {c.get('dtype')}: {'PASS' if c.get('pass') else 'FAIL'} {errs} {c.get('error', '')}")
    for n, p in parts.items():
        log(f"kernels N={n}: " + "  ".join(f"{k} {v['ms']:.3f} ms ({v['tflops']:.0f} TF/s)" for k, v in p.items()))
    log(fmt_table(rows))


if __name__ == "__main__":
    main()
