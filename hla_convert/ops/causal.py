"""Causal and block-causal second-order linear attention (HLA-MATH.md section 2).

Time. Token t has the time p(t) = t // block_size (block_size = 1: token-level causal). A query
sees the keys whose time is <= its own: with block_size = tokens per frame block, the tokens of
one block see each other and every earlier block (block-causal video, SkyReels-V2 diffusion
forcing). Decay gamma in (0, 1] (a float or one per head, [H]) ages a token by gamma per step of
time.

The masked second-order weights (Zhang, Qin, Wang, Gu, Theorem 3.1; decay as defined here):

    a_tj = [p_j <= p_t] sum_{i: p_i <= p_j} gamma^(2 p_t - p_i - p_j) (q_t.k_i)(k_i.q_j)
    o_t  = sum_j a_tj v_j / (sum_j a_tj + eps)          (normalize=True)
    o_t  = sum_j a_tj v_j / P_t                          (normalize=False)

P_t = the number of kept pairs (i, j) with p_i <= p_j <= p_t (>= 1): the causal counterpart of
the bidirectional form's N^2, so the unnormalised operator stays O(1) without decay. The pairs
i <= j are what the summaries S, C, G of the paper leave after G removes the pairs j < i. As
matrices (L the block-causal 0/1 mask, D = L * gamma^(p_t - p_j)):

    A = D (.) [ (D (.) Q K^T) (L (.) Q K^T)^T ]

Serial recurrence (per unit of time; kk = sum of k k^T over the step's tokens, and so on):

    S_t = g S + kk,  C_t = g C + q [v, 1]^T,  G_t = g^2 G + g kk C_{t-1}
    o_t = q_t^T (S_t C_t - G_t), numerator and normaliser in one [r, dv + 1] product

(m and h of the paper are the last columns of C and G.) The chunk-parallel form scans chunk
summaries (S, C, X = S C - G, g = gamma^(time steps)) with the semidirect-product combine

    (S, C, X, g)_AB = (g_B S_A + S_B,  g_B C_A + C_B,  g_B^2 X_A + X_B + g_B S_A C_B,  g_A g_B)

which is the paper's (G_A + G_B + S_B C_A) written for X, so nothing cancels; inside a chunk the
quadratic form is exact. Key masks (bool [B, N], True = keep): a masked token is in no sum (its k
in S, its q and v in C); it still takes a step of time.

AHLA (asymmetric, A = Q (K^T Q)(K^T V) masked: a_tj = sum_{p_j <= p_i <= p_t} (q_t.k_i)(q_i.k_j))
and third order (a_tj = sum_{p_l <= p_t} sum_{p_i, p_j <= p_l} (q_t.k_i)(q_l.k_i)(q_l.k_j)) are
reference forms: quadratic and serial, no decay (normalize=False returns their raw sums).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import compute_dtype, key_weights

DEFAULT_CHUNK = 64


# -- shared pieces --------------------------------------------------------------------------------


def block_causal_mask(n: int, block_size: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [N, N], [t, j] True where p_j <= p_t, p = token // block_size."""
    p = torch.arange(n, device=device) // block_size
    return p[None, :] <= p[:, None]


def _check_block(block_size: int) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1 (tokens per causal block), got {block_size!r}")
    return block_size


def _log_decay(decay: float | torch.Tensor | None, heads: int, dt: torch.dtype, device) -> torch.Tensor:
    """log gamma as [H] (zeros for no decay). gamma must lie in (0, 1]."""
    if decay is None:
        return torch.zeros(heads, dtype=dt, device=device)
    g = torch.as_tensor(decay, dtype=dt, device=device)
    if g.dim() == 0:
        g = g.expand(heads)
    if g.shape != (heads,):
        raise ValueError(f"decay must be a float or one value per head [H] = [{heads}], got shape {list(g.shape)}")
    if bool(((g <= 0) | (g > 1)).any()):
        raise ValueError("decay gamma must lie in (0, 1]")
    return g.log()


