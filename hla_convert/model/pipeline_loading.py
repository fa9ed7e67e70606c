"""The parts of a model around its transformer that the CLI needs, without loading weights.

- `inspect_model`: the module tree, tokens and FLOPs. `hla-convert inspect` must answer for a 14B
  model in seconds and without downloading 28 GB, so the transformer is built from its config.json
  on the meta device (no storage, no weights read).
- `load_scheduler`: the pipeline's noise scheduler, for the drift check's sampling runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import first_line
from .architectures import patch_sizes_of, with_field
from .loading import LoadedModel, ModelLoadError, loaded_from, quiet_loading, resolve_model

# Architectures whose converted self-attention also attends over the text tokens (joint attention).
JOINT_TEXT_ATTENTION = tuple(with_field("text_tokens"))


def load_skeleton(model: str | None, revision: str | None = None, subfolder: str | None = None, config: str | None = None) -> LoadedModel:
    """MODEL's transformer (resolved as loading.load_transformer does) with meta-device weights;
    a single-file MODEL's from the config `config` names."""
    from accelerate import init_empty_weights

    ref = resolve_model(model, revision, subfolder, config)
    where, kwargs = (ref.config, {"subfolder": ref.config_subfolder} if ref.config_subfolder else {}) if ref.config else (ref.path, ref.pretrained_kwargs())
    try:
        with quiet_loading():
            config = ref.cls.load_config(where, **kwargs)
            with init_empty_weights():
                transformer = ref.cls.from_config(config)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"could not build {ref.cls.__name__} from the config of {ref.path}: {first_line(exc)}") from None
    return loaded_from(ref, transformer)


def demo_scheduler() -> Any:
    """The embedded demo's sampler: rectified-flow Euler, no shift (it was trained with t ~ U(0, 1))."""
    import diffusers

    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def load_scheduler(loaded: LoadedModel) -> Any | None:
    """The scheduler the model samples with: the pipeline's own (config only), the demo's
    rectified-flow Euler scheduler, or None for a bare transformer (then no sampling check)."""
    import diffusers

    if loaded.is_demo:
        return demo_scheduler()
    if not loaded.pipeline_dir:
        return None
    where = loaded.pipeline_dir
    try:
        if Path(where).is_dir():
            index = json.loads((Path(where) / "model_index.json").read_text())
        else:
            from huggingface_hub import hf_hub_download

            index = json.loads(Path(hf_hub_download(where, "model_index.json", revision=loaded.revision)).read_text())
        entry = index.get("scheduler")
        cls = getattr(diffusers, entry[1]) if isinstance(entry, list) and len(entry) == 2 else None
        if cls is None:
            return None
        return cls.from_pretrained(where, subfolder="scheduler", **({"revision": loaded.revision} if loaded.revision else {}))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"could not load the scheduler of {where}: {first_line(exc)}") from None


def video_tokens(model: nn.Module, latent: tuple[int, int, int]) -> int:
    """Video tokens one self-attention sees for a latent of (frames, height, width)."""
    pt, ph, pw = patch_sizes_of(model)
    f, h, w = latent
    return -(-f // pt) * (h // ph) * (w // pw)


def inspect_model(model: str | None, recipe, revision: str | None = None, subfolder: str | None = None, config: str | None = None) -> dict[str, Any]:
    """Attention modules, which the recipe converts, tokens and attention FLOPs (a JSON-able dict).
    config: a single-file MODEL's diffusers config (default: the recipe's model.config)."""
    from .single_file import is_single_file
    from .surgery import _heads_and_query, _is_self_attention, attention_flops, attention_modules, select_modules

    if config is None and is_single_file(model):
        config = recipe.model.config
    loaded = load_skeleton(model, revision=revision, subfolder=subfolder, config=config)
    net = loaded.transformer
    cal = recipe.calibration
    latent = cal.latent_shape()
    tokens = video_tokens(net, latent)
    pt, ph, pw = patch_sizes_of(net)
    grid = (-(-latent[0] // pt), latent[1] // ph, latent[2] // pw)  # for the hybrid kind's windows
    text_tokens = cal.text_len if type(net).__name__ in JOINT_TEXT_ATTENTION else 0
    n = tokens + text_tokens
    config = recipe.hla_config()
    chosen = set(select_modules(net, recipe.attention.include, recipe.attention.exclude))
    rows = []
    before = after = 0.0
    for name, module in attention_modules(net).items():
        heads, to_q = _heads_and_query(module, name)
        head_dim = to_q.out_features // heads
        self_attn = _is_self_attention(module)
        row: dict[str, Any] = {
            "name": name,
            "type": "self" if self_attn else "cross",
            "heads": heads,
            "head_dim": head_dim,
            "converts_to": config.kind if name in chosen else None,
            "flops_before": None,
            "flops_after": None,
        }
        if self_attn:
            # Cross-attention cost depends on the prompt length and is not converted: not counted.
            row["flops_before"] = attention_flops(n, heads, head_dim, None)
            row["flops_after"] = attention_flops(
                n, heads, head_dim, config if name in chosen else None, grid=grid, text_tokens=text_tokens
            )
            before += row["flops_before"]
            after += row["flops_after"]
        rows.append(row)
    return {
        "model": loaded.source,
        "class": type(net).__name__,
        "recipe": recipe.name,
        "attention": config.to_dict(),
        "window": _window_at(config, grid, tokens),
        "video": {"frames": cal.frames, "height": cal.height, "width": cal.width, "latent": list(latent)},
        "patch_size": list(patch_sizes_of(net)),
        "tokens": tokens,
        "text_tokens": text_tokens,
        "modules": rows,
        "converted": sorted(chosen),
        "flops": {"before": before, "after": after, "speedup": before / after if after else None},
    }


def _window_at(config, grid: tuple[int, int, int], tokens: int) -> dict[str, Any] | None:
    """What the hybrid kind's window is at this video size: as the recipe asks for it (a window in
    tokens or `tiles`), its box in tokens (frames, height, width) on the latent grid, and the video
    keys a query of an unclipped block sees (box + halo, clipped to the grid) and their share of the
    video tokens. None for kinds without a window."""
    if config.kind != "hybrid":
        return None
    from .flops import hybrid_window

    box, _, keys = hybrid_window(config, grid)
    return {"asked": config.window_words(), "grid": list(grid), "box": list(box), "halo": list(config.halo),
            "keys": keys, "share": keys / tokens if tokens else None}


__all__ = ["inspect_model", "load_scheduler", "load_skeleton", "video_tokens"]
