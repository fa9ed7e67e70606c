"""Causal and block-causal attention math (ops/causal.py, ops/causal_hadamard.py) against its
definitions: chunked == serial == naive masked in float64, streaming steps == the full pass,
future tokens invisible."""

from __future__ import annotations

import itertools

import pytest
import torch

from hla_convert import ops
from hla_convert.ops import causal as C
from hla_convert.ops import causal_hadamard as CH

B, H, N, R, DV = 2, 3, 23, 4, 5
TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _inputs(seed: int, n: int = N, r: int = R, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, n, r, generator=g, dtype=dtype)
    k = torch.rand(B, H, n, r, generator=g, dtype=dtype)
    v = torch.randn(B, H, n, DV, generator=g, dtype=dtype)
    mask = torch.rand(B, n, generator=g) > 0.3
    return q, k, v, mask


DECAYS = {"none": None, "0.9": 0.9, "per-head": torch.tensor([0.7, 0.95, 1.0], dtype=torch.float64)}


@pytest.mark.parametrize("decay", list(DECAYS), ids=list(DECAYS))
@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_second_order_chunked_equals_serial_equals_naive(decay, block_size, normalize):
    q, k, v, mask = _inputs(0)
    for key_mask in (None, mask):
        kw = dict(key_mask=key_mask, normalize=normalize, decay=DECAYS[decay], block_size=block_size)
        naive = C.higher_order_causal_naive(q, k, v, **kw)
        assert _rel(C.higher_order_causal_serial(q, k, v, **kw), naive) < TOL
        for cs in (1, 4, 5, 7, 64):  # 5, 7 do not divide 23; 64 > N
            out = ops.higher_order_attention(q, k, v, causal=True, chunk_size=cs, **kw)
            assert _rel(out, naive) < TOL, (cs, key_mask is not None)


def test_second_order_weights_are_the_masked_triple_sum():
    """a_tj = [j <= t] sum_{i <= j} gamma^(2t - i - j) (q_t.k_i)(k_i.q_j), term by term."""
    q, k, _, _ = _inputs(1, n=6, r=3)
    gamma = 0.8
    a = C.higher_order_causal_weights(q, k, decay=gamma)
    ref = torch.zeros_like(a)
    for t, j in itertools.product(range(6), range(6)):
        if j <= t:
            for i in range(j + 1):
                ref[..., t, j] += gamma ** (2 * t - i - j) * (q[..., t, :] * k[..., i, :]).sum(-1) * (k[..., i, :] * q[..., j, :]).sum(-1)
    assert _rel(a, ref) < TOL


def test_serial_is_the_papers_recurrence_in_s_c_m_g_h():
    """HLA-MATH section 2 token by token: G_t = G + k k^T C_{t-1}, h_t = h + k k^T m_{t-1}."""
    q, k, v, _ = _inputs(2)
    s = torch.zeros(B, H, R, R, dtype=q.dtype)
    c = torch.zeros(B, H, R, DV, dtype=q.dtype)
    m = torch.zeros(B, H, R, dtype=q.dtype)
    g = torch.zeros_like(c)
    hh = torch.zeros_like(m)
    outs = []
    for t in range(N):
        kt, qt, vt = k[:, :, t], q[:, :, t], v[:, :, t]
        kkT = kt[..., :, None] * kt[..., None, :]
        g = g + kkT @ c
        hh = hh + (kkT @ m[..., None])[..., 0]
        s, c, m = s + kkT, c + qt[..., :, None] * vt[..., None, :], m + qt
        num = (qt[..., None, :] @ (s @ c - g))[..., 0, :]
        den = (qt[..., None, :] @ (s @ m[..., None] - hh[..., None]))[..., 0, :]
        outs.append(num / (den + 1e-6))
    ref = torch.stack(outs, dim=2)
    assert _rel(C.higher_order_causal_serial(q, k, v), ref) < TOL
    assert _rel(ops.higher_order_attention(q, k, v, causal=True, chunk_size=6), ref) < TOL


def test_one_block_is_the_bidirectional_form():
    q, k, v, mask = _inputs(3)
    for normalize in (True, False):
        full = ops.higher_order_attention_naive(q, k, v, mask, normalize)
        assert _rel(ops.higher_order_attention(q, k, v, mask, normalize, causal=True, block_size=N), full) < TOL
    qf, kf = [q, k], [k.flip(-1), q.flip(-1)]
    full = ops.hadamard_attention_naive(qf, kf, v, mask)
    assert _rel(ops.hadamard_attention(qf, kf, v, mask, causal=True, block_size=N), full) < TOL


