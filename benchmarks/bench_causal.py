"""Causal attention on the GPU: the chunked causal Hadamard HLA kernel vs causal SDPA, fla's chunked
linear attention and fla's Based, plus a streaming benchmark (per-block cost over 1 ... 64 blocks).

    python benchmarks/bench_causal.py results.json                      # N = 32760: checks, methods, streaming, sweep
    python benchmarks/bench_causal.py results.json --ns 8192,32760 --no-stream --no-sweep
    python benchmarks/bench_causal.py results.json --smoke              # tiny, on the CPU (interpreter)

The whole default run is meant to finish in well under 5 minutes on an H100 (--budget-s, 200 s by
default, bounds the sweep, which runs last); the JSON is rewritten after every row, so a run that
is killed still leaves every finished row.

Shape: B = 1, H = 12, D = dv = 128, bf16; HLA F = 2, r = 32 positive features given directly
(the feature maps are the same in every method's cost and left out). fla (flash-linear-attention,
`pip install fla-core`) is optional: first-order chunked linear attention with K = 128 and with
K = 1024 (the HLA state size r^2 = 1024 rows), and Based (2nd-order Taylor features, K = 16); a
method that cannot run records its error. Times: median of triton.testing.do_bench (CUDA events)
after warm-up; "fwd+bwd" = forward plus torch.autograd.grad of every input. Peak extra memory:
peak allocated during one call minus what was allocated before it.

Check: the kernel against the float64 chunked reference (hla_convert.ops.hadamard_attention,
causal=True) at N = 4096, with a key mask, token-causal and block-causal, forward and gradients.

Streaming: a sequence of frame blocks (1,560 tokens each, a 480p latent frame) fed one at a time;
HLA (ops.hadamard_stream_step, state r^2 x (dv + 1) per head) against softmax with a KV cache
(SDPA of the new block's queries over every cached key). Per-step time and state bytes after
1, 2, 4, ..., 64 blocks: HLA's stay flat, the KV cache's grow.

Sweep (last): launch settings of the causal kernel at the first N, token-causal, one change at a
time from hla_kernels.causal.GPU_CONFIG (the chunk C; per kernel G, tiles, num_warps,
num_stages: SWEEP below), each checked against the fp32 PyTorch reference (forward and every
gradient) and timed forward and forward+backward; then the fastest correct change per kernel
combined, checked and timed ("combined"). "suggested_config" is that table when it is faster
than the default: apply it by editing GPU_CONFIG.

--smoke runs every part once at tiny sizes on the CPU (kernels under TRITON_INTERPRET=1, wall
clock timing, fla skipped) so the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pathlib
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from gpu_timing import bench, import_kernels, log, peak_extra_mb, rel

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One change at a time from GPU_CONFIG: "C" values, or per kernel overrides of its entry. Tiles and
# warps whose sm_90 compile spills (benchmarks/causal_resource_usage.py) are left out.
SWEEP = {
    "C": [128, 512],
    "state_fwd": [{"G": 2}, {"G": 8}, {"BLOCK_DV": 32}, {"BLOCK_DV": 128}, {"BLOCK_N": 32}, {"BLOCK_N": 128}, {"num_warps": 4}, {"num_stages": 3}],
    "readout": [{"BLOCK_M": 32}, {"BLOCK_N": 32}, {"G": 1}, {"G": 4}, {"num_warps": 4}, {"num_stages": 3}],
    "state_bwd": [{"G": 2}, {"BLOCK_DV": 32}, {"BLOCK_DV": 128}, {"num_warps": 4}],
    "dq": [{"BLOCK_M": 32}, {"BLOCK_N": 64}, {"G": 1}, {"num_warps": 4}, {"num_stages": 3}],
    "dkdv": [{"BLOCK_M": 64}, {"BLOCK_N": 32}, {"G": 1}, {"num_warps": 4}, {"num_stages": 3}],
}
SMOKE_SWEEP = {"C": [8], "dkdv": [{"BLOCK_M": 4}]}  # the code path only: --smoke combines every correct change
# which time a kernel's settings change: the forward's, or only forward+backward's
FORWARD_KERNELS = ("C", "state_fwd", "readout")


class Results(dict):
    """The JSON document, rewritten (atomically) after every row."""

    def __init__(self, path: str, **fields):
        super().__init__(**fields)
        self.path = pathlib.Path(path)

    def add(self, section: str, row: dict) -> None:
        self.setdefault(section, []).append(row)
        log(json.dumps(row))
        self.save()

    def save(self) -> None:
        from hla_convert.atomic_files import atomic_write_text  # after _imports() put the checkout on the path

        atomic_write_text(self.path, json.dumps(self, indent=1))


def _imports():
    hla_kernels = import_kernels()
    sys.path.insert(0, str(ROOT))
    from hla_convert.ops import causal_hadamard as ref

    return hla_kernels, ref


class Setup:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.dev = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.b, self.h, self.d, self.r = (1, 1, 4, 2) if smoke else (1, 12, 128, 32)
        self.stream_block = 4 if smoke else 1560

    def timer(self, fn) -> float:
        """Milliseconds per call."""
        if self.smoke:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return bench(fn, warmup=10, rep=50)

    def peak_mb(self, fn) -> float | None:
        return None if self.smoke else peak_extra_mb(fn)


def inputs(s: Setup, n: int, seed: int = 0, mask_frac: float = 0.0):
    g = torch.Generator(device=s.dev).manual_seed(seed)
    shape = (s.b, s.h, n)
    feats = [F.softplus(torch.randn(*shape, s.r, device=s.dev, generator=g)).to(s.dtype) for _ in range(4)]
    q, k, v = (torch.randn(*shape, s.d, device=s.dev, generator=g).to(s.dtype) for _ in range(3))
    mask = (torch.rand(s.b, n, device=s.dev, generator=g) >= mask_frac) if mask_frac else None
    return feats, q, k, v, mask


def _grad_fn(fn, leaves):
    leaves = [t.detach().requires_grad_() for t in leaves]

    def run():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def methods(s: Setup, kern, n: int, res: Results) -> None:
    feats, q, k, v, _ = inputs(s, n)

    def add(name, fn, leaves, note=""):
        row = {"method": name, "n": n, "note": note}
        try:
            row["fwd_ms"] = s.timer(lambda: fn(*leaves))
            row["fwd_peak_mb"] = s.peak_mb(lambda: fn(*leaves))
            fb = _grad_fn(fn, leaves)
            row["fwd_bwd_ms"] = s.timer(fb)
            row["fwd_bwd_peak_mb"] = s.peak_mb(fb)
        except Exception as exc:  # noqa: BLE001 - a method that cannot run is a result too
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        res.add("methods", row)

    add("hla_causal_kernel F=2 r=%d" % s.r, lambda a, b, c, d, vv: kern.causal_hadamard_attention([a, b], [c, d], vv), [*feats, v])
    # a 480p Wan latent frame per block (1,560 tokens: no chunk aligns with it, block mode)
    blk = 8 if s.smoke else 1560
    add(f"hla_causal_kernel block={blk}", lambda a, b, c, d, vv: kern.causal_hadamard_attention([a, b], [c, d], vv, block_size=blk), [*feats, v], "block-causal")
    add("sdpa causal", lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), [q, k, v])
    if s.smoke:
        return
    try:
        from fla.ops.based import parallel_based
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as exc:  # noqa: BLE001 - recorded, the rest still runs
        res.add("methods", {"method": "fla", "n": n, "error": f"not importable: {type(exc).__name__}: {exc}"[:500]})
        return
    bthk = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731 - fla takes [B, T, H, K]
    for kdim in (128, 1024):
        g = torch.Generator(device=s.dev).manual_seed(kdim)
        fq, fk = (F.elu(torch.randn(s.b, n, s.h, kdim, device=s.dev, generator=g)).add(1).to(s.dtype) for _ in range(2))
        add(f"fla chunk_linear_attn K={kdim}", lambda a, b, c: chunk_linear_attn(a, b, c, normalize=True)[0], [fq, fk, bthk(v)],
            "first order, state K x dv" + (" = HLA's r^2 rows" if kdim == 1024 else ""))
    g = torch.Generator(device=s.dev).manual_seed(16)
    bq, bk = (torch.randn(s.b, n, s.h, 16, device=s.dev, generator=g).to(s.dtype) for _ in range(2))
    add("fla parallel_based K=16", lambda a, b, c: parallel_based(a, b, c, use_norm=True), [bq, bk, bthk(v)], "2nd-order Taylor features")


def check(s: Setup, kern, ref, n: int, res: Results) -> None:
    for block in (1,) if s.smoke else (1, 1560):  # smoke: the block-causal check lives in the tests
        feats, _, _, v, mask = inputs(s, n, seed=1, mask_frac=0.1)
        leaves = [t.detach().requires_grad_() for t in (*feats, v)]
        out = kern.causal_hadamard_attention(leaves[:2], leaves[2:4], leaves[4], mask, block_size=block)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, do)
        rl = [t.detach().double().requires_grad_() for t in (*feats, v)]
        r_out = ref.hadamard_causal(rl[:2], rl[2:4], rl[4], mask, block_size=block)
        r_grads = torch.autograd.grad(r_out, rl, do.double())
        row = {"check": f"block_size={block}", "n": n, "dtype": str(s.dtype), "out": rel(out, r_out)}
        row.update({name: rel(a, b) for name, a, b in zip(("dq1", "dq2", "dk1", "dk2", "dv"), grads, r_grads)})
        res.add("checks", row)


def streaming(s: Setup, ref, blocks: int, res: Results) -> None:
    n = s.stream_block
    state, kc, vc = None, None, None
    marks = {2**i for i in range(8)} | {blocks}
    for i in range(1, blocks + 1):
        feats, q, k, v, _ = inputs(s, n, seed=i)
        qf, kf = feats[:2], feats[2:]
        step = lambda st=state: ref.hadamard_stream_step(qf, kf, v, st)  # noqa: E731
        kc = k if kc is None else torch.cat([kc, k], dim=2)
        vc = v if vc is None else torch.cat([vc, v], dim=2)
        if i in marks:
            t_hla = s.timer(step)
            t_kv = s.timer(lambda: F.scaled_dot_product_attention(q, kc, vc))
            st_bytes = ref.hadamard_stream_step(qf, kf, v, state)[1].numel() * 4
            row = {"blocks": i, "tokens_per_block": n, "hla_step_ms": t_hla, "hla_state_mb": st_bytes / 2**20,
                   "kv_step_ms": t_kv, "kv_cache_mb": (kc.numel() + vc.numel()) * kc.element_size() / 2**20}
            res.add("streaming", row)
        _, state = step()


def _merged(base: dict, kernel: str, change) -> dict:
    cfg = copy.deepcopy(base)
    if kernel == "C":
        cfg["C"] = change
    else:
        cfg[kernel].update(change)
    return cfg


def sweep(s: Setup, kern, ref, n: int, deadline: float, res: Results) -> None:
    """Launch settings one change at a time (SWEEP), each checked against the fp32 reference and
    timed; then the fastest correct change per kernel combined. Stops at `deadline` (time.monotonic)."""
    import hla_kernels.causal as kc

    table = "INTERP_CONFIG" if s.smoke else "GPU_CONFIG"
    base = copy.deepcopy(getattr(kc, table))
    res["sweep_base"] = base
    feats, _, _, v, _ = inputs(s, n, seed=2)
    leaves = [*feats, v]
    do = torch.randn_like(v)
    rl = [t.detach().float().requires_grad_() for t in leaves]
    r_out = ref.hadamard_causal(rl[:2], rl[2:4], rl[4])
    reference = [r_out.detach(), *torch.autograd.grad(r_out, rl, do.float())]
    del r_out, rl
    tol = 1e-4 if s.dtype == torch.float32 else 2e-2

    def measure(label: str, kernel: str, change, cfg: dict, block: int = 1) -> dict:
        row = {"sweep": label, "kernel": kernel, "change": change, "n": n, "block_size": block}
        setattr(kc, table, cfg)
        try:
            lv = [t.detach().requires_grad_() for t in leaves]
            fwd = lambda: kc.causal_hadamard_attention(lv[:2], lv[2:4], lv[4], block_size=block)  # noqa: E731
            out = fwd()
            got = [out, *torch.autograd.grad(out, lv, do)]
            if block == 1:
                errs = {name: rel(a, b) for name, a, b in zip(("out", "dq1", "dq2", "dk1", "dk2", "dv"), got, reference)}
                row["max_rel_err"] = max(errs.values())
                row["ok"] = row["max_rel_err"] < tol  # NaN: not ok
            del out, got
            with torch.no_grad():
                row["fwd_ms"] = s.timer(fwd)
            row["fwd_bwd_ms"] = s.timer(lambda: torch.autograd.grad(fwd(), lv, do))
        except Exception as exc:  # noqa: BLE001 - a config that cannot compile or run is a result too
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["ok"] = False
        finally:
            setattr(kc, table, base)
        res.add("sweep", row)
        return row

    default = measure("default", "-", None, base)
    best: dict[str, tuple[float, object]] = {}
    candidates = SMOKE_SWEEP if s.smoke else SWEEP
    for kernel, changes in candidates.items():
        key = "fwd_ms" if kernel in FORWARD_KERNELS and kernel != "C" else "fwd_bwd_ms"
        for change in changes:
            if time.monotonic() > deadline:
                res.add("sweep", {"sweep": "stopped", "kernel": kernel, "change": change, "reason": "--budget-s reached"})
                break
            row = measure("one change", kernel, change, _merged(base, kernel, change))
            if not (row.get("ok") and key in row and key in default):
                continue
            if s.smoke or row[key] < 0.98 * min(default[key], best.get(kernel, (float("inf"),))[0]):
                best[kernel] = (row[key], change)
    cfg = base
    for kernel, (_, change) in best.items():
        cfg = _merged(cfg, kernel, change)
    res["suggested_config"] = cfg if best else None
    if best:
        measure("combined", ",".join(best), {k: c for k, (_, c) in best.items()}, cfg)
        measure("combined", ",".join(best), {k: c for k, (_, c) in best.items()}, cfg, block=8 if s.smoke else 1560)
    res.save()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--ns", default="32760", help="sequence lengths, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (kernels interpreted)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--stream-blocks", type=int, default=64)
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweep")
    ap.add_argument("--budget-s", type=float, default=200.0, help="the sweep starts no config after this many seconds of the run (its combined rows follow)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        ap.error("needs CUDA (or --smoke)")
    s = Setup(args.smoke)
    kern, ref = _imports()
    ns = [16] if args.smoke else [int(x) for x in args.ns.split(",")]
    res = Results(
        args.out,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device="cpu (smoke)" if s.smoke else torch.cuda.get_device_name(),
        torch=torch.__version__,
        shape={"B": s.b, "H": s.h, "D": s.d, "r": s.r, "dtype": str(s.dtype)},
        methods=[],
    )
    try:
        if not args.no_check:
            check(s, kern, ref, 20 if s.smoke else 4096, res)
        for n in ns:
            methods(s, kern, n, res)
        if not args.no_stream:
            streaming(s, ref, 4 if s.smoke else args.stream_blocks, res)
        if not args.no_sweep:
            sweep(s, kern, ref, ns[0], start + args.budget_s, res)
    except Exception:
        res["error"] = traceback.format_exc()
        raise
    finally:
        res["seconds"] = round(time.monotonic() - start, 1)
        res.save()
    return res


if __name__ == "__main__":
    main()
