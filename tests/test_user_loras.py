"""A user's own LoRA (a community Wan LoRA) on a converted pipeline, through diffusers' LoRA API.

Two conversions of a 6-block tiny Wan saved as a WanPipeline folder (save_pretrained), one block
kept softmax: one with the conversion's own LoRA (`train: lora`, adapter "hla_lora"), one without
(`train: hla`). A user's LoRA on every block's attn1, attn2 and ffn (60 targets, past the 20 at
which peft shortens target names) is made with peft and saved with diffusers' own
`WanPipeline.save_lora_weights`; the original-Wan (`diffusion_model.blocks.0.self_attn.q.lora_A`)
and musubi/kohya (`lora_unet_blocks_0_self_attn_q.lora_down` + alpha) files are the same weights
renamed with the reverse of diffusers' Wan converters. What a user relies on: the LoRA loads in
each layout, both adapters are active and weighted by `set_adapters`, `set_adapters` back to the
conversion restores its output bit for bit, `fuse_lora` equals the unfused output, unloading the
user's LoRA keeps the conversion's, and teacher mode is still the base model.
"""

from __future__ import annotations

import pytest
import torch

import hla_convert
from hla_convert.model.lora import tuner_layers
from hla_convert.model.modes import attention_mode
from hla_convert.model.user_loras import active_adapters
from helpers import wan_recipe
from tiny_models import forward, save_tiny_wan_pipeline, tiny_inputs, tiny_wan

LAYERS = 6
RANK = 4
OURS = hla_convert.CONVERSION_ADAPTER
TARGETS = [
    f"blocks.{i}.{m}"
    for i in range(LAYERS)
    for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
]
ORIGINAL = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def _convert(root, train: str):
    recipe = wan_recipe(
        attention__softmax_layers=1,
        calibration__samples=4,
        calibration__heldout=2,
        calibration__batch_size=2,
        stage1__steps=2,
        stage1__batch_size=2,
        stage2__steps=2,
        stage2__batch_size=2,
        stage2__train=train,
    )
    hla_convert.convert(str(root / "model"), recipe, out=root / train, device="cpu")
    return root / train


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("user-loras")
    save_tiny_wan_pipeline(root / "model", tiny_wan(num_layers=LAYERS))
    user = tiny_wan(seed=5, num_layers=LAYERS)  # "trained" elsewhere: random, nonzero A and B
    torch.manual_seed(5)
    user.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=False), adapter_name="u")
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(user, adapter_name="u").items()}
    WanPipeline.save_lora_weights(root / "style", transformer_lora_layers=state)
    return {"root": root, "lora": _convert(root, "lora"), "hla": _convert(root, "hla"), "state": state}


def _pipeline(folders, which: str = "lora"):
    from diffusers import WanPipeline

    transformer = hla_convert.load_converted(folders[which], device="cpu")
    return WanPipeline.from_pretrained(folders["root"] / "model", transformer=transformer)


def _original_layout(state: dict) -> dict:
    """diffusers keys -> original Wan keys (the reverse of _convert_non_diffusers_wan_lora_to_diffusers)."""
    out = {}
    for key, value in state.items():
        module, _, tail = key.removeprefix("transformer.").partition(".lora_")
        block, index, rest = module.split(".", 2)
        part, _, linear = rest.partition(".") if rest.startswith("attn") else ("", "", rest)
        name = f"{block}.{index}.{ORIGINAL[part]}.{ORIGINAL[linear]}" if part else f"{block}.{index}.{ORIGINAL[linear]}"
        out[f"diffusion_model.{name}.lora_{tail}"] = value
    return out


def _musubi_layout(state: dict, alpha: float) -> dict:
    """diffusers keys -> musubi-tuner / kohya keys with an alpha per module (lora_down / lora_up)."""
    out = {}
    for key, value in _original_layout(state).items():
        module, _, tail = key.removeprefix("diffusion_model.").partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if tail.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def test_the_conversion_adapter_has_its_documented_name(folders):
    model = hla_convert.load_converted(folders["lora"], device="cpu")
    assert OURS == "hla_lora" and list(model.peft_config) == [OURS]


