"""torch.compile of a converted model: one graph, no breaks, and the eager model's output.

A graph break inside the attention layer would cost a compiled converted model its fusion around
every converted layer; `fullgraph=True` makes any break an error, so these tests fail on one.
CPU only: the reference path of the HLA layer (PyTorch ops) and, under the Triton interpreter,
the kernels as torch.library custom ops (what dynamo sees on the GPU). Backend "eager" / "aot_eager"
(no code generation), tiny Wans (tests/tiny_models/) of two blocks (forward) and one (backward), so
the tests stay a few seconds each: dynamo traces every block anew, and the 3-block demo model's
compiles took twice as long for the same check (one graph per forward, the eager output).
"""

from __future__ import annotations

import pytest
import torch

from hla_convert import convert_attention
from hla_convert.model.config import HLAConfig
from hla_convert.model.layers import hla_layers, hla_parameters
from tiny_models import tiny_inputs, tiny_model

CONFIGS = {
    "hadamard": HLAConfig(kind="hadamard", feature_dim=4, feature_map="taylor"),
    "hybrid": HLAConfig(kind="hybrid", far="hadamard", feature_dim=4, feature_map="taylor", window=(1, 0, 0)),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move the HLA parameters off their identity start, so the student differs from softmax."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hla_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _demo(kind: str) -> tuple[torch.nn.Module, dict]:
    """The two-block tiny Wan converted with CONFIGS[kind], and one input of the demo model's latent
    grid (8 frames of 16 x 16 pixels: 512 video tokens, 8 x 8 x 8 patches)."""
    model = _perturbed(convert_attention(tiny_model("wan"), CONFIGS[kind]))
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, model.config.in_channels, 8, 16, 16, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, model.config.text_dim, generator=g),
    }
    return model, inputs


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_converted_model_compiles_to_one_graph_and_matches_eager(kind):
    model, inputs = _demo(kind)
    with torch.no_grad():
        eager = model(**inputs, return_dict=False)[0]
        # fullgraph: any graph break (in the attention layer, the routing or the grid hook) raises
        cmodel = torch.compile(model, backend="eager", fullgraph=True)
        compiled = cmodel(**inputs, return_dict=False)[0]
        # the same inputs again reuse the graph: nothing the layer mutates per call (its call
        # counter) may be guarded on (that recompiled every call: 3.4x slower on the H100)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = cmodel(**inputs, return_dict=False)[0]
    assert _rel(compiled, eager) < 1e-6 and torch.equal(again, compiled)
    # the HLA cores ran (the perturbed student differs from softmax, so a softmax fall-through
    # would fail the comparison above); compiled calls are not counted, eager ones are
    layers = hla_layers(model).values()
    assert len(layers) == 2 and all(layer.calls == 1 for layer in layers)
    if kind == "hybrid":
        # The window tiling is baked into the graph as a constant: another latent grid must
        # recompile, not reuse the first grid's tiling (the same compiled model as above, so the
        # graph of the first grid is the one a wrong guard would reuse).
        g = torch.Generator().manual_seed(2)
        other = {**inputs, "hidden_states": torch.randn(1, model.config.in_channels, 4, 16, 8, generator=g)}
        with torch.no_grad():
            compiled = cmodel(**other, return_dict=False)[0]
            eager = model(**other, return_dict=False)[0]
        assert _rel(compiled, eager) < 1e-6


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_backward_gives_the_eager_gradients(checkpointing):
    """Distillation's path: aot_eager traces the backward too; gradients reach the HLA parameters.

    With gradient checkpointing (stage 2) the block's forward runs inside dynamo's checkpoint
    operator, where entering the routing TorchFunctionMode and counting calls are side effects it
    refuses to replay (the whole forward would fall back to eager) unless told to skip them in the
    recompute: `skip_fwd_side_effects_in_bwd_under_checkpoint`. They carry no tensor state.
    """
    if checkpointing and not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        pytest.skip("this torch has no skip_fwd_side_effects_in_bwd_under_checkpoint")
    model = _perturbed(convert_attention(tiny_model("wan", num_layers=1), CONFIGS["hybrid"]))
    if checkpointing:
        model.enable_gradient_checkpointing()
    inputs = tiny_inputs("wan", batch=1)
    params = hla_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)

    def grads(fn):
        for p in params.values():
            p.grad = None
        fn(**inputs, return_dict=False)[0].square().mean().backward()
        return {n: p.grad.clone() for n, p in params.items()}

    eager = grads(model)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=checkpointing):
        compiled = grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    for name in params:
        assert _rel(compiled[name], eager[name]) < 1e-5, name


# -- the Triton kernels as custom ops (interpreter on the CPU) -------------------------------------


def _kernel_inputs(seed=0, b=1, h=2, n=24, r=4, dv=8):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.nn.functional.softplus(torch.randn(b, h, n, r, generator=g)) for _ in range(4)]
    v = torch.randn(b, h, n, dv, generator=g)
    mask = torch.rand(b, n, generator=g) > 0.3
    mask[:, 0] = True
    return feats, v, mask


