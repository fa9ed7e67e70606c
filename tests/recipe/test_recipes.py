"""Recipes: every built-in loads into a valid HLAConfig; bad fields are named in the error."""

from __future__ import annotations

import pytest
import yaml

from hla_convert.model.config import HLAConfig
from hla_convert.recipe import Recipe, RecipeError, builtin_recipes, load_recipe, parse_recipe, recipe_text

REQUIRED = {
    "tiny-wan", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b",
    "cogvideox-2b", "hunyuanvideo", "ltx-video",
}


def test_builtin_recipes_load_and_give_valid_configs():
    names = builtin_recipes()
    assert REQUIRED <= set(names)
    for name, desc in names.items():
        assert desc, f"{name} has no description"
        r = load_recipe(name)
        assert r.name == name
        assert isinstance(r.hla_config(), HLAConfig)
        # the YAML dump reads back to the same recipe
        assert parse_recipe(yaml.safe_load(r.to_yaml())) == r
        assert "#" in recipe_text(name)  # the reasoning is in comments


def test_the_fidelity_first_recipes_old_names_load_the_defaults_and_are_not_listed_twice():
    """wan2.1-t2v-1.3b-hq and cogvideox-2b-hq became the defaults (2026-12-07 (night)); a script that
    names them gets the same recipe, and the speed-first recipes of before are the -fast ones, made
    for the same model (the default is the one chosen by model ID)."""
    from hla_convert.conversion.common import resolve_recipe

    names = builtin_recipes()
    for old, new in (("wan2.1-t2v-1.3b-hq", "wan2.1-t2v-1.3b"), ("cogvideox-2b-hq", "cogvideox-2b")):
        assert old not in names and f"{new}-fast" in names
        assert load_recipe(old) == load_recipe(new) and recipe_text(old) == recipe_text(new)
        fast, default = load_recipe(f"{new}-fast"), load_recipe(new)
        assert fast.model.hub_id == default.model.hub_id
        assert resolve_recipe(None, default.model.hub_id).name == new
    with pytest.raises(RecipeError) as e:
        load_recipe("no-such-recipe")
    assert "wan2.1-t2v-1.3b-fast" in str(e.value) and "-hq" not in str(e.value)


def test_recipe_from_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(recipe_text("tiny-wan").replace("name: tiny-wan", "name: mine"))
    assert load_recipe(str(p)).name == "mine"


def test_unknown_recipe_lists_builtins():
    with pytest.raises(RecipeError) as e:
        load_recipe("no-such-recipe")
    assert "tiny-wan" in str(e.value) and "wan2.1-t2v-14b" in str(e.value)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("/nonexistent/recipe.yaml")


