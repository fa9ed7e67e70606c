"""Property-based fuzz of the two readers of untrusted files: the recipe loader and the adapter reader.

Whatever a recipe file or an adapter folder holds, the Python API raises the reader's one-line
exception (RecipeError, AdapterError: ValueError subclasses) or succeeds, and the command line
exits 2 with one `hla-convert: error:` line: never another exception, a traceback, a hang or
gigabytes of memory.

    recipes   random bytes / unicode / YAML-token soup, alias bombs, deep nesting, huge numbers,
              duplicate keys, non-mapping roots; the built-in recipes with a field dropped, retyped
              or added at any depth
    adapters  a real adapter (tiny Wan) with bytes flipped, cut or inserted; safetensors files with
              a random or lying length prefix, random header JSON (dtypes, shapes, offsets) and
              random metadata values (modules, config, lora, base_fingerprint, format_version)
    CLI       `hla-convert recipes FILE` and `hla-convert validate DIR` on the same kinds of input

Two grids complement the random search where it samples thinly: every recipe field, and every
adapter metadata key, set to each of WRONG_TYPES in turn. A recipe that parses must also come back
the same from its own to_yaml (the recipe.yaml that `validate` reads).

Bounds: an example past the deadline (5 s, generous for a shared CI core; the readers take
milliseconds) fails, and so does a test that raises the process's peak memory by 1 GiB or more.
Examples are bounded and derandomized (the "hla-ci" profile below), so CI runs the same examples
every time in well under a minute; HLA_FUZZ_EXAMPLES=2000 runs a longer local search with the same
properties. Every bug the fuzz found is pinned by an explicit @example here, or by a plain regression
test next to the check that fixed it (tests/io/test_adapter.py, tests/model/test_lora.py).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import resource
import struct
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from safetensors.torch import save as safetensors_bytes
from typer.testing import CliRunner

from hla_convert import HLAConfig, convert_attention, hla_parameters
from hla_convert.io.adapter import ADAPTER_FILE, CONFIG_FILE, AdapterError, load_adapter, read_adapter_info, save_adapter
from hla_convert.cli import app
from hla_convert.errors import MAX_MESSAGE
from hla_convert.recipe import RecipeError, builtin_recipes, load_recipe, parse_recipe, recipe_text
from tiny_models import tiny_wan

_SCALE = int(os.environ.get("HLA_FUZZ_EXAMPLES", "0") or 0)

settings.register_profile(
    "hla-ci",
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,  # nothing written under .hypothesis/
    deadline=timedelta(seconds=5),  # generous: a shared CI core; the readers take milliseconds
    # The cap on every property's examples in the test suite: 100 (the properties asked 150-300
    # before: 1,500 examples, 28 s of a loaded 2-core run; 800 now). Every bug the search found is
    # pinned by an @example, which runs on top of the cap; the two grids stay exhaustive.
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
_CI = settings.get_profile("hla-ci")


def fuzz(examples: int):
    """The CI profile with `examples` examples, at most its cap (HLA_FUZZ_EXAMPLES overrides both,
    for a long local run). `examples` is what the property deserves, the cap what CI affords."""
    return settings(_CI, max_examples=_SCALE or min(examples, _CI.max_examples))


MAX_RSS_GROWTH = 1 << 30  # bytes of peak resident memory a whole property may add


def _peak_rss() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform == "darwin" else 1024)


@pytest.fixture(autouse=True)
def _bounded_memory():
    """No example may allocate without bound: the process's peak RSS grows by less than 1 GiB
    (coarse, since it is a high-water mark, but free: tracemalloc would slow every example ~3x and
    does not see torch's allocations)."""
    before = _peak_rss()
    yield
    grown = _peak_rss() - before
    assert grown < MAX_RSS_GROWTH, f"peak memory grew by {grown >> 20} MiB"


def _only(error: type[ValueError], fn, *args, **kwargs):
    """fn's result, or None when it raised `error` with a one-line message; any other exception
    propagates (and fails the property, with the shrunk input)."""
    try:
        return fn(*args, **kwargs)
    except error as exc:
        message = str(exc)
        assert message.strip(), f"{type(exc).__name__} with an empty message"
        assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
        assert len(message) <= MAX_MESSAGE, f"{len(message)} characters: {message[:200]!r}..."
        return None


# -- strategies: JSON-ish values --------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**31, 2**63, -(2**63), 10**400, 0, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)

# One of each JSON type, nested and not, and text no message should carry whole (long, multi-line):
# what a value of the wrong type most often looks like.
WRONG_TYPES = [5, -1, 1.5, None, True, "x", "", "a\nb", "x" * 3000, [], [5], [[1]], ["x" * 3000], ["a\nb"], {}, {"a": 1}]
_WRONG_TYPES = st.sampled_from(WRONG_TYPES)


# -- recipes: random text -------------------------------------------------------------------------

_YAML_TOKENS = [
    "a", "name", "attention", "kind", "hadamard", "model", "calibration", "frames", "1", "-1", "0",
    ":", ": ", " ", "  ", "\n", "\t", "- ", "[", "]", "{", "}", ",", "?", "? ", "'", '"', "#", "|", ">", "---", "...",
    "&x ", "*x", "&y ", "*y", "<<: ", "!!int ", "!!float ", "!!str ", "!!bool ", "!!null ", "!!timestamp ", "!!binary ",
    "!!set ", "!!omap ", "!!pairs ", "!!map ", "!!seq ", "!foo ", "!!python/object:os.system ", "%YAML 1.1\n", "%TAG ! x\n",
    "0b", "0x", "0o", "0b12", "1_000", "1:2:3", "1:20:x", "2020-02-30", "2020-13-01", "2001-12-14t21:59:43.10-05:00",
    "1e999", "-1e999", ".nan", ".inf", "-.inf", "~", "null", "true", "yes", "off", "9" * 30, "\x00", "\ufeff", "\u2028", "é",
]
yaml_soup = st.lists(st.sampled_from(_YAML_TOKENS), max_size=40).map("".join)
_no_surrogates = st.characters(blacklist_categories=("Cs",))


@st.composite
def yaml_documents(draw) -> str:
    """YAML that parses to a random shape: a random value dumped in a random style."""
    value = draw(json_values | st.dictionaries(st.sampled_from(["name", "attention", "model", "stage1"]), json_values, max_size=4))
    flow = draw(st.sampled_from([None, True, False]))
    try:
        return yaml.safe_dump(value, default_flow_style=flow, allow_unicode=draw(st.booleans()))
    except (yaml.YAMLError, ValueError):
        return "a: 1"


@st.composite
def hostile_yaml(draw) -> str:
    """The shapes that cost memory or recursion: alias bombs, deep nesting, huge numbers, repeated keys."""
    kind = draw(st.sampled_from(["bomb", "flow_nest", "block_nest", "huge_int", "huge_float", "duplicates", "merge_bomb", "self_alias"]))
    n = draw(st.integers(1, 12))
    if kind == "bomb":  # "billion laughs": width ** depth nodes from a few lines
        width = draw(st.integers(2, 12))
        lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, n)]
        return "\n".join(lines) + "\n"
    if kind == "flow_nest":
        depth = draw(st.integers(1, 20_000))
        return "name: " + "[" * depth + "]" * depth
    if kind == "block_nest":
        depth = draw(st.integers(1, 3_000))
        return "".join(f"{' ' * i}k{i}:\n" for i in range(depth)) + " " * depth + "v\n"
    if kind == "huge_int":
        return f"name: x\ncalibration:\n  frames: {'9' * draw(st.integers(1, 20_000))}\n"
    if kind == "huge_float":
        return f"stage1:\n  lr: {'9' * draw(st.integers(1, 5_000))}.5e{draw(st.integers(-400, 400))}\n"
    if kind == "duplicates":
        return "name: a\n" * n + "attention:\n  kind: hadamard\n  kind: linear\n"
    if kind == "merge_bomb":
        lines = ["m0: &m0 {a: 1, b: 2}"] + [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}" for i in range(1, n)]
        return "\n".join(lines) + "\n"
    return "a: &a [*a]\n"


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_recipe") / "recipe.yaml"


