"""The fidelity benchmark's rows and report, without running a conversion: what each row of
benchmarks/fidelity/bench_recipes.py changes in the recipe it resolves to (--base shipped: the shipped
recipe with the benchmark's model and data, one lever a row; the window rows' key counts; the
stage-2-only rows' stage-1 fingerprints), and what report.py makes of records. The runs themselves:
test_fidelity_runs.py.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from helpers import fidelity_module


def test_report_targets_a_nan_seed_never_meets_them():
    report = fidelity_module("report")

    def record(seed, worst):
        return {"model": "wan", "config": "hla", "seed": seed, "status": "ok", "loss": {"ratio": 1.0},
                "output": {"rel_l2": 0.01, "worst_bucket_rel_l2": worst}}  # fmt: skip

    assert report.targets([record(0, 0.05), record(1, 0.06)], "wan", ["hla"])  # both meet
    assert report.targets([record(0, 0.05), record(1, math.nan)], "wan", ["hla"]) == []  # max() skipped the NaN
    assert report.targets([record(0, math.inf)], "wan", ["hla"]) == []


# -- the shipped recipe as the base (--base shipped, --tier deep) --------------------------------------


def test_onpolicy_rows_train_half_the_stage2_steps_sampling_as_the_measure_does():
    """stage 3 at half of stage 2's steps, on the sampler the measure uses (--sampling-steps), not
    the sampling_steps the recipe resolved when it was loaded."""
    recipes = fidelity_module("bench_recipes")
    data = {"stage2": {"steps": 400}, "validation": {"sampling_steps": 20}}
    assert recipes.resolved_overrides("shipped-onpolicy", data) == {"stage3.steps": 200, "stage3.sampling_steps": 20}
    got = recipes.resolved_overrides("hybrid-lora-keep2-onpolicy", data)
    assert got["stage3.steps"] == 200 and got["stage3.sampling_steps"] == 20
    assert "stage3.sampling_steps" not in recipes.resolved_overrides("shipped", data)


def test_shipped_softmax_layers_keep_the_same_fraction_of_the_blocks():
    recipes = fidelity_module("bench_recipes")
    assert recipes.SHIPPED["wan"] == ("wan2.1-t2v-1.3b-fast", 30)  # Wan2.1-1.3B's 30 blocks
    assert recipes.scaled_softmax_layers(2, 30, 15) == 1  # Wan2.1-1.3B's 2 of 30 -> 1 of the deep tier's 15
    assert recipes.scaled_softmax_layers(2, 30, 30) == 2
    assert recipes.scaled_softmax_layers(4, 30, 15) == 2
    assert recipes.scaled_softmax_layers(2, 30, 6) == 1  # 0.4 rounds to 0: at least 1 when the shipped keeps any
    assert recipes.scaled_softmax_layers(0, 30, 15) == 0


def _args(**over):
    base = {"base": "shipped", "train_samples": None, "heldout_samples": 64, "steps_scale": None, "sampling_steps": None, "batch_size": None}
    return argparse.Namespace(**{**base, **over})


@pytest.mark.parametrize("arch", ["wan", "cogvideox"])
def test_shipped_base_changes_only_the_model_and_data_fields(arch, tmp_path):
    """The resolved recipe differs from the shipped one only in the fields that name the benchmark's
    model and inputs (bench_recipes.SHIPPED_CHANGES) and the row's own; lr, batch, steps, LoRA, stage 1 stay."""
    recipes = fidelity_module("bench_recipes")
    bd = fidelity_module("run").bd
    from hla_convert.recipe import load_recipe

    shipped = load_recipe(recipes.SHIPPED[arch][0]).to_dict()
    spec = bd.VideoSpec()  # the benchmark's 16 x 32 x 32 pixels: 4,096 tokens
    rec = recipes.recipe_for(arch, "shipped", 3, tmp_path, spec, _args(), bench_layers=15).to_dict()
    changed = recipes.changed_fields(shipped, rec)
    assert set(changed) <= set(recipes.SHIPPED_CHANGES), set(changed) - set(recipes.SHIPPED_CHANGES)
    assert changed["attention.softmax_layers"] == [2, 1] and changed["model.hub_id"][1] is None
    assert rec["calibration"]["samples"] == 64 == shipped["calibration"]["samples"]  # the real recipe's count
    assert (rec["calibration"]["frames"], rec["calibration"]["seed"], rec["calibration"]["source"]) == (16, 3, "folder")
    for section in ("stage1", "stage2", "validation"):
        assert rec[section] == shipped[section]
    assert {k: v for k, v in rec["attention"].items() if k != "softmax_layers"} == {k: v for k, v in shipped["attention"].items() if k != "softmax_layers"}

    # a row changes its lever and nothing else; --steps-scale only when given
    rec = recipes.recipe_for(arch, "shipped-cal512", 0, tmp_path, spec, _args(), bench_layers=15).to_dict()
    assert set(recipes.changed_fields(shipped, rec)) <= set(recipes.SHIPPED_CHANGES) and rec["calibration"]["samples"] == 512
    rec = recipes.recipe_for(arch, "shipped-lora64", 0, tmp_path, spec, _args(), bench_layers=15).to_dict()
    # (and stage2.train where the shipped recipe trains full: wan2.1-t2v-1.3b)
    assert set(recipes.changed_fields(shipped, rec)) - set(recipes.SHIPPED_CHANGES) - {"stage2.train"} == {"stage2.lora_rank"}
    assert rec["stage2"]["train"] == "lora"
    rec = recipes.recipe_for(arch, "shipped-tile", 0, tmp_path, spec, _args(steps_scale=0.5), bench_layers=15).to_dict()
    # (the shipped recipes give their window as tiles; the row gives the same window in tokens)
    assert set(recipes.changed_fields(shipped, rec)) - set(recipes.SHIPPED_CHANGES) == {"attention.window", "attention.tiles", "stage1.steps", "stage2.steps"}
    assert rec["stage2"]["steps"] == round(shipped["stage2"]["steps"] / 2)
    assert recipes.input_plan(arch, "shipped-cal512", _args()) == (512, shipped["calibration"]["batch_size"])


