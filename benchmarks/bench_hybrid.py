"""Hybrid attention on the GPU: the Triton kernels vs torch's default SDPA, the flash backend, the
PyTorch block form (what the layer ran before the kernels) and the plain HLA kernel.

    python benchmarks/bench_hybrid.py results.json                  # checks + timings, 480p and 720p
    python benchmarks/bench_hybrid.py results.json --sweep          # also sweep the launch configs
    python benchmarks/bench_hybrid.py results.json --rs 64 --grids 21x30x52 --no-check

Shape: Wan2.1-1.3B's self-attention: B = 1, H = 12, head dim 128, bf16; latent grids 21x30x52
(480p/81 frames, N = 32,760) and 21x45x80 (720p/81 frames, N = 75,600); the window (--windows,
frames x height x width in latent tokens, 0 = the whole axis) by default the token's own latent
frame 1x0x0 (1,560 / 3,600 keys; whole frames skip the kernel's gather), e.g. 0x6x13 the 5 x 4
spatial tiles through all frames (1,638 keys at 480p: the block-major path, its tokens from reordered
copies or read in place: --tile-reads gather / index, both side by side: index,gather), Hadamard far part F = 2 with the recipe's taylor
features [1, x P sqrt(scale / 2)], r = 32 and 64. Every time is the median of
triton.testing.do_bench (CUDA events, L2 flushed) after warm-up; "fwd+bwd" is the forward plus
torch.autograd.grad of q, k, v, both feature tensors and log_beta. "core" = the kernel on given
features; "layer" = feature maps + kernel, as HLAAttention.student runs it.

FLOPs per head: window softmax forward 4 N |W| D, backward 2.5x; far part forward (states +
readout) 4 N r^2 dv, backward (dq, dT, dk/dv) 8 N r^2 dv.

Correctness: the bf16 kernels against the PyTorch block form in fp32 (hla_convert.ops.hybrid_attention,
itself equal to the float64 naive reference in tests/ops/test_hybrid.py), forward and every gradient,
with 226 text tokens first and a key mask, H = 2; relative error ||x - ref|| / ||ref||.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gpu_timing
import hla_kernels
from hla_kernels import hybrid as hy
from hla_convert.ops.hybrid import effective_window
from hla_convert.ops.hybrid import hybrid_attention as block_form

B, H, D = 1, 12, 128
DEV = "cuda"
log = gpu_timing.log


def bench(fn, warmup=10, rep=50):
    return gpu_timing.bench(fn, warmup, rep)


def peak_extra_mb(fn):
    return round(gpu_timing.peak_extra_mb(fn), 1)


def rel(x, ref):
    return float("nan") if x is None else gpu_timing.rel(x, ref)


def make(grid, r, h=H, text=0, dtype=torch.bfloat16, mask_frac=0.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    n = grid[0] * grid[1] * grid[2] + text
    q, k, v = (torch.randn(B, h, n, D, device=DEV, generator=g).to(dtype) for _ in range(3))
    proj = (torch.randn(h, D, r - 1, device=DEV, generator=g) / math.sqrt(D)).to(dtype)
    log_beta = torch.zeros(h, device=DEV)
    mask = None
    if mask_frac:
        mask = torch.rand(B, n, device=DEV, generator=g) >= mask_frac
        mask[:, 0] = True
    return q, k, v, proj, log_beta, mask


def taylor(x, proj, scale):
    """The recipe's feature map: [1, x P sqrt(scale / F)], F = 2, the same for both factors."""
    y = torch.matmul(x, proj) * math.sqrt(scale / 2)
    phi = torch.cat([torch.ones_like(y[..., :1]), y], dim=-1)
    return [phi, phi]


def window_keys(grid, window):
    """Keys of one query's window (a full block; ragged edge blocks have fewer)."""
    return math.prod(effective_window(grid, window))