def _load_recipe_file(path: Path, data: bytes):
    path.write_bytes(data)
    return _only(RecipeError, load_recipe, str(path))


@fuzz(200)
@given(data=st.binary(max_size=400) | st.text(_no_surrogates, max_size=200).map(str.encode) | yaml_soup.map(str.encode))
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


# What a user may type where a name or a path goes: short text, or long runs of path characters
# (past the file system's 255-byte name and 4096-byte path limits).
path_names = st.text(_no_surrogates, max_size=40) | st.text(st.sampled_from("x./~-\\ y"), min_size=200, max_size=6000)


@fuzz(150)
@given(name=path_names)
@example(name="x" * 5000)  # found: a name past the file system's limit raised OSError (ENAMETOOLONG)
def test_random_recipe_names_are_a_recipe_error_or_a_recipe(name):
    """What `--recipe NAME` may be: a built-in name, a path, or anything else a user types."""
    _only(RecipeError, load_recipe, name)
    _only(RecipeError, recipe_text, name)


@functools.cache
def _builtin_data() -> dict[str, dict]:
    """The built-in recipes as YAML data (parsed once: PyYAML is pure Python here, ~10 ms a recipe)."""
    return {name: yaml.safe_load(recipe_text(name)) for name in builtin_recipes()}


def _paths(node, prefix=()):
    """Every (path to a container, key) in a recipe mapping, at any depth."""
    if isinstance(node, dict):
        yield prefix
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        yield prefix
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_recipes(draw):
    data = copy.deepcopy(draw(st.sampled_from(sorted(_builtin_data().items())))[1])
    for _ in range(draw(st.integers(1, 3))):
        containers = list(_paths(data))
        where = draw(st.sampled_from(containers))
        node = data
        for k in where:
            node = node[k]
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = draw(st.sampled_from(["drop", "retype", "insert"] if keys else ["insert"]))
        if op == "drop":
            del node[draw(st.sampled_from(keys))]
        elif op == "retype":
            node[draw(st.sampled_from(keys))] = draw(json_values)
        elif isinstance(node, dict):
            node[draw(st.text(max_size=10) | st.integers() | st.none())] = draw(json_values)
        else:
            node.append(draw(json_values))
    return data


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
        recipe = _only(RecipeError, parse_recipe, data)
    _event("refused" if recipe is None else "parsed")
    if recipe is not None:  # what a conversion saves as recipe.yaml, and `validate` reads back
        recipe_path.write_text(recipe.to_yaml(), encoding="utf-8")
        assert load_recipe(str(recipe_path)).to_dict() == recipe.to_dict()


