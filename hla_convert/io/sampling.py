"""Look at a conversion: the teacher (the base model) and the student (the converted model) sampled
from the same noise, written as a side-by-side video and a PNG contact sheet with per-frame PSNR.

Both runs use one copy of the weights: `set_attention_mode(model, "teacher")` is the base model
(softmax cores, LoRA adapters disabled), "student" the converted one.

- The embedded demo (pixel-space latents: the video itself in [-1, 1]): the drift check's scheduler
  loop (`drift.sample_latents`), plain, no guidance; the prompt is drawn from the seed.
- A base that is a diffusers pipeline (folder or Hub ID): the whole pipeline, twice, with the
  converted transformer as its transformer (teacher mode, then student mode): its text encoder,
  its scheduler and guidance defaults, the same seeded generator (so the same initial noise), and
  its VAE to decode. The video size is the recipe's calibration size. An image-to-video pipeline
  (WanImageToVideoPipeline) is given the first image of the recipe's calibration.images, or the
  seeded synthetic image calibration would make (hla_convert.stages.calibration_images).
- A two-expert conversion (Wan2.2 A14B): the same, with the pipeline load_converted gives (every
  expert converted), all experts in teacher mode, then all in student mode.
- A bare transformer (no VAE, no text encoder) is refused with one line: pass --base PIPELINE.

The files (video, contact sheet, the model card's section) are written by hla_convert.io.sample_media,
whose names are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import first_line
from .checks import shown
from .sample_media import (  # re-exported: the files a sample becomes
    FPS,
    MIN_FRAME_PX,
    SEPARATOR_PX,
    VIDEO_SUFFIXES,
    SampleError,
    SampleResult,
    add_to_output,
    card_section,
    check_video_path,
    contact_sheet,
    default_video_suffix,
    encode_contact_sheet,
    encode_outputs,
    encode_video,
    frame_psnr,
    mp4_plugin,
    side_by_side,
    upscale,
    write_contact_sheet,
    write_video,
)

MAX_STEPS = 1000
DEFAULT_STEPS = 10
DEFAULT_PROMPT = "a red fox runs across a snowy meadow"
# What an --inputs file may hand a pipeline (the demo takes its transformer's forward inputs).
PIPELINE_INPUTS = ("prompt_embeds", "negative_prompt_embeds", "latents")


def latents_to_frames(latents: torch.Tensor) -> np.ndarray:
    """Pixel-space latents ``[1, 3, F, H, W]`` in [-1, 1] as frames ``[F, H, W, 3]`` uint8."""
    x = latents.detach().float().cpu()[0].clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def demo_inputs(seed: int) -> tuple[dict[str, Any], str]:
    """The demo's conditioning for a seed: a random prompt (shape, colour, direction); its text."""
    from ..stages import demo_data as dd

    g = torch.Generator().manual_seed(seed)
    classes = dd.sample_classes(1, g)
    shape = (1, dd.DEMO_CHANNELS, dd.DEMO_FRAMES, dd.DEMO_HEIGHT, dd.DEMO_WIDTH)
    item = {
        "hidden_states": torch.zeros(shape),
        "timestep": torch.zeros(1),
        "encoder_hidden_states": dd.prompt_embeddings(classes),
    }
    return item, dd.describe_class(classes[0])


