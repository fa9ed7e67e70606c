"""The Recipe: a recipe's sections together (recipe.schema), built only through the field checks
(recipe.checks): `Recipe.from_dict` / `parse_recipe`, `with_overrides`; and `hla_config()`, the
attention section as the model's HLAConfig. Above schema and checks, so that neither imports the
other's importer (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..model.config import _KIND_FEATURE_MAPS, HLAConfig
from .checks import check_recipe
from .schema import HLA_FIELDS, AttentionSpec, CalibrationSpec, ModelSpec, RecipeError, Stage1Spec, Stage2Spec, Stage3Spec, ValidationSpec


@dataclass
class Recipe:
    name: str
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    stage1: Stage1Spec = field(default_factory=Stage1Spec)
    stage2: Stage2Spec = field(default_factory=Stage2Spec)
    stage3: Stage3Spec = field(default_factory=Stage3Spec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)

    def hla_config(self) -> HLAConfig:
        a = self.attention
        return HLAConfig(**{name: getattr(a, name) for name in HLA_FIELDS})

    # dotted paths of fields given as null and derived from another field by the checks (a stage's
    # batch_size from calibration.batch_size, stage3.sampling_steps from validation's): to_dict
    # writes them as null, so they follow that field in a copy (with_overrides) and a saved recipe.
    derived = frozenset()  # not a dataclass field (no annotation): set by the checks

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for dotted in self.derived:
            section, key = dotted.split(".")
            data[section][key] = None
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        return check_recipe(data, cls)

    def with_overrides(
        self,
        steps: int | None = None,
        kind: str | None = None,
        stage2_steps: int | None = None,
        source: str | None = None,
        path: str | None = None,
        seed: int | None = None,
        fields: dict[str, Any] | None = None,
    ) -> "Recipe":
        """A validated copy with command-line overrides applied.

        steps:        stage-1 steps. Stages 2 and 3 are scaled by the same factor (rounded, at least
                      1 when on, 0 stays 0), so `--steps` shortens or lengthens the whole run in
                      proportion; steps=0 turns every stage off. Pass stage2_steps to set it outright.
        kind:         attention kind (the comparison benchmark's `--attention`). The feature map
                      falls back to the new kind's default when the old one is not allowed for it.
        source, path: calibration source and its path (folder of cached inputs, or pipeline).
        seed:         calibration seed.
        fields:       any other field by dotted path, e.g. {"stage1.lr": 3e-4}.
        """
        data = self.to_dict()
        if steps is not None:
            old1, old2, old3 = data["stage1"]["steps"], data["stage2"]["steps"], data["stage3"]["steps"]
            _set_path(data, "stage1.steps", steps)
            if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0:
                # steps 0 means no training at all: stages 2 and 3 go to 0 too
                for later, old in (("stage2", old2), ("stage3", old3)):
                    if old and not (later == "stage2" and stage2_steps is not None):
                        data[later]["steps"] = 0 if steps == 0 else max(1, round(old * steps / max(old1, 1)))
        if stage2_steps is not None:
            _set_path(data, "stage2.steps", stage2_steps)
        if kind is not None:
            data["attention"]["kind"] = kind
            maps_of = data["attention"].get("far") if kind == "hybrid" else kind  # hybrid: its far kind's maps
            if maps_of in _KIND_FEATURE_MAPS and data["attention"]["feature_map"] not in _KIND_FEATURE_MAPS[maps_of]:
                data["attention"]["feature_map"] = None
        if source is not None:
            data["calibration"]["source"] = source
        if path is not None:
            data["calibration"]["path"] = str(path)
        if seed is not None:
            data["calibration"]["seed"] = seed
        for key, value in (fields or {}).items():
            _set_path(data, key, value)
        return check_recipe(data, type(self))


def parse_recipe(data: Any) -> Recipe:
    """Validate a recipe mapping (as read from YAML) into a Recipe; RecipeError names the bad field."""
    return Recipe.from_dict(data)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise RecipeError(".".join(parts[: i + 1]), f"not a section; sections: {', '.join(k for k, v in node.items() if isinstance(v, dict))}")
        node = node[part]
    if parts[-1] not in node:
        raise RecipeError(dotted, f"unknown field; allowed: {', '.join(node)}")
    node[parts[-1]] = value


__all__ = ["Recipe", "parse_recipe"]
