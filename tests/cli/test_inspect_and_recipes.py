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


def test_inspect_says_what_the_tiles_are_at_each_video_size():
    """A recipe's `tiles` resolve to a window in tokens at the video size asked for: wan2.1-t2v-1.3b-fast's
    [1, 5, 2] is 6 x 26 tokens through 21 frames at 480p (3,276 keys, 10 %), 9 x 40 at 720p; the
    default wan2.1-t2v-1.3b's [1, 2, 2] 15 x 26 (8,190 keys, 25 %), and 23 x 40 at 720p (45 rows in 2
    tiles: the first 23)."""
    at_480 = json.loads(invoke("inspect", "--recipe", "wan2.1-t2v-1.3b-fast", "--json").stdout)
    w = at_480["window"]
    assert w["asked"] == "tiles=(1, 5, 2)" and w["grid"] == [21, 30, 52] and w["box"] == [21, 6, 26]
    assert w["keys"] == 3276 and abs(w["share"] - 0.1) < 1e-9
    at_720 = json.loads(invoke("inspect", "--recipe", "wan2.1-t2v-1.3b-fast", "--height", "720", "--width", "1280", "--json").stdout)
    assert at_720["window"]["box"] == [21, 9, 40] and at_720["window"]["keys"] == 7560
    default = json.loads(invoke("inspect", "--recipe", "wan2.1-t2v-1.3b", "--json").stdout)["window"]
    assert default["asked"] == "tiles=(1, 2, 2)" and default["box"] == [21, 15, 26] and default["keys"] == 8190
    default = json.loads(invoke("inspect", "--recipe", "wan2.1-t2v-1.3b", "--height", "720", "--width", "1280", "--json").stdout)
    assert default["window"]["box"] == [21, 23, 40] and default["window"]["keys"] == 19320
    shown = invoke("inspect", "--recipe", "wan2.1-t2v-1.3b-fast")
    text = " ".join(shown.stdout.split())  # rich wraps at the terminal width
    assert "softmax window: tiles (1, 5, 2) -> 21 x 6 x 26 tokens" in text and "3,276 video keys a query (10.0 %)" in text
    demo = json.loads(invoke("inspect", "--json").stdout)  # tiny-wan: the token's own latent frame
    frame = demo["window"]
    assert frame["asked"] == "window=(1, 0, 0)" and frame["box"] == [1, *frame["grid"][1:]]
    assert frame["keys"] * frame["grid"][0] == demo["tokens"]


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