def flops(grid, r, text=0, bwd=False, window=(1, 0, 0)):
    n = grid[0] * grid[1] * grid[2] + text
    win = window_keys(grid, window) + text
    local = 4 * n * win * D
    far = 4 * n * r * r * D
    if bwd:
        return H * (2.5 * local + 2 * far)
    return H * (local + far)


def sdpa_flops(n, bwd=False):
    return H * 4 * n * n * D * (2.5 if bwd else 1.0)


# ------------------------------------------------------------------------------------------ check
def check(grid, r, text=226, mask_frac=0.1, window=(1, 0, 0)):
    scale = D ** -0.5
    q, k, v, proj, log_beta, mask = make(grid, r, h=2, text=text, mask_frac=mask_frac, seed=1)
    log_beta = torch.randn(2, device=DEV) * 0.3
    do = torch.randn_like(v)

    def run(dtype, fn):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        p = proj.detach().to(dtype)
        qf = [t.detach().requires_grad_() for t in taylor(ins[0].detach(), p, scale)[:1]] * 2
        kf = [t.detach().requires_grad_() for t in taylor(ins[1].detach(), p, scale)[:1]] * 2
        lb = log_beta.detach().clone().requires_grad_()
        out = fn(ins[0], ins[1], ins[2], qf, kf, scale, lb, grid, window, (0, 0, 0), text, True, mask)
        grads = torch.autograd.grad(out, [*ins, qf[0], kf[0], lb], do.to(dtype))
        return [out, *grads]

    ref = run(torch.float32, block_form)
    res = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        got = run(dtype, hla_kernels.hybrid_attention)
        errs = [rel(a, b) for a, b in zip(got, ref)]
        res[name] = dict(zip(["out", "dq", "dk", "dv", "dphi_q", "dphi_k", "dlog_beta"], errs))
    return res


# ------------------------------------------------------------------------------------------ times
def timings(grid, r, baselines=True, block=False, window=(1, 0, 0)):
    scale = D ** -0.5
    q, k, v, proj, log_beta, _ = make(grid, r)
    n = q.shape[2]
    rows = []

    def add(method, mode, fn, fl):
        try:
            ms = bench(fn)
            mem = peak_extra_mb(fn)
            rows.append({"grid": "x".join(map(str, grid)), "window": "x".join(map(str, window)), "N": n, "r": r, "method": method, "mode": mode,
                         "ms": round(ms, 3), "tflops": round(fl / ms / 1e9, 1) if fl else None, "peak_extra_mb": mem})
            log(f"  {method:28s} {mode:8s} N={n:6d} r={r:3d} w={'x'.join(map(str, window))} {ms:9.3f} ms  {rows[-1]['tflops']} TFLOP/s  {mem} MB")
        except Exception as e:  # one failing row must not lose the rest
            rows.append({"grid": "x".join(map(str, grid)), "window": "x".join(map(str, window)), "N": n, "r": r, "method": method, "mode": mode, "error": repr(e)})
            log(f"  {method} {mode}: FAILED {e!r}")

    qf, kf = taylor(q, proj, scale), taylor(k, proj, scale)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    fg = [t.detach().requires_grad_() for t in (qf[0], kf[0])]
    lbg = log_beta.detach().requires_grad_()
    do = torch.randn_like(v)

    def core_fwd():
        return hla_kernels.hybrid_attention(q, k, v, qf, kf, scale, log_beta, grid, window)

    def core_fb():
        out = hla_kernels.hybrid_attention(qg, kg, vg, [fg[0]] * 2, [fg[1]] * 2, scale, lbg, grid, window)
        return torch.autograd.grad(out, [qg, kg, vg, *fg, lbg], do)

    pg = proj.detach().requires_grad_()

    def layer_fb():
        out = hla_kernels.hybrid_attention(qg, kg, vg, taylor(qg, pg, scale), taylor(kg, pg, scale), scale, lbg, grid, window)
        return torch.autograd.grad(out, [qg, kg, vg, pg, lbg], do)

    add("hybrid kernel (core)", "fwd", core_fwd, flops(grid, r, window=window))
    add("hybrid kernel (core)", "fwd+bwd", core_fb, flops(grid, r, bwd=True, window=window))
    add("hybrid kernel (layer)", "fwd", lambda: hla_kernels.hybrid_attention(q, k, v, taylor(q, proj, scale), taylor(k, proj, scale), scale, log_beta, grid, window), flops(grid, r, window=window))
    add("hybrid kernel (layer)", "fwd+bwd", layer_fb, flops(grid, r, bwd=True, window=window))
    if block:
        add("hybrid block form (torch)", "fwd", lambda: block_form(q, k, v, qf, kf, scale, log_beta, grid, window), flops(grid, r, window=window))

        def block_fb():
            out = block_form(qg, kg, vg, [fg[0]] * 2, [fg[1]] * 2, scale, lbg, grid, window)
            return torch.autograd.grad(out, [qg, kg, vg, *fg, lbg], do)

        add("hybrid block form (torch)", "fwd+bwd", block_fb, flops(grid, r, bwd=True, window=window))
    if baselines:
        add("plain HLA kernel", "fwd", lambda: hla_kernels.hadamard_attention(qf, kf, v), H * 4 * n * r * r * D)

        def sdpa_fb(backend=None):
            def f():
                if backend is None:
                    out = F.scaled_dot_product_attention(qg, kg, vg)
                else:
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(qg, kg, vg)
                return torch.autograd.grad(out, [qg, kg, vg], do)
            return f

        def sdpa_f(backend=None):
            def f():
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)
            return f

        add("SDPA default", "fwd", sdpa_f(), sdpa_flops(n))
        add("SDPA default", "fwd+bwd", sdpa_fb(), sdpa_flops(n, True))
        add("SDPA flash", "fwd", sdpa_f(SDPBackend.FLASH_ATTENTION), sdpa_flops(n))
    return rows


