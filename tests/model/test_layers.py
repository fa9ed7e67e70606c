"""HLAAttention: data-driven initialisation and the teacher / student / both modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hla_convert import HLAAttention, HLAConfig, convert_attention, hla_layers, set_attention_mode
from hla_convert.model.layers import hla_parameters

from tiny_models import forward, tiny_inputs, tiny_model

H, D = 2, 8


def _samples_with_subspace(m: int, rank: int, seed: int, stds=None):
    """q/k samples [M, H, D] concentrated on a known orthonormal basis U [H, D, rank] with distinct
    per-direction spreads (largest first) plus small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(H, D, D, generator=g, dtype=torch.float64))[0][..., :rank]
    stds = torch.tensor(stds if stds is not None else [10.0 - 2 * i for i in range(rank)], dtype=torch.float64)

    def draw():
        # z^T z = m diag(stds^2) exactly, so the principal directions are exactly the basis
        z = torch.linalg.qr(torch.randn(H, m, rank, generator=g, dtype=torch.float64))[0].transpose(0, 1)
        z = z * math.sqrt(m) * stds
        x = torch.einsum("mhr,hdr->mhd", z, basis)
        return (x + 0.01 * torch.randn(m, H, D, generator=g, dtype=torch.float64)).float()

    return draw(), draw(), basis


def test_taylor_init_is_the_leading_principal_directions():
    config = HLAConfig(kind="hadamard", factors=2, feature_dim=4, feature_map="taylor")  # r-1 = 3
    layer = HLAAttention(config, H, D)
    q, k, basis = _samples_with_subspace(400, rank=3, seed=0)
    layer.initialize_from_samples(q, k)
    proj = layer.proj.detach().double()  # [H, D, 3]
    assert proj.shape == (H, D, 3)
    # orthonormal columns, each +- the matching known direction, in order of decreasing spread
    eye = torch.eye(3, dtype=torch.float64).expand(H, 3, 3)
    assert torch.allclose(proj.transpose(1, 2) @ proj, eye, atol=1e-5)
    assert torch.allclose((proj.transpose(1, 2) @ basis).abs(), eye, atol=1e-3)


def test_hybrid_taylor_init_is_its_far_kinds_init():
    """A hybrid layer starts from the same feature maps as the HLA layer it extends; beta = 1."""
    q, k, _ = _samples_with_subspace(200, rank=3, seed=5)
    hla = HLAAttention(HLAConfig(kind="hadamard", feature_dim=4), H, D)
    hybrid = HLAAttention(HLAConfig(kind="hybrid", feature_dim=4, window=(1, 0, 0)), H, D)
    hla.initialize_from_samples(q, k)
    hybrid.initialize_from_samples(q, k)
    assert torch.equal(hybrid.proj, hla.proj)
    assert torch.equal(hybrid.log_beta, torch.zeros(H))


def test_taylor_init_keeps_more_of_qk_than_the_identity_init():
    """What calibration buys: with r-1 < d the PCA projection keeps q.k, the default does not."""
    config = HLAConfig(kind="hadamard", factors=2, feature_dim=3, feature_map="taylor")  # r-1 = 2
    q, k, _ = _samples_with_subspace(300, rank=2, seed=1, stds=[3.0, 2.0])
    exact = torch.einsum("mhd,nhd->hmn", q, k)

    def kept(layer):
        pq = torch.einsum("mhd,hdr->mhr", q, layer.proj.detach())
        pk = torch.einsum("mhd,hdr->mhr", k, layer.proj.detach())
        return float((torch.einsum("mhr,nhr->hmn", pq, pk) - exact).norm() / exact.norm())

    layer = HLAAttention(config, H, D)
    before = kept(layer)
    layer.initialize_from_samples(q, k)
    after = kept(layer)
    assert after < 0.02 < 0.5 < before, (before, after)


