"""Hybrid attention (HLA-MATH.md section 4): exact softmax inside a window of the latent token grid,
HLA (or same-state linear) weights outside it, one normaliser.

What a user relies on: the block form equals the quadratic reference (outputs and gradients) for
every window shape, with key masks and text tokens; the window is the one the config names on the
grid; a window covering everything is softmax, in the op and in a whole converted model; masked
keys and padded text stay invisible; nothing overflows when logits are far from 0; the grid comes
from the model's input, and a core without one fails with a message that says so.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hla_convert import ConfigError, HLAAttention, HLAConfig, convert_attention, hla_layers, hla_parameters, revert_attention
from hla_convert import ops
from hla_convert.model.surgery import attention_flops, token_grid

from tiny_models import HUNYUAN_PADDED, forward, other_model, tiny_inputs, tiny_model

B, H, D = 2, 2, 8

# (grid, window, halo, text_len, text_first)
CASES = [
    ((3, 2, 3), (1, 0, 0), (0, 0, 0), 0, True),
    ((5, 2, 2), (2, 0, 0), (1, 0, 0), 0, True),
    ((2, 4, 4), (0, 2, 2), (0, 0, 0), 0, True),
    ((2, 3, 3), (4, 7, 9), (0, 0, 0), 0, True),  # larger than the grid: everything
    ((3, 2, 3), (1, 0, 0), (0, 0, 0), 3, True),  # CogVideoX: text first
    ((5, 2, 2), (2, 0, 0), (1, 0, 0), 3, False),  # HunyuanVideo: text last
    ((3, 4, 5), (2, 3, 2), (1, 1, 0), 2, False),  # 3D tiles with edge blocks and a halo
]
CASE_IDS = ["frame", "chunk2-halo1", "tube2x2", "bigger-than-grid", "frame-text-first", "chunk-text-last", "tiles-halo"]

FAR_CONFIGS = [
    HLAConfig(kind="hybrid", far="hadamard", factors=2, feature_dim=3, feature_map="taylor"),
    HLAConfig(kind="hybrid", far="hadamard", factors=3, feature_dim=3, feature_map="softplus"),
    HLAConfig(kind="hybrid", far="linear", factors=2, feature_dim=2, feature_map="elu"),
]
FAR_IDS = ["hadamard-taylor", "hadamard-softplus-F3", "linear-elu"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(config: HLAConfig, seed: int, dtype=torch.float64) -> HLAAttention:
    layer = HLAAttention(config, H, D).to(dtype)
    g = _gen(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) / math.sqrt(D))
    return layer


def _inputs(n: int, seed: int, magnitude: float = 1.0, dtype=torch.float64):
    g = _gen(seed)
    q = torch.randn(B, H, n, D, generator=g, dtype=dtype) * magnitude
    k = torch.randn(B, H, n, D, generator=g, dtype=dtype) * magnitude
    v = torch.randn(B, H, n, D, generator=g, dtype=dtype)
    return q, k, v


def _mask(n: int, seed: int) -> torch.Tensor:
    m = torch.rand(B, n, generator=_gen(seed)) > 0.3
    m[1, -3:] = False  # trailing padding, the Hunyuan layout
    return m


def _both(layer, q, k, v, case, key_mask, scale=0.35):
    grid, window, halo, text_len, text_first = case
    qf, kf = layer.features(q, scale), layer.features(k, scale)
    args = (q, k, v, qf, kf, scale, layer.log_beta, grid, window, halo, text_len, text_first, key_mask, layer.config.eps)
    return ops.hybrid_attention(*args), ops.hybrid_attention_naive(*args)


def _rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# -- block form == quadratic reference ------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("config", FAR_CONFIGS, ids=FAR_IDS)
def test_block_form_equals_reference(config, case, masked):
    grid, text_len = case[0], case[3]
    n = grid[0] * grid[1] * grid[2] + text_len
    layer = _layer(config, seed=1)
    for seed in range(2):
        q, k, v = _inputs(n, seed)
        key_mask = _mask(n, seed) if masked else None
        eff, ref = _both(layer, q, k, v, case, key_mask)
        assert eff.dtype == torch.float64 and eff.shape == (B, H, n, D)
        assert _rel(eff, ref) < 1e-10


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[6]], ids=["chunk2-halo1", "chunk-text-last", "tiles-halo"])
def test_block_form_gradients_equal_reference(case):
    grid, text_len = case[0], case[3]
    n = grid[0] * grid[1] * grid[2] + text_len
    layer = _layer(FAR_CONFIGS[0], seed=2)
    q, k, v = (t.requires_grad_() for t in _inputs(n, 3))
    key_mask = _mask(n, 3)
    grads = []
    for out in _both(layer, q, k, v, case, key_mask):
        layer.zero_grad()
        g = torch.autograd.grad((out * torch.linspace(-1, 1, D, dtype=out.dtype)).sum(), [q, k, v, layer.log_beta, layer.proj], retain_graph=True)
        grads.append(g)
    for a, b in zip(*grads):
        assert _rel(a, b) < 1e-9


def test_block_form_chunks_over_blocks_like_one_pass(monkeypatch):
    """The per-chunk block loop (what bounds memory on long videos) gives the one-pass result."""
    from hla_convert.ops import hybrid as hybrid_mod

    case = CASES[6]
    n = 3 * 4 * 5 + 2
    layer = _layer(FAR_CONFIGS[1], seed=4)
    q, k, v = _inputs(n, 5)
    one, _ = _both(layer, q, k, v, case, _mask(n, 5))
    monkeypatch.setattr(hybrid_mod, "_BLOCK_BUDGET", 1)  # one block per chunk
    many, _ = _both(layer, q, k, v, case, _mask(n, 5))
    assert _rel(many, one) < 1e-12


# -- the window is the one the config names -----------------------------------------------------------


def test_window_mask_same_frame_and_overlapping_chunks():
    grid = (5, 2, 3)
    frame = torch.arange(30) // 6  # row-major (t, h, w): 6 tokens per frame
    m = ops.window_mask(grid, (1, 0, 0), (0, 0, 0))
    assert torch.equal(m, frame[:, None] == frame[None, :])
    # chunks of 2 frames widened by 1 frame each side: chunk c holds frames 2c..2c+1, sees 2c-1..2c+2
    m = ops.window_mask(grid, (2, 0, 0), (1, 0, 0))
    chunk = frame // 2
    expected = (frame[None, :] >= 2 * chunk[:, None] - 1) & (frame[None, :] <= 2 * chunk[:, None] + 2)
    assert torch.equal(m, expected)


def test_window_mask_tubes_and_text():
    grid = (2, 4, 4)
    t, h, w = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    tile = ((h // 2) * 2 + w // 2).reshape(-1)
    m = ops.window_mask(grid, (0, 2, 2), (0, 0, 0), text_len=3, text_first=True)
    assert m.shape == (35, 35)
    assert m[:3].all() and m[:, :3].all()  # text queries see everything; text keys are seen by all
    assert torch.equal(m[3:, 3:], tile[:, None] == tile[None, :])
    last = ops.window_mask(grid, (0, 2, 2), (0, 0, 0), text_len=3, text_first=False)
    assert last[32:].all() and last[:, 32:].all() and torch.equal(last[:32, :32], m[3:, 3:])


# -- limits: everything = softmax; masks; overflow -----------------------------------------------------


@pytest.mark.parametrize("case", [CASES[3], ((2, 3, 3), (0, 0, 0), (0, 0, 0), 2, False)], ids=["bigger", "zeros-text"])
def test_window_covering_everything_is_softmax(case):
    grid, text_len = case[0], case[3]
    n = grid[0] * grid[1] * grid[2] + text_len
    layer = _layer(FAR_CONFIGS[0], seed=6)
    q, k, v = _inputs(n, 6, magnitude=2.0)
    key_mask = _mask(n, 6)
    eff, _ = _both(layer, q, k, v, case, key_mask)
    sm = ops.softmax_attention(q, k, v, key_mask, 0.35)
    assert _rel(eff, sm) < 1e-5  # eps = 1e-6 against a normaliser >= 1


def test_zero_beta_leaves_windowed_softmax():
    """beta -> 0 leaves windowed softmax: the far part really is added with weight beta."""
    case = CASES[0]
    n = 18
    layer = _layer(FAR_CONFIGS[0], seed=7)
    with torch.no_grad():
        layer.log_beta.fill_(-200.0)
    q, k, v = _inputs(n, 7)
    eff, _ = _both(layer, q, k, v, case, None)
    logits = (q @ k.transpose(-1, -2)) * 0.35
    logits = logits.masked_fill(~ops.window_mask(*case[:3]), float("-inf"))
    windowed = torch.softmax(logits, -1) @ v
    assert _rel(eff, windowed) < 1e-5  # eps = 1e-6 against a normaliser >= 1
    with torch.no_grad():
        layer.log_beta.fill_(0.0)
    eff, _ = _both(layer, q, k, v, case, None)
    assert _rel(eff, windowed) > 1e-2


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["chunk2-halo1", "frame-text-first"])
def test_masked_keys_are_invisible(case):
    grid, text_len = case[0], case[3]
    n = grid[0] * grid[1] * grid[2] + text_len
    layer = _layer(FAR_CONFIGS[1], seed=8)
    q, k, v = _inputs(n, 8)
    key_mask = _mask(n, 8)
    out, _ = _both(layer, q, k, v, case, key_mask)
    g = _gen(9)
    drop = ~key_mask[:, None, :, None]
    k2 = torch.where(drop, 30 * torch.randn(k.shape, generator=g, dtype=k.dtype), k)
    v2 = torch.where(drop, 30 * torch.randn(v.shape, generator=g, dtype=v.dtype), v)
    out2, _ = _both(layer, q, k2, v2, case, key_mask)
    assert _rel(out2, out) < 1e-12
    out3, _ = _both(layer, q, k2, v2, case, None)  # the same change without the mask shows
    assert _rel(out3, out) > 1e-2


@pytest.mark.parametrize("shift", [-300.0, 300.0])
def test_no_overflow_when_logits_are_far_from_zero(shift):
    """Logits all near -300 (the shift floors) or +300 (the window dominates): float32 stays finite and
    agrees with the float64 reference."""
    case = CASES[5]
    n = 5 * 2 * 2 + 3
    layer = _layer(FAR_CONFIGS[0], seed=10)
    q, k, v = _inputs(n, 10, magnitude=0.1)
    # a constant added to every logit: q_i gets an extra coordinate along a shared direction
    q = torch.cat([q, torch.full_like(q[..., :1], shift)], dim=-1)
    k = torch.cat([k, torch.ones_like(k[..., :1])], dim=-1)
    layer64 = HLAAttention(layer.config, H, D + 1).double()
    scale = 1.0
    qf, kf = layer64.features(q, scale), layer64.features(k, scale)
    grid, window, halo, tl, tf = case
    ref = ops.hybrid_attention_naive(q, k, v, qf, kf, scale, layer64.log_beta, grid, window, halo, tl, tf, None)
    f32 = [t.float() for t in (q, k, v)]
    out = ops.hybrid_attention(
        *f32, [f.float() for f in qf], [f.float() for f in kf], scale, layer64.log_beta.float(), grid, window, halo, tl, tf, None
    )
    assert torch.isfinite(out).all()
    assert _rel(out.double(), ref) < 1e-4


@pytest.mark.parametrize("config", FAR_CONFIGS + [HLAConfig(kind="hybrid", far="hadamard", factors=4, feature_dim=3)], ids=FAR_IDS + ["taylor-F4"])
def test_far_weights_are_nonnegative(config):
    layer = _layer(config, seed=11)
    q, k, _ = _inputs(30, 11, magnitude=3.0)
    qf, kf = layer.features(q, 0.35), layer.features(k, 0.35)
    assert ops.hadamard_weights(qf, kf).min() >= 0


# -- config ---------------------------------------------------------------------------------------


def test_config_fields_validate_and_round_trip():
    c = HLAConfig(kind="hybrid", far="linear", window=[2, 0, 0], halo=[1, 0, 0], learn_temperature=True, feature_dim=4)
    assert c.window == (2, 0, 0) and c.halo == (1, 0, 0) and c.feature_map == "elu" and c.state_features == 16
    assert HLAConfig.from_json(c.to_json()) == c
    assert HLAConfig.from_dict({"kind": "hybrid", "window": [0, 8, 8]}).window == (0, 8, 8)
    for kwargs, field in [
        ({"far": "softmax"}, "far"),
        ({"window": (1, 0)}, "window"),
        ({"window": (1, -1, 0)}, "window"),
        ({"halo": "1"}, "halo"),
        ({"learn_temperature": 1}, "learn_temperature"),
        ({"far": "linear", "feature_map": "taylor"}, "feature_map"),
        ({"factors": 3}, "factors"),  # taylor far needs even F
        ({"factors": 1}, "factors"),
        ({"eps": True}, "eps"),  # a bool is an int to Python, not a number to a recipe
        ({"eps": float("inf")}, "eps"),
        ({"eps": 10**400}, "eps"),  # too large for a float
    ]:
        with pytest.raises(ConfigError, match=f"^{field}:"):
            HLAConfig(kind="hybrid", **kwargs)


def test_learn_temperature_parameter_for_every_non_softmax_kind():
    for kind in ("hadamard", "linear", "higher_order", "hybrid"):
        layer = HLAAttention(HLAConfig(kind=kind, feature_dim=3, learn_temperature=True), H, D)
        assert layer.log_temp.shape == (H,) and torch.equal(layer.log_temp, torch.zeros(H))
    assert not list(HLAAttention(HLAConfig(kind="softmax", learn_temperature=True), H, D).parameters())
    # the temperature multiplies the taylor similarity: exp(log_temp) = t gives a_ij = (1 + t s_ij / F)^F
    c = HLAConfig(kind="hadamard", feature_dim=D + 1, learn_temperature=True)
    layer = HLAAttention(c, H, D).double()
    q, k, v = _inputs(10, 12)
    with torch.no_grad():
        layer.log_temp.fill_(math.log(2.0))
    out = layer.student(q, k, v, None, 0.35)
    a = (1 + 2.0 * 0.35 * (q @ k.transpose(-1, -2)) / 2) ** 2
    assert _rel(out, (a @ v) / (a.sum(-1, keepdim=True) + c.eps)) < 1e-10


# -- the grid from the model's input ------------------------------------------------------------------


def _hybrid(window=(1, 0, 0), **kw) -> HLAConfig:
    return HLAConfig(**{"kind": "hybrid", "factors": 2, "feature_dim": 4, "window": window, **kw})


@pytest.mark.parametrize("arch,grid,text", [("wan", (2, 4, 4), (0, True)), ("cogvideox", (2, 4, 4), (4, True)), ("hunyuan", (2, 4, 4), (6, False)), ("ltx", (2, 4, 4), (0, True))])
def test_grid_is_read_from_the_model_input(arch, grid, text):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model=model)
    with torch.no_grad():
        ref = forward(model, inputs)
    convert_attention(model, _hybrid(window=(0, 0, 0)))
    with torch.no_grad():
        out = forward(model, inputs)
    cores = hla_layers(model).values()
    assert all(c.grid == grid and (c.text_len, c.text_first) == (text[0], text[1] if text[0] else c.text_first) for c in cores)
    # W(i) = everything: the converted model is the teacher
    assert float((out - ref).abs().max()) < 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("arch", ["wan", "cogvideox", "hunyuan"])
def test_training_reaches_log_beta(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, model=model)
    model.requires_grad_(False)
    convert_attention(model, _hybrid(learn_temperature=True))
    out = forward(model, inputs)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    params = hla_parameters(model)
    assert any(n.endswith(".hla.log_beta") for n in params) and any(n.endswith(".hla.log_temp") for n in params)
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_hunyuan_padded_text_stays_invisible():
    """Extra padded (masked) text tokens change nothing: the same prompt with 3 more padded tokens."""
    model = tiny_model("hunyuan")
    inputs = tiny_inputs("hunyuan", model=model)
    convert_attention(model, _hybrid(window=(1, 0, 0)))
    with torch.no_grad():
        out = forward(model, inputs)
        extra = 3
        g = _gen(13)
        text = torch.cat([inputs["encoder_hidden_states"], 5 * torch.randn(B, extra, 16, generator=g)], dim=1)
        mask = torch.cat([inputs["encoder_attention_mask"], torch.zeros(B, extra, dtype=torch.long)], dim=1)
        # batch element 1's prompt already ends in padding: put the new pads after it (same layout)
        padded = forward(model, {**inputs, "encoder_hidden_states": text, "encoder_attention_mask": mask})
    assert next(iter(hla_layers(model).values())).text_len == 6 + extra
    assert torch.allclose(padded, out, rtol=0, atol=1e-5)
    assert inputs["encoder_attention_mask"][1, -HUNYUAN_PADDED:].eq(0).all()


def test_adapter_round_trip_restores_the_hybrid(tmp_path):
    from hla_convert.io.adapter import load_adapter, save_adapter

    model = tiny_model("cogvideox")
    base = copy.deepcopy(model)
    inputs = tiny_inputs("cogvideox", model=model)
    config = _hybrid(window=(1, 0, 0), halo=(0, 1, 1), far="linear", feature_dim=3, learn_temperature=True)
    convert_attention(model, config)
    with torch.no_grad():
        for p in hla_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=_gen(14)) * 0.1)
        out = forward(model, inputs)
    save_adapter(model, tmp_path)
    loaded = load_adapter(base, tmp_path)
    assert all(c.config == config for c in hla_layers(loaded).values())
    with torch.no_grad():
        assert torch.equal(forward(loaded, inputs), out)


def test_core_alone_or_wrong_token_count_raises():
    layer = HLAAttention(_hybrid(), H, D)
    q = torch.randn(1, H, 8, D)
    with pytest.raises(RuntimeError, match="needs the latent token grid; run the converted model through its forward"):
        layer.student(q, q, q, None, 0.3)
    layer.grid = (2, 2, 3)
    with pytest.raises(RuntimeError, match="got 8 tokens.*2x2x3 = 12 video tokens"):
        layer.student(q, q, q, None, 0.3)


def test_unknown_architecture_raises_at_forward_and_other_kinds_are_unaffected():
    found = other_model("mochi")
    if found is None:
        pytest.skip("no tiny Mochi in this diffusers")
    model, inputs = found
    base = copy.deepcopy(model)
    convert_attention(model, _hybrid())
    with pytest.raises(RuntimeError, match="MochiTransformer3DModel is not an architecture whose latent token grid"):
        with torch.no_grad():
            model(**inputs)
    # a non-hybrid kind on the same architecture runs: the hook leaves it alone
    convert_attention(base, HLAConfig(kind="hadamard", feature_dim=4))
    with torch.no_grad():
        base(**inputs)


def test_revert_removes_the_grid_hook():
    model = tiny_model("wan")
    hooks = len(model._forward_pre_hooks)
    convert_attention(model, _hybrid(), include=["blocks.0.*"])
    convert_attention(model, _hybrid(), include=["blocks.1.attn1"])  # a second call adds no second hook
    assert len(model._forward_pre_hooks) == hooks + 1
    revert_attention(model)
    assert len(model._forward_pre_hooks) == hooks


def test_token_grid_patch_sizes():
    model = tiny_model("cogvideox")
    x = torch.zeros(1, 3, 4, 8, 6)  # [B, F, C, H, W], spatial patch 2
    grid, text, first = token_grid(model, (), {"hidden_states": x, "encoder_hidden_states": torch.zeros(1, 5, 16)})
    assert (grid, text, first) == ((3, 4, 3), 5, True)


# -- FLOPs ------------------------------------------------------------------------------------------


def test_hybrid_flops():
    grid = (21, 30, 52)  # Wan2.1 480p latent tokens
    n = 21 * 30 * 52
    soft = attention_flops(n, 12, 128, None)
    frame = attention_flops(n, 12, 128, _hybrid(feature_dim=16), grid=grid)
    every = attention_flops(n, 12, 128, _hybrid(window=(0, 0, 0), feature_dim=16), grid=grid)
    hla = attention_flops(n, 12, 128, HLAConfig(kind="hadamard", feature_dim=16))
    assert hla < frame < soft / 5  # one frame of 21 keeps ~1/21 of the softmax work
    assert every > soft  # a window of everything is softmax plus the far part's overhead