def _assert_compiled_equals_eager(attend, leaves):
    """`attend(*leaves)` compiled in one graph (fullgraph) gives the eager output and the eager
    gradients of every leaf, bit for bit (one loss: a fixed ramp over the output)."""

    def run(fn):
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [t.grad.clone() for t in leaves]

    out_e, grads_e = run(attend)
    out_c, grads_c = run(torch.compile(attend, backend="aot_eager", fullgraph=True))
    assert torch.equal(out_c, out_e)
    for ge, gc in zip(grads_e, grads_c):
        assert torch.equal(gc, ge)


def test_hadamard_kernel_is_one_op_under_compile(interp):
    import hla_kernels

    feats, v, mask = _kernel_inputs()
    leaves = [t.clone().requires_grad_() for t in (*feats, v)]

    def attend(q1, q2, k1, k2, vv):
        return hla_kernels.hadamard_attention([q1, q2], [k1, k2], vv, mask, 1e-6)

    _assert_compiled_equals_eager(attend, leaves)


def test_hadamard_kernel_custom_op_passes_opcheck(interp):
    """Schema, fake (meta) shapes and autograd registration agree with the real kernels."""
    from hla_kernels import hadamard as hk

    feats, v, mask = _kernel_inputs(seed=1)
    torch.library.opcheck(hk._forward_op, (*feats, v, mask.float(), 1e-6))


def _hybrid_inputs(seed=0, grid=(2, 2, 2), text=2, h=2, d=8, r=4):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2] + text
    q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
    feats = [torch.nn.functional.softplus(torch.randn(1, h, n, r, generator=g)) for _ in range(4)]
    log_beta = 0.1 * torch.randn(h, generator=g)
    return q, k, v, feats, log_beta


# whole frames; tiles through all frames (block-major slots); clipped 2 x 2 tiles of a 3 x 3 frame
# (padding), the tiles both ways the kernels reach their tokens (read in place, reordered copies).
# One head except in one case that runs the opcheck (the interpreter runs one program per head, and
# the heads are independent programs): that case's 2 heads against 1 batch sample still catch the
# batch and head dims swapped in the fake shapes or the kernels' flattened (B * H) rows.
@pytest.mark.parametrize("grid, window, reads, heads", [
    ((2, 2, 2), (1, 0, 0), "gather", 1),
    ((2, 2, 2), (0, 1, 2), "gather", 1), ((2, 2, 2), (0, 1, 2), "index", 2),
    ((2, 3, 3), (0, 2, 2), "gather", 1), ((2, 3, 3), (0, 2, 2), "index", 1),
])
def test_hybrid_kernel_is_one_op_under_compile(interp, monkeypatch, grid, window, reads, heads):
    import hla_kernels
    from hla_kernels import hybrid as hybrid_kernels

    monkeypatch.setattr(hybrid_kernels, "TILE_READS", reads)

    q, k, v, feats, log_beta = _hybrid_inputs(grid=grid, h=heads)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *feats, log_beta)]

    def attend(q, k, v, q1, q2, k1, k2, lb):
        return hla_kernels.hybrid_attention(q, k, v, [q1, q2], [k1, k2], 0.35, lb, grid, window, text_len=2)

    _assert_compiled_equals_eager(attend, leaves)
    # schema, fake shapes and autograd registration agree with the kernels: whole frames (slot =
    # row, no index) and tiles read in place through the slot index (padding slots in the last case)
    box = hybrid_kernels._box(grid, window, (0, 0, 0))
    big, nb = hybrid_kernels._blocks(grid, box)
    permutes = hybrid_kernels._permutes(grid, box)
    if permutes and reads == "gather":
        # the op is called with the slot index explicitly (TILE_READS is read outside it): this
        # opcheck would repeat the "index" case's of the same grid and window, the same op with the
        # same index (opcheck runs the interpreted kernel a dozen times)
        return
    idx = hybrid_kernels.slot_rows(grid, box, 2, True, "cpu") if permutes else None
    torch.library.opcheck(hybrid_kernels._forward_op, (q, k, v, *feats, log_beta, None, idx, 0.35, big, nb, 2, True, 1e-6))


def test_causal_kernel_is_one_op_under_compile(interp):
    """The causal kernels compile in one graph (fullgraph) and give the eager outputs and gradients
    (token mode); the custom op's fake shapes agree with the kernels in block mode too (opcheck)."""
    import hla_kernels
    from hla_kernels import causal as causal_kernels

    feats, v, mask = _kernel_inputs(seed=2)
    leaves = [t.clone().requires_grad_() for t in (*feats, v)]

    def attend(q1, q2, k1, k2, vv):
        return hla_kernels.causal_hadamard_attention([q1, q2], [k1, k2], vv, mask, 1e-6, 1)

    _assert_compiled_equals_eager(attend, leaves)
    # block mode: 20-token causal blocks above the interpreter's 16-token chunk, one state per block;
    # one head (opcheck runs the interpreted kernel a dozen times; the heads are independent programs)
    feats, v, mask = _kernel_inputs(seed=3, h=1)
    torch.library.opcheck(causal_kernels._forward_op, (*feats, v, mask.float(), 1e-6, 20))