@pytest.mark.parametrize("block_size", [1, 4])
def test_future_tokens_change_nothing(block_size):
    q, k, v, _ = _inputs(4)
    g = torch.Generator().manual_seed(9)
    cut = 12  # a block boundary for both block sizes
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2):
        t[:, :, cut:] = torch.rand(t[:, :, cut:].shape, generator=g, dtype=t.dtype)
    v2[:, :, cut:] = torch.randn(v2[:, :, cut:].shape, generator=g, dtype=v.dtype)
    a = ops.higher_order_attention(q, k, v, causal=True, chunk_size=5, block_size=block_size, decay=0.9)
    b = ops.higher_order_attention(q2, k2, v2, causal=True, chunk_size=5, block_size=block_size, decay=0.9)
    assert torch.equal(a[:, :, :cut], b[:, :, :cut]) or _rel(a[:, :, :cut], b[:, :, :cut]) < TOL
    assert _rel(a[:, :, cut:], b[:, :, cut:]) > 1e-3
    a = ops.hadamard_attention([q, q], [k, k], v, causal=True, chunk_size=5, block_size=block_size)
    b = ops.hadamard_attention([q2, q2], [k2, k2], v2, causal=True, chunk_size=5, block_size=block_size)
    assert _rel(a[:, :, :cut], b[:, :, :cut]) < TOL


def test_decay_matters_and_is_checked():
    q, k, v, _ = _inputs(5)
    assert _rel(ops.higher_order_attention(q, k, v, causal=True, decay=0.5), ops.higher_order_attention(q, k, v, causal=True)) > 1e-3
    for bad in (0.0, 1.5, torch.ones(2)):
        with pytest.raises(ValueError, match="decay"):
            ops.higher_order_attention(q, k, v, causal=True, decay=bad)
    with pytest.raises(ValueError, match="causal=True only"):
        ops.higher_order_attention(q, k, v, decay=0.9)
    with pytest.raises(ValueError, match="causal=True only"):
        ops.hadamard_attention([q, q], [k, k], v, chunk_size=4)
    with pytest.raises(ValueError, match="block_size"):
        ops.hadamard_attention([q, q], [k, k], v, causal=True, block_size=0)


@pytest.mark.parametrize("block_size", [1, 4])
def test_hadamard_chunked_equals_prefix_equals_naive(block_size):
    q, k, v, mask = _inputs(6)
    qf, kf = [q, q.flip(-1), q], [k, k.flip(-1), k]  # F = 3, distinct factors
    for key_mask in (None, mask):
        naive = ops.hadamard_attention_naive(qf, kf, v, key_mask, causal=True, block_size=block_size)
        assert _rel(CH.hadamard_causal_prefix(qf, kf, v, key_mask, block_size=block_size), naive) < TOL
        for cs in (1, 5, 7, 8, 64):
            out = ops.hadamard_attention(qf, kf, v, key_mask, causal=True, chunk_size=cs, block_size=block_size)
            assert _rel(out, naive) < TOL, cs


def test_streaming_steps_equal_the_full_pass():
    """Frame block by frame block: outputs of each step == the full block-causal pass; the state
    keeps its size."""
    q, k, v, mask = _inputs(7, n=24)
    bs = 6
    decay = torch.tensor([0.9, 1.0, 0.8], dtype=torch.float64)
    for normalize in (True, False):
        full = ops.higher_order_attention(q, k, v, mask, normalize, causal=True, block_size=bs, decay=decay, chunk_size=12)
        state, outs = None, []
        for t0 in range(0, 24, bs):
            sl = slice(t0, t0 + bs)
            out, state = C.higher_order_stream_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, mask[:, sl], normalize, decay=decay)
            outs.append(out)
            assert state.S.shape == (B, H, R, R) and state.X.shape == (B, H, R, DV + 1)
        assert _rel(torch.cat(outs, dim=2), full) < TOL
    qf, kf = [q, k], [k, q]
    full = ops.hadamard_attention(qf, kf, v, mask, causal=True, block_size=bs)
    state, outs = None, []
    for t0 in range(0, 24, bs):
        sl = slice(t0, t0 + bs)
        out, state = CH.hadamard_stream_step([f[:, :, sl] for f in qf], [f[:, :, sl] for f in kf], v[:, :, sl], state, mask[:, sl])
        outs.append(out)
        assert state.shape == (B, H, R * R, DV + 1)
    assert _rel(torch.cat(outs, dim=2), full) < TOL


