"""The fidelity benchmark end to end on tiny shapes: train_models.py -> run.py (--jobs, --resume,
--stage1-from) -> its records.

Tiny teachers (2 blocks, 2 heads x 16, 4 x 8 x 8 pixels) are trained for two steps on the CPU, then
run.py converts one of them with the identity conversion (kind softmax), a real HLA config and a
config naming a recipe field that does not exist, for a few distillation steps. A 4-block tiny
teacher runs the deep tier's rows on the shipped recipe (--base shipped). The rows' definitions and
the report: test_fidelity_rows.py.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from helpers import fidelity_module


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    train = fidelity_module("train_models")
    out = tmp_path_factory.mktemp("fidelity-models")
    argv = ["--out", str(out), "--tiny", "--steps", "2", "--models", "wan", "--heldout", "4", "--entropy-videos", "1",
            "--device", "cpu", "--threads", "1", "--log-every", "1000"]  # fmt: skip
    assert train.main(argv) == 0
    return out


def test_train_models_writes_a_loadable_teacher(tiny_teacher):
    bm = fidelity_module("bench_models")
    arch, model, spec, info = bm.load_model(tiny_teacher / "wan")
    assert arch == "wan" and info["training"]["steps"] == 2 and info["tiny"]
    assert math.isfinite(info["heldout_loss"]["mean"]) and len(info["heldout_loss"]["buckets"]) == 4
    ent = info["attention_entropy"]["trained"]
    assert ent["n"] == spec.frames * spec.height // 2 * spec.width // 2
    assert 0 < ent["mean"] <= ent["uniform_log_n"] + 1e-6


NO_SUCH_FIELD = {"attention.no_such_field": 1}  # a config naming a recipe field that does not exist


def _grid_argv(teacher: Path, folder: Path, name: str, configs: list[str], *extra: str) -> list[str]:
    """run.py over the tiny teacher: 1 % of the recipe's steps, 8 + 8 inputs, 2 sampling steps; the
    inputs in folder/inputs, the records in folder/NAME.jsonl, the conversions in folder/conv-NAME."""
    return ["--models-dir", str(teacher), "--models", "wan", "--configs", *configs, "--seeds", "0",
            "--out", str(folder / f"{name}.jsonl"), "--steps-scale", "0.01", "--device", "cpu", "--train-samples", "8",
            "--heldout-samples", "8", "--batch-size", "4", "--sampling-steps", "2", "--threads", "1",
            "--inputs-dir", str(folder / "inputs"), "--conversions-dir", str(folder / f"conv-{name}"), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def grid_run(tiny_teacher, tmp_path_factory):
    """One run.py --jobs 1 (in this process) over softmax, hla and no-such-field, made once for the
    tests that read it: the records test, the --jobs 2 test (the --jobs 1 records it must give) and
    the --stage1-from test (the hla row whose stage 1 a later row starts from). Read-only: a test
    that appends to the records copies the file first. (folder, argv, the records file)"""
    run = fidelity_module("run")
    folder = tmp_path_factory.mktemp("fidelity-grid")
    argv = _grid_argv(tiny_teacher, folder, "one", ["softmax", "hla", "no-such-field"])
    with pytest.MonkeyPatch.context() as m:
        m.setitem(run.CONFIGS, "no-such-field", NO_SUCH_FIELD)
        assert run.main(argv) == 0
    return folder, argv, folder / "one.jsonl"


@pytest.mark.slow
def test_run_records_every_measure_and_softmax_is_exact(grid_run, tmp_path, monkeypatch, capsys):
    run = fidelity_module("run")
    monkeypatch.setitem(run.CONFIGS, "no-such-field", NO_SUCH_FIELD)
    _, argv, made = grid_run
    results = tmp_path / "results.json"  # the --resume below appends: a copy of the shared records
    results.write_text(made.read_text())
    argv = [*argv[: argv.index("--out")], "--out", str(results), *argv[argv.index("--out") + 2 :]]
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
        # the sampled videos over every held-out batch (2 of 4 here), the first the report's own
        wide = r["sampled_batches"]
        assert (wide["steps"], wide["batches"], wide["samples"]) == (2, 2, 8) and len(wide["psnr_db_each"]) == 2
        assert wide["psnr_db_each"][0] == pytest.approx(r["sampling"]["psnr_db"], abs=1e-3)
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
    assert sm["sampled_batches"]["psnr_db_each"] == [200.0, 200.0]  # identical latents (drift.psnr_db)

    h = records["hla"]  # a real conversion: trained, measurably different from the teacher
    assert h["stage1"]["steps"] >= 1 and h["stage2"]["steps"] >= 1 and h["trainable"]["hla"] > 0
    assert set(h["attention"]["stage1_train"]) == {"blocks.0.attn1", "blocks.1.attn1"}
    assert 0 < h["output"]["rel_l2"] < 1 and h["loss"]["ratio"] != 1.0
    each = h["sampled_batches"]["psnr_db_each"]  # other inputs and noise: another video, another PSNR
    assert each[0] != each[1] and h["sampled_batches"]["psnr_db_mean"] == pytest.approx(sum(each) / 2, abs=1e-3)

    # --resume skips what finished and retries what failed
    assert run.main([*argv, "--resume"]) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["config"] for r in lines[3:]] == ["no-such-field"]

    report = fidelity_module("report")
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


@pytest.mark.slow
def test_run_deep_tier_on_the_shipped_recipe(tmp_path_factory, tmp_path):
    """--base shipped end to end on a 4-block tiny teacher: the record says the tier, the base, the
    calibration count (the shipped 64), the scaled softmax budget, what changed from the shipped
    recipe, and the output-effect selection's measured per-layer effects (wan2.1-t2v-1.3b's
    softmax_select: output)."""
    train, run = fidelity_module("train_models"), fidelity_module("run")
    models = tmp_path_factory.mktemp("fidelity-deep-models")
    argv = ["--out", str(models), "--tiny", "--layers", "4", "--steps", "1", "--models", "wan", "--heldout", "4",
            "--entropy-videos", "1", "--device", "cpu", "--threads", "1", "--log-every", "1000"]  # fmt: skip
    assert train.main(argv) == 0
    results = tmp_path / "deep.json"
    argv = ["--base", "shipped", "--tier", "deep", "--models-dir", str(models), "--models", "wan", "--configs", "shipped",
            "--seeds", "0", "--out", str(results), "--steps-scale", "0.01", "--device", "cpu", "--heldout-samples", "4",
            "--sampling-steps", "1", "--threads", "1", "--inputs-dir", str(tmp_path / "inputs"), "--conversions-dir", str(tmp_path / "conv")]  # fmt: skip
    assert run.main(argv) == 0
    run_argv = argv
    (r,) = map(json.loads, results.read_text().splitlines())
    assert r["status"] == "ok", r.get("error")
    assert (r["tier"], r["base"], r["blocks"], r["calibration_samples"], r["softmax_layers"]) == ("deep", "shipped", 4, 64, 1)
    assert set(r["changed_from_shipped"]) - set(fidelity_module("bench_recipes").SHIPPED_CHANGES) == {
        "stage1.steps", "stage2.steps", "validation.sampling_steps", "validation.teacher_steps"
    }  # fmt: skip
    assert r["recipe"]["validation"]["teacher_steps"] == 0  # the shipped 2 of 10 at 1 step: none left to give
    scaled = fidelity_module("bench_recipes").scaled_teacher_steps
    assert (scaled(2, 10, 20), scaled(2, 10, 10), scaled(2, 10, 3), scaled(2, 10, 2), scaled(0, 10, 20)) == (4, 2, 1, 1, 0)
    assert r["recipe"]["stage2"]["train"] == "full"  # as shipped (wan2.1-t2v-1.3b since 2026-12-07)
    sel = r["selection_summary"]
    assert sel["select"] == "output" and r["selection"] == [sel["output_effects"][0]["picked"]]
    assert len(sel["output_effects"][0]["with_softmax"]) == 4
    assert {"stage1", "stage2", "stage3"} <= set(r["seconds"]) and math.isfinite(r["sampling"]["psnr_db"])
    # dense_steps.py on the saved folder: the student alone, the teacher's first step, its last step
    dense, out = fidelity_module("dense_steps"), tmp_path / "dense.jsonl"
    argv = [str(tmp_path / "conv" / "wan-shipped-seed0"), "--out", str(out), "--ks", "0", "1", "--steps", "2", "--items", "1", "--device", "cpu"]
    assert dense.main(argv) == 0
    rows = {(d["where"], d["teacher_steps"]): d for d in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {("none", 0), ("first", 1), ("last", 1)} and all(math.isfinite(d["psnr_db"]) for d in rows.values())
    # fit_gap.py on the same folder: drift on 2 of the 32 calibration forwards it trained on, and on the held-out ones
    gap, out = fidelity_module("fit_gap"), tmp_path / "gap.jsonl"
    assert gap.main([str(tmp_path / "conv" / "wan-shipped-seed0"), "--out", str(out), "--device", "cpu", "--limit", "2"]) == 0
    rows = {d["split"]: d for d in map(json.loads, out.read_text().splitlines())}
    batch = r["recipe"]["calibration"]["batch_size"]
    assert (rows["train"]["inputs"], rows["train"]["samples"], rows["heldout"]["samples"]) == (2, 2 * batch, 2 * batch)
    assert all(0 < d["output_rel_l2"] < 10 and d["buckets"] for d in rows.values())
    # --resume where the folder was saved whole but no record written (a time limit cut the measure):
    # measured from the folder, not converted again; a folder saved by another recipe is not taken
    again = tmp_path / "again.json"
    assert run.main([*run_argv[: run_argv.index("--out")], "--out", str(again), *run_argv[run_argv.index("--out") + 2 :], "--resume"]) == 0
    (r2,) = map(json.loads, again.read_text().splitlines())
    assert r2["status"] == "ok" and r2.get("reused_saved_conversion") and not r.get("reused_saved_conversion")
    assert (r2["output"]["rel_l2"], r2["stage1"], r2["selection"]) == (r["output"]["rel_l2"], r["stage1"], r["selection"])
    conversion = fidelity_module("conversion")
    rec = fidelity_module("bench_recipes").shipped_recipe("wan")
    assert conversion.finished_conversion(tmp_path / "conv" / "wan-shipped-seed0", rec) is None


# -- run.py --jobs N: the runs N at a time, each by a worker process (jobs.py) -------------------------

_FAKE_WORKER = """
import json, pathlib, sys, time
name, record_file, meet = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
(meet / name).touch()
print(f"{name} started", flush=True)
t0 = time.time()
while len(list(meet.iterdir())) < 2 and time.time() - t0 < 20:  # both running at once, or a timeout
    time.sleep(0.02)
