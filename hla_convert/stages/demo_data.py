"""Procedural moving-shape videos and prompt embeddings for the embedded demo model.

The demo model (``hla_convert/demo_model``) is a tiny ``WanTransformer3DModel`` that works
directly in pixel space: there is no VAE, so a video here *is* the model's latent,
``[B, C, F, H, W]`` with values in ``[-1, 1]``.

Each video shows one shape (square, disc or bar) of one colour moving with constant velocity
(one pixel per frame) in one of four directions, wrapping around the frame edges, over a static
grey background texture (a still camera: the background is the same in every frame). What is
drawn is named by a "prompt": ``encoder_hidden_states`` ``[B, DEMO_TEXT_LEN, DEMO_TEXT_DIM]``
built from a fixed, seeded embedding table — one token for the shape, one for the colour, one
for the direction, an end token and zero padding, the way Wan pads its umT5 embeddings. Start
position, size and the background are free random attributes that the prompt does not name.

The static texture is there for the attention: with a plain background the best a denoiser
can do for the background is average everything (near-uniform attention); with a texture that
repeats across frames, and a shape that moves along a line, it pays to attend to the same
place in other frames and along the trajectory.

Everything is deterministic given a ``torch.Generator``; the prompt table does not depend on
the caller's generator at all (it is built from ``PROMPT_TABLE_SEED``), so a prompt means the
same thing at training, calibration and validation time.

Flow-matching convention (as Wan is used with diffusers' ``FlowMatchEulerDiscreteScheduler``):
``x_t = (1 - t) * x0 + t * noise``, the model gets ``timestep = 1000 * t`` and predicts the
velocity ``noise - x0``. :func:`flow_matching_inputs` builds exactly that.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.loading import DEMO_MODEL_PATH  # hla_convert/demo_model: its one home

__all__ = [
    "DEMO_CHANNELS",
    "DEMO_FRAMES",
    "DEMO_HEIGHT",
    "DEMO_WIDTH",
    "DEMO_TEXT_LEN",
    "DEMO_TEXT_DIM",
    "SHAPES",
    "COLOURS",
    "DIRECTIONS",
    "NUM_TRAIN_TIMESTEPS",
    "SIZE_RANGE",
    "TEXTURE_GRID",
    "TEXTURE_AMPLITUDE",
    "demo_model_dir",
    "sample_classes",
    "prompt_embeddings",
    "render_videos",
    "background_texture",
    "sample_videos",
    "flow_matching_inputs",
    "sample_model_inputs",
    "describe_class",
]

DEMO_CHANNELS = 3
DEMO_FRAMES = 8
DEMO_HEIGHT = 16
DEMO_WIDTH = 16
DEMO_TEXT_LEN = 8
DEMO_TEXT_DIM = 32
NUM_TRAIN_TIMESTEPS = 1000

SHAPES = ("square", "disc", "bar")
# RGB in [-1, 1]; chosen to stay distinguishable from the grey background in every channel mix.
COLOURS = {
    "red": (1.0, -0.8, -0.8),
    "green": (-0.8, 1.0, -0.8),
    "blue": (-0.8, -0.8, 1.0),
    "yellow": (1.0, 1.0, -0.8),
}
# (dy, dx) in pixels per frame.
DIRECTIONS = {
    "right": (0, 1),
    "left": (0, -1),
    "down": (1, 0),
    "up": (-1, 0),
}

# Background texture: control points per side and amplitude around the dark grey level.
TEXTURE_GRID = 6
TEXTURE_AMPLITUDE = 0.3
# Half-extent of a shape in pixels, drawn uniformly from this inclusive range.
SIZE_RANGE = (1, 2)

PROMPT_TABLE_SEED = 1234
# Prompt tokens: shape, colour, direction, end; the rest of DEMO_TEXT_LEN is zero padding.
_PROMPT_TOKENS = 4


def demo_model_dir() -> Path:
    """Folder of the shipped demo model (``config.json``, safetensors, ``demo_info.json``)."""
    return DEMO_MODEL_PATH


def _prompt_table(text_dim: int) -> dict[str, torch.Tensor]:
    """Fixed token embeddings ``[n, text_dim]`` per attribute, from ``PROMPT_TABLE_SEED``."""
    g = torch.Generator().manual_seed(PROMPT_TABLE_SEED)
    return {
        "shape": torch.randn(len(SHAPES), text_dim, generator=g),
        "colour": torch.randn(len(COLOURS), text_dim, generator=g),
        "direction": torch.randn(len(DIRECTIONS), text_dim, generator=g),
        "end": torch.randn(1, text_dim, generator=g),
    }


def sample_classes(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform random classes ``[B, 3]`` of (shape, colour, direction) indices."""
    return torch.stack(
        [
            torch.randint(len(SHAPES), (batch,), generator=generator),
            torch.randint(len(COLOURS), (batch,), generator=generator),
            torch.randint(len(DIRECTIONS), (batch,), generator=generator),
        ],
        dim=1,
    )