def sample_noise(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """The starting noise of a seed (CPU generator, so every device starts from the same noise)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


MAX_SEED = 2**32 - 1  # torch generators take 64 bits; sample_noise multiplies the seed by ~10^6


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise SampleError(f"seed must be an integer from 0 to {MAX_SEED}, got {str(seed)[:40]}")


def with_demo_inputs(item: dict[str, torch.Tensor], inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The demo's conditioning `item` (demo_inputs) with an --inputs file's tensors in place of its
    own: the same keys, floating point (cast to the demo's dtype), hidden_states [1, 3, F, H, W]
    with H and W even (2x2 patches), encoder_hidden_states [1, L, 32], timestep as the demo's.
    Anything else is a SampleError naming the key, not an error from inside the model."""
    unknown = sorted(set(inputs) - set(item))
    if unknown:
        raise SampleError(f"--inputs holds {unknown[0]!r}; the demo model takes {', '.join(item)}")
    out = dict(item)
    for key, value in inputs.items():
        ref = item[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else type(value).__name__
            raise SampleError(f"--inputs {key} is {kind}; the demo model takes floating-point tensors")
        shape = tuple(value.shape)
        if key == "hidden_states":
            # the demo's RoPE covers at most rope_max_seq_len patches per axis (2x2 patches over H, W);
            # past it the model fails inside its RoPE (exit 3), and the video would be past any memory
            most = _demo_rope_len()
            ok = len(shape) == 5 and shape[:2] == tuple(ref.shape[:2]) and min(shape) > 0 and shape[3] % 2 == 0 and shape[4] % 2 == 0
            ok = ok and shape[2] <= most and shape[3] <= 2 * most and shape[4] <= 2 * most
            wanted = f"[1, {ref.shape[1]}, F, H, W] with H and W even, F at most {most}, H and W at most {2 * most}"
        elif key == "encoder_hidden_states":
            ok = len(shape) == 3 and shape[0] == 1 and shape[1] > 0 and shape[2] == ref.shape[2]
            wanted = f"[1, L, {ref.shape[2]}]"
        else:
            ok, wanted = shape == tuple(ref.shape), str(list(ref.shape))
        if not ok:
            raise SampleError(f"--inputs {key} has shape {list(shape)}; the demo model takes {wanted}")
        out[key] = value.to(ref.dtype)
    return out


def _demo_rope_len() -> int:
    """The demo model's rope_max_seq_len (its config.json, the one home of that number)."""
    import json

    from ..stages import demo_data as dd

    return int(json.loads((dd.demo_model_dir() / "config.json").read_text())["rope_max_seq_len"])


def check_steps(steps: int | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS):
        raise SampleError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")


def read_inputs_file(path: str | Path) -> dict[str, torch.Tensor]:
    """An --inputs file: a safetensors file of named tensors (no JSON: tensors stay tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..user_files import MAX_TENSOR_FILE_BYTES, check_regular_file

    path = Path(path)
    try:
        is_file = path.is_file()
    except OSError as exc:  # a name too long for the file system
        raise SampleError(f"--inputs {shown(str(path))} is not a usable path ({exc.strerror or type(exc).__name__})") from None
    if not is_file and not path.exists():
        raise SampleError(f"--inputs {str(path)!r} is not a file (give a .safetensors file of named tensors)")
    check_regular_file(path, f"--inputs {str(path)!r}", MAX_TENSOR_FILE_BYTES, SampleError)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SampleError(f"--inputs {str(path)!r} is not a readable safetensors file ({first_line(exc)})") from None
    if not tensors:
        raise SampleError(f"--inputs {str(path)!r} holds no tensors")
    for key, value in tensors.items():  # NaN conditioning samples a NaN video that "succeeds" (exit 0)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise SampleError(f"--inputs {str(path)!r}: {key} holds NaN or infinite values")
    return tensors


def sample_side_by_side(
    out_dir: str | Path,
    base: str | None = None,
    inputs: dict[str, Any] | None = None,
    seed: int = 0,
    steps: int | None = None,
    device: str | None = None,
    prompt: str | None = None,
    revision: str | None = None,
    config: str | None = None,
    teacher_steps: int = 0,
) -> SampleResult:
    """Sample the conversion in `out_dir` (a folder, or a Hub ID at `revision`) as teacher and as
    student from the same noise.

    teacher_steps: the first k steps of the student's run by the teacher (model.teacher_steps: the
    sampling-time lever, at the softmax cost of those k steps); below `steps`.

    config: the diffusers config of a single-file base (default: the one recorded at conversion;
    a pipeline config gives the pipeline that samples).

    base: where to load the base model from (as load_converted); a pipeline (folder or Hub ID)
    runs whole (see the module docstring). steps: scheduler steps (default: the recipe's
    validation.sampling_steps). prompt: the pipeline's prompt (default DEFAULT_PROMPT; the demo
    draws its own from the seed). inputs: for the demo, forward keyword arguments that replace its
    conditioning (``hidden_states`` sets the latent shape ``[1, C, F, H, W]``); for a pipeline,
    PIPELINE_INPUTS keyword arguments of its call (e.g. ``prompt_embeds`` instead of a prompt).
    """
    from .hub import resolve_output_dir
    from ..model.loading import DEMO_MODEL_NAME, resolve_model
    from .converted import base_of, read_output
    from ..recipe import load_recipe

    check_steps(steps)
    check_seed(seed)
    if isinstance(teacher_steps, bool) or not isinstance(teacher_steps, int) or teacher_steps < 0:
        raise SampleError(f"teacher_steps must be a whole number >= 0, got {teacher_steps!r}")
    out_dir = resolve_output_dir(out_dir, revision)
    info, recipe_path, _ = read_output(out_dir)
    recipe = load_recipe(str(recipe_path))
    if steps is None:
        steps = recipe.validation.sampling_steps or DEFAULT_STEPS
    if teacher_steps >= steps:
        raise SampleError(
            f"--teacher-steps {teacher_steps} must be below the {steps} sampling steps: the first k run by the teacher, the rest by the conversion"
        )
    source, rev, subfolder, config = base_of(info, base, config)
    ref = resolve_model(source, rev, subfolder, config)
    if ref.is_demo or (info.get("base_source") == DEMO_MODEL_NAME and not ref.pipeline_dir):  # --base: a copy of the demo
        if prompt is not None:
            raise SampleError("--prompt applies to pipelines; the demo model's prompt is drawn from --seed (or give --inputs)")
        return _sample_demo(out_dir, base, inputs, seed, steps, device, teacher_steps)
    if not ref.pipeline_dir:
        raise SampleError(
            f"the base {ref.path!r} is a bare transformer: no text encoder and no VAE to sample with; "
            "pass --base with its diffusers pipeline (folder or Hub ID)"
        )
    return _sample_pipeline(out_dir, ref, recipe, base, inputs, seed, steps, device, prompt, teacher_steps)


def _sample_demo(
    out_dir: Path, base: str | None, inputs: dict[str, Any] | None, seed: int, steps: int, device: str | None, teacher_steps: int = 0
) -> SampleResult:
    from ..stages.drift import sample_latents
    from ..model.modes import set_attention_mode
    from .converted import load_converted
    from ..model.pipeline_loading import demo_scheduler

    scheduler = demo_scheduler()  # the drift check's, through pipeline_loading.load_scheduler
    item, prompt = demo_inputs(seed)
    if inputs is not None:
        item, prompt = with_demo_inputs(item, inputs), None
    hs = item["hidden_states"]
    model = load_converted(out_dir, base=base, device=device)
    dev = next(model.parameters()).device
    item = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
    noise = sample_noise(hs.shape, seed)
    finals = {}
    for mode in ("teacher", "student"):
        set_attention_mode(model, mode)
        k = teacher_steps if mode == "student" else 0
        finals[mode] = sample_latents(model, item, scheduler, steps, noise.to(dev), teacher_steps=k).float().cpu()
    set_attention_mode(model, "student")
    teacher, student = latents_to_frames(finals["teacher"]), latents_to_frames(finals["student"])
    return SampleResult(
        teacher=teacher,
        student=student,
        teacher_latents=finals["teacher"],
        student_latents=finals["student"],
        noise=noise,
        inputs={k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in item.items()},
        psnr_db=frame_psnr(teacher, student),
        steps=steps,
        seed=seed,
        scheduler=type(scheduler).__name__,
        prompt=prompt,
        teacher_steps=teacher_steps,
    )


def load_pipeline(model: torch.nn.Module, ref: Any, device: Any) -> Any:
    """The diffusers pipeline of `ref` (loading.ModelRef with a pipeline_dir) around `model` as its
    transformer, on `device`, progress bars off."""
    import diffusers
    from diffusers import DiffusionPipeline

    from ..model.loading import quiet_loading

    where = ref.pipeline_dir
    kwargs = {"revision": ref.revision} if ref.revision else {}
    try:
        # The concrete class: only its from_pretrained takes our transformer in place of its own.
        name = DiffusionPipeline.load_config(where, **kwargs)["_class_name"]
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise SampleError(f"{where}: its pipeline class {name!r} is not in diffusers {diffusers.__version__}")
        with quiet_loading():
            pipe = cls.from_pretrained(where, transformer=model, torch_dtype=model.dtype, **kwargs)
    except SampleError:
        raise
    except Exception as exc:  # noqa: BLE001 - many ways a folder is not a loadable pipeline
        raise SampleError(f"cannot load the diffusers pipeline {where!r}: {first_line(exc)}") from None
    if getattr(pipe, "transformer", None) is not model:
        raise SampleError(f"the pipeline {where!r} did not take the converted transformer")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video_frames(output: Any) -> np.ndarray:
    """A pipeline's first video (output_type "np": ``[B, F, H, W, 3]`` in [0, 1]) as uint8 frames ``[F, H, W, 3]``."""
    video = output.frames[0] if hasattr(output, "frames") else output[0][0]
    if isinstance(video, torch.Tensor):
        video = video.detach().float().cpu().numpy()
    if isinstance(video, list):  # PIL images
        video = np.stack([np.asarray(im.convert("RGB")) for im in video]).astype(np.float32) / 255.0
    video = np.asarray(video, dtype=np.float32)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise SampleError(f"the pipeline returned frames of shape {list(video.shape)}, not [F, H, W, 3]")
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _conditioning_image(pipe: Any, recipe: Any, seed: int) -> dict[str, Any]:
    """An image-to-video pipeline's image: the first of the recipe's calibration.images, or the
    held-out synthetic image of run `seed` (stages.calibration_images); {} for other pipelines."""
    from ..stages.calibration_images import image_conditioned, image_kwargs, read_images

    if not image_conditioned(pipe):
        return {}
    images = read_images(recipe.calibration.images)[:1] if recipe.calibration.images is not None else None
    return image_kwargs(pipe, recipe, "heldout", seed, images)


