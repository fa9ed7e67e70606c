"""HLAConfig: what a converted attention layer computes.

One config object describes every converted layer of a model (torchao's `quantize_(model, config)`
shape). It serialises to plain JSON for adapters and recipes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

KINDS = ("softmax", "hadamard", "linear", "higher_order")
FEATURE_MAPS = ("taylor", "softplus", "elu")

# Feature maps each kind accepts, first = default.
_KIND_FEATURE_MAPS = {
    "softmax": ("none",),
    "hadamard": ("taylor", "softplus"),
    "linear": ("elu", "softplus"),
    "higher_order": ("softplus", "elu"),
}


class ConfigError(ValueError):
    """A bad HLAConfig field; the message names the field and what is allowed."""


@dataclass(frozen=True)
class HLAConfig:
    """What the converted attention cores compute.

    kind:         "softmax" (identity conversion, bit-exact), "hadamard" (HLA), "linear"
                  (first-order baseline with the same state size r**factors), "higher_order"
                  (2nd-order linear attention of Zhang et al.).
    factors:      F, the number of Hadamard factors (hadamard only; >= 2). With the "taylor"
                  feature map F must be even so that every attention weight is >= 0.
    feature_dim:  r, the width of each factor's feature map (taylor: 1 + a learned r-1 projection).
    feature_map:  "taylor" ([1, P x], initialised from principal directions), "softplus"
                  (positive learnable affine map), "elu" (elu(W x) + 1). None picks the kind's default.
    eps:          added to the normaliser; every kind's normaliser is >= 0 before it.
    normalize:    higher_order only: divide by the 2nd-order normaliser (recommended).
    """

    kind: str = "hadamard"
    factors: int = 2
    feature_dim: int = 32
    feature_map: str | None = None
    eps: float = 1e-6
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        allowed = _KIND_FEATURE_MAPS[self.kind]
        fmap = self.feature_map
        if fmap is None or (self.kind == "softmax"):
            object.__setattr__(self, "feature_map", allowed[0])
        elif fmap not in allowed:
            raise ConfigError(
                f"feature_map: {fmap!r} is not allowed for kind {self.kind!r}; use one of {', '.join(allowed)}"
            )
        if not isinstance(self.factors, int) or isinstance(self.factors, bool) or self.factors < 1:
            raise ConfigError(f"factors: must be a positive integer, got {self.factors!r}")
        if self.kind == "hadamard":
            if self.factors < 2:
                raise ConfigError(f"factors: hadamard needs at least 2 factors, got {self.factors}")
            if self.factors > 4:
                raise ConfigError(f"factors: at most 4 are supported (state grows as r**F), got {self.factors}")
            if self.feature_map == "taylor" and self.factors % 2:
                raise ConfigError(
                    f"factors: the taylor feature map needs an even number of factors so that attention "
                    f"weights stay >= 0, got {self.factors}; use 2 or 4, or feature_map softplus"
                )
        if not isinstance(self.feature_dim, int) or isinstance(self.feature_dim, bool) or not 2 <= self.feature_dim <= 256:
            raise ConfigError(f"feature_dim: must be an integer in 2..256, got {self.feature_dim!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ConfigError(f"eps: must be a positive number, got {self.eps!r}")

    @property
    def state_features(self) -> int:
        """Width of the key-side state per head: r**F for hadamard and its linear twin."""
        if self.kind in ("hadamard", "linear"):
            return self.feature_dim**self.factors
        if self.kind == "higher_order":
            return self.feature_dim
        return 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HLAConfig":
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
