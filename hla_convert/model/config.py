"""HLAConfig: what a converted attention layer computes.

One config object describes every converted layer of a model (torchao's `quantize_(model, config)`
shape). It serialises to plain JSON for adapters and recipes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

KINDS = ("softmax", "hadamard", "linear", "higher_order", "hybrid")
FEATURE_MAPS = ("taylor", "softplus", "elu")
# What a hybrid layer uses outside its softmax window (the kind whose feature maps it owns).
FAR_KINDS = ("hadamard", "linear")

# Feature maps each kind accepts, first = default.
_KIND_FEATURE_MAPS = {
    "softmax": ("none",),
    "hadamard": ("taylor", "softplus"),
    "linear": ("elu", "softplus"),
    "higher_order": ("softplus", "elu"),
}


MAX_GRID = 2048  # a window / halo in latent tokens per axis: no axis of a video's latent grid is longer


def _grid_triple(name: str, value: Any, minimum: int = 0, words: str = "frames, height, width in latent tokens") -> tuple[int, int, int]:
    """(frames, height, width) of integers >= minimum, at most MAX_GRID each (past it a window or
    halo would only size allocations: 10^9 asked for 128 GB); lists (JSON) become tuples."""
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in value):
        if max(value) > MAX_GRID:
            raise ConfigError(f"{name}: must be at most {MAX_GRID:,} (latent tokens per axis; no axis of a clip is longer), got {value!r}")
        return tuple(value)  # type: ignore[return-value]
    raise ConfigError(f"{name}: must be 3 integers >= {minimum} ({words}), got {value!r}")


def _positive_number(value: Any) -> bool:
    """A finite number > 0; not a bool (True is an int), NaN, inf, or an int too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:
        return False


class ConfigError(ValueError):
    """A bad HLAConfig field; the message names the field and what is allowed."""


