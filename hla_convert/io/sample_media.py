"""A sample as files: the side-by-side video (teacher | student), the PNG contact sheet with
per-frame PSNR, and the "Sample" section of an output folder's model card (hla_convert.io.sampling
makes the SampleResult these write).

The video is MP4 (H.264, yuv420p) by default, through imageio's FFMPEG plugin and the ffmpeg binary
that the imageio-ffmpeg wheel bundles (a dependency, as for diffusers' export_to_video: no system
package needed; PyAV is used instead where only it is there); GIF (Pillow) when the file name asks
for .gif. The contact sheet is a PNG. Each is encoded in memory and written atomically (a temporary
file in the same folder, then os.replace: atomic_files.atomic_write_bytes).
"""

from __future__ import annotations

import importlib.util
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_files import atomic_write_bytes
from ..stages.drift import PSNR_IDENTICAL, psnr_db  # dB reported for identical frames, as in the drift report

MIN_FRAME_PX = 128  # tiny frames are upscaled (nearest) to at least this many pixels a side
SEPARATOR_PX = 4
FPS = 4
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
    teacher_steps: how many of the student run's first steps the teacher ran (model.teacher_steps).
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
    teacher_steps: int = 0

    def summary(self) -> dict[str, Any]:
        """What --json reports (no tensors)."""
        return {
            "frames": int(self.teacher.shape[0]),
            "height": int(self.teacher.shape[1]),
            "width": int(self.teacher.shape[2]),
            "steps": self.steps,
            "teacher_steps": self.teacher_steps,
            "seed": self.seed,
            "scheduler": self.scheduler,
            "pipeline": self.pipeline,
            "prompt": self.prompt,
            "psnr_db": list(self.psnr_db),
            "psnr_db_mean": float(np.mean(self.psnr_db)) if self.psnr_db else None,
            "files": dict(self.files),
        }


def frame_psnr(teacher: np.ndarray, student: np.ndarray) -> list[float]:
    """PSNR (dB, peak 255) of each student frame against the teacher's; frames ``[F, H, W, 3]``."""
    diff = teacher.astype(np.float64) - student.astype(np.float64)
    mse = (diff**2).reshape(diff.shape[0], -1).mean(axis=1)
    return [psnr_db(float(m), 255.0) for m in mse]


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
    """The imageio plugin that writes MP4 here: "FFMPEG" (imageio-ffmpeg, a dependency), else
    "pyav" (PyAV), else None (an install without its dependencies: MP4 is refused, GIF works)."""
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "FFMPEG"
    if importlib.util.find_spec("av") is not None:
        return "pyav"
    return None


def default_video_suffix() -> str:
    """The video of `sample` without --out (and of --out without a suffix): MP4, as model cards show."""
    return ".mp4"


def check_video_path(path: str | Path) -> Path:
    """A video path `write_video` can serve: .mp4 or .gif (SampleError, one line, otherwise)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise SampleError(f"--out {str(path)!r}: the video must end in .mp4 or .gif")
    if suffix == ".mp4" and mp4_plugin() is None:
        raise SampleError(
            f"--out {str(path)!r}: no MP4 encoder here: imageio-ffmpeg, a dependency of hla-convert, is not installed "
            "(pip install imageio-ffmpeg); or use a .gif name"
        )
    return path


def check_video_folder(path: Path) -> None:
    """Refuse (SampleError, one line) a video path whose folder cannot be written: its nearest
    existing ancestor (folders that are missing are created) must be a writable folder. Checked
    before the (slow) sampling, so that a bad --out costs nothing."""
    parent = path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SampleError(f"--out {str(path)!r} cannot be written: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SampleError(f"--out {str(path)!r} cannot be written: the folder {str(parent)!r} is not writable")


def even_size(frames: np.ndarray) -> np.ndarray:
    """Frames ``[F, H, W, 3]`` padded (white, bottom / right) to an even height and width: H.264 in
    yuv420p halves the chroma planes, and ffmpeg would otherwise rescale the frames."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=255)


