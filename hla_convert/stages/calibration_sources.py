"""Calibration inputs that come from outside the recipe: the model's own pipeline trajectories
(recorded with a forward pre-hook while the pipeline denoises) and a folder of safetensors input
files (`save_inputs` writes them, `folder_inputs` reads and checks them)."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration_base import CalibrationError, _arch, _text_dim, batch_size_of, split_generator
from .calibration_images import check_image_pipeline, image_conditioned, image_kwargs, read_images
from ..atomic_files import atomic_write_bytes
from ..recipe import Recipe

_META_KEY = "hla_convert_inputs"

# Prompts for trajectory capture when the recipe names none: varied subjects, motion and camera
# work, so the captured attention covers the kinds of maps the model makes. Held-out prompts are
# a separate list.
TRAIN_PROMPTS = (
    "A golden retriever runs across a sunlit meadow, slow motion, shallow depth of field.",
    "Aerial drone shot over a rugged coastline with waves crashing against the cliffs.",
    "A chef tosses vegetables in a wok, flames rising, close-up, warm kitchen light.",
    "Timelapse of clouds rolling over snowy mountain peaks at sunrise.",
    "A cyclist rides through a busy city street at night, neon reflections on wet asphalt.",
    "Macro shot of a honeybee landing on a purple flower, soft bokeh background.",
    "An astronaut floats inside a space station, Earth visible through the window.",
    "A paper boat drifts down a rain-filled gutter, camera tracking alongside.",
    "Children fly colourful kites on a windy beach, handheld camera.",
    "A steam locomotive crosses a stone bridge in autumn, wide shot.",
    "An octopus changes colour while crawling over coral, underwater footage.",
    "A dancer spins in a white studio, fabric of her dress flowing, slow motion.",
    "Rain falls on a quiet forest lake, ripples spreading, overcast light.",
    "A cat watches snow falling outside a frosted window, cosy interior.",
    "Fireworks burst over a harbour city skyline, reflections in the water.",
    "A potter shapes clay on a spinning wheel, top-down view.",
)
HELDOUT_PROMPTS = (
    "A red fox trots through fresh snow in a pine forest, tracking shot.",
    "Waves of wheat sway in the wind under a stormy sky, wide angle.",
    "A barista pours latte art into a cup, close-up, morning light.",
    "A sailboat glides across a calm bay at sunset, drone shot.",
)


# -- trajectories ----------------------------------------------------------------------------------


def _split_item(item: dict[str, Any]) -> list[dict[str, Any]]:
    """One captured forward (batch B, CFG halves included) -> B single-sample dicts."""
    b = batch_size_of(item)
    out = []
    for i in range(b):
        one = {}
        for k, v in item.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b:
                one[k] = v[i : i + 1]
            elif k == "timestep" and isinstance(v, torch.Tensor) and v.dim() == 0:
                one[k] = v.reshape(1)
            else:
                one[k] = v
        out.append(one)
    return out


def _stack_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate single-sample dicts into one batch (non-batched values from the first)."""
    first = items[0]
    out = {}
    for k, v in first.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1 and all(isinstance(it.get(k), torch.Tensor) for it in items):
            out[k] = torch.cat([it[k] for it in items], dim=0)
        else:
            out[k] = v
    return out