SWEEP = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3)],
    "dq": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3), (128, 64, 4, 2)],
    "dkdv": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2)],
}


CHECK_GRID = (3, 30, 52)  # check(): 3 frames of a 480p frame, with text tokens and masked keys


def candidate_ok(errs: dict) -> tuple[bool, float]:
    """A launch config is right when check() finds the fp32 kernel within 1e-3 of the fp32 block form
    on the output and every gradient, and the bf16 kernel within 2e-2 (log_beta's gradient, a sum of
    terms of both signs over every query, excepted in bf16). (ok, the largest of those errors)."""
    fp32 = list(errs["fp32"].values())
    bf16 = [v for k, v in errs["bf16"].items() if k != "dlog_beta"]
    ok = all(e < 1e-3 for e in fp32) and all(e < 2e-2 for e in bf16)  # a NaN is not below anything
    worst = [e for e in fp32 + bf16 if e != e] or fp32 + bf16  # max() skips a NaN that is not first
    return ok, max(worst)


def sweep(grid, r, window=(1, 0, 0)):
    """Times each launch config of each kernel (others at their defaults), each first checked against
    the fp32 block form (check() at CHECK_GRID with the same window, candidate_ok); returns the rows and
    the fastest right config per kernel (a kernel whose candidates all fail keeps its default)."""
    scale = D ** -0.5
    q, k, v, proj, log_beta, _ = make(grid, r)
    qf, kf = taylor(q, proj, scale), taylor(k, proj, scale)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    fg = [t.detach().requires_grad_() for t in (qf[0], kf[0])]
    do = torch.randn_like(v)
    out = hla_kernels.hybrid_attention(qg, kg, vg, [fg[0]] * 2, [fg[1]] * 2, scale, log_beta, grid, window)
    rows, best = [], {}
    keep = {name: dict(cfg) for name, cfg in hy.GPU_CONFIG.items()}
    for name, cands in SWEEP.items():
        results = []
        for bm, bn, warps, stages in cands:
            hy.GPU_CONFIG[name] = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            row = {"kernel": name, "r": r, "grid": "x".join(map(str, grid)), "config": [bm, bn, warps, stages]}
            try:
                row["ok"], row["max_rel_err"] = candidate_ok(check(CHECK_GRID, r, window=window))
                if not row["ok"]:
                    ms = float("inf")
                elif name == "fwd":
                    ms = bench(lambda: hla_kernels.hybrid_attention(q, k, v, qf, kf, scale, log_beta, grid, window))
                else:
                    ms = bench(lambda: torch.autograd.grad(out, [qg, kg, vg, *fg], do, retain_graph=True))
            except Exception as e:
                ms, row["ok"], row["error"] = float("inf"), False, f"{type(e).__name__}: {e}"[:300]
                log(f"  sweep {name} {bm},{bn},{warps},{stages}: FAILED {e!r}"[:300])
            results.append((ms, (bm, bn, warps, stages)))
            rows.append(dict(row, ms=round(ms, 3)))
            verdict = ("" if row["ok"] else "  did not launch" if "error" in row  # the FAILED line above says why
                       else f"  WRONG (max rel err {row['max_rel_err']:.2e})")
            log(f"  sweep {name:5s} r={r} BM={bm:3d} BN={bn:3d} w={warps} s={stages}: {ms:.3f} ms{verdict}")
        ms, cfg = min(results)
        if ms < float("inf"):
            best[name] = cfg
        hy.GPU_CONFIG[name] = keep[name]
    return rows, best


