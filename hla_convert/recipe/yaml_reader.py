"""Reading a recipe file safely: bounded size, bounded YAML (aliases counted as expanded, depth,
no recursion), UTF-8 only. A hostile file (an alias bomb, a huge or deeply nested document) costs
milliseconds and one RecipeError line, never gigabytes of memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..user_files import read_regular_file
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
    except OSError as exc:
        raise RecipeError("", f"recipe file {shown} cannot be read ({exc.strerror or type(exc).__name__})") from None
    data = read_regular_file(p, f"recipe file {shown}", MAX_RECIPE_BYTES, lambda message: RecipeError("", message))
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
    Nesting is also refused while the document is composed (the composer recurses once per level:
    20,000 "[" took 1.5 s to reach Python's recursion limit), and a scalar PyYAML's constructors
    cannot build is a YAML error like any other.
    """

    _depth = 0

    def compose_node(self, parent, index):  # noqa: D102
        self._depth += 1
        try:
            if self._depth > MAX_RECIPE_DEPTH + 1:
                raise RecipeError("", f"the recipe is nested more than {MAX_RECIPE_DEPTH} levels deep: not a recipe")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):  # noqa: D102
        _expanded_size(node, {}, 0, set())
        return super().construct_document(node)

    def construct_object(self, node, deep=False):  # noqa: D102
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecipeError, RecursionError):
            raise
        except Exception:  # noqa: BLE001 - PyYAML's scalar constructors call int() / float() /
            # datetime() / re.match(...).groupdict() unguarded: "!!int 0b" (ValueError), a bare "!!int"
            # (IndexError), a bare "!!timestamp" (AttributeError), "2020-02-30", an int past Python's
            # 4300-digit limit
            kind = str(node.tag).rsplit(":", 1)[-1]
            value = node.value if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(None, None, f"{_r(value)} is not a valid {kind}", node.start_mark) from None


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
