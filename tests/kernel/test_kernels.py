"""hla_kernels.hadamard_attention against the float64 quadratic reference.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set for this module's tests
only: the kernels read it when called, and leaving it set would send other modules' CPU tensors
through the slow interpreter). Shapes are tiny and the interpreter blocks small, so sequences
span several blocks and the state is split over programs. On a CUDA machine the GPU tests run
the compiled kernels at real head sizes.

Errors are ||x - ref|| / ||ref|| per tensor, forward and every gradient. Outputs are poisoned
with NaN before each run, so any element a kernel leaves unwritten fails.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

import hla_kernels  # noqa: E402
from hla_kernels import hadamard as hk  # noqa: E402
from hla_convert.ops import hadamard_attention_naive  # noqa: E402
from helpers import kernel_autograd_bytes  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _inputs(b, h, n, r, dv, dtype, device="cpu", masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    # softplus features, as the layer makes them: positive, spread over a decade
    feats = [torch.nn.functional.softplus(torch.randn(b, h, n, r, generator=g) * 1.5) for _ in range(4)]
    v = torch.randn(b, h, n, dv, generator=g)
    do = torch.randn(b, h, n, dv, generator=g)
    mask = None
    if masked:
        mask = torch.rand(b, n, generator=g) > 0.3
        mask[:, 0] = True
    to = dict(device=device, dtype=dtype)
    feats = [f.to(**to) for f in feats]
    return feats[:2], feats[2:], v.to(**to), do.to(**to), None if mask is None else mask.to(device)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite (unwritten?) elements"
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _check(q, k, v, do, mask, tol, grads=True):
    leaves = [t.detach().clone().requires_grad_(grads) for t in (*q, *k, v)]
    out = hla_kernels.hadamard_attention(leaves[:2], leaves[2:4], leaves[4], mask)
    assert out.dtype == v.dtype and out.shape == v.shape
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in (*q, *k, v)]
    ref = hadamard_attention_naive(ref_leaves[:2], ref_leaves[2:4], ref_leaves[4], None if mask is None else mask)
    errs = {"out": _rel(out, ref)}
    if grads:
        (out.float() * do.float()).sum().backward()
        (ref * do.double()).sum().backward()
        for name, x, y in zip(("dq1", "dq2", "dk1", "dk2", "dv"), leaves, ref_leaves):
            assert x.grad.dtype == x.dtype
            errs[name] = _rel(x.grad, y.grad)
    bad = {k_: e for k_, e in errs.items() if not e < tol}
    assert not bad, f"errors over {tol}: {errs}"
    return errs


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreter_forward_backward(interp, dtype, masked):
    # float32 with 2 batch elements x 2 heads (per-element masks, per-head states); bf16's rounding
    # does not depend on either, so one of each (the interpreter's time is per program); both
    # 40 tokens, 2.5 of the interpreter's 16-token blocks
    b = 2 if dtype == torch.float32 else 1
    q, k, v, do, mask = _inputs(b, b, 40, 4, 16, dtype, masked=masked)
    _check(q, k, v, do, mask, TOL[dtype])


@pytest.mark.parametrize("r,dv,n", [(8, 16, 64), (16, 8, 33)])
def test_interpreter_other_sizes(interp, r, dv, n):
    q, k, v, do, mask = _inputs(1, 2, n, r, dv, torch.float32, masked=True, seed=1)
    _check(q, k, v, do, mask, TOL[torch.float32])


def test_interpreter_fp16_forward(interp):
    q, k, v, do, mask = _inputs(1, 2, 40, 8, 16, torch.float16, masked=True, seed=2)
    _check(q, k, v, do, mask, TOL[torch.float16], grads=False)


@pytest.mark.parametrize("g,trans_acc,prefetch", [(1, True, False), (4, False, True)])
def test_interpreter_block_shapes(interp, monkeypatch, g, trans_acc, prefetch):
    """Every kernel with one and with several outer Kronecker indices per block, both
    accumulator orientations of the state kernel, with and without the register prefetch
    (state, readout, dq, dk/dv)."""
    cfg = {name: dict(c, G=g, PREFETCH=prefetch) for name, c in hk.INTERP_CONFIG.items()}
    for name in ("state", "dstate"):
        cfg[name].update(split_rows=24, TRANS_ACC=trans_acc)  # uneven splits
    monkeypatch.setattr(hk, "INTERP_CONFIG", cfg)
    q, k, v, do, mask = _inputs(1, 2, 37, 4, 16, torch.float32, masked=True, seed=3)
    _check(q, k, v, do, mask, TOL[torch.float32])


def test_interpreter_strided_inputs(interp):
    """Features as views of one projection, v and dO not contiguous: strides are honoured."""
    b, h, n, r, dv = 1, 2, 24, 4, 16
    g = torch.Generator().manual_seed(4)
    qf = torch.nn.functional.softplus(torch.randn(b, n, h, 2 * r, generator=g)).transpose(1, 2)
    kf = torch.nn.functional.softplus(torch.randn(b, n, h, 2 * r, generator=g)).transpose(1, 2)
    v = torch.randn(b, n, h, dv, generator=g).transpose(1, 2)
    q, k = [qf[..., :r], qf[..., r:]], [kf[..., :r], kf[..., r:]]
    assert not v.is_contiguous() and q[1].stride(-1) == 1
    leaves = [t.clone().requires_grad_() for t in (*q, *k, v)]  # clone keeps the strides
    out = hla_kernels.hadamard_attention(leaves[:2], leaves[2:4], leaves[4])
    ref_leaves = [t.detach().double().requires_grad_() for t in (*q, *k, v)]
    ref = hadamard_attention_naive(ref_leaves[:2], ref_leaves[2:4], ref_leaves[4])
    assert _rel(out, ref) < 1e-4
    do = torch.randn(b, n, h, dv, generator=g).transpose(1, 2)
    (out * do).sum().backward()
    (ref * do.double()).sum().backward()
    for x, y in zip(leaves, ref_leaves):
        assert _rel(x.grad, y.grad) < 1e-4


def test_interpreter_partial_grads_and_no_grad(interp):
    q, k, v, do, mask = _inputs(1, 1, 20, 4, 16, torch.float32, seed=5)
    vq = v.clone().requires_grad_()
    out = hla_kernels.hadamard_attention(q, k, vq, mask)
    (out * do).sum().backward()
    assert vq.grad is not None and torch.isfinite(vq.grad).all()
    with torch.no_grad():
        out2 = hla_kernels.hadamard_attention(q, k, v, mask)
    torch.testing.assert_close(out2, out.detach())


def test_backward_memory_is_the_saved_state_alone(interp):
    """Autograd keeps q1, q2, k1, k2, v (bf16), den (fp32 [B*H, N]) and the state (T bf16
    [B*H, r*r, dv], Z fp32 [B*H, r*r]); the backward allocates nothing outside its kernel op (no zero
    gradients for den, T and Z, which the formula ignores: see _runtime.no_zero_grads)."""
    b, h, n, r, dv = 1, 2, 24, 4, 8
    g = torch.Generator().manual_seed(0)
    leaves = [torch.nn.functional.softplus(torch.randn(b, h, n, r, generator=g)).bfloat16().requires_grad_() for _ in range(4)]
    v = torch.randn(b, h, n, dv, generator=g).bfloat16().requires_grad_()
    saved, backward_bytes = kernel_autograd_bytes(
        lambda: hla_kernels.hadamard_attention(leaves[:2], leaves[2:], v), torch.randn(b, h, n, dv).bfloat16()
    )
    assert sum(saved) == b * h * (n * (2 * (4 * r + dv) + 4) + 2 * r * r * dv + 4 * r * r)
    assert backward_bytes == 0


def test_interpreter_all_keys_masked(interp):
    """A batch element whose keys are all masked gets zeros (num 0, den eps), as the reference."""
    q, k, v, do, _ = _inputs(2, 1, 16, 4, 16, torch.float32, seed=6)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1] = False
    out = hla_kernels.hadamard_attention(q, k, v, mask)
    ref = hadamard_attention_naive([t.double() for t in q], [t.double() for t in k], v.double(), mask)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    assert _rel(out, ref) < 1e-4


def test_supports(interp, monkeypatch):
    q, k, v, _, _ = _inputs(1, 1, 8, 4, 16, torch.float32)
    assert hla_kernels.supports(q, k, v)
    assert not hla_kernels.supports(q + q[:1], k + k[:1], v)  # F = 3
    assert not hla_kernels.supports(q, k[:1], v)
    assert not hla_kernels.supports([t.double() for t in q], [t.double() for t in k], v.double())
    q3 = [t[..., :3] for t in q]
    k3 = [t[..., :3] for t in k]
    assert not hla_kernels.supports(q3, k3, v)  # r not a power of two
    assert not hla_kernels.supports(q, k, v[..., :12])  # dv not a power of two
    assert not hla_kernels.supports([q[0], q[1][:, :, :4]], k, v)  # shapes disagree
    with pytest.raises(ValueError, match="only F = 2"):
        hla_kernels.hadamard_attention(q + q[:1], k + k[:1], v)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not hla_kernels.supports(q, k, v)  # CPU tensors need the interpreter
    assert "TRITON_INTERPRET" in hla_kernels.unsupported_reason(q, k, v)


def test_mask_validation(interp):
    q, k, v, _, _ = _inputs(1, 1, 8, 4, 16, torch.float32)
    with pytest.raises(TypeError):
        hla_kernels.hadamard_attention(q, k, v, torch.ones(1, 8))
    with pytest.raises(ValueError):
        hla_kernels.hadamard_attention(q, k, v, torch.ones(1, 7, dtype=torch.bool))


GPU_CASES = [(r, dv, torch.bfloat16) for r in (16, 32, 64) for dv in (64, 128)] + [
    (16, 64, torch.float32), (32, 128, torch.float32), (64, 64, torch.float32), (32, 128, torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("r,dv,dtype", GPU_CASES)
def test_gpu_forward_backward(gpu, r, dv, dtype):
    q, k, v, do, mask = _inputs(2, 3, 1000, r, dv, dtype, device="cuda", masked=True, seed=r + dv)
    _check(q, k, v, do, mask, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_long_sequence_forward(gpu, dtype):
    """N = 8192 at the benchmark head sizes, forward against the float64 efficient reference
    (a readout variant was right at N = 1000 and wrong here once; benchmarks/RESULTS.md)."""
    from hla_convert.ops import hadamard_attention as reference

    q, k, v, _, mask = _inputs(1, 4, 8192, 32, 128, dtype, device="cuda", masked=True, seed=7)
    out = hla_kernels.hadamard_attention(q, k, v, mask)
    ref = reference([t.double() for t in q], [t.double() for t in k], v.double(), mask)
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.gpu
def test_gpu_supports_rejects_small_r(gpu):
    q, k, v, _, _ = _inputs(1, 1, 64, 8, 64, torch.bfloat16, device="cuda")
    assert not hla_kernels.supports(q, k, v)
    q, k, v, _, _ = _inputs(1, 1, 64, 16, 64, torch.bfloat16, device="cuda")
    assert hla_kernels.supports(q, k, v)