if name == "crash":
    print("Segmentation fault (core dumped)", file=sys.stderr, flush=True)
    sys.exit(139)
record_file.write_text(json.dumps({"model": "wan", "config": name, "seed": 0, "status": "ok", "met": len(list(meet.iterdir()))}) + "\\n")
"""


def test_jobs_run_at_once_and_a_crashed_worker_is_an_error_record(tmp_path, capsys):
    """Two workers run at the same time (each waits to see the other start); the parent appends both
    records to --out, a worker that dies without a record gives a one-line error record, and each
    worker's lines are streamed prefixed and kept in its log file."""
    run = fidelity_module("run")
    meet = tmp_path / "meet"
    meet.mkdir()
    out = tmp_path / "r.jsonl"

    def worker_cmd(r, record_file):
        return [sys.executable, "-c", _FAKE_WORKER, r[1], str(record_file), str(meet)]

    def error_fields(r):
        return {"model": r[0], "config": r[1], "seed": r[2]}

    rc = run.jobs.run_grid([("wan", "ok", 0), ("wan", "crash", 0)], 2, out, worker_cmd, error_fields, run.append, "python run.py --jobs 2")
    assert rc == 0
    records = {r["config"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["ok"]["status"] == "ok" and records["ok"]["met"] == 2  # the two ran at once
    assert records["ok"]["env"]["command"] == "python run.py --jobs 2" and records["ok"]["worker"]["jobs"] == 2
    crash = records["crash"]
    assert crash["status"] == "error" and crash["error"] == "worker: exit status 139: Segmentation fault (core dumped)"
    assert (crash["model"], crash["seed"]) == ("wan", 0) and crash["seconds"]["total"] > 0
    text = capsys.readouterr().out
    assert "[wan ok 0] ok started" in text and "[wan crash 0] Segmentation fault (core dumped)" in text
    assert "ok started" in (tmp_path / "r-logs" / "wan-ok-seed0.log").read_text()
    assert list((tmp_path / "r-jobs").iterdir()) == []  # the workers' record files are gone once appended


def test_jobs_start_no_run_once_the_time_is_up(tmp_path, capsys):
    run = fidelity_module("run")
    out = tmp_path / "r.jsonl"
    script = "import json, sys, time; time.sleep(0.5); open(sys.argv[1], 'w').write(json.dumps({'config': sys.argv[2]}))"
    rc = run.jobs.run_grid(
        [("wan", c, 0) for c in ("a", "b", "c")], 1, out, lambda r, f: [sys.executable, "-c", script, str(f), r[1]],
        lambda r: {}, run.append, "cmd", stop_after_minutes=0.01,
    )  # fmt: skip
    # the first run starts (nothing measured yet); after it, 0.5 s used + 0.5 s for the next > 0.6 s
    assert rc == 0 and [json.loads(x)["config"] for x in out.read_text().splitlines()] == ["a"]
    assert "2 not started; --resume continues" in capsys.readouterr().out


@pytest.mark.slow
def test_jobs_two_give_the_records_of_one_and_resume_skips_them(tiny_teacher, grid_run, tmp_path, capsys):
    """--jobs 2 over two configs: the same records, bit for bit in every measure (one thread, the
    same seeds), as --jobs 1 (grid_run's, its inputs made by that run: here each worker makes its
    own), in the one --out file; --resume after it starts nothing."""
    run = fidelity_module("run")
    _, _, made = grid_run

    def argv():
        return _grid_argv(tiny_teacher, tmp_path, "two", ["softmax", "hla"], "--jobs", "2")

    assert run.main(argv()) == 0
    one = {r["config"]: r for r in map(json.loads, made.read_text().splitlines()) if r["config"] != "no-such-field"}
    two = {r["config"]: r for r in map(json.loads, (tmp_path / "two.jsonl").read_text().splitlines())}
    assert set(one) == set(two) == {"softmax", "hla"}
    for config, a in one.items():
        b = two[config]
        assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
        for key in ("output", "loss", "attention", "sampling", "sampled_batches", "stage1", "stage2", "trainable", "heldout_samples", "overrides"):
            assert a[key] == b[key], (config, key)
        assert b["output_dir"] == str(tmp_path / "conv-two" / f"wan-{config}-seed0")  # the --jobs 1 folder: either mode resumes it
        assert b["env"]["command"].endswith("--jobs 2") and "worker" not in a
    assert one["hla"]["output"]["rel_l2"] > 0

    capsys.readouterr()
    assert run.main([*argv(), "--resume"]) == 0
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 2
    assert capsys.readouterr().out.count("done already (--resume)") == 2


@pytest.mark.parametrize("signals", [1, 2])
def test_jobs_sigterm_ends_the_workers_and_writes_no_record(tmp_path, capsys, signals):
    """A caller's time limit (SIGTERM to run.py) ends every worker with it, not orphaned to run on;
    no record is written for a run cut off (--resume continues its conversion), and run.py says 130.
    A second SIGTERM while the workers are being stopped (`timeout` signals the whole process group;
    on 2026-12-07 it ended the cleanup in a traceback) does not cut the cleanup short."""
    import os
    import signal
    import threading
    import time

    run = fidelity_module("run")
    out = tmp_path / "r.jsonl"
    # a worker takes 0.5 s to stop, as a conversion finishing a checkpoint write does
    script = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(143))); "
              "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)")
    pids = [tmp_path / f"pid{i}" for i in range(2)]

    def limit():  # the caller's limit: SIGTERM once both workers run
        t0 = time.time()
        while not all(p.is_file() and p.read_text() for p in pids) and time.time() - t0 < 30:
            time.sleep(0.05)
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)

    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    threading.Thread(target=limit, daemon=True).start()
    t0 = time.time()
    rc = run.jobs.run_grid(
        [("wan", "a", 0), ("wan", "b", 0)], 2, out, lambda r, f: [sys.executable, "-c", script, str(pids[r[1] == "b"])],
        lambda r: {}, run.append, "cmd",
    )  # fmt: skip
    assert rc == 130 and time.time() - t0 < 30 and not out.exists()
    for p in pids:  # both workers are gone (ended and reaped)
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)
    assert "interrupted: cut off wan-a-seed0, wan-b-seed0; --resume continues them" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before and signal.getsignal(signal.SIGINT) == before_int  # the caller's handlers are back