@dataclass(frozen=True)
class HLAConfig:
    """What the converted attention cores compute.

    kind:         "softmax" (identity conversion, bit-exact), "hadamard" (HLA), "linear"
                  (first-order baseline with the same state size r**factors), "higher_order"
                  (2nd-order linear attention of Zhang et al.), "hybrid" (exact softmax inside a
                  local window of the latent token grid, the `far` kind's weights outside it, one
                  normaliser; HLA-MATH.md section 4).
    factors:      F, the number of Hadamard factors (hadamard, and hybrid with far hadamard; >= 2).
                  With the "taylor" feature map F must be even so that every weight is >= 0.
    feature_dim:  r, the width of each factor's feature map (taylor: 1 + a learned r-1 projection).
    feature_map:  "taylor" ([1, P x], initialised from principal directions), "softplus"
                  (positive learnable affine map), "elu" (elu(W x) + 1). None picks the kind's default.
    eps:          added to the normaliser; every kind's normaliser is >= 0 before it.
    normalize:    higher_order only: divide by the 2nd-order normaliser (recommended).
    far:          hybrid only: "hadamard" (HLA) or "linear" (first-order, same r**F state) outside
                  the window. feature_map and factors then follow that kind's rules.
    window:       hybrid only: the query block in (frames, height, width) latent tokens after
                  patching; 0 = the whole extent. (1, 0, 0) = the token's own latent frame,
                  (0, 8, 8) = an 8x8 tube through all frames, (2, 0, 0) = chunks of 2 frames.
    tiles:        hybrid only: the window as a count of blocks per axis of the latent grid
                  (frames, height, width), so that it keeps its share of the video at every
                  resolution: each side is ceil(extent / tiles) tokens, 1 = the whole axis
                  (`window_on`). (1, 5, 4) = 5 x 4 spatial tiles through all frames: (0, 6, 13)
                  at Wan 480p (grid 21 x 30 x 52), (0, 9, 20) at 720p (21 x 45 x 80), (0, 4, 4)
                  on a 16 x 16 x 16 grid. None: `window` in tokens. Set one of the two: with
                  tiles, window stays at its default.
    halo:         hybrid only: widens each block's key window by that many tokens on each side.
    learn_temperature: every kind but softmax: a learnable per-head log_temp [H] (init 0) scaling
                  the queries that enter the feature maps, i.e. the similarity the linear/HLA part
                  sees. Ignored by softmax.
    causal_block_frames: block-causal video models only (SkyReels-V2 diffusion forcing): latent
                  frames per causal block, set on the model by `convert_attention` (its
                  `num_frame_per_block`, as the DF pipelines' causal_block_size sets it) so that
                  the teacher's mask and the converted layers follow the blocks; saved with the
                  adapter, so loading restores it. None: the model as loaded (docs/causal.md).
    """

    kind: str = "hadamard"
    factors: int = 2
    feature_dim: int = 32
    feature_map: str | None = None
    eps: float = 1e-6
    normalize: bool = True
    far: str = "hadamard"
    window: tuple[int, int, int] = (1, 0, 0)
    tiles: tuple[int, int, int] | None = None
    halo: tuple[int, int, int] = (0, 0, 0)
    learn_temperature: bool = False
    causal_block_frames: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.far not in FAR_KINDS:
            raise ConfigError(f"far: {self.far!r} is not one of {', '.join(FAR_KINDS)}")
        object.__setattr__(self, "window", _grid_triple("window", self.window))
        object.__setattr__(self, "halo", _grid_triple("halo", self.halo))
        if self.tiles is not None:
            tiles = _grid_triple("tiles", self.tiles, 1, "blocks per axis: frames, height, width; 1 = the whole axis")
            if self.window != HLAConfig.window:
                raise ConfigError(
                    f"tiles: set window (in tokens) or tiles (blocks per axis), not both; got window {list(self.window)} and tiles {list(tiles)}"
                )
            object.__setattr__(self, "tiles", tiles)
        if not isinstance(self.learn_temperature, bool):
            raise ConfigError(f"learn_temperature: must be true or false, got {self.learn_temperature!r}")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize: must be true or false, got {self.normalize!r}")
        cbf = self.causal_block_frames
        if cbf is not None and (not isinstance(cbf, int) or isinstance(cbf, bool) or cbf < 1):
            raise ConfigError(f"causal_block_frames: must be a positive integer or null, got {cbf!r}")
        allowed = _KIND_FEATURE_MAPS[self.feature_kind]
        fmap = self.feature_map
        if fmap is None or (self.kind == "softmax"):
            object.__setattr__(self, "feature_map", allowed[0])
        elif fmap not in allowed:
            raise ConfigError(
                f"feature_map: {fmap!r} is not allowed for {self._kind_words()}; use one of {', '.join(allowed)}"
            )
        if not isinstance(self.factors, int) or isinstance(self.factors, bool) or self.factors < 1:
            raise ConfigError(f"factors: must be a positive integer, got {self.factors!r}")
        if self.feature_kind == "hadamard":
            if self.factors < 2:
                raise ConfigError(f"factors: {self._kind_words()} needs at least 2 factors, got {self.factors}")
            if self.factors > 4:
                raise ConfigError(f"factors: at most 4 are supported (state grows as r**F), got {self.factors}")
            if self.feature_map == "taylor" and self.factors % 2:
                raise ConfigError(
                    f"factors: the taylor feature map needs an even number of factors so that attention "
                    f"weights stay >= 0, got {self.factors}; use 2 or 4, or feature_map softplus"
                )
        if not isinstance(self.feature_dim, int) or isinstance(self.feature_dim, bool) or not 2 <= self.feature_dim <= 256:
            raise ConfigError(f"feature_dim: must be an integer in 2..256, got {self.feature_dim!r}")
        if not _positive_number(self.eps):
            raise ConfigError(f"eps: must be a positive number, got {self.eps!r}")

    @property
    def feature_kind(self) -> str:
        """The kind whose feature maps and parameters the layer owns: `far` for hybrid, else kind."""
        return self.far if self.kind == "hybrid" else self.kind

    def _kind_words(self) -> str:
        return f"kind {self.kind!r}" if self.kind != "hybrid" else f"kind 'hybrid' with far {self.far!r}"

    @property
    def state_features(self) -> int:
        """Width of the key-side state per head: r**F for hadamard and its linear twin (and hybrid)."""
        if self.feature_kind in ("hadamard", "linear"):
            return self.feature_dim**self.factors
        if self.kind == "higher_order":
            return self.feature_dim
        return 0

    def window_on(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The window in latent tokens (frames, height, width; 0 = the whole axis) on `grid`, the
        (T, Hg, Wg) video tokens of a forward: `window`, or with `tiles` each extent split into that
        many blocks (ceil(extent / tiles) tokens a side; fewer blocks where that divides unevenly)."""
        if self.tiles is None:
            return self.window
        return tuple(0 if t == 1 else -(-e // t) for e, t in zip(grid, self.tiles))  # type: ignore[return-value]

    def window_words(self) -> str:
        """How the window was asked for, for describing a layer: "window=(1, 0, 0)" or "tiles=(1, 5, 4)"."""
        return f"window={self.window}" if self.tiles is None else f"tiles={self.tiles}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON mapping of adapters and fingerprints. `tiles` only where set: adapters and
        stage checkpoints of windows in tokens stay as earlier versions wrote and read them."""
        data = dataclasses.asdict(self)
        if data["tiles"] is None:
            del data["tiles"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HLAConfig":
        """The config of a JSON mapping (an adapter's "config"). The one home of the fields' types
        (checked in __post_init__): a bool is not an integer (factors: true), a float is not one
        (factors: 2.0), an integer is not a bool (normalize: 1); eps is a finite positive number."""
        if not isinstance(data, dict):
            raise ConfigError(f"attention config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown attention field; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "HLAConfig":
        return cls.from_dict(json.loads(text))