def test_window_rows_compare_equal_sized_windows():
    """The tile row's window holds as many tokens as the own frame at the benchmark's 16 x 16 x 16 grid,
    tile2x twice that, and each shipped recipe's tiles give there the window of the row that measured
    it before it shipped (Wan: shipped-tile2x; CogVideoX: shipped-tile2x-select-output), with that
    row's other attention choices (CogVideoX: the kept layers by output effect)."""
    from hla_convert.recipe import load_recipe

    recipes = fidelity_module("bench_recipes")
    frames, side = 16, 16
    measured_as = {"wan": "shipped-tile2x", "cogvideox": "shipped-tile2x-select-output"}
    assert set(measured_as) == set(recipes.SHIPPED)
    for arch, (name, _) in recipes.SHIPPED.items():
        shipped = load_recipe(name)
        row = recipes.CONFIGS[measured_as[arch]]
        assert list(shipped.hla_config().window_on((frames, side, side))) == row["attention.window"], arch
        for path, value in row.items():
            if path.startswith("attention.") and path not in ("attention.window", "attention.tiles"):
                assert getattr(shipped.attention, path.split(".")[1]) == value, (arch, path)

    def keys(window, halo=(0, 0, 0)):
        n = 1
        for w, h, extent in zip(window, halo, (frames, side, side)):
            n *= min(extent, (w or extent) + 2 * h)
        return n

    own = keys(recipes.CONFIGS["shipped-frame"]["attention.window"])
    assert own == keys([1, 0, 0])
    assert keys(recipes.CONFIGS["shipped-tile"]["attention.window"]) == own == 256
    assert keys(recipes.CONFIGS["shipped-tile2x"]["attention.window"]) == 2 * own
    assert keys(recipes.CONFIGS["shipped-cube"]["attention.window"]) == 2 * own  # the 4 x 8 tile's keys as a cube
    assert keys(recipes.CONFIGS["shipped-tile4x"]["attention.window"]) == 4 * own
    halo = recipes.CONFIGS["shipped-tile-halo1"]
    assert keys(halo["attention.window"], halo["attention.halo"]) == 576  # 6 x 6 x 16: about tile2x's 512
    assert recipes.CONFIGS["shipped-tile2x-s2x2"]["attention.window"] == recipes.CONFIGS["shipped-tile2x"]["attention.window"]
    assert keys(recipes.CONFIGS["shipped-chunk2"]["attention.window"]) == 2 * own
    assert keys([1, 0, 0], recipes.CONFIGS["shipped-chunk1-halo1"]["attention.halo"]) == 3 * own
    assert recipes.HalfOf("stage2.steps").resolve({"stage2": {"steps": 400}}) == 200


