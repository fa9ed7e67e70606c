"""Padded text tokens stay invisible to a converted layer (Hunyuan's key padding mask), and
hla_convert.model.surgery.key_mask_from_attn_mask reads a key padding mask out of the attention
masks diffusers passes and refuses the masks that are not one (causal, bias, per head, per query).
"""

from __future__ import annotations

import pytest
import torch

from hla_convert import HLAConfig, convert_attention
from hla_convert.model.surgery import key_mask_from_attn_mask
from helpers import HADAMARD, STUDENT_CONFIGS, STUDENT_IDS, forward_no_grad, tiny_base

from tiny_models import HUNYUAN_PADDED

# -- (d) key padding masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [HLAConfig(kind="softmax")] + STUDENT_CONFIGS, ids=["softmax"] + STUDENT_IDS)
def test_hunyuan_padded_text_tokens_are_invisible(config):
    model, inputs, _ = tiny_base("hunyuan")
    convert_attention(model, config)
    out = forward_no_grad(model, inputs)
    mask = inputs["encoder_attention_mask"]
    assert mask[1, -HUNYUAN_PADDED:].eq(0).all() and mask[0].eq(1).all()

    g = torch.Generator().manual_seed(7)
    text = inputs["encoder_hidden_states"].clone()
    text[1, -HUNYUAN_PADDED:] = 20 * torch.randn(HUNYUAN_PADDED, text.shape[-1], generator=g)
    out_padded_changed = forward_no_grad(model, {**inputs, "encoder_hidden_states": text})
    assert torch.allclose(out_padded_changed, out, rtol=0, atol=1e-5)

    # the same change to tokens the mask keeps does show: the comparison above can fail
    unmasked = {**inputs, "encoder_attention_mask": torch.ones_like(mask)}
    a = forward_no_grad(model, unmasked)
    b = forward_no_grad(model, {**unmasked, "encoder_hidden_states": text})
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_hunyuan_refiner_mask_is_not_a_padding_mask():
    """The text refiner's mask lets padded queries attend to token 0 only: converting it must fail
    loudly at the forward, not run a different attention."""
    model, inputs, _ = tiny_base("hunyuan")
    convert_attention(model, HADAMARD, include=["context_embedder.*"])
    with pytest.raises(RuntimeError, match="differs between queries"):
        forward_no_grad(model, inputs)


B, N = 2, 6


def _keep() -> torch.Tensor:
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, -2:] = False
    return keep


def test_key_mask_from_bool_key_padding_mask():
    keep = _keep()
    assert torch.equal(key_mask_from_attn_mask(keep[:, None, None, :], B, N), keep)
    # broadcast over the batch, and a batch with no padding at all means no mask
    assert torch.equal(key_mask_from_attn_mask(keep[1:, None, None, :], B, N), keep[1:].expand(B, N))
    assert key_mask_from_attn_mask(torch.ones(B, 1, 1, N, dtype=torch.bool), B, N) is None
    assert key_mask_from_attn_mask(None, B, N) is None


def test_key_mask_from_outer_product_mask():
    keep = _keep()
    outer = keep[:, None, :, None] & keep[:, None, None, :]  # [B, 1, N, N]: padded queries see nothing
    assert torch.equal(key_mask_from_attn_mask(outer, B, N), keep)
    # same mask repeated over heads
    assert torch.equal(key_mask_from_attn_mask(outer.expand(B, 3, N, N), B, N), keep)


@pytest.mark.parametrize("masked_value", [float("-inf"), torch.finfo(torch.float32).min, -10000.0])
def test_key_mask_from_additive_float_mask(masked_value):
    keep = _keep()
    additive = torch.zeros(B, 1, 1, N).masked_fill(~keep[:, None, None, :], masked_value)
    assert torch.equal(key_mask_from_attn_mask(additive, B, N), keep)
    assert key_mask_from_attn_mask(torch.zeros(B, 1, 1, N), B, N) is None


@pytest.mark.parametrize("kind", ["causal", "refiner", "bias", "per_head", "per_query"])
def test_key_mask_rejects_masks_that_are_not_key_padding(kind):
    keep = _keep()
    if kind == "causal":
        mask = torch.ones(N, N, dtype=torch.bool).tril()[None, None].expand(B, 1, N, N)
    elif kind == "refiner":  # Hunyuan's text refiner: outer product, then every query may see token 0
        mask = (keep[:, None, :, None] & keep[:, None, None, :]).clone()
        mask[:, :, :, 0] = True
    elif kind == "bias":  # a relative-position bias: finite, nonzero
        mask = torch.linspace(-1, 0, N).expand(B, 1, N, N)
    elif kind == "per_head":
        mask = keep[:, None, None, :].repeat(1, 2, 1, 1)
        mask[0, 1, 0, 0] = False
    else:
        mask = keep[:, None, None, :].repeat(1, 1, N, 1)
        mask[0, 0, 2, 3] = False
    with pytest.raises(RuntimeError):
        key_mask_from_attn_mask(mask, B, N)
