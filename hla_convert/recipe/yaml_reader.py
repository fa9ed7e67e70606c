"""Reading a recipe file safely: bounded size, bounded YAML (aliases counted as expanded, depth,
no recursion), UTF-8 only. A hostile file (an alias bomb, a huge or deeply nested document) costs
milliseconds and one RecipeError line, never gigabytes of memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .schema import RecipeError, _clip, _r

# What a recipe file may be: a few KB in practice. The bounds make a hostile file (an alias bomb, a
# huge or deeply nested document) one line of error instead of gigabytes of memory.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000  # YAML nodes once aliases are expanded (what a walk over the data sees)
MAX_RECIPE_DEPTH = 32


def read_recipe_file(name: str) -> str:
    p = Path(name)
    shown = _r(name)
    try:
        if p.is_dir():
            raise RecipeError("", f"recipe {shown} is a folder, not a YAML file")
        if not p.exists():
            raise RecipeError("", f"recipe file {shown} not found")
        if not p.is_file():
            raise RecipeError("", f"recipe {shown} is not a regular file")
        with open(p, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError("", f"recipe file {shown} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError("", f"recipe file {shown} is larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError("", f"recipe file {shown} is not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise RecipeError("", f"recipe file {shown} is empty")
    return text


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose alias-expanded size or depth is past the bounds.

    Aliases share one node in the composed graph, so the graph stays small while anything that walks
    the data (a check, a repr, a copy) sees every expansion: the expanded size is counted on the graph
    (memoised per node, so a bomb costs no more to count than to read) before any object is built.
    """

    def construct_document(self, node):  # noqa: D102
        _expanded_size(node, {}, 0, set())
        return super().construct_document(node)


def _expanded_size(node, memo: dict[int, int], depth: int, path: set[int]) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    if depth > MAX_RECIPE_DEPTH:
        raise RecipeError("", f"the recipe is nested more than {MAX_RECIPE_DEPTH} levels deep: not a recipe")
    if key in path:
        raise RecipeError("", "the recipe refers to itself (a recursive YAML alias)")
    size = 1
    if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        path.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else [c for pair in node.value for c in pair]
        for child in children:
            size += _expanded_size(child, memo, depth + 1, path)
            if size > MAX_RECIPE_NODES:
                raise RecipeError("", f"the recipe expands to more than {MAX_RECIPE_NODES:,} YAML nodes (aliases included): not a recipe")
        path.discard(key)
    memo[key] = size
    return size


def parse_yaml(text: str, origin: str = "the recipe") -> Any:
    """The data of a recipe's YAML text, loaded safely and within the bounds above."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise RecipeError("", f"{origin} is not valid YAML: {_clip(' '.join(str(e).split()), 200)}") from None
    except RecursionError:
        raise RecipeError("", f"{origin} is nested too deeply: not a recipe") from None


__all__ = ["MAX_RECIPE_BYTES", "MAX_RECIPE_DEPTH", "MAX_RECIPE_NODES", "parse_yaml", "read_recipe_file"]
