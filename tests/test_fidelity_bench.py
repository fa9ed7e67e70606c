"""The fidelity benchmark end to end on tiny shapes: train_models.py -> run.py -> report.py.

Tiny teachers (2 blocks, 2 heads x 16, 4 x 8 x 8 pixels) are trained for two steps on the CPU, then
run.py converts one of them with the identity conversion (kind softmax), a real HLA config and a
config naming a recipe field that does not exist, for a few distillation steps.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

FIDELITY = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity"


def _module(name: str):
    if str(FIDELITY) not in sys.path:
        sys.path.insert(0, str(FIDELITY))
    spec = importlib.util.spec_from_file_location(f"fidelity_{name}", FIDELITY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    train = _module("train_models")
    out = tmp_path_factory.mktemp("fidelity-models")
    argv = ["--out", str(out), "--tiny", "--steps", "2", "--models", "wan", "--heldout", "4", "--entropy-videos", "1",
            "--device", "cpu", "--threads", "1", "--log-every", "1000"]  # fmt: skip
    assert train.main(argv) == 0
    return out


def test_train_models_writes_a_loadable_teacher(tiny_teacher):
    bm = _module("bench_models")
    arch, model, spec, info = bm.load_model(tiny_teacher / "wan")
    assert arch == "wan" and info["training"]["steps"] == 2 and info["tiny"]
    assert math.isfinite(info["heldout_loss"]["mean"]) and len(info["heldout_loss"]["buckets"]) == 4
    ent = info["attention_entropy"]["trained"]
    assert ent["n"] == spec.frames * spec.height // 2 * spec.width // 2
    assert 0 < ent["mean"] <= ent["uniform_log_n"] + 1e-6


@pytest.mark.slow
def test_run_records_every_measure_and_softmax_is_exact(tiny_teacher, tmp_path, monkeypatch, capsys):
    run = _module("run")
    monkeypatch.setitem(run.CONFIGS, "no-such-field", {"attention.no_such_field": 1})
    results = tmp_path / "results.json"
    argv = ["--models-dir", str(tiny_teacher), "--models", "wan", "--configs", "softmax", "hla", "no-such-field",
            "--seeds", "0", "--out", str(results), "--steps-scale", "0.01", "--device", "cpu", "--train-samples", "8",
            "--heldout-samples", "8", "--batch-size", "4", "--sampling-steps", "2", "--threads", "1", "--inputs-dir", str(tmp_path / "inputs"),
            "--conversions-dir", str(tmp_path / "conversions")]  # fmt: skip
    assert run.main(argv) == 0
    records = {r["config"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(records) == {"softmax", "hla", "no-such-field"}

    bad = records["no-such-field"]
    assert bad["status"] == "error" and "attention.no_such_field" in bad["error"] and "\n" not in bad["error"]

    for name in ("softmax", "hla"):
        r = records[name]
        assert r["status"] == "ok", r.get("error")
        assert r["heldout_samples"] == 8
        assert [b["samples"] for b in r["output"]["buckets"]] == [2, 2, 2, 2]  # t evenly spread
        assert [b["samples"] for b in r["loss"]["buckets"]] == [2, 2, 2, 2]
        for key in ("rel_l2", "cosine", "worst_bucket_rel_l2"):
            assert math.isfinite(r["output"][key])
        for key in ("teacher", "student", "ratio"):
            assert math.isfinite(r["loss"][key])
        assert set(r["sampling"]) >= {"steps", "rel_l2", "psnr_db"} and r["sampling"]["steps"] == 2
        assert set(r["seconds"]) >= {"convert_distil", "stage1", "stage2", "measure_fresh_process", "total"}
        # measured from the saved folder in a fresh process: the folder is there, and what it gives
        # is what the conversion measured in memory on the same held-out inputs
        assert r["measured_from"] == "saved folder, load_converted in a fresh process"
        assert (Path(r["output_dir"]) / "adapter_model.safetensors").is_file()
        assert r["output"]["rel_l2"] == pytest.approx(r["in_process"]["output_rel_l2"], rel=1e-4, abs=1e-7)
        assert Path(r["recipe_file"]).is_file() and r["recipe"]["calibration"]["source"] == "folder"

    sm = records["softmax"]  # the teacher against itself: nothing may differ
    assert sm["output"]["rel_l2"] == 0.0 and sm["output"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert sm["loss"]["ratio"] == 1.0 and all(b["ratio"] == 1.0 for b in sm["loss"]["buckets"])
    assert sm["sampling"]["rel_l2"] == 0.0 and sm["attention"]["final_mean"] == 0.0

    h = records["hla"]  # a real conversion: trained, measurably different from the teacher
    assert h["stage1"]["steps"] >= 1 and h["stage2"]["steps"] >= 1 and h["trainable"]["hla"] > 0
    assert set(h["attention"]["stage1_train"]) == {"blocks.0.attn1", "blocks.1.attn1"}
    assert 0 < h["output"]["rel_l2"] < 1 and h["loss"]["ratio"] != 1.0

    # --resume skips what finished and retries what failed
    assert run.main([*argv, "--resume"]) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["config"] for r in lines[3:]] == ["no-such-field"]

    report = _module("report")
    capsys.readouterr()
    assert report.main([str(results)]) == 0
    text = capsys.readouterr().out
    assert "| softmax | 1 | 0.0000 |" in text and "| hla | 1 |" in text
    assert "no-such-field failed: recipe: " in text and "--steps-scale 0.01" in text

    doc = tmp_path / "comparison.md"  # --write replaces only what lies between the markers
    doc.write_text(f"before\n{report.START}\nold\n{report.END}\nafter\n")
    assert report.main([str(results), "--write", str(doc)]) == 0
    written = doc.read_text()
    assert written.startswith("before\n") and written.endswith("after\n") and "old" not in written
    assert "| hla | 1 |" in written


def test_report_targets_a_nan_seed_never_meets_them():
    report = _module("report")

    def record(seed, worst):
        return {"model": "wan", "config": "hla", "seed": seed, "status": "ok", "loss": {"ratio": 1.0},
                "output": {"rel_l2": 0.01, "worst_bucket_rel_l2": worst}}  # fmt: skip

    assert report.targets([record(0, 0.05), record(1, 0.06)], "wan", ["hla"])  # both meet
    assert report.targets([record(0, 0.05), record(1, math.nan)], "wan", ["hla"]) == []  # max() skipped the NaN
    assert report.targets([record(0, math.inf)], "wan", ["hla"]) == []
