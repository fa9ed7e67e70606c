"""Look at a conversion: the teacher (the base model) and the student (the converted model) sampled
from the same noise, written as a side-by-side video and a PNG contact sheet with per-frame PSNR.

Both runs use one copy of the weights: `set_attention_mode(model, "teacher")` is the base model
(softmax cores, LoRA adapters disabled), "student" the converted one.

- The embedded demo (pixel-space latents: the video itself in [-1, 1]): the drift check's scheduler
  loop (`drift.sample_latents`), plain, no guidance; the prompt is drawn from the seed.
- A base that is a diffusers pipeline (folder or Hub ID): the whole pipeline, twice, with the
  converted transformer as its transformer (teacher mode, then student mode): its text encoder,
  its scheduler and guidance defaults, the same seeded generator (so the same initial noise), and
  its VAE to decode. The video size is the recipe's calibration size.
- A bare transformer (no VAE, no text encoder) is refused with one line: pass --base PIPELINE.

Files: the video is MP4 when imageio has an encoder (PyAV, or imageio-ffmpeg), GIF (Pillow)
otherwise; the contact sheet is a PNG. Each is encoded in memory and written atomically.
"""

from __future__ import annotations

import importlib.util
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoints import atomic_write_bytes
from .errors import first_line
from .drift import PSNR_IDENTICAL  # dB reported for identical frames, as in the drift report

MIN_FRAME_PX = 128  # tiny frames are upscaled (nearest) to at least this many pixels a side
SEPARATOR_PX = 4
FPS = 4
MAX_STEPS = 1000
DEFAULT_STEPS = 10
DEFAULT_PROMPT = "a red fox runs across a snowy meadow"
# What an --inputs file may hand a pipeline (the demo takes its transformer's forward inputs).
PIPELINE_INPUTS = ("prompt_embeds", "negative_prompt_embeds", "latents")
VIDEO_SUFFIXES = (".mp4", ".gif")


class SampleError(ValueError):
    """A conversion or request `sample` cannot serve; the message is one line saying why."""


@dataclass
class SampleResult:
    """Teacher and student samples from the same noise.

    teacher / student: frames ``[F, H, W, 3]`` uint8 at the model's resolution.
    teacher_latents / student_latents: the final latents ``[1, C, F, H, W]`` (float32, CPU); None
    for a pipeline run (its VAE decoded them inside the pipeline). noise: the demo's starting noise
    (a pipeline draws its own from the seeded generator: None).
    psnr_db: per frame, student against teacher (uint8 frames, peak 255; PSNR_IDENTICAL if equal).
    """

    teacher: np.ndarray
    student: np.ndarray
    teacher_latents: torch.Tensor | None
    student_latents: torch.Tensor | None
    noise: torch.Tensor | None
    inputs: dict[str, Any]
    psnr_db: list[float]
    steps: int
    seed: int
    scheduler: str
    prompt: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    pipeline: str | None = None  # the pipeline class of a pipeline run

    def summary(self) -> dict[str, Any]:
        """What --json reports (no tensors)."""
        return {
            "frames": int(self.teacher.shape[0]),
            "height": int(self.teacher.shape[1]),
            "width": int(self.teacher.shape[2]),
            "steps": self.steps,
            "seed": self.seed,
            "scheduler": self.scheduler,
            "pipeline": self.pipeline,
            "prompt": self.prompt,
            "psnr_db": list(self.psnr_db),
            "psnr_db_mean": float(np.mean(self.psnr_db)) if self.psnr_db else None,
            "files": dict(self.files),
        }


def latents_to_frames(latents: torch.Tensor) -> np.ndarray:
    """Pixel-space latents ``[1, 3, F, H, W]`` in [-1, 1] as frames ``[F, H, W, 3]`` uint8."""
    x = latents.detach().float().cpu()[0].clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def frame_psnr(teacher: np.ndarray, student: np.ndarray) -> list[float]:
    """PSNR (dB, peak 255) of each student frame against the teacher's; frames ``[F, H, W, 3]``."""
    diff = teacher.astype(np.float64) - student.astype(np.float64)
    mse = (diff**2).reshape(diff.shape[0], -1).mean(axis=1)
    return [PSNR_IDENTICAL if m == 0 else min(PSNR_IDENTICAL, 10 * math.log10(255.0**2 / m)) for m in mse]


def demo_inputs(seed: int) -> tuple[dict[str, Any], str]:
    """The demo's conditioning for a seed: a random prompt (shape, colour, direction); its text."""
    from . import demo_data as dd

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


def check_steps(steps: int | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS):
        raise SampleError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")


