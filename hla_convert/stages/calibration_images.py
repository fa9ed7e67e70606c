"""The conditioning images of an image-to-video pipeline's calibration trajectories.

An image-to-video pipeline (diffusers' WanImageToVideoPipeline: its `__call__` requires `image`)
is called with one image per prompt: the png / jpg files of `calibration.images` in sorted order,
cycled over the prompts (the pipeline resizes them to calibration.height x width), or, when the
recipe names no folder, a seeded synthetic image per prompt. The pipeline turns the image into
the transformer's conditioning itself (Wan2.1 I2V: the VAE latent of the first frame and a mask
in hidden_states' extra channels, CLIP image tokens in `encoder_hidden_states_image`; Wan2.2:
the latent only), so the recorded inputs carry it as they carry the text.

The synthetic image is smooth coloured noise: a 3 x 4 x 6 gaussian field drawn from the split's
seed and the run's index, upsampled bicubically to the calibration size and squashed to 0..255.
It has the large smooth regions and colour edges of a photograph's first frame, and is the same
for the same recipe every time (so `validate` sees the images the conversion saw).
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any

import torch

from .calibration_base import CalibrationError, split_generator
from ..recipe import Recipe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_conditioned(pipe: Any) -> bool:
    """Whether `pipe` is an image-to-video pipeline: its __call__ requires an `image`."""
    param = inspect.signature(pipe.__call__).parameters.get("image")
    return param is not None and param.default is inspect.Parameter.empty


def image_files(folder: str | Path) -> list[Path]:
    """The png / jpg files of a calibration.images folder, sorted, each a regular file of a bounded
    size (checked before the run loads the model); CalibrationError, one line, otherwise."""
    from ..user_files import MAX_IMAGE_BYTES, check_regular_file

    where = Path(folder).expanduser()
    if not where.is_dir():
        raise CalibrationError(f"calibration.images: {str(folder)!r} is not a folder of png / jpg images")
    files = sorted(p for p in where.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"calibration.images: no {' / '.join(IMAGE_SUFFIXES)} files in {str(folder)!r}")
    for f in files:
        check_regular_file(f, f"calibration.images: {f}", MAX_IMAGE_BYTES, CalibrationError)
    return files


def read_images(folder: str | Path) -> list[Any]:
    """The images of a calibration.images folder as RGB PIL images, in file-name order; a file
    that is not a readable image is CalibrationError naming it."""
    from PIL import Image

    from ..user_files import MAX_IMAGE_BYTES, read_regular_file

    images = []
    for f in image_files(folder):
        data = read_regular_file(f, f"calibration.images: {f}", MAX_IMAGE_BYTES, CalibrationError)
        try:
            with Image.open(io.BytesIO(data)) as im:
                images.append(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a damaged file
            raise CalibrationError(f"calibration.images: {f}: not a readable image ({type(e).__name__}: {e})") from None
    return images


def synthetic_image(seed: int, split: str, index: int, height: int, width: int) -> Any:
    """Run `index`'s synthetic conditioning image of `split` (see the module docstring): RGB, height x width."""
    from PIL import Image

    g = torch.Generator().manual_seed((split_generator(seed, split).initial_seed() * 7919 + index) % 2**63)
    field = torch.randn(1, 3, 4, 6, generator=g)
    smooth = torch.nn.functional.interpolate(field, size=(height, width), mode="bicubic", align_corners=False)
    pixels = (torch.sigmoid(1.5 * smooth[0]) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def _not_image_to_video(name: str) -> CalibrationError:
    return CalibrationError(
        f"calibration.images: {name} is not an image-to-video pipeline (its __call__ takes no image); set calibration.images to null"
    )


def check_image_pipeline(pipeline_dir: str | Path | None) -> None:
    """Before the model load: refuse calibration.images for a local pipeline folder whose
    model_index.json names a diffusers pipeline that takes no image (a Hub ID or a folder without
    one is checked once the pipeline is loaded, by image_kwargs)."""
    from ..user_files import read_json_file

    index = Path(pipeline_dir).expanduser() / "model_index.json" if pipeline_dir else None
    if index is None or not index.is_file():
        return
    info = read_json_file(index, f"{index}", error=CalibrationError)
    name = info.get("_class_name") if isinstance(info, dict) else None
    if not isinstance(name, str):
        return
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is not None and not image_conditioned(cls):
        raise _not_image_to_video(name)


def image_kwargs(pipe: Any, recipe: Recipe, split: str, run: int, images: list[Any] | None) -> dict[str, Any]:
    """The image argument of trajectory run `run` of `split`: {"image": ...} for an image-to-video
    pipeline (`images`: read_images of calibration.images, cycled; None: synthetic), {} otherwise."""
    if not image_conditioned(pipe):
        if recipe.calibration.images is not None:
            raise _not_image_to_video(type(pipe).__name__)
        return {}
    cal = recipe.calibration
    if images:
        return {"image": images[run % len(images)]}
    return {"image": synthetic_image(cal.seed, split, run, cal.height, cal.width)}


__all__ = ["IMAGE_SUFFIXES", "check_image_pipeline", "image_conditioned", "image_files", "image_kwargs", "read_images", "synthetic_image"]
