"""The attention math (hla_convert.ops) against its own definitions (HLA-MATH.md).

Every efficient form is checked against its quadratic reference in float64, on the feature maps the
layer really produces (HLAAttention.features), so a test fails when either the algebra or the
feature maps break the contract: equal outputs, masked keys invisible, normaliser never negative.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hla_convert import ConfigError, HLAAttention, HLAConfig
from hla_convert import ops
from hla_convert.ops import _common as ops_common
from hla_convert.ops import hadamard as hadamard_mod

B, H, N, D = 2, 2, 13, 8

# (config, label): every kind and feature map the tool offers, at small state sizes.
KIND_CONFIGS = [
    HLAConfig(kind="hadamard", factors=2, feature_dim=5, feature_map="taylor"),
    HLAConfig(kind="hadamard", factors=4, feature_dim=3, feature_map="taylor"),
    HLAConfig(kind="hadamard", factors=2, feature_dim=4, feature_map="softplus"),
    HLAConfig(kind="hadamard", factors=3, feature_dim=3, feature_map="softplus"),
    HLAConfig(kind="hadamard", factors=4, feature_dim=3, feature_map="softplus"),
    HLAConfig(kind="linear", factors=2, feature_dim=3, feature_map="elu"),
    HLAConfig(kind="linear", factors=2, feature_dim=3, feature_map="softplus"),
    HLAConfig(kind="higher_order", feature_dim=5, feature_map="softplus", normalize=True),
    HLAConfig(kind="higher_order", feature_dim=5, feature_map="elu", normalize=True),
    HLAConfig(kind="higher_order", feature_dim=5, feature_map="softplus", normalize=False),
]


def _label(c: HLAConfig) -> str:
    extra = "" if c.kind != "higher_order" else ("-norm" if c.normalize else "-unnorm")
    return f"{c.kind}-F{c.factors}-{c.feature_map}{extra}"


IDS = [_label(c) for c in KIND_CONFIGS]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(config: HLAConfig, seed: int, magnitude: float = 1.0, dtype=torch.float64) -> HLAAttention:
    """An HLAAttention whose feature-map parameters are random draws (not the identity/init values)."""
    layer = HLAAttention(config, H, D).to(dtype)
    g = _gen(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * magnitude / math.sqrt(D))
    return layer


def _qkv(seed: int, magnitude: float = 1.0, n: int = N, dtype=torch.float64):
    g = _gen(seed)
    q = torch.randn(B, H, n, D, generator=g, dtype=dtype) * magnitude
    k = torch.randn(B, H, n, D, generator=g, dtype=dtype) * magnitude
    v = torch.randn(B, H, n, D, generator=g, dtype=dtype)
    return q, k, v


def _mask(seed: int, n: int = N) -> torch.Tensor:
    """bool [B, N] with a few dropped keys per row, never all dropped."""
    g = _gen(seed)
    m = torch.rand(B, n, generator=g) > 0.3
    m[:, 0] = True
    m[1, -3:] = False  # batch element 1 also has trailing padding, the Hunyuan layout
    return m


def _efficient(config: HLAConfig, qf, kf, v, key_mask):
    """The efficient op the layer dispatches to for this kind."""
    if config.kind == "hadamard":
        return ops.hadamard_attention(qf, kf, v, key_mask, config.eps)
    if config.kind == "linear":
        return ops.linear_attention(qf[0], kf[0], v, key_mask, config.eps)
    return ops.higher_order_attention(qf[0], kf[0], v, key_mask, config.normalize, config.eps)


def _naive(config: HLAConfig, qf, kf, v, key_mask):
    if config.kind == "hadamard":
        return ops.hadamard_attention_naive(qf, kf, v, key_mask, config.eps)
    if config.kind == "linear":
        return ops.linear_attention_naive(qf[0], kf[0], v, key_mask, config.eps)
    return ops.higher_order_attention_naive(qf[0], kf[0], v, key_mask, config.normalize, config.eps)


def _weights(config: HLAConfig, qf, kf, key_mask):
    """Explicit attention weights a_ij [B, H, N, N], masked keys zeroed."""
    if config.kind == "higher_order":
        return ops.higher_order_weights(qf[0], kf[0], key_mask)
    a = ops.hadamard_weights(qf, kf)  # linear: one factor, a_ij = phi(q_i).phi(k_j)
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype)
    return a


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# -- efficient == naive ---------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("config", KIND_CONFIGS, ids=IDS)
def test_efficient_form_equals_naive_quadratic_form(config, masked):
    layer = _layer(config, seed=1)
    scale = 1.0 / math.sqrt(D)
    for seed in range(3):
        q, k, v = _qkv(seed)
        key_mask = _mask(seed) if masked else None
        qf, kf = layer.features(q, scale), layer.features(k, scale)
        assert all(f.dtype == torch.float64 for f in qf + kf)
        eff = _efficient(config, qf, kf, v, key_mask)
        ref = _naive(config, qf, kf, v, key_mask)
        assert eff.dtype == torch.float64 and eff.shape == (B, H, N, D)
        assert _rel(eff, ref) < 1e-10
        # the layer's own student path is the efficient form on these features
        assert torch.equal(layer.student(q, k, v, key_mask, scale), eff)


@pytest.mark.parametrize("factors,fmap", [(2, "taylor"), (4, "taylor"), (3, "softplus")])
def test_hadamard_chunked_state_equals_one_shot(monkeypatch, factors, fmap):
    """Long sequences are processed in token chunks; chunking must not change the result."""
    config = HLAConfig(kind="hadamard", factors=factors, feature_dim=3, feature_map=fmap)
    layer = _layer(config, seed=2)
    q, k, v = _qkv(3, n=23)
    key_mask = _mask(3, n=23)
    qf, kf = layer.features(q, 0.3), layer.features(k, 0.3)
    whole = ops.hadamard_attention(qf, kf, v, key_mask)
    for module in (hadamard_mod, ops_common):  # the readout and the state (ops/_common.py) both chunk
        monkeypatch.setattr(module, "chunk_size", lambda n, per_token, budget=0: 4)  # 23 = 5*4 + 3
    chunked = ops.hadamard_attention(qf, kf, v, key_mask)
    assert _rel(chunked, whole) < 1e-12
    assert _rel(chunked, ops.hadamard_attention_naive(qf, kf, v, key_mask)) < 1e-10


def test_kronecker_features_first_factor_outermost():
    a = torch.tensor([[1.0, 2.0]])
    b = torch.tensor([[3.0, 5.0, 7.0]])
    assert torch.equal(ops.kronecker_features([a, b]), torch.tensor([[3.0, 5.0, 7.0, 6.0, 10.0, 14.0]]))
    # kron(a).kron(b) == prod_f a_f.b_f: the identity the efficient form rests on
    g = _gen(0)
    fa = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    fb = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    lhs = (ops.kronecker_features(fa) * ops.kronecker_features(fb)).sum(-1)
    rhs = math.prod((x * y).sum(-1) for x, y in zip(fa, fb))
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=0)


# -- key masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", KIND_CONFIGS, ids=IDS)
def test_masked_tokens_change_nothing_for_kept_queries(config):
    layer = _layer(config, seed=4, dtype=torch.float32)
    q, k, v = _qkv(5, dtype=torch.float32)
    key_mask = _mask(5)
    scale = 1.0 / math.sqrt(D)
    out = layer.student(q, k, v, key_mask, scale)
    assert torch.isfinite(out).all()

    # every input of a masked token replaced (its q too: higher_order uses q_j on the key side)
    g = _gen(6)
    drop = ~key_mask[:, None, :, None]
    q2, k2, v2 = (torch.where(drop, torch.randn(x.shape, generator=g) * 50, x) for x in (q, k, v))
    out2 = layer.student(q2, k2, v2, key_mask, scale)
    keep = key_mask[:, None, :, None].expand_as(out)
    assert torch.equal(out[keep], out2[keep])

    # ... while changing one kept key does change them: the comparison above can fail
    k3 = k.clone()
    k3[1, :, 0] += 3.0
    v3 = v.clone()
    v3[1, :, 0] += 3.0
    out3 = layer.student(q, k3, v3, key_mask, scale)
    assert (out3[1][keep[1]] - out[1][keep[1]]).abs().max() > 1e-4


@pytest.mark.parametrize("config", KIND_CONFIGS, ids=IDS)
def test_mask_equals_dropping_the_tokens(config):
    """Masked attention over N tokens == unmasked attention over the kept tokens only."""
    layer = _layer(config, seed=7)
    q, k, v = _qkv(8)
    key_mask = _mask(8)
    scale = 0.4
    out = layer.student(q, k, v, key_mask, scale)
    for b in range(B):
        idx = key_mask[b].nonzero().squeeze(-1)
        sub = layer.student(q[b : b + 1, :, idx], k[b : b + 1, :, idx], v[b : b + 1, :, idx], None, scale)
        assert _rel(out[b : b + 1, :, idx], sub) < 1e-10


def test_key_mask_must_be_bool_b_by_n():
    config = HLAConfig(kind="hadamard", factors=2, feature_dim=3)
    layer = _layer(config, seed=0)
    q, k, v = _qkv(0)
    with pytest.raises(TypeError):
        layer.student(q, k, v, torch.ones(B, N), 0.3)
    with pytest.raises(ValueError):
        layer.student(q, k, v, torch.ones(B, N + 1, dtype=torch.bool), 0.3)


# -- the normaliser -------------------------------------------------------------------------------


def _efficient_normaliser(config: HLAConfig, qf, kf, key_mask) -> torch.Tensor:
    """sum_j a_ij over kept keys as the efficient form computes it (before eps): [B, H, N]."""
    if config.kind == "higher_order":
        q, k = qf[0], kf[0]
        w = key_mask[:, None, :, None].to(q.dtype)
        s_k = (k * w).transpose(-1, -2) @ (k * w)
        m_q = (q * w).sum(2).unsqueeze(-1)
        return (q @ s_k @ m_q).squeeze(-1)
    if config.kind == "linear":
        qf, kf = qf[:1], kf[:1]
    v = torch.zeros(*kf[0].shape[:3], 1, dtype=kf[0].dtype)
    state = hadamard_mod.hadamard_state(kf, v, key_mask)  # last channel: sum_j kron(phi(k_j))
    return (ops.kronecker_features(qf) @ state[..., -1:]).squeeze(-1)


@pytest.mark.parametrize("config", KIND_CONFIGS, ids=IDS)
def test_normaliser_nonnegative_on_random_draws(config):
    """sum_j a_ij >= 0 for every query, for the layer's feature maps with arbitrary parameters and
    inputs over six orders of magnitude; > 0 when every feature is positive (no underflow)."""
    positive_features = config.feature_map in ("softplus", "elu")
    for seed in range(40):
        param_mag = [0.1, 1.0, 10.0][seed % 3]
        input_mag = [1e-3, 0.3, 1.0, 3.0, 30.0, 1e3][seed % 6]
        layer = _layer(config, seed=100 + seed, magnitude=param_mag)
        q, k, _ = _qkv(200 + seed, magnitude=input_mag)
        key_mask = _mask(300 + seed)
        scale = 1.0 / math.sqrt(D)
        qf, kf = layer.features(q, scale), layer.features(k, scale)
        a = _weights(config, qf, kf, key_mask)
        assert torch.isfinite(a).all()
        # every single weight is >= 0, not only their sum (a negative weight is a bug, HLA-MATH.md)
        assert (a >= 0).all(), f"seed {seed}: min weight {a.min().item()}"
        den = a.sum(-1)
        eff = _efficient_normaliser(config, qf, kf, key_mask)
        # the efficient form may round differently, never below -1e-12 of the weights' own scale
        assert (eff >= -1e-12 * den.abs().clamp_min(1e-300)).all()
        assert _rel(eff, den) < 1e-10
        if positive_features and all(bool((f > 0).all()) for f in qf + kf) and input_mag <= 30:
            assert (den > 0).all(), f"seed {seed}: zero normaliser with positive features"
            assert (eff > 0).all()


@pytest.mark.parametrize("config", [c for c in KIND_CONFIGS if c.feature_map in ("softplus", "elu")], ids=lambda c: _label(c))
def test_positive_feature_maps_are_positive(config):
    layer = _layer(config, seed=9, magnitude=3.0)
    q, _, _ = _qkv(10, magnitude=5.0)
    for f in layer.features(q, 0.35):
        assert (f > 0).all()


@pytest.mark.parametrize("kind", ["linear", "higher_order"])
def test_elu_features_positive_for_strongly_negative_preactivations_float32(kind):
    """elu(y) + 1 = exp(y) for y < 0: positive down to y ~ -87 in float32 (a naive F.elu(y) + 1
    rounds to exactly 0 below y ~ -17, which zeroes weights and normalisers)."""
    layer = HLAAttention(HLAConfig(kind=kind, factors=2, feature_dim=3, feature_map="elu"), H, D)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    x = torch.full((1, H, 4, D), -5.0)  # pre-activation y = -40
    (phi,) = layer.features(x, 0.35)
    assert (phi > 0).all()
    assert torch.allclose(phi, torch.full_like(phi, math.exp(-40.0)), rtol=1e-5, atol=0)


# -- softmax --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_softmax_attention_matches_torch_sdpa(dtype, masked, scale):
    q, k, v = _qkv(11, dtype=dtype)
    key_mask = _mask(11) if masked else None
    ours = ops.softmax_attention(q, k, v, key_mask, scale=scale)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    assert ours.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(ours, ref, rtol=tol, atol=tol)


# -- the taylor family ----------------------------------------------------------------------------


@pytest.mark.parametrize("factors", [2, 4])
def test_taylor_weights_are_compound_interest_form(factors):
    """a_ij = (1 + s/F)^F with s = scale (P q_i).(P k_j), for the layer's taylor features."""
    config = HLAConfig(kind="hadamard", factors=factors, feature_dim=5, feature_map="taylor")
    layer = _layer(config, seed=12)
    q, k, _ = _qkv(13, magnitude=2.0)
    scale = 0.27
    a = ops.hadamard_weights(layer.features(q, scale), layer.features(k, scale))
    pq = torch.einsum("bhnd,hdr->bhnr", q, layer.proj)
    pk = torch.einsum("bhnd,hdr->bhnr", k, layer.proj)
    s = scale * pq @ pk.transpose(-1, -2)
    expected = (1 + s / factors) ** factors
    assert torch.allclose(a, expected, rtol=1e-12, atol=1e-12)