def _pow(log_g: torch.Tensor, exponent: torch.Tensor, lead: int) -> torch.Tensor:
    """gamma^exponent as [H, *exponent.shape] placed after `lead` singleton dims."""
    e = log_g.reshape((-1,) + (1,) * exponent.dim()) * exponent
    return e.exp().reshape((1,) * lead + tuple(e.shape))


def pair_counts(n: int, block_size: int, key_mask: torch.Tensor | None, batch: int, dt, device) -> torch.Tensor:
    """P_t = #kept pairs (i, j) with p_i <= p_j <= p_t, clamped to >= 1: [B, 1, N, 1]."""
    w = torch.ones(batch, n, dtype=dt, device=device) if key_mask is None else key_mask.to(dt)
    p = torch.arange(n, device=device) // block_size
    last = ((p + 1) * block_size - 1).clamp(max=n - 1)  # the last token of each token's block
    kept_upto = w.cumsum(-1)[:, last]  # kept tokens with p_i <= p_j
    pairs = (w * kept_upto).cumsum(-1)[:, last]
    return pairs.clamp(min=1)[:, None, :, None]


def _masked(q, k, v, key_mask, dt):
    """(q, k*w, q*w, [v, 1]*w) in dt: the readout query and the key-side tensors."""
    q, k = q.to(dt), k.to(dt)
    v1 = torch.cat([v.to(dt), torch.ones_like(v[..., :1], dtype=dt)], dim=-1)
    w = key_weights(key_mask, v1)
    if w is None:
        return q, k, q, v1
    return q, k * w, q * w, v1 * w


def _finish(nd: torch.Tensor, normalize: bool, eps: float, pairs_fn) -> torch.Tensor:
    if normalize:
        return nd[..., :-1] / (nd[..., -1:] + eps)
    return nd[..., :-1] / pairs_fn()


def _check_qkv(q, k, v) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, H, N, r] and v [B, H, N, dv] alike, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")


# -- second order: naive, serial, chunked ---------------------------------------------------------


def higher_order_causal_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    decay: float | torch.Tensor | None = None,
    block_size: int = 1,
) -> torch.Tensor:
    """Explicit masked weights A = D (.) [(D (.) Q K_m^T)(L (.) Q_m K_m^T)^T]: [B, H, N, N]."""
    dt = compute_dtype(q, k)
    n = q.shape[2]
    q, km, qm, _ = _masked(q, k, q[..., :1], key_mask, dt)
    p = torch.arange(n, device=q.device) // _check_block(block_size)
    lmask = (p[None, :] <= p[:, None]).to(dt)
    age = (p[:, None] - p[None, :]).clamp(min=0).to(dt)
    d = lmask * _pow(_log_decay(decay, q.shape[1], dt, q.device), age, 1)
    b1 = d * (q @ km.transpose(-1, -2))  # [t, i]
    b2 = lmask * (qm @ km.transpose(-1, -2))  # [j, i], p_i <= p_j
    return d * (b1 @ b2.transpose(-1, -2))


def higher_order_causal_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    decay: float | torch.Tensor | None = None,
    block_size: int = 1,
) -> torch.Tensor:
    """Quadratic reference with the explicit masked weights. q, k [B, H, N, r]; v [B, H, N, dv]."""
    _check_qkv(q, k, v)
    dt = compute_dtype(q, k, v)
    a = higher_order_causal_weights(q, k, key_mask, decay, block_size)
    nd = torch.cat([a @ v.to(dt), a.sum(-1, keepdim=True)], dim=-1)
    pairs = lambda: pair_counts(q.shape[2], block_size, key_mask, q.shape[0], dt, q.device)  # noqa: E731
    return _finish(nd, normalize, eps, pairs).to(v.dtype)


class HigherOrderState(NamedTuple):
    """The streaming state of causal 2nd-order attention after some blocks (compute dtype).

    S [B, H, r, r], C [B, H, r, dv + 1], X = S C - G [B, H, r, dv + 1], kept [B] (kept tokens so
    far), pairs [B] (kept pairs i <= j so far, for normalize=False).
    """

    S: torch.Tensor
    C: torch.Tensor
    X: torch.Tensor
    kept: torch.Tensor
    pairs: torch.Tensor