def _sample_pipeline(
    out_dir: Path,
    ref: Any,
    recipe: Any,
    base: str | None,
    inputs: dict[str, Any] | None,
    seed: int,
    steps: int,
    device: str | None,
    prompt: str | None,
    teacher_steps: int = 0,
) -> SampleResult:
    import contextlib
    import inspect

    from ..model.modes import set_attention_mode
    from ..model.teacher_steps import TeacherSteps
    from .adapter import read_adapter_info
    from .output import experts_of
    from .converted import load_converted

    unknown = sorted(set(inputs or {}) - set(PIPELINE_INPUTS))
    if unknown:
        raise SampleError(f"--inputs {unknown[0]!r}: a pipeline takes {', '.join(PIPELINE_INPUTS)} from an inputs file")
    model = load_converted(out_dir, base=base, device=device, config=ref.config)
    if isinstance(model, torch.nn.Module):
        dev = next(model.parameters()).device
        pipe, nets = load_pipeline(model, ref, dev), [model]
    else:  # a two-expert conversion: the pipeline with every expert converted (io.converted.load_converted)
        pipe = model
        nets = [getattr(pipe, name) for name in experts_of(read_adapter_info(out_dir))]
        dev = next(nets[0].parameters()).device
    accepted = inspect.signature(pipe.__call__).parameters
    cal = recipe.calibration
    call: dict[str, Any] = {"num_frames": cal.frames, "height": cal.height, "width": cal.width}
    call = {k: v for k, v in call.items() if k in accepted}
    call |= {"num_inference_steps": steps, "output_type": "np"}
    call |= {k: v.to(dev) for k, v in (inputs or {}).items()}
    if "prompt_embeds" not in call:
        prompt = prompt or DEFAULT_PROMPT
        call["prompt"] = prompt
    call |= _conditioning_image(pipe, recipe, seed)
    frames = {}
    try:
        for mode in ("teacher", "student"):
            for net in nets:
                set_attention_mode(net, mode)
            mixed = TeacherSteps(nets, pipe.scheduler, teacher_steps) if mode == "student" and teacher_steps else contextlib.nullcontext()
            with mixed:
                # A CPU generator seeded alike: both runs start from the same noise, on any device.
                frames[mode] = video_frames(pipe(**call, generator=torch.Generator().manual_seed(seed)))
    finally:
        for net in nets:
            set_attention_mode(net, "student")
    return SampleResult(
        teacher=frames["teacher"],
        student=frames["student"],
        teacher_latents=None,
        student_latents=None,
        noise=None,
        inputs={k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in call.items() if k != "image"},
        psnr_db=frame_psnr(frames["teacher"], frames["student"]),
        steps=steps,
        seed=seed,
        scheduler=type(pipe.scheduler).__name__,
        prompt=prompt,
        pipeline=type(pipe).__name__,
        teacher_steps=teacher_steps,
    )


__all__ = [
    "DEFAULT_PROMPT",
    "DEFAULT_STEPS",
    "FPS",
    "MAX_STEPS",
    "MIN_FRAME_PX",
    "PIPELINE_INPUTS",
    "SEPARATOR_PX",
    "VIDEO_SUFFIXES",
    "SampleError",
    "SampleResult",
    "add_to_output",
    "card_section",
    "check_steps",
    "check_video_path",
    "contact_sheet",
    "default_video_suffix",
    "demo_inputs",
    "encode_contact_sheet",
    "encode_outputs",
    "encode_video",
    "frame_psnr",
    "latents_to_frames",
    "load_pipeline",
    "mp4_plugin",
    "read_inputs_file",
    "sample_noise",
    "sample_side_by_side",
    "side_by_side",
    "upscale",
    "video_frames",
    "write_contact_sheet",
    "write_video",
]
