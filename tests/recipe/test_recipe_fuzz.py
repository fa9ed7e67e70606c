"""Property-based fuzz of the recipe loader (hla_convert.recipe): whatever a recipe file or a
`--recipe NAME` holds, load_recipe / parse_recipe / recipe_text raise RecipeError with one line or
give a recipe; never another exception, a hang or gigabytes of memory. A recipe that parses must
also come back the same from its own to_yaml (the recipe.yaml that `validate` reads). The grid
complements the random search where it samples thinly: every recipe field set to each of
WRONG_TYPES in turn. Profile, bounds and strategies: tests/fuzzing.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from hla_convert.recipe import RecipeError, load_recipe, parse_recipe, recipe_text
from fuzzing import (
    WRONG_TYPES,
    bounded_memory,
    builtin_recipe_data,
    container_paths,
    count_event,
    fuzz,
    hostile_yaml,
    mutated_recipes,
    no_surrogates,
    only,
    path_names,
    recipe_path,
    yaml_documents,
    yaml_soup,
)


def _load_recipe_file(path: Path, data: bytes):
    path.write_bytes(data)
    return only(RecipeError, load_recipe, str(path))


@fuzz(200)
@given(data=st.binary(max_size=400) | st.text(no_surrogates, max_size=200).map(str.encode) | yaml_soup.map(str.encode))
@example(data=b"calibration: !!int 0b")  # found: int() of a bad YAML 1.1 literal escaped as a bare ValueError
@example(data=b"a: 2020-02-30")  # found: a plain scalar that looks like a date but is none (ValueError)
@example(data=b"a: !!float x")
@example(data=b"!!int")  # found: an empty tagged int indexes past its end (IndexError)
@example(data=b"!!timestamp")  # found: AttributeError from the timestamp constructor
@example(data=b"\xff\xfe")
def test_random_recipe_text_is_a_recipe_error_or_a_recipe(recipe_path, data):
    _load_recipe_file(recipe_path, data)


@fuzz(150)
@given(text=yaml_documents() | hostile_yaml())
@example(text="name: x\ncalibration:\n  frames: " + "9" * 5000 + "\n")  # found: past Python's 4300-digit int() limit (ValueError)
@example(text="a: &a [*a]\n")
@example(text="name: " + "[" * 20_000 + "]" * 20_000)  # found: 1.5-5 s to reach the recursion limit (past the deadline)
def test_yaml_shapes_are_a_recipe_error_or_a_recipe(recipe_path, text):
    _load_recipe_file(recipe_path, text.encode("utf-8"))


@fuzz(150)
@given(name=path_names)
@example(name="x" * 5000)  # found: a name past the file system's limit raised OSError (ENAMETOOLONG)
def test_random_recipe_names_are_a_recipe_error_or_a_recipe(name):
    """What `--recipe NAME` may be: a built-in name, a path, or anything else a user types."""
    only(RecipeError, load_recipe, name)
    only(RecipeError, recipe_text, name)


@fuzz(300)
@given(data=mutated_recipes(), through_yaml=st.booleans())
def test_mutated_builtin_recipes_are_a_recipe_error_or_a_recipe(recipe_path, data, through_yaml):
    if through_yaml:  # as a user's edited file: dumped (where YAML can say it) and loaded back
        try:
            text = yaml.safe_dump(data)
        except yaml.YAMLError:
            return
        recipe = _load_recipe_file(recipe_path, text.encode("utf-8"))
    else:
        recipe = only(RecipeError, parse_recipe, data)
    count_event("refused" if recipe is None else "parsed")
    if recipe is not None:  # what a conversion saves as recipe.yaml, and `validate` reads back
        recipe_path.write_text(recipe.to_yaml(), encoding="utf-8")
        assert load_recipe(str(recipe_path)).to_dict() == recipe.to_dict()


def test_each_recipe_field_with_each_wrong_type_is_a_recipe_error_or_a_recipe():
    """The grid the random mutations sample thinly: every field and section of the demo's recipe (the
    built-ins share one schema) set to each of WRONG_TYPES and a few numbers past the bounds in turn."""
    for name, data in [("tiny-wan", builtin_recipe_data()["tiny-wan"])]:
        for where in container_paths(data):
            node = data
            for k in where:
                node = node[k]
            for key in list(node) if isinstance(node, dict) else range(len(node)):
                for value in [*WRONG_TYPES, 0, 2**31, 2**64, -(2**64), 1e308, float("nan"), float("inf")]:
                    mutated = copy.deepcopy(data)
                    target = mutated
                    for k in where:
                        target = target[k]
                    target[key] = value
                    recipe = only(RecipeError, parse_recipe, mutated)
                    if recipe is not None:
                        assert parse_recipe(yaml.safe_load(recipe.to_yaml())).to_dict() == recipe.to_dict(), (name, where, key, value)