def higher_order_stream_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: HigherOrderState | None = None,
    key_mask: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    decay: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, HigherOrderState]:
    """One block of new tokens (they see each other and every earlier block) -> (outputs, state).

    q, k [B, H, n, r], v [B, H, n, dv], key_mask bool [B, n]. State size and cost do not depend on
    how many blocks came before. Feeding the blocks of a sequence one by one gives the outputs of
    higher_order_attention(..., causal=True, block_size=n) on the whole sequence.
    """
    _check_qkv(q, k, v)
    dt = compute_dtype(q, k, v) if state is None else state.S.dtype
    b, h, n, r = q.shape
    qr, km, qm, v1 = _masked(q, k, v, key_mask, dt)
    if state is None:
        z = torch.zeros(b, dtype=dt, device=q.device)
        state = HigherOrderState(
            torch.zeros(b, h, r, r, dtype=dt, device=q.device),
            torch.zeros(b, h, r, v1.shape[-1], dtype=dt, device=q.device),
            torch.zeros(b, h, r, v1.shape[-1], dtype=dt, device=q.device),
            z,
            z,
        )
    lg = _log_decay(decay, h, dt, q.device)
    g = lg.exp()[None, :, None, None]
    kk = km.transpose(-1, -2) @ km
    cb = qm.transpose(-1, -2) @ v1
    # X counts pairs p_i <= p_j: old X ages twice, old keys pair with the new block's (q, v)
    x = g * g * state.X + g * (state.S @ cb) + kk @ cb
    s = g * state.S + kk
    c = g * state.C + cb
    kept_b = torch.full((b,), float(n), dtype=dt, device=q.device) if key_mask is None else key_mask.to(dt).sum(-1)
    kept = state.kept + kept_b
    pairs = state.pairs + kept_b * kept
    nd = qr @ x
    out = _finish(nd, normalize, eps, lambda: pairs.clamp(min=1)[:, None, None, None])
    return out.to(v.dtype), HigherOrderState(s, c, x, kept, pairs)


def higher_order_causal_serial(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    decay: float | torch.Tensor | None = None,
    block_size: int = 1,
) -> torch.Tensor:
    """The paper's serial recurrence (S, C, m, G, h), one step of time (block) at a time.

    Written in the G form of HLA-MATH.md (G_t = g^2 G + g kk C_{t-1}); m and h are the last
    columns of C and G. A reference: N / block_size Python steps.
    """
    _check_qkv(q, k, v)
    dt = compute_dtype(q, k, v)
    b, h, n, r = q.shape
    bs = _check_block(block_size)
    qr, km, qm, v1 = _masked(q, k, v, key_mask, dt)
    lg = _log_decay(decay, h, dt, q.device)
    g = lg.exp()[None, :, None, None]
    s = torch.zeros(b, h, r, r, dtype=dt, device=q.device)
    c = torch.zeros(b, h, r, v1.shape[-1], dtype=dt, device=q.device)
    gg = torch.zeros_like(c)
    outs = []
    for t0 in range(0, n, bs):
        sl = slice(t0, t0 + bs)
        kk = km[:, :, sl].transpose(-1, -2) @ km[:, :, sl]
        gg = g * g * gg + g * (kk @ c)  # uses C_{t-1}
        s = g * s + kk
        c = g * c + qm[:, :, sl].transpose(-1, -2) @ v1[:, :, sl]
        outs.append(qr[:, :, sl] @ (s @ c - gg))
    nd = torch.cat(outs, dim=2)
    pairs = lambda: pair_counts(n, bs, key_mask, b, dt, q.device)  # noqa: E731
    return _finish(nd, normalize, eps, pairs).to(v.dtype)


def _combine(a, b):
    """Semidirect-product combine of chunk summaries (S, C, X, g): a before b."""
    sa, ca, xa, ga = a
    sb, cb, xb, gb = b
    return (gb * sa + sb, gb * ca + cb, gb * gb * xa + xb + gb * (sa @ cb), ga * gb)


