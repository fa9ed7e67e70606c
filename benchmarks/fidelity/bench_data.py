"""Procedural moving-object videos for the fidelity benchmark's teacher models (pixel space, no VAE).

A video is ``[B, 3, F, H, W]`` in ``[-1, 1]`` (the model's latent *is* the video, as in the demo):
1 to 3 objects (disc, square or diamond, soft-edged, radius 2-4 px at 32 x 32) in one of six
saturated colours move with constant velocity in one of eight directions (1 or 2 px per frame,
speed from the prompt) and bounce off the frame edges, over a static, faintly tinted background
texture that is the same in every frame. Later objects are drawn over earlier ones.

Why this distribution: denoising it well needs motion (an object's position in one frame pins it
down in every other frame along a straight, reflected path), locality (object edges and the
texture are local detail at 2x2-patch scale) and the prompt (the colour, shape and direction
of each object come from the text). The static texture rewards attending to the same place in
other frames; the moving objects reward attending along their trajectories.

The "prompt" ``[B, text_len, text_dim]`` is built from a fixed, seeded embedding table (its own
seed, not the caller's generator): per object one token = colour + shape embedding and one token
= direction + speed embedding, then an end token, then zero padding up to ``text_len`` (8 for up
to 3 objects). Start positions, radii and the background are free: the prompt does not name them.

Everything is vectorised over the batch (no Python loop per sample) and runs on the generator's
device, so on a GPU data generation costs a few milliseconds per batch. Flow matching as in the
demo: ``x_t = (1 - t) x0 + t noise``, ``timestep = 1000 t``, target ``noise - x0``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
PROMPT_TABLE_SEED = 4321

# RGB in [-1, 1], all saturated so an object never blends into the grey-ish background.
COLOURS = (
    (1.0, -0.8, -0.8),  # red
    (-0.8, 1.0, -0.8),  # green
    (-0.8, -0.8, 1.0),  # blue
    (1.0, 1.0, -0.8),  # yellow
    (1.0, -0.8, 1.0),  # magenta
    (-0.8, 1.0, 1.0),  # cyan
)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("disc", "square", "diamond")
# Unit (dy, dx) of the eight compass directions.
DIRECTIONS = tuple((round(math.sin(a), 6), round(math.cos(a), 6)) for a in (k * math.pi / 4 for k in range(8)))
SPEEDS = (1.0, 2.0)  # pixels per frame along the direction


@dataclass(frozen=True)
class VideoSpec:
    """Shape of the benchmark data; `to_dict()` is stored beside the trained weights."""

    frames: int = 16
    height: int = 32
    width: int = 32
    channels: int = 3
    max_objects: int = 3
    min_objects: int = 1
    radius: tuple[float, float] = (2.0, 4.0)
    text_len: int = 8
    text_dim: int = 32
    texture_grid: int = 8  # control points per side of the background texture
    texture_amplitude: float = 0.3

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["radius"] = list(self.radius)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VideoSpec":
        d = dict(d)
        if "radius" in d:
            d["radius"] = tuple(d["radius"])
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


TINY = VideoSpec(frames=4, height=8, width=8, max_objects=2, radius=(1.0, 2.0), texture_grid=4)


def prompt_table(text_dim: int) -> dict[str, torch.Tensor]:
    """Fixed token embeddings [n, text_dim] per attribute (seeded, caller-independent, CPU)."""
    g = torch.Generator().manual_seed(PROMPT_TABLE_SEED)
    scale = 1.0 / math.sqrt(2.0)  # two embeddings are summed per token; keep unit variance
    return {
        "colour": torch.randn(len(COLOURS), text_dim, generator=g) * scale,
        "shape": torch.randn(len(SHAPES), text_dim, generator=g) * scale,
        "direction": torch.randn(len(DIRECTIONS), text_dim, generator=g) * scale,
        "speed": torch.randn(len(SPEEDS), text_dim, generator=g) * scale,
        "end": torch.randn(1, text_dim, generator=g),
    }


def _bounce(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Reflect unconstrained positions p into [lo, hi] (elastic bounces off both walls)."""
    span = (hi - lo).clamp_min(1e-6)
    u = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(u > span, 2 * span - u, u)