def test_each_recipe_field_with_each_wrong_type_is_a_recipe_error_or_a_recipe():
    """The grid the random mutations sample thinly: every field and section of the demo's recipe (the
    built-ins share one schema) set to each of WRONG_TYPES and a few numbers past the bounds in turn."""
    for name, data in [("tiny-wan", _builtin_data()["tiny-wan"])]:
        for where in _paths(data):
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
                    recipe = _only(RecipeError, parse_recipe, mutated)
                    if recipe is not None:
                        assert parse_recipe(yaml.safe_load(recipe.to_yaml())).to_dict() == recipe.to_dict(), (name, where, key, value)


# -- adapters ---------------------------------------------------------------------------------------


class _Base:
    """The tiny Wan base, unconverted, built once; `fresh()` is a copy for one example to load onto
    (and a short repr, for Hypothesis's report of a failing example)."""

    def __init__(self):
        self.model = tiny_wan()

    def fresh(self):
        return copy.deepcopy(self.model)

    def __repr__(self) -> str:
        return "tiny_wan()"


@pytest.fixture(scope="module")
def base():
    return _Base()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base):
    """(the bytes of a real adapter_model.safetensors, its header length): made once per module."""
    model = convert_attention(base.fresh(), HLAConfig(kind="hadamard", feature_dim=4, feature_map="softplus"))
    folder = tmp_path_factory.mktemp("fuzz_adapter_src")
    path = save_adapter(model, folder, base_source="/nonexistent/fuzz-base", base_revision=None)
    data = path.read_bytes()
    return data, struct.unpack("<Q", data[:8])[0]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_adapter")


