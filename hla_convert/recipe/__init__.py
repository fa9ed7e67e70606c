"""Recipes: the schema (sections, defaults), the field checks, bounded YAML reading and the
built-in recipes. `from hla_convert.recipe import Recipe, load_recipe, parse_recipe`: the public
names of hla_convert.recipe.builtin, which re-exports the schema's (docs/architecture.md)."""

from .builtin import *  # noqa: F403 - the package's public names are builtin's __all__
from .builtin import __all__  # noqa: F401