def test_taylor_with_odd_factors_is_rejected_because_weights_go_negative():
    """F = 3 taylor-style features: the ops still agree, but (1 + s/3)^3 < 0 for s < -3, which is
    why HLAConfig refuses taylor with an odd F."""
    with pytest.raises(ConfigError, match="even"):
        HLAConfig(kind="hadamard", factors=3, feature_map="taylor")
    q, k, v = _qkv(15, magnitude=3.0)
    scale = 1.0 / math.sqrt(D)

    def phi(x):
        y = x * math.sqrt(scale / 3)
        return torch.cat([torch.ones_like(y[..., :1]), y], dim=-1)

    qf, kf = [phi(q)] * 3, [phi(k)] * 3
    a = ops.hadamard_weights(qf, kf)
    s = scale * q @ k.transpose(-1, -2)
    assert torch.allclose(a, (1 + s / 3) ** 3, rtol=1e-12, atol=1e-12)
    assert a.min() < 0
    assert _rel(ops.hadamard_attention(qf, kf, v), ops.hadamard_attention_naive(qf, kf, v)) < 1e-8


def test_taylor_with_identity_projection_approaches_exp():
    """P = identity (r-1 = d, the default init): (1 + s/F)^F -> exp(s), better at F=4 than F=2,
    for the weights and for the normalised attention output against softmax."""
    q, k, v = _qkv(14, magnitude=0.6)
    scale = 1.0 / math.sqrt(D)
    logits = scale * q @ k.transpose(-1, -2)
    assert logits.abs().max() < 2  # the range where (1 + s/F)^F grows monotonically towards exp(s)
    soft = ops.softmax_attention(q, k, v, scale=scale)
    weight_err, out_err = [], []
    for factors in (2, 4):
        layer = HLAAttention(HLAConfig(kind="hadamard", factors=factors, feature_dim=D + 1), H, D).double()
        assert torch.equal(layer.proj, torch.eye(D, dtype=torch.float64).expand(H, D, D))
        qf, kf = layer.features(q, scale), layer.features(k, scale)
        a = ops.hadamard_weights(qf, kf)
        weight_err.append(float(((a.detach() - logits.exp()).abs() / logits.exp()).max()))
        out_err.append(_rel(ops.hadamard_attention(qf, kf, v, eps=0.0), soft))
    assert weight_err[1] < weight_err[0] / 2, weight_err
    assert out_err[1] < out_err[0], out_err
    assert weight_err[1] < 0.2 and out_err[1] < 0.025, (weight_err, out_err)