def read_inputs_file(path: str | Path) -> dict[str, torch.Tensor]:
    """An --inputs file: a safetensors file of named tensors (no JSON: tensors stay tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SampleError(f"--inputs {str(path)!r} is not a file (give a .safetensors file of named tensors)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SampleError(f"--inputs {str(path)!r} is not a readable safetensors file ({first_line(exc)})") from None
    if not tensors:
        raise SampleError(f"--inputs {str(path)!r} holds no tensors")
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
) -> SampleResult:
    """Sample the conversion in `out_dir` (a folder, or a Hub ID at `revision`) as teacher and as
    student from the same noise.

    base: where to load the base model from (as load_converted); a pipeline (folder or Hub ID)
    runs whole (see the module docstring). steps: scheduler steps (default: the recipe's
    validation.sampling_steps). prompt: the pipeline's prompt (default DEFAULT_PROMPT; the demo
    draws its own from the seed). inputs: for the demo, forward keyword arguments that replace its
    conditioning (``hidden_states`` sets the latent shape ``[1, C, F, H, W]``); for a pipeline,
    PIPELINE_INPUTS keyword arguments of its call (e.g. ``prompt_embeds`` instead of a prompt).
    """
    from .hub import resolve_output_dir
    from .loading import resolve_model
    from .output import base_of, read_output
    from .recipes import load_recipe

    check_steps(steps)
    out_dir = resolve_output_dir(out_dir, revision)
    info, recipe_path, _ = read_output(out_dir)
    recipe = load_recipe(str(recipe_path))
    if steps is None:
        steps = recipe.validation.sampling_steps or DEFAULT_STEPS
    source, rev, subfolder = (base, None, None) if base is not None else base_of(info)
    ref = resolve_model(source, rev, subfolder)
    if ref.is_demo:
        if prompt is not None:
            raise SampleError("--prompt applies to pipelines; the demo model's prompt is drawn from --seed (or give --inputs)")
        return _sample_demo(out_dir, base, inputs, seed, steps, device)
    if not ref.pipeline_dir:
        raise SampleError(
            f"the base {ref.path!r} is a bare transformer: no text encoder and no VAE to sample with; "
            "pass --base with its diffusers pipeline (folder or Hub ID)"
        )
    return _sample_pipeline(out_dir, ref, recipe, base, inputs, seed, steps, device, prompt)


def _sample_demo(out_dir: Path, base: str | None, inputs: dict[str, Any] | None, seed: int, steps: int, device: str | None) -> SampleResult:
    from .drift import sample_latents
    from .layers import set_attention_mode
    from .output import load_converted
    from .pipeline_loading import demo_scheduler

    scheduler = demo_scheduler()  # the drift check's, through pipeline_loading.load_scheduler
    item, prompt = demo_inputs(seed)
    if inputs is not None:
        item = {**item, **inputs}
        prompt = None
    hs = item["hidden_states"]
    if not isinstance(hs, torch.Tensor) or hs.ndim != 5 or hs.shape[0] != 1 or hs.shape[1] != 3:
        raise SampleError(f"inputs' hidden_states must be a [1, 3, F, H, W] tensor, got {getattr(hs, 'shape', type(hs).__name__)}")
    model = load_converted(out_dir, base=base, device=device)
    dev = next(model.parameters()).device
    item = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
    noise = sample_noise(hs.shape, seed)
    finals = {}
    for mode in ("teacher", "student"):
        set_attention_mode(model, mode)
        finals[mode] = sample_latents(model, item, scheduler, steps, noise.to(dev)).float().cpu()
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
    )


def load_pipeline(model: torch.nn.Module, ref: Any, device: Any) -> Any:
    """The diffusers pipeline of `ref` (loading.ModelRef with a pipeline_dir) around `model` as its
    transformer, on `device`, progress bars off."""
    import diffusers
    from diffusers import DiffusionPipeline

    where = ref.pipeline_dir
    kwargs = {"revision": ref.revision} if ref.revision else {}
    try:
        # The concrete class: only its from_pretrained takes our transformer in place of its own.
        name = DiffusionPipeline.load_config(where, **kwargs)["_class_name"]
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise SampleError(f"{where}: its pipeline class {name!r} is not in diffusers {diffusers.__version__}")
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


def _sample_pipeline(
    out_dir: Path, ref: Any, recipe: Any, base: str | None, inputs: dict[str, Any] | None, seed: int, steps: int, device: str | None, prompt: str | None
) -> SampleResult:
    import inspect

    from .layers import set_attention_mode
    from .output import load_converted

    unknown = sorted(set(inputs or {}) - set(PIPELINE_INPUTS))
    if unknown:
        raise SampleError(f"--inputs {unknown[0]!r}: a pipeline takes {', '.join(PIPELINE_INPUTS)} from an inputs file")
    model = load_converted(out_dir, base=base, device=device)
    dev = next(model.parameters()).device
    pipe = load_pipeline(model, ref, dev)
    accepted = inspect.signature(pipe.__call__).parameters
    cal = recipe.calibration
    call: dict[str, Any] = {"num_frames": cal.frames, "height": cal.height, "width": cal.width}
    call = {k: v for k, v in call.items() if k in accepted}
    call |= {"num_inference_steps": steps, "output_type": "np"}
    call |= {k: v.to(dev) for k, v in (inputs or {}).items()}
    if "prompt_embeds" not in call:
        prompt = prompt or DEFAULT_PROMPT
        call["prompt"] = prompt
    frames = {}
    try:
        for mode in ("teacher", "student"):
            set_attention_mode(model, mode)
            # A CPU generator seeded alike: both runs start from the same noise, on any device.
            frames[mode] = video_frames(pipe(**call, generator=torch.Generator().manual_seed(seed)))
    finally:
        set_attention_mode(model, "student")
    return SampleResult(
        teacher=frames["teacher"],
        student=frames["student"],
        teacher_latents=None,
        student_latents=None,
        noise=None,
        inputs={k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in call.items()},
        psnr_db=frame_psnr(frames["teacher"], frames["student"]),
        steps=steps,
        seed=seed,
        scheduler=type(pipe.scheduler).__name__,
        prompt=prompt,
        pipeline=type(pipe).__name__,
    )


# -- writers ----------------------------------------------------------------------------------


def upscale(frames: np.ndarray, min_px: int = MIN_FRAME_PX) -> np.ndarray:
    """Frames ``[F, H, W, 3]`` repeated (nearest) by the smallest integer factor reaching `min_px`."""
    k = max(1, -(-min_px // min(frames.shape[1], frames.shape[2])))
    return frames.repeat(k, axis=1).repeat(k, axis=2)


def side_by_side(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """Frames ``[F, H', 2 W' + separator, 3]``: teacher | white separator | student, upscaled."""
    t, s = upscale(teacher), upscale(student)
    sep = np.full((t.shape[0], t.shape[1], SEPARATOR_PX, 3), 255, dtype=np.uint8)
    return np.concatenate([t, sep, s], axis=2)


def mp4_plugin() -> str | None:
    """The imageio plugin that can write MP4 here, or None (then videos are GIFs)."""
    if importlib.util.find_spec("av") is not None:
        return "pyav"
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "FFMPEG"
    return None


def default_video_suffix() -> str:
    return ".mp4" if mp4_plugin() else ".gif"


def check_video_path(path: str | Path) -> Path:
    """A video path `write_video` can serve: .mp4 (when an encoder is installed) or .gif."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise SampleError(f"--out {str(path)!r}: the video must end in .mp4 or .gif")
    if suffix == ".mp4" and mp4_plugin() is None:
        raise SampleError(f"--out {str(path)!r}: no MP4 encoder here (pip install av, or imageio-ffmpeg); use a .gif name")
    return path