def test_taylor_init_with_more_features_than_dims_pads_with_zero_directions():
    config = HLAConfig(kind="hadamard", factors=2, feature_dim=D + 3, feature_map="taylor")
    layer = HLAAttention(config, H, D)
    q, k, _ = _samples_with_subspace(100, rank=D, seed=2, stds=[8.0 - 0.5 * i for i in range(D)])
    layer.initialize_from_samples(q, k)
    proj = layer.proj.detach().double()
    assert proj.shape == (H, D, D + 2)
    assert torch.allclose(proj[..., :D].transpose(1, 2) @ proj[..., :D], torch.eye(D, dtype=torch.float64).expand(H, D, D), atol=1e-5)
    assert torch.equal(proj[..., D:], torch.zeros(H, D, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    "config",
    [
        HLAConfig(kind="hadamard", factors=2, feature_dim=4, feature_map="softplus"),
        HLAConfig(kind="hadamard", factors=3, feature_dim=3, feature_map="softplus"),
        HLAConfig(kind="linear", factors=2, feature_dim=3, feature_map="elu"),
        HLAConfig(kind="higher_order", feature_dim=4, feature_map="softplus"),
        HLAConfig(kind="hybrid", far="hadamard", factors=3, feature_dim=3, feature_map="softplus"),
        HLAConfig(kind="hybrid", far="linear", factors=2, feature_dim=3, feature_map="elu"),
    ],
    ids=["hadamard-F2-softplus", "hadamard-F3-softplus", "linear-elu", "higher_order-softplus", "hybrid-hadamard", "hybrid-linear"],
)
def test_positive_map_init_from_samples(config):
    layer = HLAAttention(config, H, D)
    with torch.no_grad():
        layer.bias.fill_(0.5)
    before = layer.weight.detach().clone()
    q, k, _ = _samples_with_subspace(200, rank=3, seed=3)
    layer.initialize_from_samples(q, k)
    w = layer.weight.detach()
    assert w.shape == before.shape
    assert torch.isfinite(w).all()
    assert not torch.allclose(w, before)
    assert torch.equal(layer.bias.detach(), torch.zeros_like(layer.bias))
    # each factor gets its own map (a different rotation of the principal frame)
    if w.shape[0] > 1:
        assert not torch.allclose(w[0], w[1])
    # deterministic for a given generator, and the features it gives are finite and positive
    other = HLAAttention(config, H, D)
    other.initialize_from_samples(q, k)
    assert torch.equal(other.weight, layer.weight)
    for f in layer.features(q.transpose(0, 1).unsqueeze(0), 1.0 / math.sqrt(D)):
        assert torch.isfinite(f).all() and (f > 0).all()


def test_softmax_layer_has_no_parameters_and_init_is_a_no_op():
    layer = HLAAttention(HLAConfig(kind="softmax"), H, D)
    assert list(layer.parameters()) == []
    layer.initialize_from_samples(torch.randn(10, H, D), torch.randn(10, H, D))


# -- modes ------------------------------------------------------------------------------------------


def _qkv(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, H, n, D, generator=g) for _ in range(3))


def test_layer_modes_route_one_softmax_call():
    layer = HLAAttention(HLAConfig(kind="hadamard", factors=2, feature_dim=4), H, D)
    q, k, v = _qkv()
    calls = []

    def teacher():
        calls.append(1)
        return F.scaled_dot_product_attention(q, k, v)

    soft = F.scaled_dot_product_attention(q, k, v)
    student = layer.student(q, k, v, None, 1.0 / math.sqrt(D))
    assert not torch.allclose(student, soft, atol=1e-3)

    assert torch.equal(layer.attend(teacher, q, k, v, None, None), student)  # default mode: student
    assert calls == []

    layer.mode = "teacher"
    assert torch.equal(layer.attend(teacher, q, k, v, None, None), soft)
    assert calls == [1]

    layer.mode = "both"
    out = layer.attend(teacher, q, k, v, None, None)
    assert torch.equal(out, soft)  # the teacher's output flows on
    target, pred = layer.last_pair
    assert torch.equal(target, soft) and torch.equal(pred, student)
    assert not target.requires_grad and pred.requires_grad  # only the student is trained
    assert layer.calls == 3


