"""Compile the causal Hadamard kernels for a CUDA target without a GPU and print their registers and
spills (Triton's bundled ptxas and cuobjdump). Catches compile errors and register spills of a new
launch config before GPU time is spent.

    python benchmarks/causal_resource_usage.py                 # sm_90, the GPU_CONFIG tiles
    python benchmarks/causal_resource_usage.py --arch 80 --warps 4

Shapes: r = 32, dv = 128, bf16 inputs (dot operands bf16, fp32 accumulation), key mask on.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "0")

import triton  # noqa: E402
import triton.backends.nvidia as nvidia  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def _kernel_modules():
    import hla_kernels.causal as kc

    return kc, kc._kernels(False)


def compile_kernel(fn, types: dict, consts: dict, warps: int, stages: int, target: GPUTarget):
    """fn compiled for `target` (no GPU needed): pointer/float argument types by name (others
    i32), constexprs by name. Pointers and the strides (i32 arguments named s...) are marked
    divisible by 16, as a launch specialises them for the aligned, contiguous tensors the kernels
    get: without it the compiler cannot vectorise a row's loads, so issues no async copies and
    pipelines nothing (what a compile without the marks showed on 2026-12-07, not the real code)."""
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    div16 = [["tt.divisibility", 16]]
    attrs = {(i,): div16 for i, n in enumerate(names) if sig[n].startswith("*") or (sig[n] == "i32" and n.startswith("s"))}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})


def cuobjdump(kernel, *flags: str) -> str:
    """Triton's bundled cuobjdump run with `flags` on the kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    try:
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def usage(fn, types: dict, consts: dict, warps: int, stages: int, target: GPUTarget) -> str:
    out = cuobjdump(compile_kernel(fn, types, consts, warps, stages, target), "--dump-resource-usage")
    line = next(x for x in out.splitlines() if "REG:" in x)
    return " ".join(p for p in line.split() if p.startswith(("REG:", "STACK:", "SHARED:")))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100)")
    ap.add_argument("--warps", type=int, default=None, help="num_warps of every kernel (default: GPU_CONFIG's per kernel)")
    args = ap.parse_args(argv)
    kc, mod = _kernel_modules()
    cfg = kc.GPU_CONFIG
    target = GPUTarget("cuda", args.arch, 32)
    bf, f32 = "*bf16", "*fp32"
    types = {n: bf for n in ("Q1", "Q2", "K1", "K2", "V", "dO", "Out", "T", "dT", "P1", "P2", "X")}
    types.update({n: f32 for n in ("W", "WZ", "ZOut", "Z", "Den", "Wb", "dQ1a", "dQ1b", "dQ2", "dK1a", "dK1b", "dK2", "dV", "dZ")})
    types["eps"] = "fp32"
    base = dict(R=32, DV=128, HAS_W=True, DOT_DT=tl.bfloat16, PREC=None, EMU=False)
    jobs = {}
    for name, kern, extra in (
        ("readout", mod._readout_kernel, dict(INTRA=True, SMALL_PREC="tf32x3")),
        ("readout (block mode)", mod._readout_kernel, dict(INTRA=False, SMALL_PREC="tf32x3")),
        ("dq", mod._dq_kernel, dict(INTRA=True, SMALL_PREC="tf32x3")),
        ("dq (block mode)", mod._dq_kernel, dict(INTRA=False, SMALL_PREC="tf32x3")),
        ("dkdv", mod._dkdv_kernel, dict(INTRA=True)),
        ("dkdv (block mode)", mod._dkdv_kernel, dict(INTRA=False)),
    ):
        k = cfg[name.split()[0]]
        jobs[name] = (kern, dict(base, G=k["G"], BLOCK_M=k["BLOCK_M"], BLOCK_N=k["BLOCK_N"], **extra), k)
    for name, key, consts in (
        ("prefix_state", "state_fwd", dict(STORE_BEFORE=True, REVERSE=False)),
        ("prefix_state (reverse, blocks)", "state_bwd", dict(STORE_BEFORE=False, REVERSE=True)),
    ):
        k = cfg[key]
        jobs[name] = (mod._prefix_state_kernel, dict(base, G=k["G"], BLOCK_N=k["BLOCK_N"], BLOCK_DV=k["BLOCK_DV"], HAS_WZ=True, **consts), k)
    failed = 0
    for name, (kern, consts, k) in jobs.items():
        warps = args.warps or k["num_warps"]
        try:
            print(f"{name:32s} sm_{args.arch} warps {warps}: {usage(kern, types, consts, warps, k['num_stages'], target)}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every kernel
            print(f"{name:32s} FAILED: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            failed += 1
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