def encode_video(frames: np.ndarray, suffix: str, fps: int = FPS) -> bytes:
    """Frames ``[F, H, W, 3]`` uint8 as the bytes of an MP4 or a looping GIF."""
    import imageio.v3 as iio

    if suffix == ".gif":
        # Pillow merges identical consecutive frames into one longer frame: a still sample's GIF
        # holds fewer frames than were sampled (the same picture, the same total duration).
        return iio.imwrite("<bytes>", frames, extension=".gif", duration=int(1000 / fps), loop=0)
    plugin = mp4_plugin()
    if plugin == "pyav":
        return iio.imwrite("<bytes>", frames, extension=".mp4", plugin="pyav", codec="libx264", fps=fps, out_pixel_format="yuv420p")
    return iio.imwrite("<bytes>", frames, extension=".mp4", plugin="FFMPEG", fps=fps, macro_block_size=2)


def write_video(path: str | Path, result: SampleResult, fps: int = FPS) -> Path:
    """The side-by-side video (teacher | student), written atomically."""
    path = check_video_path(path)
    return atomic_write_bytes(path, encode_video(side_by_side(result.teacher, result.student), path.suffix.lower(), fps))


def contact_sheet(result: SampleResult) -> "Any":
    """A PIL image: row 1 the teacher's frames, row 2 the student's, each column's PSNR under it."""
    from PIL import Image, ImageDraw, ImageFont

    t, s = upscale(result.teacher), upscale(result.student)
    n, h, w = t.shape[0], t.shape[1], t.shape[2]
    gap, label_w, text_h = SEPARATOR_PX, 60, 18
    width = label_w + n * (w + gap)
    height = 2 * (h + gap) + text_h + gap
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, (name, frames) in enumerate((("teacher", t), ("student", s))):
        y = row * (h + gap)
        draw.text((4, y + h // 2 - 6), name, fill=(0, 0, 0), font=font)
        for i in range(n):
            sheet.paste(Image.fromarray(frames[i]), (label_w + i * (w + gap), y))
    y = 2 * (h + gap) + 2
    draw.text((4, y), "PSNR dB", fill=(0, 0, 0), font=font)
    for i, p in enumerate(result.psnr_db):
        text = "identical" if p >= PSNR_IDENTICAL else f"{p:.1f}"
        draw.text((label_w + i * (w + gap) + 4, y), text, fill=(0, 0, 0), font=font)
    return sheet


def encode_contact_sheet(result: SampleResult) -> bytes:
    buf = io.BytesIO()
    contact_sheet(result).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_contact_sheet(path: str | Path, result: SampleResult) -> Path:
    """The contact sheet as a PNG, written atomically."""
    return atomic_write_bytes(path, encode_contact_sheet(result))


def encode_outputs(result: SampleResult, video_path: str | Path) -> dict[Path, bytes]:
    """{video path: side-by-side video, the same path with .png: contact sheet}, encoded in memory."""
    path = check_video_path(video_path)
    return {
        path: encode_video(side_by_side(result.teacher, result.student), path.suffix.lower()),
        path.with_suffix(".png"): encode_contact_sheet(result),
    }


# -- the output folder ------------------------------------------------------------------------


def card_section(video: str, sheet: str, result: SampleResult) -> str:
    """The model card's "Sample" section (file names relative to the card)."""
    psnr = ", ".join("identical" if p >= PSNR_IDENTICAL else f"{p:.1f}" for p in result.psnr_db)
    what = f' (prompt "{result.prompt}")' if result.prompt else ""
    return "\n".join(
        [
            "## Sample",
            "",
            f"![teacher (top) and student (bottom), frame by frame]({sheet})",
            "",
            f"The base model (teacher) and the converted one (student) from the same noise{what}, seed {result.seed}, "
            f"{result.steps} {result.scheduler} steps; side by side as a video: [`{video}`]({video}). "
            f"Per-frame PSNR of the student against the teacher (dB): {psnr}.",
            "",
        ]
    )


def add_to_output(out_dir: str | Path, info: dict[str, Any], report: dict[str, Any], files: dict[Path, bytes], result: SampleResult) -> None:
    """Write sample files into a conversion's folder: list them in its manifest first (so that
    `convert --overwrite` may replace them and a killed write leaves nothing unlisted), write them,
    and link them from the model card. The caller holds the folder's lock. In a folder without a
    manifest (written before manifests existed) the files are written and nothing else changes.
    """
    import hashlib

    from .output import CARD_FILE, model_card
    from .output_guard import read_manifest, write_manifest

    out = Path(out_dir)
    before = read_manifest(out)
    if before is None:
        for path, data in files.items():
            atomic_write_bytes(path, data)
        return
    names = {p.suffix.lower(): p.name for p in files}
    video = next((names[s] for s in VIDEO_SUFFIXES if s in names), None)
    card = model_card(info, report)
    if video and ".png" in names:
        card = card.rstrip("\n") + "\n\n" + card_section(video, names[".png"], result)
    new = {p.name: data for p, data in files.items()} | {CARD_FILE: card.encode("utf-8")}
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in new.items()}
    listed = {k: list(v) for k, v in before.items()}
    for name, h in hashes.items():
        listed[name] = [h] + [old for old in before.get(name, []) if old != h]
    write_manifest(out, listed)
    for name, data in new.items():
        atomic_write_bytes(out / name, data)
    write_manifest(out, listed | {name: [h] for name, h in hashes.items()})


__all__ = [
    "add_to_output",
    "SampleError",
    "SampleResult",
    "check_video_path",
    "contact_sheet",
    "encode_outputs",
    "default_video_suffix",
    "frame_psnr",
    "latents_to_frames",
    "load_pipeline",
    "read_inputs_file",
    "sample_side_by_side",
    "side_by_side",
    "write_contact_sheet",
    "write_video",
]