def describe_class(cls: torch.Tensor) -> str:
    """A class row ``[3]`` as its prompt text, e.g. ``"red disc moving left"``."""
    s, c, d = (int(v) for v in cls)
    return f"{list(COLOURS)[c]} {SHAPES[s]} moving {list(DIRECTIONS)[d]}"


def prompt_embeddings(
    classes: torch.Tensor, text_len: int = DEMO_TEXT_LEN, text_dim: int = DEMO_TEXT_DIM
) -> torch.Tensor:
    """Prompt embeddings ``[B, text_len, text_dim]`` for classes ``[B, 3]``.

    Tokens are (shape, colour, direction, end) followed by zero padding up to ``text_len``.
    """
    if text_len < _PROMPT_TOKENS:
        raise ValueError(f"text_len must be at least {_PROMPT_TOKENS}, got {text_len}")
    table = _prompt_table(text_dim)
    b = classes.shape[0]
    tokens = torch.stack(
        [
            table["shape"][classes[:, 0]],
            table["colour"][classes[:, 1]],
            table["direction"][classes[:, 2]],
            table["end"].expand(b, -1),
        ],
        dim=1,
    )
    pad = torch.zeros(b, text_len - _PROMPT_TOKENS, text_dim)
    return torch.cat([tokens, pad], dim=1)


def render_videos(
    classes: torch.Tensor,
    start: torch.Tensor,
    size: torch.Tensor,
    background: torch.Tensor,
    frames: int = DEMO_FRAMES,
    height: int = DEMO_HEIGHT,
    width: int = DEMO_WIDTH,
) -> torch.Tensor:
    """Draw videos ``[B, 3, F, H, W]`` in ``[-1, 1]``.

    Args:
        classes: ``[B, 3]`` (shape, colour, direction) indices.
        start: ``[B, 2]`` (y, x) centre of the shape at frame 0, in pixels.
        size: ``[B]`` half-extent of the shape in pixels (a square is ``2*size+1`` wide).
        background: ``[B, H, W]`` grey background image in ``[-1, 1]``, the same in every frame.
    """
    b = classes.shape[0]
    vel = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float32)[classes[:, 2]]  # [B, 2]
    t = torch.arange(frames, dtype=torch.float32)
    centre = start.float()[:, None, :] + vel[:, None, :] * t[None, :, None]  # [B, F, 2]
    ys = torch.arange(height, dtype=torch.float32)
    xs = torch.arange(width, dtype=torch.float32)
    # Wrapped offsets from the centre, so shapes leaving one edge re-enter at the opposite one.
    dy = torch.remainder(ys[None, None, :] - centre[..., 0:1] + height / 2, height) - height / 2
    dx = torch.remainder(xs[None, None, :] - centre[..., 1:2] + width / 2, width) - width / 2
    dy = dy[..., :, None]  # [B, F, H, 1]
    dx = dx[..., None, :]  # [B, F, 1, W]
    r = size.float()[:, None, None, None]
    square = (dy.abs() <= r) & (dx.abs() <= r)
    disc = dy**2 + dx**2 <= (r + 0.3) ** 2
    bar = (dy.abs() <= (r / 2).floor()) & (dx.abs() <= 2 * r)
    kind = classes[:, 0][:, None, None, None]
    mask = torch.where(kind == 0, square, torch.where(kind == 1, disc, bar))  # [B, F, H, W]
    colour = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[classes[:, 1]]  # [B, 3]
    bg = background.float()[:, None, None, :, :].expand(b, 3, frames, height, width)
    fg = colour[:, :, None, None, None].expand(b, 3, frames, height, width)
    return torch.where(mask[:, None], fg, bg).contiguous()