@pytest.mark.parametrize("arch,name,base_name,row_name,fields", [
    ("wan", "wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b-fast", "shipped-tile4x-s2x2", {("attention", "tiles"), ("stage2", "steps")}),
    ("cogvideox", "cogvideox-2b", "cogvideox-2b-fast", "shipped-tile4x", {("attention", "tiles")}),
])
def test_the_default_recipes_are_the_rows_that_measured_them(arch, name, base_name, row_name, fields):
    """Each default (fidelity-first) recipe is the benchmark's base recipe, the speed-first -fast one,
    with the fields of the row that reached the drift target (the 8 x 8 tile on the deep benchmark's
    grid; on Wan with 800 stage-2 steps) and nothing else changed."""
    from hla_convert.recipe import load_recipe

    recipes = fidelity_module("bench_recipes")
    assert recipes.SHIPPED[arch][0] == base_name  # the shipped* rows are changes to the -fast recipe
    base, hq = (load_recipe(n).to_dict() for n in (base_name, name))
    row = recipes.CONFIGS[row_name]
    assert list(load_recipe(name).hla_config().window_on((16, 16, 16))) == row["attention.window"]
    assert hq["stage2"]["steps"] == row.get("stage2.steps", base["stage2"]["steps"])
    changed = {(section, key) for section in base for key in base[section] if isinstance(base[section], dict)
               and base[section][key] != hq[section][key]}
    assert changed == fields, changed
    assert {k for k in base if not isinstance(base[k], dict) and base[k] != hq[k]} <= {"name", "description"}


@pytest.mark.parametrize("arch,row,stage1_of", [
    ("cogvideox", "shipped-tile2x-select-output", "shipped-tile2x"),
    ("cogvideox", "shipped-tile-select-output-full", "shipped-tile"),
    ("wan", "shipped-tile2x-lora64", "shipped-tile2x"),
    ("wan", "shipped-tile2x-s2x2", "shipped-tile2x"),
    ("wan", "shipped-tile4x-s2x2", "shipped-tile4x"),
])
def test_stage2_rows_start_from_the_committed_stage1_of_their_window(arch, row, stage1_of, tmp_path):
    """A row that changes only stage 2 or the kept-layer choice fingerprints stage 1 as the row whose
    checkpoints it reuses (--stage1-from matches by fingerprint), so it trains no stage 1 of its own."""
    recipes = fidelity_module("bench_recipes")
    bd = fidelity_module("run").bd
    from hla_convert.stages.distill_loop import stage_fingerprint

    spec = bd.VideoSpec()
    params = {"blocks.0.attn1.hla.proj": torch.empty(2, 64, 32)}
    other = "shipped-tile" if stage1_of == "shipped-tile4x" else "shipped-tile4x"  # another window: another stage 1
    prints = {
        name: stage_fingerprint("stage1", recipes.recipe_for(arch, name, 0, tmp_path, spec, _args(), bench_layers=15), params, 32)
        for name in (row, stage1_of, other)
    }
    assert prints[row] == prints[stage1_of] != prints[other]


@pytest.mark.parametrize("arch,row,seed,results", [
    ("wan", "shipped-tile4x-s2x2", 0, "2026-12-07_h100_deep6_stage1"),  # as the twelfth run reused it (wan2.1-t2v-1.3b's row)
    ("cogvideox", "shipped-tile2x-select-output", 2, "2026-12-07_h100_deep5_stage1"),
    ("cogvideox", "shipped-tile-select-output-full", 0, "2026-12-07_h100_deep4_stage1"),
])
def test_committed_stage1_checkpoints_are_found_for_the_rows_that_reuse_them(arch, row, seed, results, tmp_path):
    """--stage1-from finds a committed stage-1 checkpoint by its fingerprint, as run.py resolves the
    row (shipped base, --calibration-batch 2, the deep tier's 15 blocks): a change to the recipe or
    the fingerprint that no longer matches them would retrain stage 1 on the GPU, unannounced, and
    the row would not share its stage 1 with the row it is compared against."""
    recipes, run, reuse = (fidelity_module(m) for m in ("bench_recipes", "run", "stage1_reuse"))
    args = _args(sampling_steps=20, calibration_batch=2)
    rec = recipes.recipe_for(arch, row, seed, tmp_path, run.bd.VideoSpec(), args, bench_layers=15)
    n, batch = recipes.input_plan(arch, row, args)
    folder = run.HERE / "results" / results
    found = reuse.finished_stage1([folder], arch, seed, rec, math.ceil(n / batch))
    assert found is not None and found.parent == folder / reuse.KEPT_DIR, found
    # and not by name or seed alone: the own-frame row's stage 1 is another one
    frame = recipes.recipe_for(arch, "shipped-frame", seed, tmp_path, run.bd.VideoSpec(), args, bench_layers=15)
    assert reuse.finished_stage1([folder], arch, seed, frame, math.ceil(n / batch)) is None