def rebatch(samples: Sequence[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """Single-sample dicts -> batches of batch_size (the last may be smaller)."""
    return [_stack_items(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


class _Recorder:
    """A forward pre-hook that records the transformer's keyword arguments on the CPU."""

    def __init__(self, model: nn.Module):
        self.names = [n for n in inspect.signature(model.forward).parameters if n != "self"]
        self.calls: list[dict[str, Any]] = []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        bound = dict(zip(self.names, args))
        bound.update(kwargs)
        item = {}
        for k, v in bound.items():
            if k in ("return_dict", "attention_kwargs") or v is None:
                continue
            item[k] = _detach_cpu(v)
        self.calls.append(item)


def _detach_cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu").clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_detach_cpu(x) for x in v)
    return v


def _call_kwargs(pipe: Any, **wanted: Any) -> dict[str, Any]:
    params = inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in wanted.items() if k in params and v is not None}


def load_pipeline(model: nn.Module, pipeline_dir: str, device: Any = "cpu", **experts: nn.Module) -> Any:
    """The diffusers pipeline of `pipeline_dir` with `model` as its transformer, on `device`;
    `experts`: its other transformers by component name (Wan2.2's transformer_2=...)."""
    import diffusers
    from diffusers import DiffusionPipeline

    try:
        # The concrete class, not DiffusionPipeline: only its from_pretrained takes our transformer
        # in place of loading another copy.
        name = DiffusionPipeline.load_config(pipeline_dir)["_class_name"]
        cls = getattr(diffusers, name, None) or DiffusionPipeline
        pipe = cls.from_pretrained(pipeline_dir, transformer=model, **experts)
    except Exception as e:  # noqa: BLE001 - many ways a folder is not a pipeline
        raise CalibrationError(f"calibration.source trajectories: cannot load a diffusers pipeline from {pipeline_dir!r}: {e}") from e
    for component, net in {"transformer": model, **experts}.items():
        if getattr(pipe, component, None) is not net:
            raise CalibrationError(f"calibration.source trajectories: the pipeline in {pipeline_dir!r} did not take the model as its {component}")
    pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def trajectory_inputs(
    model: nn.Module,
    recipe: Recipe,
    split: str,
    pipeline_dir: str,
    device: Any = "cpu",
    progress: Callable[[str, int, int, dict[str, Any]], None] | None = None,
    pipe: Any = None,
) -> list[dict[str, Any]]:
    """Inputs recorded from the pipeline's own denoising loops; see expert_trajectory_inputs (one expert)."""
    return expert_trajectory_inputs({"transformer": model}, recipe, split, pipeline_dir, device, progress, pipe)["transformer"]


def expert_trajectory_inputs(
    experts: dict[str, nn.Module],
    recipe: Recipe,
    split: str,
    pipeline_dir: str,
    device: Any = "cpu",
    progress: Callable[[str, int, int, dict[str, Any]], None] | None = None,
    pipe: Any = None,
) -> dict[str, list[dict[str, Any]]]:
    """Inputs recorded from the pipeline's own denoising loops, with `model` as its transformer.

    The pipeline is loaded from `pipeline_dir` with `transformer=model` (no second copy of the
    weights); converted layers run in teacher mode while recording, so the trajectories are the
    original model's. `pipe`: the pipeline already loaded by `load_pipeline`, so that both splits
    share one load of the text encoder and VAE. Each run uses one prompt and
    recipe.calibration.trajectory_steps steps; every transformer call (classifier-free guidance halves included) gives samples, of which a seeded
    choice of `samples` (or `heldout`) is kept.

    `experts`: the pipeline's transformers by component name ({"transformer": model}, or Wan2.2's
    two); one pass of the pipeline records each one's calls (a pre-hook on each), so every expert
    gets exactly the inputs the pipeline served it, and the runs go on until each has its count.
    """
    model = experts["transformer"]
    from ..model.modes import attention_mode

    cal = recipe.calibration
    want = cal.samples if split == "train" else cal.heldout
    if cal.prompts:
        n_held = max(1, len(cal.prompts) // 4) if len(cal.prompts) > 1 else 0
        prompts = list(cal.prompts[len(cal.prompts) - n_held :] if split == "heldout" and n_held else cal.prompts[: len(cal.prompts) - n_held])
    else:
        prompts = list(TRAIN_PROMPTS if split == "train" else HELDOUT_PROMPTS)
    if pipe is None:
        pipe = load_pipeline(model, pipeline_dir, device, **{k: v for k, v in experts.items() if k != "transformer"})
    images = read_images(cal.images) if cal.images is not None and image_conditioned(pipe) else None
    g = split_generator(cal.seed, split)
    recorders = {name: _Recorder(net) for name, net in experts.items()}
    handles = [net.register_forward_pre_hook(recorders[name], with_kwargs=True) for name, net in experts.items()]
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in experts}
    runs = 0
    with contextlib.ExitStack() as modes:
        for net in experts.values():
            modes.enter_context(attention_mode(net, "teacher"))  # the original model: softmax cores, LoRA off
        try:
            while min(len(samples) for samples in found.values()) < want:
                prompt = prompts[runs % len(prompts)]
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
                for recorder in recorders.values():
                    recorder.calls.clear()
                kwargs = _call_kwargs(
                    pipe,
                    prompt=prompt,
                    num_inference_steps=cal.trajectory_steps,
                    height=cal.height,
                    width=cal.width,
                    num_frames=cal.frames,
                    max_sequence_length=cal.text_len,
                    output_type="latent",
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                    **image_kwargs(pipe, recipe, split, runs, images),  # an image-to-video pipeline's image
                )
                with torch.no_grad():
                    pipe(**kwargs)
                for name, recorder in recorders.items():
                    if not recorder.calls:
                        what = f"{name} in {cal.trajectory_steps} steps (raise calibration.trajectory_steps)" if len(experts) > 1 else "its transformer"
                        raise CalibrationError(f"the pipeline in {pipeline_dir!r} never called {what}; is it the model's pipeline?")
                    for call in recorder.calls:
                        found[name].extend(_split_item(call))
                runs += 1
                if progress:
                    got = min(len(samples) for samples in found.values())
                    progress("calibration", min(got, want), want, {"split": split, "runs": runs})
        finally:
            for handle in handles:
                handle.remove()
    kept = {}
    for name, samples in found.items():  # one seeded choice per expert, in the experts' order
        keep = torch.randperm(len(samples), generator=g)[:want].sort().values.tolist()
        kept[name] = rebatch([samples[i] for i in keep], cal.batch_size)
    return kept


# -- folder ----------------------------------------------------------------------------------------


def save_inputs(items: Sequence[dict[str, Any]], folder: str | Path) -> list[Path]:
    """Write input dicts as <folder>/00000.safetensors, ... (the `folder` source's format).

    Tensors are stored under their keyword name, tuples of tensors (CogVideoX's image_rotary_emb)
    as name.0, name.1, and plain values (LTX's num_frames, ...) as JSON in the file's metadata.
    For `calibration.source: folder`, write the training inputs to <path>/train and the held-out
    ones to <path>/heldout.
    """
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(items):
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"tuples": {}, "values": {}}
        for k, v in item.items():
            if isinstance(v, torch.Tensor):
                tensors[k] = v.detach().cpu().contiguous()
            elif isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
                meta["tuples"][k] = len(v)
                for j, x in enumerate(v):
                    tensors[f"{k}.{j}"] = x.detach().cpu().contiguous()
            else:
                meta["values"][k] = list(v) if isinstance(v, tuple) else v
        data = save(tensors, metadata={_META_KEY: json.dumps(meta)})
        paths.append(atomic_write_bytes(folder / f"{i:05d}.safetensors", data))
    return paths


def load_input_file(path: str | Path) -> dict[str, Any]:
    """One input dict from a file written by save_inputs (or any safetensors of kwarg tensors)."""
    from safetensors import safe_open

    from ..user_files import MAX_TENSOR_FILE_BYTES, check_regular_file

    path = Path(path)
    check_regular_file(path, str(path), MAX_TENSOR_FILE_BYTES, CalibrationError)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise CalibrationError(f"{path}: not a readable safetensors file ({e})") from e
    item: dict[str, Any] = {}
    tuples, values = (meta.get("tuples", {}), meta.get("values", {})) if isinstance(meta, dict) else (None, None)
    if not isinstance(tuples, dict) or not isinstance(values, dict):
        raise CalibrationError(f"{path}: its {_META_KEY} metadata is not the mapping save_inputs writes")
    for k, n in tuples.items():
        # each part is a tensor of this file: a count past the file's tensors is a damaged header,
        # refused before a loop over it (1e10 parts would run for hours)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(tensors):
            raise CalibrationError(f"{path}: metadata says {k} has {n!r} parts; the file holds {len(tensors)} tensors")
        missing = [f"{k}.{j}" for j in range(n) if f"{k}.{j}" not in tensors]
        if missing:
            raise CalibrationError(f"{path}: {missing[0]}: missing (metadata says {k} has {n} parts)")
        item[k] = tuple(tensors.pop(f"{k}.{j}") for j in range(n))
    item.update(tensors)
    for k, v in values.items():
        item[k] = tuple(v) if isinstance(v, list) else v
    return item


def check_input(model: nn.Module, item: dict[str, Any], where: str) -> None:
    """Raise CalibrationError naming `where` and the key when an input dict does not fit the model."""
    params = inspect.signature(model.forward).parameters
    allowed = [n for n in params if n not in ("self", "return_dict", "attention_kwargs")]
    for k in item:
        if k not in allowed:
            raise CalibrationError(f"{where}: {k}: not an input of {_arch(model)}.forward; allowed: {', '.join(allowed)}")
    for n, p in params.items():
        if n in ("self", "return_dict") or p.default is not inspect.Parameter.empty:
            continue
        if n not in item:
            raise CalibrationError(f"{where}: {n}: missing; {_arch(model)}.forward needs it")
    for k, v in item.items():  # a file's JSON "values" can name a tensor input (a list in place of encoder_hidden_states)
        if k != "timestep" and _tensor_only(params[k].annotation) and not isinstance(v, torch.Tensor):
            raise CalibrationError(f"{where}: {k}: must be a tensor for {_arch(model)}.forward, got {_described(v)}")
    hs = item["hidden_states"]
    if not isinstance(hs, torch.Tensor) or not hs.is_floating_point():
        kind = str(hs.dtype).removeprefix("torch.") if isinstance(hs, torch.Tensor) else type(hs).__name__
        raise CalibrationError(f"{where}: hidden_states: must be a floating-point tensor, got {kind}")
    for k, v in item.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CalibrationError(f"{where}: {k}: holds NaN or infinite values")
        if k == "timestep":
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            # [B, N]: a timestep per video token (Wan2.2 TI2V's expand_timesteps), N checked below
            vector = isinstance(v, torch.Tensor) and v.dim() <= 2 and not v.is_complex() and v.dtype != torch.bool
            if not (number or vector):
                raise CalibrationError(f"{where}: timestep: must be a number, a [B] or a [B, tokens] tensor, got {_described(v)}")
    cfg, arch = model.config, _arch(model)
    c = getattr(cfg, "in_channels", None)
    if arch == "CogVideoXTransformer3DModel":
        ok, expect = hs.dim() == 5 and hs.shape[2] == c, f"[B, F, {c}, H, W]"
    elif arch == "LTXVideoTransformer3DModel":
        ok, expect = hs.dim() == 3 and hs.shape[2] == c, f"[B, N, {c}]"
    elif c is not None:
        ok, expect = hs.dim() == 5 and hs.shape[1] == c, f"[B, {c}, F, H, W]"
    else:
        ok, expect = True, ""
    if not ok:
        raise CalibrationError(f"{where}: hidden_states: expected shape {expect} for this {arch}, got {list(hs.shape)}")
    if hs.dim() == 5:  # a latent video: each of F, H, W whole patches of the model (2x2 for most)
        from ..model.architectures import patch_sizes_of

        pt, ph, pw = patch_sizes_of(model)
        f, h, w = (hs.shape[1], hs.shape[3], hs.shape[4]) if arch == "CogVideoXTransformer3DModel" else tuple(hs.shape[2:])
        if hs.shape[0] < 1 or any(n < m or n % m for n, m in ((f, pt), (h, ph), (w, pw))):
            raise CalibrationError(
                f"{where}: hidden_states: frames x height x width {f} x {h} x {w} are not whole {pt} x {ph} x {pw} patches of this {arch}"
            )
        ts, tokens = item.get("timestep"), (f // pt) * (h // ph) * (w // pw)
        if isinstance(ts, torch.Tensor) and ts.dim() == 2 and ts.shape[1] != tokens:
            raise CalibrationError(f"{where}: timestep: a per-token timestep needs the {tokens} video tokens of hidden_states, got {list(ts.shape)}")
    b = hs.shape[0]
    ehs = item.get("encoder_hidden_states")
    d = _text_dim(cfg)
    if isinstance(ehs, torch.Tensor) and d is not None and (ehs.dim() != 3 or ehs.shape[-1] != d):
        raise CalibrationError(f"{where}: encoder_hidden_states: expected shape [B, L, {d}], got {list(ehs.shape)}")
    _check_image_tokens(cfg, arch, item, where)
    for k, v in item.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and k not in ("image_rotary_emb",) and v.shape[0] not in (b, 1):
            raise CalibrationError(f"{where}: {k}: batch size {v.shape[0]} differs from hidden_states' {b}")


def _check_image_tokens(cfg: Any, arch: str, item: dict[str, Any], where: str) -> None:
    """A Wan2.1 image-to-video transformer (config image_dim) needs its CLIP image tokens
    [B, L, image_dim] and 512 text tokens (model.architectures: WAN_I2V_TEXT_TOKENS)."""
    from ..model.architectures import WAN_I2V_TEXT_TOKENS

    image_dim = getattr(cfg, "image_dim", None)
    if arch != "WanTransformer3DModel" or not isinstance(image_dim, int):
        return
    img = item.get("encoder_hidden_states_image")
    if img is None:
        raise CalibrationError(f"{where}: encoder_hidden_states_image: missing; this image-to-video model (image_dim {image_dim}) needs its CLIP image tokens")
    if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[-1] != image_dim:
        raise CalibrationError(f"{where}: encoder_hidden_states_image: expected shape [B, L, {image_dim}], got {_described(img)}")
    ehs = item.get("encoder_hidden_states")
    if isinstance(ehs, torch.Tensor) and ehs.dim() == 3 and ehs.shape[1] != WAN_I2V_TEXT_TOKENS:
        raise CalibrationError(
            f"{where}: encoder_hidden_states: an image-to-video Wan needs {WAN_I2V_TEXT_TOKENS} text tokens (diffusers splits the "
            f"image tokens off its cross-attention context at that length), got {ehs.shape[1]}"
        )


def _tensor_only(annotation: Any) -> bool:
    """Whether a forward parameter's annotation admits a tensor and nothing else (None aside):
    "torch.Tensor", "torch.Tensor | None"; not "int | None", "tuple[torch.Tensor, torch.Tensor]"."""
    text = re.sub(r"<class '([^']*)'>", r"\1", str(annotation))
    alternatives = [a.strip() for a in text.split("|")]
    return any(a != "None" for a in alternatives) and all(re.fullmatch(r"torch\.\w*Tensor|None", a) for a in alternatives)


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def input_files(folder: str | Path, split: str) -> list[Path]:
    """The `split` input files of a `folder` source, each a regular file of a bounded size (a FIFO
    or a device among them would hang the read): what folder_inputs reads, checked before the run
    loads anything (check_calibration_path)."""
    from ..user_files import MAX_TENSOR_FILE_BYTES, check_regular_file

    folder = Path(folder)
    sub = folder / split
    if not sub.is_dir():
        raise CalibrationError(
            f"calibration.path: {str(folder)!r} has no {split}/ folder; expected {folder}/train/*.safetensors and "
            f"{folder}/heldout/*.safetensors (hla_convert.stages.calibration.save_inputs writes them)"
        )
    files = sorted(sub.glob("*.safetensors"))
    if not files:
        raise CalibrationError(f"calibration.path: no *.safetensors files in {sub}")
    for f in files:
        check_regular_file(f, f"calibration.path: {f}", MAX_TENSOR_FILE_BYTES, CalibrationError)
    return files


def check_calibration_path(recipe: Recipe, model: str | None = None) -> None:
    """Refuse a calibration.path (or calibration.images) that cannot serve the recipe's source,
    before a run loads its model or clears the previous output (--overwrite): CalibrationError, one
    line. model: MODEL, the pipeline folder trajectories run when calibration.path is null."""
    cal = recipe.calibration
    if cal.source == "folder":
        for split in ("train", "heldout"):
            input_files(cal.path or "", split)
    elif cal.source == "trajectories" and cal.path:
        from ..model.loading import looks_like_hub_id

        where = Path(cal.path).expanduser()
        if not where.is_dir() and (where.exists() or not looks_like_hub_id(cal.path)):
            raise CalibrationError(f"calibration.path: {cal.path!r} is neither a pipeline folder nor a Hub ID")
    if cal.images is not None:
        read_images(cal.images)  # every file decodes: a damaged image is refused before the model load
        check_image_pipeline(cal.path or model)


def folder_inputs(model: nn.Module, recipe: Recipe, split: str, path: str | None = None) -> list[dict[str, Any]]:
    files = input_files(path or recipe.calibration.path or "", split)
    items = []
    for f in files:
        item = load_input_file(f)
        check_input(model, item, str(f))
        items.append(item)
    return items