def _event(name: str) -> None:
    """Count the outcome in Hypothesis's statistics (--hypothesis-show-statistics), inside a property."""
    if currently_in_test_context():
        event(name)


def _read_then_load(folder: Path, data: bytes, base, check_base: bool = True) -> None:
    (folder / ADAPTER_FILE).write_bytes(data)
    if _only(AdapterError, read_adapter_info, folder) is None:
        _event("refused by read_adapter_info")
        return
    model = base.fresh()
    if _only(AdapterError, load_adapter, model, folder, check_base=check_base) is None:
        _event("refused by load_adapter")
        assert not hla_parameters(model), "a refused adapter left the base converted"
    else:
        _event("loaded")


@st.composite
def corrupted(draw, data: bytes, header_len: int) -> bytes:
    """The adapter's bytes with 1-4 flips, cuts or insertions, mostly in the length prefix and header."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        end = len(out) if draw(st.integers(0, 3)) == 0 else min(len(out), 8 + header_len)
        if end == 0:
            break
        at = draw(st.integers(0, end - 1))
        op = draw(st.sampled_from(["flip", "byte", "cut", "insert", "delete"]))
        if op == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            out[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[at : at + draw(st.integers(1, 16))]
    return bytes(out)


@fuzz(200)
@given(st.data())
def test_corrupted_adapter_bytes_are_an_adapter_error_or_an_adapter(adapter, adapter_dir, base, data):
    raw, header_len = adapter
    _read_then_load(adapter_dir, data.draw(corrupted(raw, header_len)), base, check_base=data.draw(st.booleans()))


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "X9", "", "f32"]
_sizes = st.integers(-2, 64) | st.sampled_from([2**31, 2**32 + 1, 2**53, 2**63 - 1, 2**64 + 7])


@st.composite
def tensor_entries(draw):
    return {
        "dtype": draw(st.sampled_from(_DTYPES) | json_values),
        "shape": draw(st.lists(_sizes, max_size=4) | json_values),
        "data_offsets": draw(st.lists(_sizes, min_size=0, max_size=3) | json_values),
    }


@st.composite
def random_safetensors(draw, metadata: dict[str, str]) -> bytes:
    """A safetensors-shaped file: random tensor entries, the real metadata with values replaced, a
    length prefix that is right, random or lying."""
    header: dict = draw(st.dictionaries(st.text(max_size=30), tensor_entries(), max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(random_metadata(metadata))
    elif draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    try:
        body = json.dumps(header).encode()
    except ValueError:
        body = b"{}"
    if draw(st.booleans()):
        body += b" " * (-len(body) % 8)
    prefix = draw(
        st.sampled_from(["right", "random", "huge", "short", "long"])
    )
    length = {
        "right": len(body),
        "random": draw(st.integers(0, 2**64 - 1)),
        "huge": draw(st.sampled_from([2**63, 2**64 - 1, 100_000_001, 1 << 40])),
        "short": max(0, len(body) - draw(st.integers(1, 16))),
        "long": len(body) + draw(st.integers(1, 1 << 20)),
    }[prefix]
    return struct.pack("<Q", length) + body + draw(st.binary(max_size=64))


_NASTY_JSON = [
    "[" * 100_000 + "]" * 100_000,  # deep nesting: json.loads recurses
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    "9" * 5000,  # past Python's int() digit limit
    "NaN", "Infinity", "-Infinity", "1e999", "null", "", "not json", '"\\ud800"', "[]", "{}", "5", "true", '"x"',
]


@st.composite
def random_metadata(draw, metadata: dict[str, str]) -> dict:
    """The real adapter's metadata with some values replaced by random JSON (or random text), some
    keys dropped, some added."""
    meta = dict(metadata)
    for key in draw(st.lists(st.sampled_from(sorted(meta) + ["lora", "extra", "base_class"]), max_size=4, unique=True)):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            meta.pop(key, None)
        elif choice == 1:
            meta[key] = json.dumps(draw(_WRONG_TYPES | json_values))
        elif choice == 2:
            meta[key] = draw(st.sampled_from(_NASTY_JSON))
        else:
            meta[key] = draw(st.text(max_size=20))
    if draw(st.integers(0, 4)) == 0:  # a lora config, random or near-real
        meta["lora"] = json.dumps(
            draw(json_values | st.fixed_dictionaries({"rank": json_values, "alpha": json_values, "modules": json_values}))
        )
    return meta


def _tensors(raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(raw)


def _metadata(raw: bytes, header_len: int) -> dict[str, str]:
    return json.loads(raw[8 : 8 + header_len])["__metadata__"]


@fuzz(200)
@given(st.data())
def test_random_safetensors_headers_are_an_adapter_error(adapter, adapter_dir, base, data):
    raw, header_len = adapter
    _read_then_load(adapter_dir, data.draw(random_safetensors(_metadata(raw, header_len))), base)


@fuzz(200)
@given(st.data())
def test_random_metadata_on_real_tensors_is_an_adapter_error_or_an_adapter(adapter, adapter_dir, base, data):
    """A well-formed safetensors file (the adapter's own tensors, maybe a LoRA weight or two) whose
    metadata values are random: this reaches the checks past the header (config, modules, lora)."""
    raw, header_len = adapter
    tensors = _tensors(raw)
    if data.draw(st.booleans()):
        tensors["lora.blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(data.draw(st.integers(1, 4)), 24)
    meta = data.draw(random_metadata(_metadata(raw, header_len)))
    _read_then_load(adapter_dir, safetensors_bytes(tensors, metadata=meta), base, check_base=data.draw(st.booleans()))


def test_each_metadata_key_with_each_wrong_type_is_an_adapter_error_or_an_adapter(adapter, adapter_dir, base):
    """The grid the random search samples thinly: every metadata key (and lora, extra) set to each
    of WRONG_TYPES in turn, on the real tensors, loaded with and without the base check."""
    raw, header_len = adapter
    meta = _metadata(raw, header_len)
    tensors = _tensors(raw)
    for key in [*sorted(meta), "lora", "extra"]:
        for value in WRONG_TYPES:
            data = safetensors_bytes(tensors, metadata={**meta, key: json.dumps(value)})
            for check_base in (True, False):
                _read_then_load(adapter_dir, data, base, check_base=check_base)


@fuzz(100)
@given(name=path_names)
@example(name="x" * 5000)  # found: ENAMETOOLONG from is_file() escaped as an OSError
def test_random_adapter_folder_names_are_an_adapter_error(name):
    _only(AdapterError, read_adapter_info, name)


# -- the command line ---------------------------------------------------------------------------------
#
# Few examples each: a command's checks are the Python ones above, so these check what the command
# line adds (its error rendering, exit code 2, nothing on stderr but the one line). In process,
# through typer's CliRunner as the tests in tests/cli/ do: a subprocess costs ~3 s of imports, which
# 2 x 15 examples cannot afford within this file's budget; one real subprocess per command checks
# the installed entry point on a hostile input.

_runner = CliRunner()


def _assert_bad_input(result, args) -> str:
    """Exit 2 with one `hla-convert: error:` line on stderr and no traceback anywhere."""
    out = (result.stdout or "") + (result.stderr or "")
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in out, out[-2000:]
    assert result.exit_code == 2, (args, result.exit_code, out[-2000:])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hla-convert: error: "), result.stderr[-2000:]
    return lines[0]


@fuzz(15)
@given(text=yaml_soup | hostile_yaml() | mutated_recipes().map(lambda d: yaml.safe_dump(d)))
@example(text="a: !!timestamp\n")
def test_cli_recipes_on_a_random_recipe_file_is_exit_2_and_one_line(recipe_path, text):
    recipe_path.write_text(text, encoding="utf-8")
    result = _runner.invoke(app, ["recipes", str(recipe_path)])
    if result.exit_code != 0:  # a file that happens to be a valid recipe is printed
        _assert_bad_input(result, text[:200])


@pytest.fixture(scope="module")
def output_folder(tmp_path_factory, adapter) -> Path:
    """A finished output folder around the fuzz adapter (recipe.yaml, drift_report.json,
    hla_config.json). Its recorded base does not exist, so even an intact folder is refused (exit 2)
    before any model loads: every example is bad input, whichever check catches it."""
    folder = tmp_path_factory.mktemp("fuzz_output")
    raw, header_len = adapter
    (folder / ADAPTER_FILE).write_bytes(raw)
    (folder / CONFIG_FILE).write_text(json.dumps({k: json.loads(v) for k, v in _metadata(raw, header_len).items()}))
    (folder / "recipe.yaml").write_text(recipe_text("tiny-wan"))
    (folder / "drift_report.json").write_text(json.dumps({"table": []}))
    return folder


def _rewrite_config_to_match(folder: Path) -> None:
    """hla_config.json made to agree with the (corrupted) header, as someone editing both would, so
    the checks behind the agreement check are reached too."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / ADAPTER_FILE), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        (folder / CONFIG_FILE).write_text(json.dumps(meta))
    except Exception:  # noqa: BLE001 - a header too broken to read: read_adapter_info refuses it anyway
        pass


@fuzz(15)
@given(st.data())
def test_cli_validate_on_a_corrupt_adapter_is_exit_2_and_one_line(adapter, output_folder, data):
    raw, header_len = adapter
    meta = _metadata(raw, header_len)
    on_real_tensors = random_metadata(meta).map(lambda m: safetensors_bytes(_tensors(raw), metadata=m))
    (output_folder / ADAPTER_FILE).write_bytes(data.draw(corrupted(raw, header_len) | random_safetensors(meta) | on_real_tensors))
    if data.draw(st.booleans()):
        _rewrite_config_to_match(output_folder)
    line = _assert_bad_input(_runner.invoke(app, ["validate", str(output_folder)]), "validate")
    event(line.split("(")[0][:70].replace(str(output_folder), "DIR"))


def test_cli_validate_with_a_non_mapping_extra_in_both_files_is_exit_2(adapter, output_folder):
    """Found by the property above: `"extra": [1]` in the header and hla_config.json alike (so they
    agree) was an AttributeError in reading the recorded base, reported as a failed run (exit 3)."""
    raw, header_len = adapter
    meta = {**_metadata(raw, header_len), "extra": "[1]"}
    (output_folder / ADAPTER_FILE).write_bytes(safetensors_bytes(_tensors(raw), metadata=meta))
    _rewrite_config_to_match(output_folder)
    line = _assert_bad_input(_runner.invoke(app, ["validate", str(output_folder)]), "validate")
    assert "'extra' must be a mapping, got [1]" in line


def _alias_bomb(tmp: Path, raw: bytes) -> Path:
    """9 ** 11 nodes once expanded, and a scalar PyYAML cannot build."""
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    (tmp / "bomb.yaml").write_text("\n".join(lines) + "\nb: !!timestamp\n")
    return tmp / "bomb.yaml"


def _lying_prefix(tmp: Path, raw: bytes) -> Path:
    """An adapter whose length prefix claims 2**63 header bytes, cut after 100 bytes."""
    (tmp / ADAPTER_FILE).write_bytes(struct.pack("<Q", 2**63) + raw[8:100])
    return tmp


@pytest.mark.parametrize("command, make", [("recipes", _alias_bomb), ("validate", _lying_prefix)])
def test_the_installed_command_refuses_a_hostile_file_in_one_line(tmp_path, adapter, command, make):
    """The real entry point (a subprocess): exit 2, one line on stderr, no traceback."""
    target = make(tmp_path, adapter[0])
    script = Path(sys.executable).with_name("hla-convert")
    proc = subprocess.run(
        [str(script), command, str(target)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hla-convert: error: "), proc.stderr[-2000:]