def background_texture(batch: int, generator: torch.Generator, height: int, width: int) -> torch.Tensor:
    """Static grey textures ``[B, H, W]`` in ``[-1, -0.1]``: a dark level plus smooth noise.

    A random ``TEXTURE_GRID`` x ``TEXTURE_GRID`` grid upsampled bilinearly (cells of about three
    pixels), so neighbouring 2x2 patches differ and a frame cannot be denoised from its own
    patch alone: the same position in the other frames holds the same background.
    """
    level = -0.75 + 0.3 * torch.rand(batch, 1, 1, 1, generator=generator)
    grid = torch.rand(batch, 1, TEXTURE_GRID, TEXTURE_GRID, generator=generator) * 2 - 1
    tex = torch.nn.functional.interpolate(grid, size=(height, width), mode="bilinear", align_corners=True)
    return (level + TEXTURE_AMPLITUDE * tex).clamp(-1.0, -0.1)[:, 0]


def sample_videos(
    batch: int,
    generator: torch.Generator,
    frames: int = DEMO_FRAMES,
    height: int = DEMO_HEIGHT,
    width: int = DEMO_WIDTH,
    text_len: int = DEMO_TEXT_LEN,
    text_dim: int = DEMO_TEXT_DIM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random videos and their prompts.

    Returns:
        videos ``[B, 3, F, H, W]`` in ``[-1, 1]`` and encoder_hidden_states
        ``[B, text_len, text_dim]``.
    """
    classes = sample_classes(batch, generator)
    start = torch.stack(
        [
            torch.randint(height, (batch,), generator=generator),
            torch.randint(width, (batch,), generator=generator),
        ],
        dim=1,
    )
    size = torch.randint(SIZE_RANGE[0], SIZE_RANGE[1] + 1, (batch,), generator=generator)
    background = background_texture(batch, generator, height, width)
    videos = render_videos(classes, start, size, background, frames, height, width)
    return videos, prompt_embeddings(classes, text_len, text_dim)


def flow_matching_inputs(
    x0: torch.Tensor, generator: torch.Generator, t: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified-flow training inputs for clean videos ``x0`` ``[B, C, F, H, W]``.

    Args:
        t: ``[B]`` noise levels in ``[0, 1]``; uniform random when omitted.

    Returns:
        ``x_t = (1 - t) x0 + t noise`` ``[B, C, F, H, W]``, the model timestep ``1000 t`` ``[B]``
        and the velocity target ``noise - x0`` ``[B, C, F, H, W]``.
    """
    b = x0.shape[0]
    if t is None:
        t = torch.rand(b, generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    tb = t.to(x0.dtype).view(b, *([1] * (x0.ndim - 1)))
    x_t = (1 - tb) * x0 + tb * noise
    return x_t, t * NUM_TRAIN_TIMESTEPS, noise - x0


def sample_model_inputs(
    batch: int, generator: torch.Generator, t: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Noised demo videos as keyword arguments of ``WanTransformer3DModel.forward``.

    Returns ``{"hidden_states": [B, 3, F, H, W], "timestep": [B], "encoder_hidden_states":
    [B, L, text_dim]}`` at the demo shape; ``t`` ``[B]`` in ``[0, 1]``, uniform when omitted.
    """
    x0, ehs = sample_videos(batch, generator)
    x_t, timestep, _ = flow_matching_inputs(x0, generator, t)
    return {"hidden_states": x_t, "timestep": timestep, "encoder_hidden_states": ehs}