PROBE = [  # (kernel config overrides) tried for finiteness and error at r = 64, bf16
    {},
    {"fwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}},
    {"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "G": 2}},
    {"fwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "G": 2}},
    {"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}},
    {"fwd": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4}},
]


def probe(r=64):
    """Which forward launch configs give finite, right bf16 outputs at this r (one check each)."""
    rows = []
    for over in PROBE:
        saved = {n: dict(c) for n, c in hy.GPU_CONFIG.items()}
        for n, c in over.items():
            hy.GPU_CONFIG[n] = dict(c)
        try:
            res = check((3, 30, 52), r)["bf16"]
        except Exception as e:
            res = {"error": repr(e)[:300]}
        hy.GPU_CONFIG.update(saved)
        rows.append({"r": r, "override": over, "check": res})
        log(f"probe r={r} {over}: {json.dumps(res)[:400]}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--grids", default="21x30x52,21x45x80")
    ap.add_argument("--rs", default="32,64")
    ap.add_argument("--windows", default="1x0x0", help="hybrid windows FxHxW in latent tokens, 0 = whole axis (comma-separated)")
    ap.add_argument("--tile-reads", default=None,
                    help="how the kernels reach a tiled window's tokens (hla_kernels.hybrid.TILE_READS), comma-separated: "
                         "index (in place) and/or gather (reordered copies); default: the library's; whole frames run once")
    ap.add_argument("--window-dq", default=None,
                    help="where the backward takes the window's dq (hla_kernels.hybrid.WINDOW_DQ), comma-separated: "
                         "pass (the dq kernel's own pass) and/or atomic (the dk/dv kernel's atomics); default: the library's")
    ap.add_argument("--full-blocks", default=None,
                    help="which window blocks the kernels mask (hla_kernels.hybrid.FULL_BLOCKS), comma-separated: "
                         "unmasked (only those that need it) and/or masked (every block, as before 2026-12-07, late night); default: the library's")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--apply-sweep", action="store_true", help="time with the sweep's best configs")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--probe", action="store_true", help="only: which forward configs are right at r = 64 in bf16")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-block", action="store_true", help="skip the PyTorch block form (slow; the row before the kernels)")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", ""))
    args = ap.parse_args()
    grids = [tuple(int(x) for x in g.split("x")) for g in args.grids.split(",")]
    rs = [int(x) for x in args.rs.split(",")]
    windows = [tuple(int(x) for x in w.split("x")) for w in args.windows.split(",")]
    default_reads = hy.TILE_READS
    reads = (args.tile_reads or default_reads).split(",")
    if any(m not in ("index", "gather") for m in reads):
        ap.error(f"--tile-reads: index and/or gather, got {args.tile_reads!r}")
    default_dq = hy.WINDOW_DQ
    dqs = (args.window_dq or default_dq).split(",")
    if any(m not in ("pass", "atomic") for m in dqs):
        ap.error(f"--window-dq: pass and/or atomic, got {args.window_dq!r}")
    default_fb = hy.FULL_BLOCKS
    fbs = (args.full_blocks or default_fb).split(",")
    if any(m not in ("unmasked", "masked") for m in fbs):
        ap.error(f"--full-blocks: unmasked and/or masked, got {args.full_blocks!r}")

    def variants():
        """(window, reads mode, window dq mode, full-blocks mode, suffix): each tiled window once per
        reads mode, whole frames once; each of those once per window dq mode and full-blocks mode."""
        for window in windows:
            tiled = window != (1, 0, 0)  # (whole frames may skip the order on some grids: timed per mode anyway)
            for m in (reads if tiled else reads[:1]):
                for dq in dqs:
                    for fb in fbs:
                        hy.TILE_READS, hy.WINDOW_DQ, hy.FULL_BLOCKS = m, dq, fb
                        yield window, m, dq, fb, (("" if not tiled or len(reads) == 1 else f"_{m}") + ("" if len(dqs) == 1 else f"_dq{dq}")
                                                  + ("" if len(fbs) == 1 else f"_{fb}"))
        hy.TILE_READS, hy.WINDOW_DQ, hy.FULL_BLOCKS = default_reads, default_dq, default_fb
    import triton

    res = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "commit": args.commit,
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "checks": {}, "sweep": [], "best": {}, "rows": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    if args.probe:
        res["probe"] = probe()
        save()
        return 0
    if args.sweep:
        hy.WINDOW_DQ = res["sweep_window_dq"] = dqs[0]  # the backward's configs are swept for the first mode
        for r in rs:
            log(f"sweep r={r} at {grids[0]}")
            rows, best = sweep(grids[0], r, windows[0])
            res["sweep"] += rows
            res["best"][str(r)] = best
            save()
        hy.WINDOW_DQ = default_dq
    if not args.no_check:
        for r in rs:
            for cfg_name in (["default"] + (["best"] if args.apply_sweep and str(r) in res["best"] else [])):
                saved = {n: dict(c) for n, c in hy.GPU_CONFIG.items()}
                if cfg_name == "best":
                    for n, (bm, bn, w, s) in res["best"][str(r)].items():
                        hy.GPU_CONFIG[n] = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
                for window, _mode, _dq, _fb, suffix in variants():
                    key = f"r{r}_{cfg_name}" + ("" if window == (1, 0, 0) else "_w" + "x".join(map(str, window))) + suffix
                    try:
                        res["checks"][key] = check((3, 30, 52), r, window=window)
                    except Exception:
                        res["checks"][key] = {"error": traceback.format_exc()[-2000:]}
                    log(f"check {key}: {json.dumps(res['checks'][key])[:600]}")
                    save()
                hy.GPU_CONFIG.update(saved)
    for grid in grids:
        for i, r in enumerate(rs):
            saved = {n: dict(c) for n, c in hy.GPU_CONFIG.items()}
            if args.apply_sweep and str(r) in res["best"]:
                for n, (bm, bn, w, s) in res["best"][str(r)].items():
                    hy.GPU_CONFIG[n] = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
            for j, (window, mode, dq, fb, _suffix) in enumerate(variants()):
                log(f"timings {grid} window {window} tile reads {mode} window dq {dq} full blocks {fb} r={r} configs {hy.GPU_CONFIG}")
                first = i == 0 and j == 0
                rows = timings(grid, r, baselines=not args.no_baselines and first, block=(grid == grids[0] and first and not args.no_block), window=window)
                res["rows"] += [dict(row, tile_reads=mode, window_dq=dq, full_blocks=fb) for row in rows]
            hy.GPU_CONFIG.update(saved)
            save()
    save()
    log(json.dumps(res["best"]))


if __name__ == "__main__":
    sys.exit(main())