def _with(path: str, value):
    data = load_recipe("tiny-wan").to_dict()
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return data


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("stage1.lr", "fast", "stage1.lr: must be a positive number, got 'fast'"),
        ("attention.kind", "foo", "attention.kind: 'foo' is not one of softmax, hadamard, linear, higher_order"),
        ("attention.factors", 3, "attention.factors: the taylor feature map needs an even number"),
        ("attention.feature_map", "relu", "attention.feature_map: 'relu' is not allowed for kind 'hybrid' with far 'hadamard'"),
        ("calibration.source", "web", "calibration.source: 'web' is not one of synthetic, trajectories, folder"),
        ("calibration.timesteps.distribution", "beta", "calibration.timesteps.distribution: 'beta' is not one of uniform, logit_normal"),
        ("calibration.timesteps.max", 2.0, "calibration.timesteps.max: must be a number in [0.0, 1.0]"),
        ("calibration.samples", 0, "calibration.samples: must be a positive integer, got 0"),
        ("stage1.batch_size", 6, "stage1.batch_size: must be a multiple of calibration.batch_size (4)"),
        ("stage2.train", "all", "stage2.train: 'all' is not one of hla"),
        ("stage2.steps", -1, "stage2.steps: must be an integer >= 0, got -1"),
        ("stage3.sampling_steps", 0, "stage3.sampling_steps: must be a positive integer, got 0"),
        ("stage3.batch_size", 6, "stage3.batch_size: must be a multiple of calibration.batch_size (4)"),
        ("stage3.lr", "fast", "stage3.lr: must be a positive number, got 'fast'"),
        ("stage3.steps", -1, "stage3.steps: must be an integer >= 0, got -1"),
        ("stage3.onpolicy_share", 1.5, "stage3.onpolicy_share: must be a number in [0.0, 1.0]"),
        ("stage2.teacher", "frozen", "stage2.teacher: 'frozen' is not one of cached, live"),
        ("validation.min_output_cosine", 1.5, "validation.min_output_cosine: must be a number in [-1.0, 1.0]"),
        ("validation.timestep_buckets", "four", "validation.timestep_buckets: must be a positive integer"),
        ("validation.teacher_steps", -1, "validation.teacher_steps: must be an integer >= 0, got -1"),
        ("attention.exclude", [1], "attention.exclude: must be a list of non-empty strings"),
        # HLAConfig's fields have one check, HLAConfig's own: one range for feature_dim (was >= 2 here, 2..256 there)
        ("attention.feature_dim", 1, "attention.feature_dim: must be an integer in 2..256, got 1"),
        ("attention.eps", float("inf"), "attention.eps: must be a positive number, got inf"),
        ("attention.causal_block_frames", 0, "attention.causal_block_frames: must be a positive integer or null, got 0"),
        ("attention.tiles", [1, 0, 4], "attention.tiles: must be 3 integers >= 1 (blocks per axis"),
    ],
)
def test_bad_field_is_named(path, value, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe(_with(path, value))
    assert str(e.value).startswith(message), str(e.value)
    assert e.value.field == path


def test_stage2_teacher_defaults_to_cached_everywhere_and_full_needs_it():
    from hla_convert.recipe import Stage2Spec

    assert Stage2Spec().teacher == "cached"
    for name in builtin_recipes():  # the shipped recipes say so, with a comment
        assert load_recipe(name).stage2.teacher == "cached"
        assert "teacher: cached " in recipe_text(name) and "#" in recipe_text(name).split("teacher: cached", 1)[1].split("\n")[0]
    data = _with("stage2.train", "full")
    assert parse_recipe(data).stage2.train == "full"  # lora_* fields set in tiny-wan: ignored, not refused
    data["stage2"]["teacher"] = "live"
    with pytest.raises(RecipeError, match=r"^stage2\.teacher: must be cached with stage2\.train full") as e:
        parse_recipe(data)
    assert e.value.field == "stage2.teacher"


def test_unknown_fields_and_sections():
    data = load_recipe("tiny-wan").to_dict()
    data["stage1"]["stepz"] = 3
    with pytest.raises(RecipeError, match=r"stage1\.stepz: unknown field; allowed: steps, lr"):
        parse_recipe(data)
    data = load_recipe("tiny-wan").to_dict()
    data["stage4"] = {}
    with pytest.raises(RecipeError, match="stage4: unknown section"):
        parse_recipe(data)


def test_vae_scales_default_by_architecture():
    data = load_recipe("wan2.1-t2v-1.3b").to_dict()
    data["calibration"]["vae_scale_temporal"] = data["calibration"]["vae_scale_spatial"] = None
    r = parse_recipe(data)
    assert (r.calibration.vae_scale_temporal, r.calibration.vae_scale_spatial) == (4, 8)
    assert r.calibration.latent_shape() == (21, 60, 104)
    data["model"]["architecture"] = "SomethingNew"
    data["calibration"]["vae_scale_temporal"] = None
    with pytest.raises(RecipeError, match="calibration.vae_scale_temporal: required"):
        parse_recipe(data)


def test_numbers_as_yaml_strings():
    # YAML 1.1 reads 1e-4 (no dot) as a string; a recipe author should not have to know that.
    data = _with("stage1.lr", "1e-4")
    assert parse_recipe(data).stage1.lr == pytest.approx(1e-4)


def test_overrides():
    r = load_recipe("tiny-wan")
    o = r.with_overrides(steps=r.stage1.steps * 2)
    assert o.stage1.steps == 2 * r.stage1.steps and o.stage2.steps == 2 * r.stage2.steps
    assert r.with_overrides(steps=1).stage2.steps == 1  # stage 2 stays on
    assert r.with_overrides(steps=10, stage2_steps=0).stage2.steps == 0
    lin = r.with_overrides(kind="linear")
    assert lin.hla_config().kind == "linear" and lin.hla_config().feature_map == "elu"
    assert r.with_overrides(kind="softmax").hla_config().kind == "softmax"
    assert r.with_overrides(fields={"stage1.lr": 0.01}).stage1.lr == 0.01
    with pytest.raises(RecipeError, match="attention.kind"):
        r.with_overrides(kind="foo")
    with pytest.raises(RecipeError, match="stage1.steps"):
        r.with_overrides(steps=-2)
    with pytest.raises(RecipeError, match="stage1.nope: unknown field"):
        r.with_overrides(fields={"stage1.nope": 1})
    with pytest.raises(RecipeError, match="calibration.path: source 'folder' needs"):
        r.with_overrides(source="folder")
    assert isinstance(r.with_overrides(source="folder", path="/tmp/x"), Recipe)


def test_steps_zero_turns_both_stages_off():
    r = load_recipe("tiny-wan")
    assert r.stage2.steps > 0
    off = r.with_overrides(steps=0)
    assert off.stage1.steps == 0 and off.stage2.steps == 0


def test_stage3_is_off_by_default_scales_with_steps_and_samples_as_the_sampling_check():
    r = load_recipe("tiny-wan")
    assert r.stage3.steps == 0  # off in every shipped recipe until the benchmark measures it
    assert all(load_recipe(n).stage3.steps == 0 for n in builtin_recipes())
    on = r.with_overrides(fields={"stage3.steps": 60})
    # --steps scales stage 3 with the others, and 0 turns it off
    assert on.with_overrides(steps=r.stage1.steps // 2).stage3.steps == 30
    assert on.with_overrides(steps=0).stage3.steps == 0
    # null sampling_steps: the sampling check's steps, or 10 when that is off
    data = _with("stage3.sampling_steps", None)
    data["validation"]["sampling_steps"] = 7
    assert parse_recipe(data).stage3.sampling_steps == 7
    data["validation"]["sampling_steps"] = 0
    assert parse_recipe(data).stage3.sampling_steps == 10
    assert r.with_overrides(fields={"stage3.sampling_steps": 3}).stage3.sampling_steps == 3


# -- hostile recipe files: bounded work, one short line -------------------------------------------


def _alias_bomb(levels: int) -> str:
    """A few hundred bytes whose aliases expand to 9**levels strings, as the value of stage1.lr."""
    items = ["&a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    items += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "name: bomb\nstage1:\n  lr: [" + ", ".join(items) + "]\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    import time

    p = tmp_path / "bomb.yaml"
    p.write_text(_alias_bomb(10))  # 9**10 = 3.5e9 strings once expanded
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="more than 100,000 YAML nodes") as e:
        load_recipe(str(p))
    assert time.perf_counter() - start < 2 and len(str(e.value)) < 200


def test_a_small_alias_expansion_is_shown_bounded(tmp_path):
    p = tmp_path / "five.yaml"
    p.write_text(_alias_bomb(5))  # 9**5 = 59,049 nodes: within the bound, a field error
    with pytest.raises(RecipeError, match="stage1.lr: must be a positive number") as e:
        load_recipe(str(p))
    assert len(str(e.value)) <= 400  # was a 481 KB line


@pytest.mark.parametrize(
    "content, message",
    [
        # refused while composing, at the bound (it took 1.5-5 s to reach the recursion limit first)
        ("name: x\nstage1: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested more than 32 levels deep"),
        ("name: x\nstage1: " + "[" * 40 + "]" * 40 + "\n", "nested more than"),
        (b"name: caf\xe9\n", "not UTF-8"),
        ("", "is empty"),
        ("   \n# only a comment\n", "is empty"),
        ("name: x\nstage1: &s\n  lr: *s\n", "recursive YAML alias"),
        ("name: x\nstage1:\n  lr: 1" + "0" * 400 + "\n", "stage1.lr: must be a positive number, got 100"),
        ("name: x\nstage1:\n  steps: 1" + "0" * 40 + "\n", "stage1.steps: must be at most 2147483647"),
        ("name: x\nattention:\n  kind: " + "k" * 100_000 + "\n", "attention.kind: 'kkk"),
        ("name: x\n" + "a" * 1000 + ": 1\n", "unknown section"),
        ("- just\n- a list\n", "must be a mapping"),
        # scalars PyYAML's constructors raise on (found by tests/recipe/test_recipe_fuzz.py): were bare
        # ValueError / IndexError / AttributeError, then the exception's text
        ("name: x\nstage1:\n  lr: !!float x\n", "'x' is not a valid float in"),
        ("name: x\ncalibration:\n  seed: !!int 0b\n", "'0b' is not a valid int in"),
        ("!!int\n", "'' is not a valid int in"),
        ("name: x\ndescription: !!timestamp\n", "'' is not a valid timestamp in"),
        ("name: x\ndescription: 2020-02-30\n", "'2020-02-30' is not a valid timestamp in"),
        ("name: x\ncalibration:\n  seed: " + "9" * 5000 + "\n", "is not a valid int in"),
    ],
)
def test_hostile_recipe_files_are_one_short_recipe_error(tmp_path, content, message):
    p = tmp_path / "r.yaml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RecipeError) as e:
        load_recipe(str(p))
    assert message in str(e.value) and len(str(e.value)) <= 400 and "\n" not in str(e.value)


def test_recipe_file_size_and_kind_are_checked(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("name: x\ndescription: '" + "x" * (1 << 20) + "'\n")
    with pytest.raises(RecipeError, match="larger than 1 MiB"):
        load_recipe(str(big))
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(str(tmp_path))
    with pytest.raises(RecipeError, match="not a regular file"):
        load_recipe("/dev/null")
    with pytest.raises(RecipeError, match="larger than 1 MiB"):
        recipe_text(str(big))
    for read in (load_recipe, recipe_text):  # found by tests/recipe/test_recipe_fuzz.py: an OSError (ENAMETOOLONG) escaped
        with pytest.raises(RecipeError, match="cannot be read"):
            read("x" * 5000)


# -- bounds: a value past them would allocate more than a machine holds, or loop for hours -------


@pytest.mark.parametrize(
    "field, value, why",
    [
        ("calibration.samples", 2147483647, "held in memory"),
        ("calibration.heldout", 2147483647, "held in memory"),
        ("validation.sampling_steps", 2147483647, "scheduler steps"),
        ("validation.timestep_buckets", 2147483647, "training timesteps"),
        ("calibration.height", 4096, "pixels"),
        ("calibration.width", 4096, "pixels"),
        ("stage2.lora_rank", 2147483647, "LoRA ranks"),
        # the fresh hostile pass: exit 3 (an allocation of 512 GB / 128 GB), a hang (10^9 forward
        # passes a step), NaN timesteps reported as drift (exit 1)
        ("calibration.text_len", 2147483647, "text tokens"),
        ("attention.halo", [10**9, 0, 0], "latent tokens per axis"),
        ("attention.window", [0, 0, 10**9], "latent tokens per axis"),
        ("stage1.batch_size", 2147483646, "inputs per optimizer step"),
        ("stage2.batch_size", 2147483646, "inputs per optimizer step"),
        ("calibration.timesteps.shift", 1e308, "shift timesteps"),
    ],
)
def test_huge_recipe_values_are_refused_with_the_bound_and_its_reason(field, value, why):
    with pytest.raises(RecipeError, match=rf"^{field}: must be at most [0-9,]+ \(.*{why}") as info:
        load_recipe("tiny-wan").with_overrides(fields={field: value})
    assert "\n" not in str(info.value)


def test_a_fifo_or_a_device_as_recipe_file_is_refused_without_reading(tmp_path):
    import os

    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(RecipeError, match="not a regular file"):
            load_recipe(str(path))


def test_attention_fields_and_defaults_are_hla_configs():
    """The attention section is HLAConfig's fields (same defaults, read from YAML as HLAConfig takes
    them) plus include, exclude, softmax_layers, softmax_select: a recipe that leaves them out gets HLAConfig()."""
    import dataclasses

    from hla_convert import HLAConfig
    from hla_convert.recipe import AttentionSpec

    names = [f.name for f in dataclasses.fields(AttentionSpec)]
    assert set(names) == {f.name for f in dataclasses.fields(HLAConfig)} | {"include", "exclude", "softmax_layers", "softmax_select"}
    wan = {"architecture": "WanTransformer3DModel"}
    assert parse_recipe({"name": "x", "model": wan}).hla_config() == HLAConfig()
    r = parse_recipe({"name": "x", "model": wan, "attention": {"eps": "1e-3", "factors": 4.0, "window": [2, 0, 0]}})
    assert (r.attention.eps, r.attention.factors, r.attention.window) == (1e-3, 4, [2, 0, 0])
    assert r.hla_config().window == (2, 0, 0)


def test_fields_derived_from_null_follow_their_source_in_an_overridden_copy():
    """A stage's batch_size given as null is calibration.batch_size, and stays so when a copy
    overrides calibration.batch_size (it was frozen at the first value, and the copy refused:
    "stage3.batch_size: must be a multiple of calibration.batch_size"); an explicit value stays."""
    data = load_recipe("wan2.1-t2v-1.3b").to_dict()  # calibration.batch_size 1, stage1 4, stage2 2
    data["stage3"].update(batch_size=None, sampling_steps=None)
    rec = parse_recipe(data)
    assert rec.stage3.batch_size == 1 and rec.to_dict()["stage3"]["batch_size"] is None
    copy = rec.with_overrides(fields={"calibration.batch_size": 2, "calibration.samples": 64})
    assert (copy.stage1.batch_size, copy.stage2.batch_size, copy.stage3.batch_size) == (4, 2, 2)
    assert rec.with_overrides(fields={"validation.sampling_steps": 20}).stage3.sampling_steps == 20
    assert rec.with_overrides(fields={"stage3.sampling_steps": 7, "validation.sampling_steps": 20}).stage3.sampling_steps == 7
    again = parse_recipe(yaml.safe_load(rec.to_yaml()))  # the saved recipe.yaml reads back the same
    assert again == rec