def encode_video(frames: np.ndarray, suffix: str, fps: int = FPS) -> bytes:
    """Frames ``[F, H, W, 3]`` uint8 as the bytes of an MP4 or a looping GIF."""
    import imageio.v3 as iio

    if suffix == ".gif":
        # Pillow merges identical consecutive frames into one longer frame: a still sample's GIF
        # holds fewer frames than were sampled (the same picture, the same total duration).
        return iio.imwrite("<bytes>", frames, extension=".gif", duration=int(1000 / fps), loop=0)
    plugin = mp4_plugin()
    frames = even_size(frames)
    if plugin == "pyav":
        return iio.imwrite("<bytes>", frames, extension=".mp4", plugin="pyav", codec="libx264", fps=fps, out_pixel_format="yuv420p")
    # H.264 in yuv420p (imageio-ffmpeg's default codec and pixel format: what browsers and the Hub play)
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
    mixed = f", its first {result.teacher_steps} steps run by the teacher" if result.teacher_steps else ""
    return "\n".join(
        [
            "## Sample",
            "",
            f"![teacher (top) and student (bottom), frame by frame]({sheet})",
            "",
            f"The base model (teacher) and the converted one (student{mixed}) from the same noise{what}, seed {result.seed}, "
            f"{result.steps} {result.scheduler} steps"
            + (f" through the whole {result.pipeline} (decoded by its VAE)" if result.pipeline else "")
            + f"; side by side as a video: [`{video}`]({video}). "
            f"Per-frame PSNR of the student against the teacher (dB): {psnr}.",
            "",
        ]
    )


SAMPLE_AGAIN = "or give --out a path outside the folder"  # how a refused write of `sample` proceeds


def sample_names(video: Path) -> list[str]:
    """The files `add_to_output` may write into a conversion's folder for the video `video`."""
    from .output import CARD_FILE

    return [video.name, video.with_suffix(".png").name, CARD_FILE]


def add_to_output(out_dir: str | Path, info: dict[str, Any], report: dict[str, Any], files: dict[Path, bytes], result: SampleResult) -> None:
    """Write sample files into a conversion's folder: list them in its manifest first (so that
    `convert --overwrite` may replace them and a killed write leaves nothing unlisted), write them,
    and link them from the model card. The caller holds the folder's lock. In a folder without a
    manifest (written before manifests existed) the files are written and nothing else changes.
    A file that is there and is not the tool's own unchanged file (a README.md the user edited, their
    own sample.png) is never replaced: OutputError, nothing written (output_guard.check_replaceable).
    """
    import hashlib

    from .output import CARD_FILE

    from .model_card import model_card
    from .output_guard import check_replaceable, read_manifest, write_manifest

    out = Path(out_dir)
    before = read_manifest(out)
    if before is None:
        check_replaceable(out, [p.name for p in files], SAMPLE_AGAIN)
        for path, data in files.items():
            atomic_write_bytes(path, data)
        return
    names = {p.suffix.lower(): p.name for p in files}
    video = next((names[s] for s in VIDEO_SUFFIXES if s in names), None)
    card = model_card(info, report)
    if video and ".png" in names:
        card = card.rstrip("\n") + "\n\n" + card_section(video, names[".png"], result)
    new = {p.name: data for p, data in files.items()} | {CARD_FILE: card.encode("utf-8")}
    check_replaceable(out, list(new), SAMPLE_AGAIN)  # sample_into checked before sampling; again for files that appeared since
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in new.items()}
    listed = {k: list(v) for k, v in before.items()}
    for name, h in hashes.items():
        listed[name] = [h] + [old for old in before.get(name, []) if old != h]
    write_manifest(out, listed)
    for name, data in new.items():
        atomic_write_bytes(out / name, data)
    write_manifest(out, listed | {name: [h] for name, h in hashes.items()})


__all__ = [
    "SampleError",
    "SampleResult",
    "SAMPLE_AGAIN",
    "add_to_output",
    "card_section",
    "check_video_folder",
    "check_video_path",
    "contact_sheet",
    "default_video_suffix",
    "encode_contact_sheet",
    "encode_outputs",
    "encode_video",
    "even_size",
    "frame_psnr",
    "mp4_plugin",
    "side_by_side",
    "sample_names",
    "upscale",
    "write_contact_sheet",
    "write_video",
]