def test_modes_on_a_converted_model():
    model = tiny_model("wan")
    inputs = tiny_inputs("wan")
    with torch.no_grad():
        original = forward(model, inputs)
    convert_attention(model, HLAConfig(kind="hadamard", factors=2, feature_dim=4))
    layers = hla_layers(model)
    assert list(layers) == ["blocks.0.attn1", "blocks.1.attn1"]

    with torch.no_grad():
        student = forward(model, inputs)
    assert (student - original).abs().max() > 1e-3

    set_attention_mode(model, "teacher")
    with torch.no_grad():
        assert torch.equal(forward(model, inputs), original)

    # record what the first converted layer's student computes (it sees the same input in every mode)
    first = layers["blocks.0.attn1"]
    seen = []
    student_fn = first.student
    first.student = lambda *a, **kw: seen.append(student_fn(*a, **kw)) or seen[-1]
    try:
        set_attention_mode(model, "student")
        with torch.no_grad():
            forward(model, inputs)
        set_attention_mode(model, "both")
        both = forward(model, inputs)
    finally:
        del first.student
    assert torch.equal(both, original)  # "both" runs the teacher through the whole model
    for name, layer in layers.items():
        assert layer.mode == "both"
        target, pred = layer.last_pair
        assert target.shape == pred.shape and target.dtype == pred.dtype
        assert not target.requires_grad and pred.requires_grad
        assert (target - pred).abs().max() > 1e-4
    assert torch.equal(layers["blocks.0.attn1"].last_pair[1], seen[0])

    # the recorded pairs are what stage 1 trains on: gradients reach every HLA parameter
    loss = sum(F.mse_loss(p, t) for t, p in (layer.last_pair for layer in layers.values()))
    loss.backward()
    for name, p in hla_parameters(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    set_attention_mode(model, "student")
    assert all(layer.last_pair is None for layer in layers.values())
    with pytest.raises(ValueError):
        set_attention_mode(model, "softmax")


def _taylor_features_before(core, x, scale):
    """The taylor map as it was written before it became one GEMM: (x @ P) * c, a ones column cat in front."""
    c = core.config
    y = torch.matmul(x.to(x.dtype), core.proj.to(x.dtype)) * math.sqrt(scale / c.factors)
    return torch.cat([torch.ones_like(y[..., :1]), y], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_taylor_features_are_one_gemm_with_the_same_values_and_gradients(dtype):
    """phi = [1, c * x P]: the same values and gradients (x and P) as the multiply-and-cat form it
    replaced, from one matmul with no cat and no multiply over the [B, H, N, r] features."""
    from torch.utils._python_dispatch import TorchDispatchMode

    core = HLAAttention(HLAConfig(kind="hybrid", factors=2, feature_dim=8, feature_map="taylor"), num_heads=2, head_dim=16)
    with torch.no_grad():
        core.proj.copy_(torch.randn(core.proj.shape, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(2, 2, 40, 16, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_(True)
    scale = 16**-0.5
    feats = core.features(x, scale)
    ref = _taylor_features_before(core, x, scale)
    assert len(feats) == 2 and feats[0] is feats[1] and feats[0].dtype == dtype and feats[0].shape == (2, 2, 40, 8)
    assert torch.equal(feats[0][..., 0], torch.ones_like(feats[0][..., 0]))
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(feats[0], ref, **tol)
    g = torch.randn(feats[0].shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = torch.autograd.grad(feats[0], (x, core.proj), g)
    want = torch.autograd.grad(ref, (x, core.proj), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-2] == 40:  # a [.., N, *] token tensor
                self.big.append(func.__name__.split(".")[0])
            return out

    with Ops() as ops, torch.no_grad():
        core.features(x, scale)
    # the GEMM and views of it: no cat, multiply or copy of the features
    assert "bmm" in ops.big and set(ops.big) <= {"expand", "view", "bmm", "mm", "_unsafe_view", "select", "fill_"}, ops.big
