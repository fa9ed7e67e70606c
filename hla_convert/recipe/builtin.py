"""Recipes by name or path: the built-in recipes (`recipes/*.yaml`, installed as
`hla_convert.builtin_recipes`) and recipe files.

The schema (sections, fields, defaults) is in recipe.schema, the field checks in recipe.checks,
the Recipe itself in recipe.recipe; their public names are re-exported here and by the package,
so `from hla_convert.recipe import Recipe, parse_recipe` works.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any

import yaml

from .recipe import Recipe, parse_recipe
from .schema import (
    BUILTIN_PACKAGE,
    DISTRIBUTIONS,
    SOURCES,
    STAGE2_TEACHER,
    STAGE2_TRAIN,
    SYNTHETIC,
    VAE_SCALES,
    AttentionSpec,
    CalibrationSpec,
    ModelSpec,
    RecipeError,
    Stage1Spec,
    Stage2Spec,
    Stage3Spec,
    TimestepSpec,
    ValidationSpec,
    _r,
)

# -- loading ---------------------------------------------------------------------------------------


def _builtin_root() -> Any:
    """The installed built-in recipes (recipes/ is installed as hla_convert.builtin_recipes); in a
    source checkout that runs without that mapping (`python -m hla_convert` or a script started in
    the repository root, which imports the checkout's hla_convert before the installed one), the
    checkout's own recipes/ folder."""
    try:
        return importlib.resources.files(BUILTIN_PACKAGE)
    except ModuleNotFoundError:
        package = Path(__file__).resolve().parent
        while package.name != "hla_convert" and package != package.parent:
            package = package.parent
        checkout = package.parent / "recipes"
        if not checkout.is_dir():
            raise
        return checkout


# Names that were built-in recipes and now load another one, so that a script that names them goes
# on working: the fidelity-first -hq recipes became the defaults on 2026-12-07 (night), and the
# defaults before them are the -fast recipes.
RENAMED = {"wan2.1-t2v-1.3b-hq": "wan2.1-t2v-1.3b", "cogvideox-2b-hq": "cogvideox-2b"}


def _builtin_files() -> dict[str, Any]:
    """Built-in recipe name -> its file; a RENAMED name -> the file it loads now."""
    root = _builtin_root()
    files = {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}
    return files | {old: files[new] for old, new in RENAMED.items() if new in files and old not in files}


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe name -> its one-line description, sorted by name."""
    out = {}
    for name, res in sorted(_builtin_files().items()):
        if name in RENAMED:
            continue
        data = yaml.safe_load(res.read_text(encoding="utf-8")) or {}
        out[name] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def recipe_text(name: str) -> str:
    """The YAML text (comments included) of a built-in recipe, or of a recipe file."""
    files = _builtin_files()
    if name in files:
        return files[name].read_text(encoding="utf-8")
    if _looks_like_path(name):
        from .yaml_reader import read_recipe_file

        return read_recipe_file(name)
    raise RecipeError("", _unknown_message(name, files))


def _looks_like_path(s: str) -> bool:
    try:
        return s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s or Path(s).is_file()
    except OSError:  # a name the file system refuses (too long): meant as a path; read_recipe_file says why not
        return True


def _unknown_message(name: str, files: dict[str, Any]) -> str:
    names = sorted(n for n in files if n not in RENAMED)
    return f"unknown recipe {_r(name)}; built-in recipes: {', '.join(names)} (or give the path of a YAML file)"


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe YAML file by path (read within the bounds of
    hla_convert.recipe.yaml_reader: size, alias-expanded nodes, depth)."""
    from .yaml_reader import parse_yaml, read_recipe_file

    files = _builtin_files()
    if name_or_path in files:
        text, origin = files[name_or_path].read_text(encoding="utf-8"), f"built-in recipe {name_or_path}"
    elif _looks_like_path(name_or_path):
        text, origin = read_recipe_file(name_or_path), _r(str(name_or_path))
    else:
        raise RecipeError("", _unknown_message(name_or_path, files))
    data = parse_yaml(text, origin)
    if data is None:
        raise RecipeError("", f"recipe file {origin} is empty (no YAML document in it)")
    return parse_recipe(data)


__all__ = [
    "AttentionSpec",
    "BUILTIN_PACKAGE",
    "CalibrationSpec",
    "DISTRIBUTIONS",
    "ModelSpec",
    "Recipe",
    "RecipeError",
    "SOURCES",
    "STAGE2_TEACHER",
    "STAGE2_TRAIN",
    "SYNTHETIC",
    "Stage1Spec",
    "Stage2Spec",
    "Stage3Spec",
    "TimestepSpec",
    "VAE_SCALES",
    "ValidationSpec",
    "builtin_recipes",
    "load_recipe",
    "parse_recipe",
    "recipe_text",
]
