"""Feature maps and the attention core that owns the learnable HLA parameters.

An `HLAAttention` replaces the softmax core of one diffusers attention module. It lives at
`<attention module>.hla`, so its parameters have stable state_dict keys:

    <module>.hla.proj            [H, d, r-1]     hadamard / taylor:  phi(x) = [1, c * x P]
    <module>.hla.weight          [F, H, d, r]    hadamard / softplus: phi_f(x) = softplus(x W_f + b_f)
    <module>.hla.bias            [F, H, r]
    <module>.hla.weight          [1, H, d, m]    linear (m = r**F) and higher_order (m = r):
    <module>.hla.bias            [1, H, m]       softplus(x W + b) or elu(x W + b) + 1
    <module>.hla.log_beta        [H]             hybrid: the far part's weight beta = exp(log_beta)
    <module>.hla.log_temp        [H]             learn_temperature: queries enter the maps times exp(log_temp)

A hybrid layer owns its far kind's feature-map parameters under the same keys. It also needs the
latent token grid, which surgery's forward pre-hook on the transformer sets on every core
(`grid`, `text_len`, `text_first`) from the model's input.

The same q/k/v can be attended by the teacher (the model's own softmax call, untouched), the
student (HLA), or both in one pass (`mode`), which is how one copy of the weights serves
distillation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .config import HLAConfig

MODES = ("student", "teacher", "both")


def _kernels():
    """The Triton kernels module, or None where Triton or the kernels cannot be imported."""
    try:
        import hla_kernels
    except Exception:  # noqa: BLE001 - no Triton (macOS, Windows) means the reference path
        return None
    return hla_kernels if hasattr(hla_kernels, "supports") else None


@dataclass(frozen=True)
class AttentionBackend:
    """One row of the student dispatch table (as diffusers' _AttentionBackendRegistry keeps one).

    The callables take the layer and the core's inputs: q, k [B, H, N, d], v [B, H, N, dv], the
    feature lists qf, kf (F tensors [B, H, N, r]; one [B, H, N, m] for linear / higher_order),
    km (key_mask) bool [B, N] or None, the softmax scale, and block (tokens per causal block,
    None = bidirectional).

    reference(layer, q, k, v, qf, kf, km, scale, block): the torch op (any device, any shape).
    kernel(kern, layer, q, k, v, qk, kk, km, scale, block) and supports(kern, layer, q, k, v, qk,
    kk, block): the hla_kernels entry point and its check, `kern` the hla_kernels module (looked up
    per call, so a missing or patched module is seen), qk, kk the features in v's dtype; None: no
    kernel. applies(config): whether the kernel computes this config's attention at all.
    """

    reference: Callable[..., torch.Tensor]
    kernel: Callable[..., torch.Tensor] | None = None
    supports: Callable[..., bool] | None = None
    applies: Callable[[HLAConfig], bool] = lambda config: True


def _hybrid_reference(layer, q, k, v, qf, kf, km, scale, block):
    c = layer.config
    # far linear: one [B, H, N, r**F] feature per side, which the op takes as a 1-factor product
    return ops.hybrid_attention(
        q, k, v, qf, kf, scale, layer.log_beta, layer.grid, c.window_on(layer.grid), c.halo, layer.text_len, layer.text_first, km, c.eps
    )


def _hybrid_kernel(kern, layer, q, k, v, qk, kk, km, scale, block):
    c = layer.config
    return kern.hybrid_attention(
        q, k, v, qk, kk, scale, layer.log_beta, layer.grid, c.window_on(layer.grid), c.halo, layer.text_len, layer.text_first, km, c.eps
    )


#: (kind, causal) -> how the student runs; causal: the model's softmax call was (block-)causal.
BACKENDS: dict[tuple[str, bool], AttentionBackend] = {
    ("hadamard", False): AttentionBackend(
        reference=lambda layer, q, k, v, qf, kf, km, scale, block: ops.hadamard_attention(qf, kf, v, km, layer.config.eps),
        kernel=lambda kern, layer, q, k, v, qk, kk, km, scale, block: kern.hadamard_attention(qk, kk, v, km, layer.config.eps),
        supports=lambda kern, layer, q, k, v, qk, kk, block: kern.supports(qk, kk, v),
    ),
    ("hadamard", True): AttentionBackend(
        reference=lambda layer, q, k, v, qf, kf, km, scale, block: ops.hadamard_attention(
            qf, kf, v, km, layer.config.eps, causal=True, block_size=block
        ),
        kernel=lambda kern, layer, q, k, v, qk, kk, km, scale, block: kern.causal_hadamard_attention(
            qk, kk, v, km, layer.config.eps, block
        ),
        supports=lambda kern, layer, q, k, v, qk, kk, block: kern.causal_supports(qk, kk, v, block),
    ),
    ("linear", False): AttentionBackend(
        reference=lambda layer, q, k, v, qf, kf, km, scale, block: ops.linear_attention(qf[0], kf[0], v, km, layer.config.eps),
    ),
    # one factor of width r**F: the causal Hadamard op with F = 1
    ("linear", True): AttentionBackend(
        reference=lambda layer, q, k, v, qf, kf, km, scale, block: ops.hadamard_attention(
            qf, kf, v, km, layer.config.eps, causal=True, block_size=block
        ),
    ),
    ("higher_order", False): AttentionBackend(
        reference=lambda layer, q, k, v, qf, kf, km, scale, block: ops.higher_order_attention(
            qf[0], kf[0], v, km, layer.config.normalize, layer.config.eps
        ),
    ),
    ("higher_order", True): AttentionBackend(
        reference=lambda layer, q, k, v, qf, kf, km, scale, block: ops.higher_order_attention(
            qf[0], kf[0], v, km, layer.config.normalize, layer.config.eps, causal=True, block_size=block
        ),
        kernel=lambda kern, layer, q, k, v, qk, kk, km, scale, block: kern.causal_second_order_attention(
            qk[0], kk[0], v, km, layer.config.eps, block
        ),
        supports=lambda kern, layer, q, k, v, qk, kk, block: kern.second_order_supports(qk[0], kk[0], v, block),
        applies=lambda config: config.normalize,
    ),
    ("hybrid", False): AttentionBackend(
        reference=_hybrid_reference,
        kernel=_hybrid_kernel,
        supports=lambda kern, layer, q, k, v, qk, kk, block: kern.hybrid_supports(
            q, k, v, qk, kk, layer.grid, layer.config.window_on(layer.grid), layer.config.halo, layer.text_len
        ),
        applies=lambda config: config.far == "hadamard",
    ),
    # the causal block is the softmax window: the teacher's own visibility rule
    ("hybrid", True): AttentionBackend(
        reference=lambda layer, q, k, v, qf, kf, km, scale, block: ops.hybrid_block_causal(
            q, k, v, qf, kf, scale, layer.log_beta, block, km, layer.config.eps
        ),
    ),
}


class HLAAttention(nn.Module):
    """The attention core of one converted layer: q, k [B, H, N, d], v [B, H, N, dv] -> [B, H, N, dv]."""

    def __init__(self, config: HLAConfig, num_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.mode = "student"
        # Filled in "both" mode: (teacher output, student output) of the last call, for stage 1.
        self.last_pair: tuple[torch.Tensor, torch.Tensor] | None = None
        # When set to a list, each call appends (q, k) token samples [M, H, d] for initialisation.
        self.sample_sink: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.sample_tokens = 256
        self.calls = 0
        # The latent token grid (frames, height, width) of the current forward, set by surgery's
        # pre-hook on the transformer; text_len tokens of text before (text_first) or after it.
        # grid_error says why there is no grid (an architecture whose input the hook cannot read).
        self.grid: tuple[int, int, int] | None = None
        self.text_len = 0
        self.text_first = True
        self.grid_error: str | None = None
        # Set by hla_convert.model.streaming.BlockStream: this layer's committed and pending stream state.
        self.stream = None
        kind, r, fac = config.feature_kind, config.feature_dim, config.factors
        if kind == "softmax":
            return
        if config.kind == "hybrid":
            self.log_beta = nn.Parameter(torch.zeros(num_heads))
        if config.learn_temperature:
            self.log_temp = nn.Parameter(torch.zeros(num_heads))
        if kind == "hadamard" and config.feature_map == "taylor":
            proj = torch.zeros(num_heads, head_dim, r - 1)
            eye = torch.eye(head_dim, r - 1)
            proj.copy_(eye.expand(num_heads, -1, -1))
            self.proj = nn.Parameter(proj)
            return
        groups = fac if kind == "hadamard" else 1
        width = r**fac if kind == "linear" else r
        # seeded: two conversions of the same base start from the same weights
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(groups, num_heads, head_dim, width, generator=gen) / math.sqrt(head_dim)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(groups, num_heads, width))

    def extra_repr(self) -> str:
        c = self.config
        if c.kind == "hybrid":
            return f"kind=hybrid, far={c.far}, {c.window_words()}, halo={c.halo}, factors={c.factors}, feature_dim={c.feature_dim}, feature_map={c.feature_map}, heads={self.num_heads}, head_dim={self.head_dim}"
        return f"kind={c.kind}, factors={c.factors}, feature_dim={c.feature_dim}, feature_map={c.feature_map}, heads={self.num_heads}, head_dim={self.head_dim}"

    # -- feature maps ---------------------------------------------------------------------------
    def features(self, x: torch.Tensor, scale: float) -> list[torch.Tensor]:
        """x [B, H, N, d] -> one [B, H, N, width] feature tensor per factor (positive where it must be)."""
        c = self.config
        # Half-precision activations keep their dtype (tensor-core GEMMs, no float32 copy of x; the
        # float32 parameters receive float32 gradients through the cast), as autocast would do.
        dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else next(self.parameters()).dtype
        if c.feature_kind == "hadamard" and c.feature_map == "taylor":
            # phi = [1, c * x P] from one GEMM that writes it whole: the scale folded into P
            # ([H, d, r-1], small) and a zero first column there, set to 1 in place. The same values
            # as (x @ P) * c with a ones column cat in front, without the two passes over
            # [B, H, N, r] that the multiply and the cat made (benchmarks/profile_block.py).
            w = F.pad(self.proj * math.sqrt(scale / c.factors), (1, 0)).to(dt)  # [H, d, r]
            phi = torch.matmul(x.to(dt), w)
            phi[..., 0] = 1.0  # the matmul's backward needs x and w, not its output: in place is safe
            return [phi] * c.factors
        groups, _, _, width = self.weight.shape
        # all factors in one batched GEMM over (B, H): x [B, H, N, d] @ [H, d, F*r]; no copy of x
        w = self.weight.to(dt).permute(1, 2, 0, 3).reshape(self.num_heads, self.head_dim, groups * width)
        y = torch.matmul(x.to(dt), w) + self.bias.to(dt).transpose(0, 1).reshape(self.num_heads, 1, groups * width)
        if c.feature_map == "softplus":
            phi = F.softplus(y)
        else:  # elu(y) + 1, written as exp(y) below 0: F.elu(y) + 1 cancels to exactly 0 for y < -17 in float32
            phi = torch.where(y > 0, y + 1.0, torch.exp(y.clamp(max=0.0)))
        return list(phi.split(width, dim=-1))  # [B, H, N, r] views, last dim contiguous

    # -- the cores ------------------------------------------------------------------------------
    def student(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
        scale: float,
        causal_block: int | None = None,
    ) -> torch.Tensor:
        """causal_block: None = bidirectional; s = block-causal with s tokens per block (1 = causal)."""
        c = self.config
        qt = q
        if c.learn_temperature:
            # scaling the queries scales the similarity the feature maps see (taylor: exactly q.k)
            qt = q * self.log_temp.exp().to(q.dtype)[None, :, None, None]
        qf, kf = self.features(qt, scale), self.features(k, scale)
        if self.stream is not None:
            return self.stream.attend(self, q, k, v, qf, kf, key_mask, scale, causal_block)  # model.streaming
        if c.kind == "hybrid":
            if causal_block is None:
                self._check_grid(q)
            elif self.text_len:
                # the causal block is the softmax window here: the teacher's own visibility rule
                raise RuntimeError("block-causal hybrid attention with text tokens in the same sequence is not supported")
        backend = BACKENDS.get((c.kind, causal_block is not None))
        if backend is None:
            raise AssertionError(f"no student for kind {c.kind}")
        kern = _kernels() if q.is_cuda and backend.kernel is not None and backend.applies(c) else None
        if kern is not None:
            # the kernels take features in the activations' dtype (bf16 tensor cores), fp32 inside
            qk, kk = [f.to(v.dtype) for f in qf], [f.to(v.dtype) for f in kf]
            if backend.supports(kern, self, q, k, v, qk, kk, causal_block):
                return backend.kernel(kern, self, q, k, v, qk, kk, key_mask, scale, causal_block)
        return backend.reference(self, q, k, v, qf, kf, key_mask, scale, causal_block)

    def _check_grid(self, q: torch.Tensor) -> None:
        """The hybrid window needs the latent grid of this forward, and it must describe q's tokens."""
        if self.grid is None:
            why = f" ({self.grid_error})" if self.grid_error else ""
            raise RuntimeError(
                "hybrid attention needs the latent token grid; run the converted model through its forward, "
                f"not the core alone{why}"
            )
        t, h, w = self.grid
        if t * h * w + self.text_len != q.shape[2]:
            raise RuntimeError(
                f"hybrid attention got {q.shape[2]} tokens, but the model's input makes a latent grid of "
                f"{t}x{h}x{w} = {t * h * w} video tokens + {self.text_len} text tokens; the attention "
                "does not see the tokens the grid describes"
            )

    def attend(
        self,
        teacher: Callable[[], torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
        scale: float | None,
        causal_block: int | None = None,
    ) -> torch.Tensor:
        """Route one softmax call. `teacher()` runs the model's own softmax call unchanged.

        q, k, v: [B, H, N, d]; key_mask bool [B, N] or None; causal_block: tokens per causal block
        when the call was block-causal (see student). Returns [B, H, N, dv] in v's dtype.
        """
        if not torch.compiler.is_compiling():
            # a compiled graph would guard on this int and recompile at every call (one more
            # graph per call until dynamo gives up): compiled calls are not counted
            self.calls += 1
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        if self.sample_sink is not None:
            self.sample_sink.append(_sample_tokens(q, k, key_mask, self.sample_tokens))
        if self.config.kind == "softmax" or self.mode == "teacher":
            return teacher()
        if self.mode == "student":
            return self.student(q, k, v, key_mask, scale, causal_block)
        with torch.no_grad():
            target = teacher()
        pred = self.student(q, k, v, key_mask, scale, causal_block)
        self.last_pair = (target, pred)
        # The teacher's output flows on, so every layer sees the teacher's inputs in one pass.
        return target

    # -- data-driven initialisation ------------------------------------------------------------
    @torch.no_grad()
    def initialize_from_samples(self, q: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Set feature maps from teacher q/k samples [M, H, d] (HLA-MATH.md: principal directions).

        taylor: P = the leading r-1 principal directions of the uncentred q and k, so that
        (P q).(P k) keeps the largest part of q.k. softplus/elu: each factor's map starts on that
        subspace (a different rotation per factor), scaled to the samples' spread.
        """
        c = self.config
        if c.kind == "softmax":
            return
        x = torch.cat([q, k], dim=0).to(torch.float64).transpose(0, 1)  # [H, M, d]
        # eigenvectors of the uncentred second moment, largest first
        cov = x.transpose(1, 2) @ x / x.shape[1]
        evals, evecs = torch.linalg.eigh(cov)
        evecs = evecs.flip(-1)
        if c.feature_kind == "hadamard" and c.feature_map == "taylor":
            r1 = self.proj.shape[-1]
            basis = evecs[..., :r1]
            if r1 > self.head_dim:  # more features than dims: pad with zero directions
                basis = F.pad(basis, (0, r1 - basis.shape[-1]))
            self.proj.copy_(basis.to(self.proj.dtype))
            return
        groups, heads, d, width = self.weight.shape
        spread = evals.flip(-1).clamp_min(1e-12).sqrt()[..., : min(d, width)].mean(-1)  # [H]
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        for gi in range(groups):
            # the generator draws on the CPU (a CPU generator cannot feed CUDA draws); the rotation
            # then joins the eigenvectors on their device
            rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].to(evecs.device)
            basis = evecs @ rot  # a rotation of the principal frame, per factor
            cols = [basis[..., j % d] for j in range(width)]
            w = torch.stack(cols, dim=-1) / spread[:, None, None]
            self.weight[gi].copy_(w.to(self.weight.dtype))
        self.bias.zero_()


def _sample_tokens(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic spread of up to `count` kept tokens per call: ([M, H, d], [M, H, d]) on the CPU."""
    qs, ks = q.detach().transpose(1, 2), k.detach().transpose(1, 2)  # [B, N, H, d]
    if key_mask is not None:
        qs, ks = qs[key_mask], ks[key_mask]
    else:
        qs, ks = qs.flatten(0, 1), ks.flatten(0, 1)
    step = max(1, qs.shape[0] // count)
    return qs[::step][:count].float().cpu(), ks[::step][:count].float().cpu()


def hla_layers(model: nn.Module) -> dict[str, HLAAttention]:
    """Every HLA core in the model, by the name of the attention module that owns it."""
    return {name[: -len(".hla")]: m for name, m in model.named_modules() if isinstance(m, HLAAttention)}


def hla_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The learnable HLA parameters by full state_dict key."""
    return {n: p for n, p in model.named_parameters() if ".hla." in f".{n}"}
