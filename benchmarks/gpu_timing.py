"""What the GPU benchmark scripts share: timing, peak memory, relative error, flushed printing.

    bench(fn, warmup, rep)  median ms of triton.testing.do_bench (CUDA events, L2 flushed)
    peak_extra_mb(fn)       peak memory allocated during one call minus what was allocated
                            before it (outputs included), MB
    rel(x, ref)             ||x - ref|| / ||ref|| in float64, NaN when x is not finite
    import_kernels()        the hla_kernels package: installed, or this checkout's kernels/hla_kernels/

The scripts run as `python benchmarks/<script>.py`, which puts this folder on sys.path; tests that
load a script by its path put it there first.
"""

from __future__ import annotations

import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_kernels():
    """hla_kernels as installed, or from this checkout's kernels/hla_kernels/ (no `pip install` needed)."""
    try:
        import hla_kernels
    except ImportError:
        sys.path.insert(0, str(ROOT / "kernels"))  # kernels/ holds the package folder hla_kernels/
        import hla_kernels
    return hla_kernels


def log(*a) -> None:
    print(*a, flush=True)


def bench(fn, warmup: int = 25, rep: int = 100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def peak_extra_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del res
    return peak / 2**20


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()
