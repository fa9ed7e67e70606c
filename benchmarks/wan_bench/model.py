"""The Wan2.1-T2V-1.3B transformer bench_wan.py measures: its published config (and --smoke's 2
small layers), the resolutions and text length, the random-weight model on the device, its inputs
and token counts, the recipe with --attention overrides, the conversion, torch.compile of the model
or its blocks, and the WanPipeline stand-in around it for the sampling measurement.
"""

from __future__ import annotations

from typing import Any

import torch

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json as published (diffusers 0.33+).
WAN_1_3B_CONFIG: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
# --smoke: the same architecture, 2 small layers
SMOKE_CONFIG: dict[str, Any] = {
    **WAN_1_3B_CONFIG, "attention_head_dim": 32, "ffn_dim": 64, "freq_dim": 32, "num_attention_heads": 2,
    "num_layers": 2, "text_dim": 32, "rope_max_seq_len": 64,
}  # fmt: skip

# name -> (frames, height, width) in pixels; the latent is 16 x ((f-1)/4+1) x h/8 x w/8
RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
SMOKE_RESOLUTIONS = {"480p": (9, 64, 64), "720p": (9, 64, 96)}
TEXT_LEN, SMOKE_TEXT_LEN = 512, 8
RECIPE = "wan2.1-t2v-1.3b"


# -- the model and its inputs -------------------------------------------------------------------


def build_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """WanTransformer3DModel from `config` with random weights drawn on the device, cast to dtype."""
    from diffusers import WanTransformer3DModel

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**kwargs)
    # as from_pretrained(torch_dtype=dtype) loads it: the class's _keep_in_fp32_modules stay float32
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not keep.intersection(name.split(".")):
                t.data = t.data.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def latent_shape(res: tuple[int, int, int], channels: int) -> tuple[int, int, int, int, int]:
    f, h, w = res
    return (1, channels, (f - 1) // 4 + 1, h // 8, w // 8)


def model_inputs(model, res, text_len, device, dtype, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    cfg = model.config
    x = torch.randn(latent_shape(res, cfg.in_channels), generator=g)
    text = torch.randn(1, text_len, cfg.text_dim, generator=g)
    return {
        "hidden_states": x.to(device, dtype),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": text.to(device, dtype),
    }


def tokens_of(model, res) -> int:
    _, _, f, h, w = latent_shape(res, model.config.in_channels)
    pt, ph, pw = model.config.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def load_bench_recipe(overrides: list[str]):
    """The recipe with --attention FIELD=VALUE overrides (YAML values: 32, true, 1,0,0 -> [1, 0, 0])."""
    import yaml

    from hla_convert.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    fields: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--attention {item!r}: expected FIELD=VALUE, e.g. feature_dim=32")
        parsed = yaml.safe_load(f"[{value}]") if "," in value else yaml.safe_load(value)
        fields[f"attention.{key.strip()}"] = parsed
    try:
        return recipe.with_overrides(fields=fields)
    except ValueError as exc:  # RecipeError: one line naming the field
        raise SystemExit(f"--attention: {exc}") from None


def attention_lora_modules(model) -> list[str]:
    """The recipe's stage-2 LoRA targets on every block's self-attention (the softmax side's LoRA)."""
    names = dict(model.named_modules())
    return [f"{b}.{t}" for b in (n for n in names if n.endswith(".attn1")) for t in ("to_q", "to_k", "to_v", "to_out.0") if f"{b}.{t}" in names]


def convert(model, recipe) -> dict[str, Any]:
    """The recipe's attention on the model, its softmax_layers given back to softmax (the first ones)."""
    from hla_convert import convert_attention, revert_attention
    from hla_convert.model.layers import hla_layers

    a = recipe.attention
    convert_attention(model, recipe.hla_config(), include=a.include, exclude=a.exclude)
    back = list(hla_layers(model))[: a.softmax_layers]
    if back:
        revert_attention(model, back)
    return {"softmax_layers": back, "converted_layers": len(hla_layers(model))}


def compiled(model, how: str | None, backend: str = "inductor", in_place: bool = False):
    """The callable to time: the model itself, torch.compile(model), or the model with its repeated
    blocks compiled in place (diffusers' regional compilation). in_place: "model" compiles the
    model object itself (nn.Module.compile), so that a pipeline holding it calls the compiled one;
    undo either in-place form with uncompile_blocks."""
    if how is None:
        return model
    from hla_convert.model.compiling import CHECKPOINT_FLAG

    torch._dynamo.reset()
    if hasattr(torch._dynamo.config, CHECKPOINT_FLAG):  # why: hla_convert.model.compiling (newer torch only)
        setattr(torch._dynamo.config, CHECKPOINT_FLAG, True)
    if how == "model" and not in_place:
        return torch.compile(model, backend=backend)
    if how == "model":
        model.compile(backend=backend)
    else:
        model.compile_repeated_blocks(backend=backend)
    return model


def uncompile_blocks(model) -> None:
    """Undo compile_repeated_blocks / an in-place model compile (the library's uncompile), and
    clear dynamo's caches."""
    from hla_convert.model.compiling import uncompile

    uncompile(model)
    torch._dynamo.reset()


def stand_in_pipeline(transformer, device, dtype, smoke: bool):
    """WanPipeline around `transformer` with a 1-layer UMT5 (its d_model = text_dim), a word-level
    tokenizer built here, a small AutoencoderKLWan (same 4x/8x compression, z_dim 16) and Wan's
    UniPC flow scheduler (shift 3)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": 3 + i for i in range(253)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(1)
    d = transformer.config.text_dim
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(vocab), d_model=d, d_kv=64, d_ff=256, num_layers=1, num_heads=max(1, d // 64 // 8))
    ).to(device, dtype).eval()
    vae = AutoencoderKLWan(base_dim=4 if smoke else 16, z_dim=transformer.config.in_channels, num_res_blocks=1).to(device).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
