"""benchmarks/bench_wan.py --smoke on the CPU: every measurement of the GPU run, on a 2-layer
Wan of the same class, writes one JSON record with the fields RESULTS.md is built from."""

from __future__ import annotations

import json

import pytest

from helpers import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "bench_wan.py"


def _bench():
    return load_script(SCRIPT, "bench_wan")


def test_published_config_is_the_1_3b_transformer():
    cfg = _bench().WAN_1_3B_CONFIG
    assert (cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]) == (30, 1536, 8960)
    assert (cfg["text_dim"], cfg["freq_dim"], cfg["in_channels"], cfg["out_channels"]) == (4096, 256, 16, 16)
    assert cfg["patch_size"] == [1, 2, 2] and cfg["qk_norm"] == "rms_norm_across_heads" and cfg["rope_max_seq_len"] == 1024


def test_smoke_run_writes_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    assert _bench().main([str(out), "--smoke", "--resolutions", "480p", "--commit", "abc1234"]) == 0
    doc = json.loads(out.read_text())
    recs = doc["records"]
    got = {(r["model"], r["measurement"]) for r in recs}
    for side in ("softmax", "converted"):
        assert {(side, "forward"), (side, "forward_backward"), (side, "sampling")} <= got
    assert {("converted", "stage1"), ("converted", "stage2")} <= got
    for r in recs:
        assert "error" not in r, r
        assert r["commit"] == "abc1234" and r["torch"] and r["resolution"] == "480p"
    conv = [r for r in recs if r["model"] == "converted"]
    # the recipe's attention, one of the 2 smoke layers given back to softmax
    assert all(r["attention"]["kind"] == "hybrid" and r["converted_layers"] == 1 for r in conv)
    fb = {r["model"]: r for r in recs if r["measurement"] == "forward_backward"}
    assert fb["softmax"]["trainable_parameters"] > 0 and fb["converted"]["trainable_parameters"] > fb["softmax"]["trainable_parameters"] / 2
    assert all(r["median_ms"] > 0 for r in recs if "median_ms" in r)
    stage2 = next(r for r in recs if r["measurement"] == "stage2")
    assert stage2["lora"]["modules"] and stage2["seconds_per_step"] > 0


def test_bad_override_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="attention.feature_dim"):
        _bench().main([str(tmp_path / "x.json"), "--smoke", "--attention", "feature_dim=banana"])


def test_smoke_sampling_at_both_resolutions_compiled_and_stage2_live_and_cached(tmp_path):
    """--parts sampling: 480p and 720p, softmax and converted in one run, each as is and compiled
    (dynamo's eager backend here: the wiring, not inductor); --parts distill: stage 2 as the
    recipe runs it (teacher cached: no teacher forward in a step) beside the live teacher."""
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--parts", "sampling,distill", "--resolutions", "480p,720p", "--compile", "blocks", "--compile-backend", "eager"]
    assert _bench().main([str(out), *argv]) == 0
    recs = json.loads(out.read_text())["records"]
    for r in recs:
        assert "error" not in r, r
    sampling = {(r["model"], r["resolution"], r["compile"]): r for r in recs if r["measurement"] == "sampling"}
    assert set(sampling) == {(m, res, how) for m in ("softmax", "converted") for res in ("480p", "720p") for how in (None, "blocks")}
    assert sampling[("softmax", "720p", None)]["tokens"] > sampling[("softmax", "480p", None)]["tokens"]
    assert all(r["seconds_per_video"] > 0 and r["steps"] == 2 for r in sampling.values())
    # the compiled runs went through dynamo, and the model is eager again afterwards
    assert all(r["dynamo_graphs"] >= 1 for k, r in sampling.items() if k[2] == "blocks")
    stage2 = {r["teacher"]: r for r in recs if r["measurement"] == "stage2" and r["train"] == "lora" and r["compile"] is None
              and r["gradient_checkpointing"]}  # fmt: skip
    assert set(stage2) == {"live", "cached"}
    assert stage2["cached"]["teacher_forwards_per_step"] == 0 and stage2["live"]["teacher_forwards_per_step"] == 2
    assert stage2["cached"]["cache_s"] > 0 and stage2["cached"]["cached_targets"] >= 1 and stage2["live"]["cache_s"] is None
    assert all(r["seconds_per_step"] > 0 for r in stage2.values())
    # then under --compile the cached LoRA run compiled (dynamo's graphs counted), train: full (every
    # weight of the converted blocks) cached, and full compiled
    stages = [(r["measurement"], r.get("train"), r.get("teacher"), r["compile"], r.get("gradient_checkpointing"))
              for r in recs if r["measurement"].startswith("stage")]  # fmt: skip
    assert stages == [("stage1", "hla", None, None, False), ("stage2", "lora", "live", None, True), ("stage2", "lora", "cached", None, True),
                      ("stage2", "lora", "cached", "blocks", True), ("stage2", "full", "cached", None, True),
                      ("stage2", "full", "cached", "blocks", True)]  # fmt: skip
    runs = [r for r in recs if r["measurement"] == "stage2"]
    for r in (runs[2], runs[4]):  # the compiled runs: the library's stage2.compile, with the backend asked for
        assert r["seconds_per_step"] > 0 and r["final_loss"] is not None and r["dynamo_graphs"] >= 1 and r["compile_backend"] == "eager"
        assert r["first_loss_rel_to_eager"] < 1e-5
    full = runs[3]
    assert full["seconds_per_step"] > 0 and full["lora"] is None and full["full"]["parameters"] > stage2["cached"]["lora"]["parameters"]
    # every stage-2 run starts from the weights stage 1 left (the LoRA ones with B = 0): one first loss
    firsts = [r["first_loss"] for r in runs]
    assert max(firsts) - min(firsts) <= 1e-5 * abs(firsts[0]), firsts
    # and trains away from it
    assert all(r["final_loss"] != r["first_loss"] for r in runs)
    # the final checkpoint write, which the steps no longer hold, has its own field
    assert all(r["after_steps_s"] > -1e-3 for r in recs if r["measurement"].startswith("stage"))