@pytest.mark.parametrize("block_size", [1, 3])
def test_ahla_and_third_order_serial_equal_naive(block_size):
    q, k, v, mask = _inputs(8)
    for normalize in (True, False):
        kw = dict(key_mask=mask, normalize=normalize, block_size=block_size)
        assert _rel(C.ahla_causal_serial(q, k, v, **kw), C.ahla_causal_naive(q, k, v, **kw)) < TOL
        assert _rel(C.third_order_causal_serial(q, k, v, **kw), C.third_order_causal_naive(q, k, v, **kw)) < TOL


def test_third_order_one_block_is_q_sk_sq_ckv():
    """Bidirectionally the third order is q_t^T S^K S^Q (K^T [V, 1]) (Zhang et al.)."""
    q, k, v, _ = _inputs(10)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    nd = q @ (k.transpose(-1, -2) @ k) @ (q.transpose(-1, -2) @ q) @ (k.transpose(-1, -2) @ v1)
    ref = nd[..., :-1] / (nd[..., -1:] + 1e-6)
    assert _rel(C.third_order_causal_naive(q, k, v, block_size=N), ref) < TOL
    nd = q @ (k.transpose(-1, -2) @ q) @ (k.transpose(-1, -2) @ v1)
    assert _rel(C.ahla_causal_naive(q, k, v, block_size=N), nd[..., :-1] / (nd[..., -1:] + 1e-6)) < TOL


def test_float32_chunked_stays_close_on_a_long_sequence():
    """Summaries grow with N: the X form (no S C - G cancellation) keeps float32 accurate."""
    q, k, v, _ = _inputs(11, n=600)
    ref = ops.higher_order_attention(q, k, v, causal=True, chunk_size=64, decay=0.99)
    out = ops.higher_order_attention(q.float(), k.float(), v.float(), causal=True, chunk_size=64, decay=0.99)
    assert out.dtype == torch.float32 and _rel(out.double(), ref) < 1e-5
    qf, kf = [q.float(), q.float()], [k.float(), k.float()]
    ref = ops.hadamard_attention([q, q], [k, k], v, causal=True, chunk_size=64)
    assert _rel(ops.hadamard_attention(qf, kf, v.float(), causal=True, chunk_size=64).double(), ref) < 1e-5


def test_hybrid_block_causal_equals_naive_and_its_limits():
    """Exact softmax in the own block + HLA for earlier blocks; one block = softmax."""
    q, k, v, mask = _inputs(12, n=24)
    qf, kf = [q, q], [k, k]
    log_beta = torch.tensor([0.0, -1.0, 0.5], dtype=torch.float64)
    for key_mask in (None, mask):
        for bs in (1, 5, 6):
            ref = CH.hybrid_block_causal_naive(q, k, v, qf, kf, 0.5, log_beta, bs, key_mask)
            assert _rel(CH.hybrid_block_causal(q, k, v, qf, kf, 0.5, log_beta, bs, key_mask), ref) < TOL
    soft = torch.softmax(0.5 * q @ k.transpose(-1, -2), dim=-1) @ v
    assert _rel(CH.hybrid_block_causal(q, k, v, qf, kf, 0.5, log_beta, 24, eps=0.0), soft) < TOL
    # the first block is plain softmax over itself, later blocks see earlier ones through HLA
    out = CH.hybrid_block_causal(q, k, v, qf, kf, 0.5, log_beta, 6, eps=0.0)
    first = torch.softmax(0.5 * q[:, :, :6] @ k[:, :, :6].transpose(-1, -2), dim=-1) @ v[:, :, :6]
    assert _rel(out[:, :, :6], first) < TOL


def test_second_order_is_first_order_with_covariance_keys():
    """The identity behind the causal form: a_tj = [p_j <= p_t] q_t . u_j with u_j = S_{p_j} q_j,
    S_p = sum_{p_i <= p} k_i k_i^T (no decay): causal 2nd order is causal linear attention with keys u."""
    q, k, v, mask = _inputs(13, n=18)
    bs = 3
    w = mask[:, None, :, None].to(q.dtype)
    km, qm = k * w, q * w
    p = torch.arange(18) // bs
    seen = (p[None, :] <= p[:, None]).to(q.dtype)  # [j, i]: p_i <= p_j
    u = torch.einsum("ji,bhid,bhie,bhje->bhjd", seen, km, km, qm)  # S_{p_j} q_j, zero for masked j
    ref = CH.hadamard_causal_naive([q], [u], v, block_size=bs)  # one factor: first-order linear attention
    assert _rel(ops.higher_order_attention(q, k, v, mask, causal=True, block_size=bs, chunk_size=6), ref) < TOL