def sample_scene(batch: int, spec: VideoSpec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random scene parameters, all on the generator's device.

    Returns present [B, K] bool, colour/shape/direction/speed [B, K] long indices, start [B, K, 2]
    (y, x) pixels, radius [B, K], background [B, 3, H, W].
    """
    dev = generator.device
    k, h, w = spec.max_objects, spec.height, spec.width

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    def randint(n, *shape):
        return torch.randint(n, shape, generator=generator, device=dev)

    count = spec.min_objects + randint(spec.max_objects - spec.min_objects + 1, batch)
    present = torch.arange(k, device=dev)[None, :] < count[:, None]
    radius = spec.radius[0] + (spec.radius[1] - spec.radius[0]) * rand(batch, k)
    lo = radius
    start = torch.stack([lo + (h - 1 - 2 * lo) * rand(batch, k), lo + (w - 1 - 2 * lo) * rand(batch, k)], dim=-1)
    # Background: a dark grey level, a smooth random texture shared by the channels, a faint tint.
    level = -0.7 + 0.3 * rand(batch, 1, 1, 1)
    grid = rand(batch, 1, spec.texture_grid, spec.texture_grid) * 2 - 1
    tex = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)
    tint = 0.08 * (rand(batch, 3, 1, 1) * 2 - 1)
    background = (level + spec.texture_amplitude * tex + tint).clamp(-1.0, -0.05)
    return {
        "present": present,
        "colour": randint(len(COLOURS), batch, k),
        "shape": randint(len(SHAPES), batch, k),
        "direction": randint(len(DIRECTIONS), batch, k),
        "speed": randint(len(SPEEDS), batch, k),
        "start": start,
        "radius": radius,
        "background": background,
    }


def render(scene: dict[str, torch.Tensor], spec: VideoSpec) -> torch.Tensor:
    """Videos [B, 3, F, H, W] in [-1, 1] from `sample_scene`'s parameters."""
    start, radius = scene["start"], scene["radius"]
    dev = start.device
    b, k = radius.shape
    f, h, w = spec.frames, spec.height, spec.width
    dirs = torch.tensor(DIRECTIONS, device=dev)[scene["direction"]]  # [B, K, 2]
    speed = torch.tensor(SPEEDS, device=dev)[scene["speed"]]  # [B, K]
    t = torch.arange(f, device=dev, dtype=torch.float32)
    raw = start[:, :, None, :] + (dirs * speed[..., None])[:, :, None, :] * t[None, None, :, None]  # [B, K, F, 2]
    lo = radius[:, :, None]
    cy = _bounce(raw[..., 0], lo, h - 1 - lo)  # [B, K, F]
    cx = _bounce(raw[..., 1], lo, w - 1 - lo)
    ys = torch.arange(h, device=dev, dtype=torch.float32)
    xs = torch.arange(w, device=dev, dtype=torch.float32)
    dy = (ys[None, None, None, :, None] - cy[..., None, None]).abs()  # [B, K, F, H, 1]
    dx = (xs[None, None, None, None, :] - cx[..., None, None]).abs()  # [B, K, F, 1, W]
    disc = (dy**2 + dx**2).sqrt()
    square = torch.maximum(dy, dx)
    diamond = (dy + dx) / math.sqrt(2.0)
    shape = scene["shape"][:, :, None, None, None]
    dist = torch.where(shape == 0, disc, torch.where(shape == 1, square, diamond))  # [B, K, F, H, W]
    # Soft edge (about one pixel wide): smooth enough to learn, sharp enough to be local detail.
    alpha = torch.sigmoid(3.0 * (radius[:, :, None, None, None] + 0.5 - dist)) * scene["present"][:, :, None, None, None]
    colours = torch.tensor(COLOURS, device=dev)[scene["colour"]]  # [B, K, 3]
    video = scene["background"][:, :, None, :, :].expand(b, 3, f, h, w)
    for j in range(k):  # objects in drawing order (K <= 3), vectorised over the batch
        a = alpha[:, j][:, None]  # [B, 1, F, H, W]
        video = video * (1 - a) + colours[:, j][:, :, None, None, None] * a
    return video.clamp(-1.0, 1.0).contiguous()


def prompt_embeddings(scene: dict[str, torch.Tensor], spec: VideoSpec) -> torch.Tensor:
    """[B, text_len, text_dim]: per present object (colour+shape, direction+speed), end, zeros."""
    if spec.text_len < 2 * spec.max_objects + 1:
        raise ValueError(f"text_len must be at least {2 * spec.max_objects + 1} for {spec.max_objects} objects")
    dev = scene["radius"].device
    table = {n: v.to(dev) for n, v in prompt_table(spec.text_dim).items()}
    b, k = scene["radius"].shape
    obj = table["colour"][scene["colour"]] + table["shape"][scene["shape"]]  # [B, K, D]
    mot = table["direction"][scene["direction"]] + table["speed"][scene["speed"]]
    pres = scene["present"][..., None].float()
    tokens = torch.stack([obj * pres, mot * pres], dim=2).reshape(b, 2 * k, spec.text_dim)
    # The end token sits right after the last present object's tokens, like a real tokenizer's EOS.
    count = scene["present"].sum(1)
    end_pos = 2 * count  # [B]
    out = torch.zeros(b, spec.text_len, spec.text_dim, device=dev)
    out[:, : 2 * k] = tokens
    out[torch.arange(b, device=dev), end_pos] = table["end"][0]
    return out


def sample_videos(batch: int, spec: VideoSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(videos [B, 3, F, H, W], prompt embeddings [B, text_len, text_dim]) on the generator's device."""
    scene = sample_scene(batch, spec, generator)
    return render(scene, spec), prompt_embeddings(scene, spec)


def flow_matching(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, timestep = 1000 t [B], target = noise - x0) for x0 [B, ...], t [B] in [0, 1]."""
    tb = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - tb) * x0 + tb * noise, t * NUM_TRAIN_TIMESTEPS, noise - x0


def sample_training_batch(batch: int, spec: VideoSpec, generator: torch.Generator, t: torch.Tensor | None = None):
    """(x0, text, t, noise) with t uniform in [0, 1) unless given; all on the generator's device."""
    x0, text = sample_videos(batch, spec, generator)
    dev = generator.device
    if t is None:
        t = torch.rand(batch, generator=generator, device=dev)
    noise = torch.randn(x0.shape, generator=generator, device=dev)
    return x0, text, t.to(dev), noise


__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "NUM_TRAIN_TIMESTEPS",
    "SHAPES",
    "SPEEDS",
    "TINY",
    "VideoSpec",
    "flow_matching",
    "prompt_embeddings",
    "prompt_table",
    "render",
    "sample_scene",
    "sample_training_batch",
    "sample_videos",
]