def test_shipped_rows_need_the_shipped_base(tmp_path, monkeypatch, capsys):
    run = fidelity_module("run")
    common = ["--models", "wan", "--out", str(tmp_path / "r.json"), "--device", "cpu"]
    assert run.main([*common, "--configs", "shipped"]) == 2
    assert "--base shipped" in capsys.readouterr().err
    assert run.main([*common, "--base", "shipped", "--configs", "hla"]) == 2
    assert run.main([*common, "--base", "shipped", "--batch-size", "4"]) == 2
    monkeypatch.setattr(run, "HERE", tmp_path)  # --tier picks the models folder
    capsys.readouterr()
    assert run.main([*common, "--base", "shipped", "--tier", "deep"]) == 2
    assert str(tmp_path / "models-deep" / "wan") in capsys.readouterr().err


def test_report_shows_what_each_lever_buys_against_the_shipped_row(tmp_path):
    report = fidelity_module("report")

    def record(config, seed, rel, psnr, s1=10.0, **extra):
        return {"model": "wan", "config": config, "seed": seed, "status": "ok", "tier": "deep", "base": "shipped", "blocks": 15,
                "calibration_samples": 512 if config == "shipped-cal512" else 64, "softmax_layers": 1,
                "output": {"rel_l2": rel}, "sampling": {"psnr_db": psnr}, "seconds": {"stage1": s1, "stage2": 20.0, "stage3": 0.0}, **extra}  # fmt: skip

    effects = {"select": "output", "errors": {"blocks.0.attn1": 0.1, "blocks.1.attn1": 0.3},
               "output_effects": [{"drift": 0.2, "with_softmax": {"blocks.0.attn1": 0.12, "blocks.1.attn1": 0.18}, "picked": "blocks.0.attn1"}]}  # fmt: skip
    records = [
        record("shipped", 0, 0.10, 30.0), record("shipped", 1, 0.12, 28.0),
        record("shipped-cal512", 0, 0.08, 31.0, s1=14.0),
        record("shipped-tile", 0, 0.09, 30.5), record("shipped-chunk2", 0, 0.13, 27.0),
        record("shipped-select-output", 0, 0.095, 30.2, selection_summary=effects),
        record("shipped-keep0", 0, 0.2, 25.0, s1=0.0, resumed=True),  # resumed: its stage times are not in the record
        {"model": "wan", "config": "shipped-full", "seed": 0, "status": "error", "tier": "deep", "base": "shipped", "error": "recipe: stage2.train: ..."},
    ]  # fmt: skip
    text = report.render(records)
    assert "### wan, deep tier (15 blocks), shipped recipe: what each lever buys" in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ") and "shipped" in line.split(" | ")[1]}
    assert "| 2 | 64 | 1 | 0.1100 ± 0.0100 |  | 29.0 ± 1.0 |  | 30 ± 0 |" in rows["shipped"]
    assert "| 1 | 512 | 1 | 0.0800 | -0.0300 | 31.0 | +2.0 | 34 | +4 |" in rows["shipped-cal512"]
    assert "| 1 | 64 | 1 | 0.2000 | +0.0900 | 25.0 | -4.0 | – | – |" in rows["shipped-keep0"]  # not "20 s"
    assert "shipped-tile has the lowest output rel L2" in text  # the window verdict
    assert "given back alone blocks.0.attn1 -> 0.1200, blocks.1.attn1 -> 0.1800; picked blocks.0.attn1 (attention error would pick blocks.1.attn1)" in text
    assert "- shipped-full failed: recipe: stage2.train: ..." in text

    # --markers: the deep tier's section of the doc is written, the fast tier's kept
    results = tmp_path / "deep.json"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    doc = tmp_path / "comparison.md"
    doc.write_text(f"{report.START}\nfast table\n{report.END}\n<!-- fidelity-deep:start -->\nold\n<!-- fidelity-deep:end -->\n")
    assert report.main([str(results), "--write", str(doc), "--markers", "fidelity-deep"]) == 0
    written = doc.read_text()
    assert "fast table" in written and "\nold\n" not in written and written.index("what each lever buys") > written.index(report.END)