def _exclusive_scan(summ):
    """Hillis-Steele scan over the chunk axis (dim 2) with _combine; then shifted: prefix before each chunk."""
    s, c, x, g = summ
    step = 1
    nc = s.shape[2]
    while step < nc:
        prev = tuple(t[:, :, :-step] for t in (s, c, x, g))
        cur = tuple(t[:, :, step:] for t in (s, c, x, g))
        new = _combine(prev, cur)
        s, c, x, g = (torch.cat([t[:, :, :step], u], dim=2) for t, u in zip((s, c, x, g), new))
        step *= 2

    def shift(t):
        return torch.cat([torch.zeros_like(t[:, :, :1]), t[:, :, :-1]], dim=2)

    return shift(s), shift(c), shift(x)


def higher_order_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    decay: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    block_size: int = 1,
) -> torch.Tensor:
    """Chunk-parallel form: exact quadratic form inside each chunk, scanned summaries across chunks.

    q, k [B, H, N, r]; v [B, H, N, dv]. chunk_size (default 64) is rounded up to whole blocks;
    N need not be a multiple of it. Cost O(N c (c + r) + N r dv) per head.
    """
    _check_qkv(q, k, v)
    dt = compute_dtype(q, k, v)
    b, h, n, r = q.shape
    bs = _check_block(block_size)
    cs = chunk_size or DEFAULT_CHUNK
    if not isinstance(cs, int) or cs < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    cs = -(-cs // bs) * bs
    qr, km, qm, v1 = _masked(q, k, v, key_mask, dt)
    nc = -(-n // cs)
    pad = nc * cs - n
    # padding tokens come after every real one and carry zero k, q and v: they change nothing before
    qr, km, qm, v1 = (torch.nn.functional.pad(t, (0, 0, 0, pad)).unflatten(2, (nc, cs)) for t in (qr, km, qm, v1))
    lg = _log_decay(decay, h, dt, q.device)
    p = torch.arange(cs, device=q.device) // bs  # local time inside a chunk (chunks start on a block)
    lmask = (p[None, :] <= p[:, None]).to(dt)
    d = lmask * _pow(lg, (p[:, None] - p[None, :]).clamp(min=0).to(dt), 1)[:, :, None]  # [1, H, 1, c, c]
    lmask = lmask[None, None, None]
    steps = int(p[-1]) + 1  # time steps per chunk
    qk_ri = qr @ km.transpose(-1, -2)  # [B, H, nc, c(t), c(i)]
    qk_ji = qm @ km.transpose(-1, -2)  # [B, H, nc, c(j), c(i)]
    a_loc = d * ((d * qk_ri) @ (lmask * qk_ji).transpose(-1, -2))
    # chunk summaries aged to the chunk's last time step
    e = _pow(lg, (steps - 1 - p).to(dt), 1)[..., None, :, None]  # [1, H, 1, c, 1] or scalar
    s_c = (km * e).transpose(-1, -2) @ km
    c_c = (qm * e).transpose(-1, -2) @ v1
    w = (lmask * qk_ji).transpose(-1, -2) * e * e.transpose(-1, -2)  # [i, j]: e_i e_j (k_i.q_j), p_i <= p_j
    x_c = km.transpose(-1, -2) @ (w @ v1)
    g_c = (lg * steps).exp().reshape(1, h, 1, 1, 1).expand(b, h, nc, 1, 1)
    s_p, c_p, x_p = _exclusive_scan((s_c, c_c, x_c, g_c))
    # o = f^2 q X_P + f [D (.) (q S_P q_m^T)] v1 + A_loc v1, f = gamma^(local time + 1)
    f = _pow(lg, (p + 1).to(dt), 1)[..., None, :, None]
    cross = d * ((qr @ s_p) @ qm.transpose(-1, -2))
    nd = f * f * (qr @ x_p) + (f * cross + a_loc) @ v1
    nd = nd.flatten(2, 3)[:, :, :n]
    pairs = lambda: pair_counts(n, bs, key_mask, b, dt, q.device)  # noqa: E731
    return _finish(nd, normalize, eps, pairs).to(v.dtype)


# -- reference forms: AHLA and third order --------------------------------------------------------


def ahla_causal_naive(q, k, v, key_mask=None, normalize=True, eps=1e-6, block_size=1):
    """Asymmetric HLA, masked: A = (L (.) Q K_m^T)(L (.) Q_m K_m^T). Quadratic reference."""
    _check_qkv(q, k, v)
    dt = compute_dtype(q, k, v)
    qr, km, qm, v1 = _masked(q, k, v, key_mask, dt)
    lmask = block_causal_mask(q.shape[2], _check_block(block_size), q.device).to(dt)
    a = (lmask * (qr @ km.transpose(-1, -2))) @ (lmask * (qm @ km.transpose(-1, -2)))
    nd = a @ v1
    return _finish(nd, normalize, eps, lambda: 1.0).to(v.dtype)


def ahla_causal_serial(q, k, v, key_mask=None, normalize=True, eps=1e-6, block_size=1):
    """AHLA recurrence: P_t = P + k [v,1]^T (kept), E_t = E + k q^T P_t, o_t = q_t^T E_t."""
    _check_qkv(q, k, v)
    dt = compute_dtype(q, k, v)
    b, h, n, r = q.shape
    bs = _check_block(block_size)
    qr, km, qm, v1 = _masked(q, k, v, key_mask, dt)
    pm = torch.zeros(b, h, r, v1.shape[-1], dtype=dt, device=q.device)
    em = torch.zeros_like(pm)
    outs = []
    for t0 in range(0, n, bs):
        sl = slice(t0, t0 + bs)
        pm = pm + km[:, :, sl].transpose(-1, -2) @ v1[:, :, sl]
        em = em + km[:, :, sl].transpose(-1, -2) @ (qm[:, :, sl] @ pm)
        outs.append(qr[:, :, sl] @ em)
    nd = torch.cat(outs, dim=2)
    return _finish(nd, normalize, eps, lambda: 1.0).to(v.dtype)


def third_order_causal_naive(q, k, v, key_mask=None, normalize=True, eps=1e-6, block_size=1):
    """Third order, masked: A = [L (.) (Q K_m^T B^T)] B, B = L (.) Q_m K_m^T. Quadratic reference."""
    _check_qkv(q, k, v)
    dt = compute_dtype(q, k, v)
    qr, km, qm, v1 = _masked(q, k, v, key_mask, dt)
    lmask = block_causal_mask(q.shape[2], _check_block(block_size), q.device).to(dt)
    bm = lmask * (qm @ km.transpose(-1, -2))  # [l, j]
    m2 = lmask * ((qr @ km.transpose(-1, -2)) @ bm.transpose(-1, -2))  # [t, l]: sum_{p_i <= p_l}
    nd = (m2 @ bm) @ v1
    return _finish(nd, normalize, eps, lambda: 1.0).to(v.dtype)


def third_order_causal_serial(q, k, v, key_mask=None, normalize=True, eps=1e-6, block_size=1):
    """Third-order recurrence: S_t = S + k k^T, P_t = P + k [v,1]^T, Y_t = Y + S_t q q^T P_t, o_t = q_t^T Y_t."""
    _check_qkv(q, k, v)
    dt = compute_dtype(q, k, v)
    b, h, n, r = q.shape
    bs = _check_block(block_size)
    qr, km, qm, v1 = _masked(q, k, v, key_mask, dt)
    s = torch.zeros(b, h, r, r, dtype=dt, device=q.device)
    pm = torch.zeros(b, h, r, v1.shape[-1], dtype=dt, device=q.device)
    y = torch.zeros_like(pm)
    outs = []
    for t0 in range(0, n, bs):
        sl = slice(t0, t0 + bs)
        s = s + km[:, :, sl].transpose(-1, -2) @ km[:, :, sl]
        pm = pm + km[:, :, sl].transpose(-1, -2) @ v1[:, :, sl]
        y = y + s @ (qm[:, :, sl].transpose(-1, -2) @ (qm[:, :, sl] @ pm))
        outs.append(qr[:, :, sl] @ y)
    nd = torch.cat(outs, dim=2)
    return _finish(nd, normalize, eps, lambda: 1.0).to(v.dtype)