def test_jobs_must_be_positive(tmp_path, capsys):
    run = fidelity_module("run")
    assert run.main(["--models", "wan", "--out", str(tmp_path / "r.json"), "--device", "cpu", "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


def test_stage1_from_starts_a_later_lever_from_the_same_stage1(tiny_teacher, grid_run, tmp_path, capsys):
    """--stage1-from: a row that differs only after stage 1 (hla-lora after grid_run's hla, on the
    same inputs) restores the kept stage-1 checkpoint of the earlier row (same losses and per-layer
    values, no stage-1 step run) and is measured as usual; a row with another stage 1 (another
    attention config) trains its own."""
    run = fidelity_module("run")
    folder, _, made = grid_run
    conv_a = folder / "conv-one"
    kept = conv_a / "stage1-checkpoints" / "wan-hla-seed0.safetensors"
    assert kept.is_file()  # the finished conversion dropped its work folder; the copy stays
    argv = _grid_argv(tiny_teacher, folder, "b", ["hla-lora", "hybrid-lora"], "--stage1-from", str(conv_a))
    argv[argv.index("--out") + 1] = str(tmp_path / "b.jsonl")
    argv[argv.index("--conversions-dir") + 1] = str(tmp_path / "conv-b")
    capsys.readouterr()
    assert run.main(argv) == 0
    (a,) = [r for r in map(json.loads, made.read_text().splitlines()) if r["config"] == "hla"]
    b = {r["config"]: r for r in map(json.loads, (tmp_path / "b.jsonl").read_text().splitlines())}
    lora, hybrid = b["hla-lora"], b["hybrid-lora"]
    assert lora["status"] == hybrid["status"] == "ok", (lora.get("error"), hybrid.get("error"))
    assert lora["stage1_from"] == str(kept) and "stage1_from" not in hybrid
    steps = a["stage1"]["steps"]
    assert a["stage1"].pop("resumed_from") is None and lora["stage1"].pop("resumed_from") == steps  # restored, not run
    assert lora["stage1"] == a["stage1"] and lora["attention"]["stage1_train"] == a["attention"]["stage1_train"]
    assert lora["recipe"]["stage2"]["train"] == "lora" and lora["trainable"] != a["trainable"]  # its own stage 2
    assert hybrid["attention"]["stage1_train"] != a["attention"]["stage1_train"]
    out = capsys.readouterr().out
    assert f"stage 1: from {kept}" in out and "no finished one of this fingerprint, trained here" in out
    report = fidelity_module("report")
    assert report._seconds(lora) is None and report._seconds(hybrid) is not None  # its stage-1 time is not its own
