"""The chunked causal Hadamard kernels (hla_kernels.causal) against the float64 masked reference.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1): small shapes, a chunk of 16 tokens
and 8-token tiles there, so 20 tokens cover two chunks, the inter and intra parts and a ragged end.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import hla_kernels.causal as kc  # noqa: E402
from hla_convert.ops.causal_hadamard import hadamard_causal, hadamard_causal_naive  # noqa: E402
from helpers import kernel_autograd_bytes  # noqa: E402


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite (unwritten?) elements"
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _check(n, r, dv, block_size, masked, dtype, tol, device="cpu"):
    g = torch.Generator().manual_seed(n + block_size)
    feats = [torch.nn.functional.softplus(torch.randn(1, 2, n, r, generator=g) * 1.5) for _ in range(4)]
    v = torch.randn(1, 2, n, dv, generator=g)
    do = torch.randn(1, 2, n, dv, generator=g)
    mask = (torch.rand(1, n, generator=g) > 0.3).to(device) if masked else None
    leaves = [t.to(device=device, dtype=dtype).detach().clone().requires_grad_() for t in (*feats, v)]
    out = kc.causal_hadamard_attention(leaves[:2], leaves[2:4], leaves[4], mask, block_size=block_size)
    assert out.dtype == dtype and out.shape == v.shape
    (out.float() * do.to(device)).sum().backward()
    ref_leaves = [t.to(device).double().requires_grad_() for t in (*feats, v)]
    # the explicit [N, N] reference on small shapes, its equal (tests/ops/test_causal.py) chunked form on long ones
    reference = hadamard_causal_naive if n <= 256 else hadamard_causal
    ref = reference(ref_leaves[:2], ref_leaves[2:4], ref_leaves[4], mask, block_size=block_size)
    (ref * do.to(device).double()).sum().backward()
    errs = {"out": _rel(out, ref)}
    for name, x, y in zip(("dq1", "dq2", "dk1", "dk2", "dv"), leaves, ref_leaves):
        assert x.grad.dtype == dtype
        errs[name] = _rel(x.grad, y.grad)
    assert all(e < tol for e in errs.values()), errs


@pytest.mark.parametrize(
    "n, block_size, chunk, masked, dtype, tol",
    [
        (20, 1, 16, True, torch.float32, 1e-5),  # token-causal: inter state + masked intra tiles
        (20, 16, 8, True, torch.float32, 1e-5),  # block-causal, 2 chunks per block: state through the block
        (20, 4, 16, False, torch.bfloat16, 2e-2),  # blocks inside a chunk, bf16 operands
        # block sizes no chunk aligns with (as 1,560 tokens on the GPU), N not a multiple of them:
        (37, 5, 16, True, torch.float32, 1e-5),  # token mode: intra keys run past the chunk's end
        (45, 19, 16, True, torch.float32, 1e-5),  # block mode: 8-row tiles straddle blocks at 19 and 38
        (40, 12, 8, False, torch.bfloat16, 2e-2),  # block mode, bf16, a boundary at a tile start too
        (20, 64, 16, True, torch.float32, 1e-5),  # one block longer than the sequence
    ],
)
def test_interpreter_forward_backward(interp, monkeypatch, n, block_size, chunk, masked, dtype, tol):
    monkeypatch.setitem(kc.INTERP_CONFIG, "C", chunk)
    _check(n, 4, 4, block_size, masked, dtype, tol)


@pytest.mark.parametrize("block_size, slots", [(1, 4), (40, 2)])  # 64 tokens: 4 chunks of 16, or 2 blocks of 40
def test_backward_memory_is_the_saved_state_alone(interp, block_size, slots):
    """Between forward and backward autograd keeps q1, q2, k1, k2, v, the output (bf16, [B, H, N, r]
    or [.., dv]), den (fp32 [B*H, N]) and one state per slot (T bf16 [slots, B*H, r*r, dv], Z fp32
    [slots, B*H, r*r]); the backward allocates nothing outside its kernel op. Before the fix autograd
    materialised zero gradients for den, T and Z (set_materialize_grads): one more copy of every
    per-slot state, +24 % fwd+bwd peak token-causal on the H100 (benchmarks/RESULTS.md)."""
    b, h, n, r, dv = 1, 1, 64, 4, 8  # one head: the interpreter runs one program per head; the bytes scale by b * h
    g = torch.Generator().manual_seed(0)
    leaves = [torch.nn.functional.softplus(torch.randn(b, h, n, r, generator=g)).bfloat16().requires_grad_() for _ in range(4)]
    v = torch.randn(b, h, n, dv, generator=g).bfloat16().requires_grad_()
    saved, backward_bytes = kernel_autograd_bytes(
        lambda: kc.causal_hadamard_attention(leaves[:2], leaves[2:], v, block_size=block_size), torch.randn(b, h, n, dv).bfloat16()
    )
    per_token = 2 * (4 * r + 2 * dv) + 4  # bf16 features, v and out; fp32 den
    per_slot = 2 * r * r * dv + 4 * r * r  # T bf16, Z fp32
    assert sum(saved) == b * h * (n * per_token + slots * per_slot)
    assert backward_bytes == 0
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (*leaves, v))


def test_interpreter_second_order_forward_backward(interp):
    """Causal 2nd order as two passes of the kernel, against the float64 masked quadratic form."""
    from hla_convert.ops.causal import higher_order_causal_naive

    g = torch.Generator().manual_seed(4)
    q, k = (torch.nn.functional.softplus(torch.randn(1, 2, 20, 2, generator=g)) for _ in range(2))
    v, do = torch.randn(1, 2, 20, 2, generator=g), torch.randn(1, 2, 20, 2, generator=g)
    mask = torch.rand(1, 20, generator=g) > 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kc.causal_second_order_attention(*leaves, mask, block_size=2)
    (out * do).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = higher_order_causal_naive(*ref_leaves, mask, block_size=2)
    (ref * do.double()).sum().backward()
    assert _rel(out, ref) < 1e-5
    for x, y in zip(leaves, ref_leaves):
        assert _rel(x.grad, y.grad) < 1e-5


def test_plan_and_supports(interp):
    assert kc.plan(100, 1, True) == (16, True)
    assert kc.plan(100, 3, True) == (16, True)  # up to the chunk: token mode, any size
    assert kc.plan(100, 16, True) == (16, True)
    assert kc.plan(100, 17, True) == (16, False)  # above it: one state per block
    assert kc.plan(32760, 1560, False) == (kc.GPU_CONFIG["C"], False)  # a 480p Wan latent frame
    q = [torch.rand(1, 1, 8, 4) for _ in range(2)]
    v = torch.rand(1, 1, 8, 4)
    assert all(kc.supports(q, q, v, bs) for bs in (1, 3, 7, 1560))
    assert not kc.supports(q, q, v, 0)
    with pytest.raises(ValueError, match="block_size = 0"):
        kc.causal_hadamard_attention(q, q, v, block_size=0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n, block_size",
    [
        (8192 + 37, 1), (8192 + 37, 256), (8192 + 37, 4096),
        (8192 + 37, 100),  # token mode, a block size that does not divide the chunk
        (4 * 1560, 1560),  # block mode: 480p Wan latent frames, tiles straddling the frame boundaries
        (3 * 1560 + 700, 1560),  # a ragged last frame
    ],
)
def test_gpu_forward_backward(gpu, n, block_size):
    _check(n, 32, 128, block_size, True, torch.bfloat16, 2e-2, device="cuda")


def test_benchmark_smoke_mode_runs_every_part(interp, tmp_path, monkeypatch):
    """benchmarks/bench_causal.py --smoke: the GPU script's code paths, tiny and on the CPU."""
    import importlib.util
    import json
    import pathlib

    bench_dir = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # as `python benchmarks/bench_causal.py` has it
    path = bench_dir / "bench_causal.py"
    spec = importlib.util.spec_from_file_location("bench_causal", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    bench.main(["--smoke", str(out)])
    res = json.loads(out.read_text())
    assert all(c["out"] < 1e-5 and c["dk1"] < 1e-5 for c in res["checks"])
    assert {m["method"].split()[0] for m in res["methods"]} == {"hla_causal_kernel", "sdpa"}
    assert all("error" not in m and m["fwd_bwd_ms"] > 0 for m in res["methods"])
    stream = res["streaming"]
    assert [r["blocks"] for r in stream] == [1, 2, 4]
    assert len({r["hla_state_mb"] for r in stream}) == 1  # constant state
    assert stream[-1]["kv_cache_mb"] == 4 * stream[0]["kv_cache_mb"]
    # the launch-config sweep: every config checked against the fp32 reference, timed, then combined
    sweep = res["sweep"]
    assert [r["sweep"] for r in sweep] == ["default", "one change", "one change", "combined", "combined"]
    assert all(r.get("ok", True) and "error" not in r and r["fwd_bwd_ms"] > 0 for r in sweep)
    assert all(r["max_rel_err"] < 1e-5 for r in sweep if r["block_size"] == 1)
    assert res["suggested_config"]["C"] == 8 and res["suggested_config"]["dkdv"]["BLOCK_M"] == 4
    assert kc.INTERP_CONFIG["C"] == 16  # the table is restored after each config


@pytest.mark.gpu
def test_gpu_second_order_forward(gpu):
    from hla_convert.ops.causal import higher_order_causal

    g = torch.Generator().manual_seed(5)
    q, k = (torch.nn.functional.softplus(torch.randn(1, 4, 4133, 32, generator=g)).cuda() for _ in range(2))
    v = torch.randn(1, 4, 4133, 128, generator=g).cuda()
    out = kc.causal_second_order_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), block_size=1)
    ref = higher_order_causal(q.double(), k.double(), v.double())
    assert _rel(out, ref) < 2e-2
