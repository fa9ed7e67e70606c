"""What the property-based fuzz tests share: the Hypothesis profile, the memory bound, and the
strategies that make hostile recipes and adapters.

The fuzz tests check the two readers of untrusted files, the recipe loader
(tests/recipe/test_recipe_fuzz.py) and the adapter reader (tests/io/test_adapter_fuzz.py), and the
command line on the same kinds of input (tests/cli/test_cli_fuzz.py): whatever a recipe file or an
adapter folder holds, the Python API raises the reader's one-line exception (RecipeError,
AdapterError: ValueError subclasses) or succeeds, and the command line exits 2 with one
`hla-convert: error:` line: never another exception, a traceback, a hang or gigabytes of memory.

    recipes   random bytes / unicode / YAML-token soup, alias bombs, deep nesting, huge numbers,
              duplicate keys, non-mapping roots; the built-in recipes with a field dropped, retyped
              or added at any depth
    adapters  a real adapter (tiny Wan) with bytes flipped, cut or inserted; safetensors files with
              a random or lying length prefix, random header JSON (dtypes, shapes, offsets) and
              random metadata values (modules, config, lora, base_fingerprint, format_version)

Bounds: an example past the deadline (5 s, generous for a shared CI core; the readers take
milliseconds) fails, and so does a test that raises the process's peak memory by 1 GiB or more
(`bounded_memory`, each fuzz module's autouse fixture). Examples are bounded and derandomized (the
"hla-ci" profile below), so CI runs the same examples every time in well under a minute;
HLA_FUZZ_EXAMPLES=2000 runs a longer local search with the same properties. Every bug the fuzz
found is pinned by an explicit @example in the fuzz tests, or by a plain regression test next to
the check that fixed it (tests/io/test_adapter.py, tests/model/test_lora.py).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import resource
import struct
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from hla_convert import HLAConfig, convert_attention
from hla_convert.io.adapter import save_adapter
from hla_convert.errors import MAX_MESSAGE
from hla_convert.recipe import builtin_recipes, recipe_text
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
def bounded_memory():
    """No example may allocate without bound: the process's peak RSS grows by less than 1 GiB
    (coarse, since it is a high-water mark, but free: tracemalloc would slow every example ~3x and
    does not see torch's allocations). Autouse in each fuzz module that imports it."""
    before = _peak_rss()
    yield
    grown = _peak_rss() - before
    assert grown < MAX_RSS_GROWTH, f"peak memory grew by {grown >> 20} MiB"


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    """One recipe file a fuzz module's examples write and read in turn."""
    return tmp_path_factory.mktemp("fuzz_recipe") / "recipe.yaml"


def only(error: type[ValueError], fn, *args, **kwargs):
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
wrong_types = st.sampled_from(WRONG_TYPES)


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
no_surrogates = st.characters(blacklist_categories=("Cs",))


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


# What a user may type where a name or a path goes: short text, or long runs of path characters
# (past the file system's 255-byte name and 4096-byte path limits).
path_names = st.text(no_surrogates, max_size=40) | st.text(st.sampled_from("x./~-\\ y"), min_size=200, max_size=6000)


@functools.cache
def builtin_recipe_data() -> dict[str, dict]:
    """The built-in recipes as YAML data (parsed once: PyYAML is pure Python here, ~10 ms a recipe)."""
    return {name: yaml.safe_load(recipe_text(name)) for name in builtin_recipes()}


def container_paths(node, prefix=()):
    """Every (path to a container, key) in a recipe mapping, at any depth."""
    if isinstance(node, dict):
        yield prefix
        for k, v in node.items():
            yield from container_paths(v, (*prefix, k))
    elif isinstance(node, list):
        yield prefix
        for i, v in enumerate(node):
            yield from container_paths(v, (*prefix, i))


@st.composite
def mutated_recipes(draw):
    data = copy.deepcopy(draw(st.sampled_from(sorted(builtin_recipe_data().items())))[1])
    for _ in range(draw(st.integers(1, 3))):
        containers = list(container_paths(data))
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


# -- adapters ---------------------------------------------------------------------------------------


class TinyBase:
    """The tiny Wan base, unconverted, built once; `fresh()` is a copy for one example to load onto
    (and a short repr, for Hypothesis's report of a failing example)."""

    def __init__(self):
        self.model = tiny_wan()

    def fresh(self):
        return copy.deepcopy(self.model)

    def __repr__(self) -> str:
        return "tiny_wan()"


def make_adapter(folder: Path, base: TinyBase) -> tuple[bytes, int]:
    """(the bytes of a real adapter_model.safetensors, its header length): a hadamard conversion of
    the tiny Wan saved into `folder`."""
    model = convert_attention(base.fresh(), HLAConfig(kind="hadamard", feature_dim=4, feature_map="softplus"))
    path = save_adapter(model, folder, base_source="/nonexistent/fuzz-base", base_revision=None)
    data = path.read_bytes()
    return data, struct.unpack("<Q", data[:8])[0]


def count_event(name: str) -> None:
    """Count the outcome in Hypothesis's statistics (--hypothesis-show-statistics), inside a property."""
    if currently_in_test_context():
        event(name)


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
            meta[key] = json.dumps(draw(wrong_types | json_values))
        elif choice == 2:
            meta[key] = draw(st.sampled_from(_NASTY_JSON))
        else:
            meta[key] = draw(st.text(max_size=20))
    if draw(st.integers(0, 4)) == 0:  # a lora config, random or near-real
        meta["lora"] = json.dumps(
            draw(json_values | st.fixed_dictionaries({"rank": json_values, "alpha": json_values, "modules": json_values}))
        )
    return meta


def adapter_tensors(raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(raw)


def adapter_metadata(raw: bytes, header_len: int) -> dict[str, str]:
    return json.loads(raw[8 : 8 + header_len])["__metadata__"]
