"""`hla-convert inspect` and `hla-convert recipes`, --help, and the --json document's error key."""

from __future__ import annotations

import json


from hla_convert.recipe import load_recipe
from helpers import invoke

# -- inspect and recipes ------------------------------------------------------------------------


def test_inspect_the_demo_as_json():
    result = invoke("inspect", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["class"] == "WanTransformer3DModel" and doc["tokens"] > 0
    kind = load_recipe("tiny-wan").attention.kind
    assert doc["converted"] and all(m["converts_to"] == kind for m in doc["modules"] if m["name"] in doc["converted"])
    assert doc["flops"]["before"] > 0 and doc["flops"]["after"] > 0
    bigger = json.loads(invoke("inspect", "--frames", "16", "--height", "32", "--width", "32", "--json").stdout)
    assert bigger["tokens"] == 8 * doc["tokens"]


def test_recipes_lists_and_prints():
    listing = invoke("recipes", "--json")
    assert listing.exit_code == 0
    names = json.loads(listing.stdout)["recipes"]
    assert "tiny-wan" in names
    shown = invoke("recipes", "tiny-wan")
    assert shown.exit_code == 0 and shown.stdout.startswith("name: tiny-wan")


def test_help_reads_like_a_manual():
    for cmd in ("convert", "validate", "inspect", "recipes"):
        result = invoke(cmd, "--help")
        assert result.exit_code == 0
    assert "Exit codes" in invoke("convert", "--help").stdout


def test_every_json_document_has_the_error_key():
    doc = json.loads(invoke("recipes", "--json").stdout)
    assert doc["exit_code"] == 0 and "error" in doc and doc["error"] is None
