"""Fingerprints of the compiled kernels, without a GPU: compile every Hadamard, causal and hybrid
kernel for sm_90 (bf16, r = 32, head dim 128, the GPU_CONFIG tiles) and print a hash of its SASS
and of its PTX (debug sections and source lines left out).

For restructurings that must not change the generated code: run it before and after and diff.

    python benchmarks/kernel_fingerprint.py > before.txt    # (at the old commit)
    python benchmarks/kernel_fingerprint.py > after.txt
    python benchmarks/kernel_fingerprint.py --dump DIR      # also writes DIR/<kernel>.sass, .ptx

A SASS hash that differs is worth reading (`--dump`): the same instructions with other register
numbers are scheduling, not math. Equal hashes are no GPU test: compiled code can still be wrong,
and the GPU tests and benchmarks remain the check.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re

from causal_resource_usage import compile_kernel, cuobjdump  # sets TRITON_INTERPRET=0 first

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

BF, F32 = "*bf16", "*fp32"
_BF16_PTRS = ("Q1", "Q2", "K1", "K2", "V", "dO", "Out", "T", "dT", "P1", "P2", "X", "Q", "K", "Trest", "dTeff", "dQ", "dK", "dV", "dQ2", "dK1", "dK2")
_F32_PTRS = ("W", "WZ", "ZOut", "Z", "Den", "Wb", "dQ1a", "dQ1b", "dK1a", "dK1b", "dZ", "Tpart", "Zpart", "Zrest", "dZeff", "Beta", "Mst", "Dst", "LSE", "Delta", "Dbeta", "KM", "dQ1")
TYPES = {**{n: BF for n in _BF16_PTRS}, **{n: F32 for n in _F32_PTRS}, **{n: "fp32" for n in ("eps", "qk_scale", "floor2", "far_init", "sm_scale")},
         "IDX": "*i32"}
CAUSAL_TYPES = dict(TYPES, dQ2=F32, dK2=F32, dV=F32)  # the causal kernels' gradient outputs are fp32


def jobs():
    """{name: (kernel, types, constexprs, num_warps, num_stages)} with each module's GPU_CONFIG."""
    import hla_kernels._runtime as rt
    import hla_kernels.causal as kc
    import hla_kernels.hadamard as hk
    import hla_kernels.hybrid as hy

    h, c, y = (rt.load_jitted(stem, False) for stem in ("_hadamard_triton", "_causal_triton", "_hybrid_triton"))
    base = dict(DOT_DT=tl.bfloat16, PREC=None, EMU=False)
    r, dv, d = 32, 128, 128

    def hcfg(name):
        return hk.kernel_config(name, r, False)

    def launch(cfg):
        return cfg["num_warps"], cfg["num_stages"]

    out = {}
    s = hcfg("state")
    out["hadamard.state"] = (h._state_kernel, TYPES, dict(base, R=r, DV=dv, G=s["G"], BLOCK_N=s["BLOCK_N"], HAS_W=True, TRANS_ACC=s["TRANS_ACC"], PREFETCH=s["PREFETCH"]), *launch(s))
    s = hcfg("zstate")
    out["hadamard.zstate"] = (h._zstate_kernel, TYPES, dict(R=r, BLOCK_N=s["BLOCK_N"], HAS_W=True, EMU=False), *launch(s))
    s = hcfg("readout")
    out["hadamard.readout"] = (h._readout_kernel, TYPES, dict(base, R=r, DV=dv, G=s["G"], BLOCK_M=s["BLOCK_M"], SMALL_PREC="tf32x3"), *launch(s))
    s = hcfg("dq")
    out["hadamard.dq"] = (h._dq_kernel, TYPES, dict(base, R=r, DV=dv, G=s["G"], BLOCK_M=s["BLOCK_M"], PREFETCH=s["PREFETCH"], SMALL_PREC="tf32x3"), *launch(s))
    s = hcfg("dkdv")
    out["hadamard.dkdv"] = (h._dkdv_kernel, TYPES, dict(base, R=r, DV=dv, G=s["G"], BLOCK_N=s["BLOCK_N"], HAS_W=True, PREFETCH=s["PREFETCH"]), *launch(s))
    cc = kc.GPU_CONFIG
    for name, kern, small in (("readout", c._readout_kernel, True), ("dq", c._dq_kernel, True), ("dkdv", c._dkdv_kernel, False)):
        k = cc[name]
        for intra in (True, False):
            consts = dict(base, R=r, DV=dv, G=k["G"], BLOCK_M=k["BLOCK_M"], BLOCK_N=k["BLOCK_N"], INTRA=intra, HAS_W=True)
            if small:
                consts["SMALL_PREC"] = "tf32x3"
            out[f"causal.{name}{'' if intra else ' (block mode)'}"] = (kern, CAUSAL_TYPES, consts, *launch(k))
    for key, consts in (("state_fwd", dict(STORE_BEFORE=True, REVERSE=False)), ("state_bwd", dict(STORE_BEFORE=False, REVERSE=True))):
        k = cc[key]
        out[f"causal.prefix_state ({key})"] = (
            c._prefix_state_kernel, CAUSAL_TYPES,
            dict(base, R=r, DV=dv, G=k["G"], BLOCK_N=k["BLOCK_N"], BLOCK_DV=k["BLOCK_DV"], HAS_W=True, HAS_WZ=True, **consts), *launch(k),
        )
    for name, kern, small in (("fwd", y._hyb_fwd_kernel, True), ("dq", y._hyb_dq_kernel, True), ("dkdv", y._hyb_dkdv_kernel, False)):
        k = hy.GPU_CONFIG[name]
        # with and without a key mask, tiles read in place (HAS_IDX) or not; the full blocks as
        # hla_kernels.hybrid.FULL_BLOCKS has them (kernel_fingerprint.py runs at whatever it is)
        for km, idx in ((True, False), (False, False), (True, True), (False, True)):
            consts = dict(base, D=d, DV=dv, R=r, G=max(1, 64 // r), BLOCK_M=k["BLOCK_M"], BLOCK_N=k["BLOCK_N"], HAS_KM=km, HAS_IDX=idx, QK_PREC=None)
            if hasattr(hy, "_pads"):  # the full-block switch (2026-12-07, late night)
                consts.update(hy._pads(idx))
            if small:
                consts["SMALL_PREC"] = "tf32x3"
            consts.update({"dq": {"WINDOW_DQ": True}, "dkdv": {"ATOMIC_DQ": False}}.get(name, {}))
            tag = ", ".join(t for t, on in (("no key mask", not km), ("in place", idx)) if on)
            out[f"hybrid.{name}" + (f" ({tag})" if tag else "")] = (kern, TYPES, consts, *launch(k))
    for fn, _types, consts, *_ in out.values():  # the slot index (tiles read in place): off where not asked for
        if "HAS_IDX" in fn.arg_names:
            consts.setdefault("HAS_IDX", False)
    return out


def fingerprint(kernel) -> tuple[str, str, str, str]:
    """(SASS hash, PTX hash, SASS text, PTX text) of a compiled kernel, addresses and debug info left out."""
    ptx = kernel.asm["ptx"]
    cut = ptx.find(".section\t.debug")
    ptx = ptx if cut < 0 else ptx[:cut]
    ptx = "\n".join(ln for ln in ptx.splitlines() if not ln.strip().startswith((".loc", ".file", "//")))
    ptx = ptx[ptx.index(".entry"):]
    sass = cuobjdump(kernel, "-sass")
    addr = re.compile(r"/\*[0-9a-f]{4}\*/")
    sass = "\n".join(addr.sub("", ln).split(";")[0].strip() for ln in sass.splitlines() if addr.search(ln))
    return hashlib.sha1(sass.encode()).hexdigest()[:12], hashlib.sha1(ptx.encode()).hexdigest()[:12], sass, ptx


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", type=pathlib.Path, default=None, help="also write each kernel's SASS and PTX here")
    ap.add_argument("only", nargs="*", help="kernel names to compile (default: all)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", 90, 32)
    for name, (fn, types, consts, warps, stages) in jobs().items():
        if args.only and name not in args.only:
            continue
        sass_h, ptx_h, sass, ptx = fingerprint(compile_kernel(fn, types, consts, warps, stages, target))
        print(f"{name:34s} sass {sass_h} ptx {ptx_h}", flush=True)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name}.sass").write_text(sass)
            (args.dump / f"{name}.ptx").write_text(ptx)


if __name__ == "__main__":
    main()