@pytest.mark.parametrize("layout", ["diffusers file", "original Wan", "musubi/kohya"])
def test_a_community_lora_stacks_on_the_conversion(folders, layout):
    pipe = _pipeline(folders)
    model, x = pipe.transformer, tiny_inputs("wan")
    converted = forward(model, x)
    source = {
        "diffusers file": folders["root"] / "style",
        "original Wan": _original_layout(folders["state"]),
        "musubi/kohya": _musubi_layout(folders["state"], alpha=RANK),
    }[layout]
    pipe.load_lora_weights(source, adapter_name="style")
    styled = [n for n, m in tuner_layers(model) if "style" in m.lora_A]
    assert len(styled) == len(TARGETS) == 60 and sorted(styled) == sorted(TARGETS)
    kept = [f"blocks.{i}.attn1" for i in range(LAYERS) if f"blocks.{i}.attn1" not in hla_convert.hla_layers(model)]
    assert len(kept) == 1 and f"{kept[0]}.to_q" in styled  # the layer given back to softmax has it too
    assert active_adapters(model) == [OURS, "style"]  # diffusers alone would leave only "style" on
    both = forward(model, x)
    assert not torch.allclose(both, converted, atol=1e-3)
    pipe.set_adapters([OURS, "style"], [1.0, 1.0])
    assert torch.equal(forward(model, x), both)
    pipe.set_adapters(["style"])  # the user's alone: the conversion's LoRA is off, and it shows
    assert not torch.allclose(forward(model, x), both, atol=1e-4)
    pipe.set_adapters([OURS])
    assert torch.equal(forward(model, x), converted)
    # every layout is the same LoRA
    reference = _pipeline(folders)
    reference.load_lora_weights(folders["root"] / "style", adapter_name="style")
    assert torch.allclose(both, forward(reference.transformer, x), atol=1e-6, rtol=0)


def test_an_alpha_below_the_rank_and_set_adapters_weights_scale_the_lora(folders):
    x = tiny_inputs("wan")
    half = _pipeline(folders)
    half.load_lora_weights(_musubi_layout(folders["state"], alpha=RANK / 2), adapter_name="style")
    weighted = _pipeline(folders)
    weighted.load_lora_weights(folders["root"] / "style", adapter_name="style")
    full = forward(weighted.transformer, x)
    weighted.set_adapters([OURS, "style"], [1.0, 0.5])
    assert torch.allclose(forward(half.transformer, x), forward(weighted.transformer, x), atol=1e-6, rtol=0)
    assert not torch.allclose(forward(weighted.transformer, x), full, atol=1e-3)
    weighted.set_adapters([OURS, "style"], [1.0, 0.0])
    weighted.delete_adapters("style")
    assert list(weighted.transformer.peft_config) == [OURS]


def test_fuse_lora_equals_the_unfused_adapters_and_the_teacher_is_still_the_base(folders):
    pipe = _pipeline(folders)
    model, x = pipe.transformer, tiny_inputs("wan")
    base = forward(tiny_wan(num_layers=LAYERS), x)
    pipe.load_lora_weights(folders["root"] / "style", adapter_name="style")
    pipe.set_adapters([OURS, "style"], [1.0, 0.7])
    unfused = forward(model, x)
    with attention_mode(model, "teacher"):  # the user's LoRA is off in the teacher too
        assert torch.equal(forward(model, x), base)
    assert torch.equal(forward(model, x), unfused)  # and back on after it
    pipe.fuse_lora(adapter_names=[OURS, "style"])
    assert torch.allclose(forward(model, x), unfused, atol=1e-5, rtol=0)
    with attention_mode(model, "teacher"):  # peft unmerges a disabled fused layer: the base to rounding
        assert torch.allclose(forward(model, x), base, atol=1e-5, rtol=0)
    assert torch.allclose(forward(model, x), unfused, atol=1e-5, rtol=0)


def test_unloading_the_users_lora_keeps_the_conversions(folders):
    pipe = _pipeline(folders)
    model, x = pipe.transformer, tiny_inputs("wan")
    converted = forward(model, x)
    for remove in (pipe.unload_lora_weights, lambda: pipe.delete_adapters("style")):
        pipe.load_lora_weights(folders["root"] / "style", adapter_name="style")
        assert not torch.allclose(forward(model, x), converted, atol=1e-3)
        remove()
        assert list(model.peft_config) == [OURS] and active_adapters(model) == [OURS]
        assert torch.equal(forward(model, x), converted)


def test_without_the_conversions_lora_a_users_lora_is_plain_diffusers(folders):
    pipe = _pipeline(folders, "hla")
    model, x = pipe.transformer, tiny_inputs("wan")
    assert not getattr(model, "peft_config", None)
    converted, base = forward(model, x), forward(tiny_wan(num_layers=LAYERS), x)
    pipe.load_lora_weights(_original_layout(folders["state"]), adapter_name="style")
    styled = forward(model, x)
    assert not torch.allclose(styled, converted, atol=1e-3)
    with attention_mode(model, "teacher"):
        assert torch.equal(forward(model, x), base)
    pipe.set_adapters(["style"], [0.0])
    assert torch.equal(forward(model, x), converted)
    pipe.unload_lora_weights()
    assert not tuner_layers(model) and torch.equal(forward(model, x), converted)
