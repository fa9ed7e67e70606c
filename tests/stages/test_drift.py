"""Drift report: identity conversion has zero drift and passes; an untrained student fails tight thresholds."""

from __future__ import annotations

import json

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from hla_convert import convert_attention
from hla_convert.stages.calibration import build_inputs
from hla_convert.stages.distill import attention_transfer, initialize_feature_maps
from hla_convert.stages.drift import PSNR_IDENTICAL, DriftReport, check_thresholds, measure_drift
from hla_convert.model.layers import hla_layers
from hla_convert.recipe import parse_recipe
from tiny_models import tiny_model


def recipe(kind="hadamard", **validation):
    val = {"sampling_steps": 3, "timestep_buckets": 2}
    val.update(validation)
    return parse_recipe(
        {
            "name": "t",
            "model": {"architecture": "WanTransformer3DModel"},
            "attention": {"kind": kind, "feature_dim": 8},
            "calibration": {"frames": 5, "height": 64, "width": 64, "samples": 16, "heldout": 8, "batch_size": 4, "text_len": 6},
            "stage1": {"steps": 40, "lr": 5e-3, "batch_size": 8},
            "validation": val,
        }
    )


def setup(rec):
    model = tiny_model("wan")
    convert_attention(model, rec.hla_config())
    return model, build_inputs(model, rec, "heldout")


def test_softmax_conversion_has_zero_drift_and_passes():
    rec = recipe("softmax", max_attention_rel_l2=0.0, max_output_rel_l2=0.0, min_output_cosine=0.9999, max_latent_rel_l2=0.0, min_latent_psnr=100.0)
    model, held = setup(rec)
    report = measure_drift(model, held, rec, scheduler=FlowMatchEulerDiscreteScheduler())
    assert report.passed and report.failures == []
    assert report.attention == {"blocks.0.attn1": 0.0, "blocks.1.attn1": 0.0}
    assert report.output_rel_l2 == 0.0 and report.output_cosine == pytest.approx(1.0, abs=1e-6)
    assert sum(b["samples"] for b in report.buckets) == 8 == report.heldout_samples
    assert report.sampling["rel_l2"] == 0.0 and report.sampling["psnr_db"] == PSNR_IDENTICAL
    doc = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert doc["passed"] is True and doc["table"]


def test_untrained_student_fails_tight_thresholds_and_report_round_trips():
    rec = recipe(max_attention_rel_l2=0.01, max_output_rel_l2=0.001, min_output_cosine=0.99999, max_latent_rel_l2=1e-4, min_latent_psnr=90.0)
    model, held = setup(rec)
    report = measure_drift(model, held, rec, scheduler=FlowMatchEulerDiscreteScheduler())
    assert not report.passed
    text = "\n".join(report.failures)
    for key in ("max_attention_rel_l2", "max_output_rel_l2", "min_output_cosine", "max_latent_rel_l2", "min_latent_psnr"):
        assert f"validation.{key}" in text
    assert all(0 < v < 10 for v in report.attention.values())
    assert 0 < report.output_rel_l2 < 1 and -1 <= report.output_cosine < 1
    assert 0 < report.sampling["psnr_db"] < PSNR_IDENTICAL
    assert all(layer.mode == "student" and layer.last_pair is None for layer in hla_layers(model).values())
    doc = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    again = DriftReport.from_dict(doc)
    assert again.failures == report.failures and again.attention == report.attention
    assert check_thresholds(doc, rec.validation) == report.failures
    assert check_thresholds(doc, {"max_output_rel_l2": 10.0}) == []  # validate re-checks with other thresholds
    assert any(row["ok"] is False for row in report.summary_rows())


def test_training_reduces_drift(tmp_path):
    rec = recipe()
    model, held = setup(rec)
    train = build_inputs(model, rec, "train")
    initialize_feature_maps(model, train)
    before = measure_drift(model, held, rec)
    attention_transfer(model, train, rec, tmp_path)
    after = measure_drift(model, held, rec)
    assert after.sampling is None  # no scheduler given
    assert after.attention_mean < before.attention_mean
    assert after.output_rel_l2 < before.output_rel_l2


def test_teacher_steps_are_sampled_beside_the_student_from_the_same_noise():
    """validation.teacher_steps = k: a third sampling run, its first k steps by the teacher; equal to
    sample_latents with teacher_steps = k from the measure's noise, reported unchecked, round-tripped."""
    import torch

    from hla_convert.stages.drift import noise_shape, psnr_db, sample_latents

    rec = recipe(min_latent_psnr=90.0, teacher_steps=2)
    model, held = setup(rec)
    sched = FlowMatchEulerDiscreteScheduler()
    report = measure_drift(model, held, rec, scheduler=sched)
    ts = report.sampling["teacher_steps"]
    assert ts["steps"] == 2 and report.sampling["steps"] == 3
    item = held[0]
    g = torch.Generator().manual_seed(rec.calibration.seed * 1_000_003 + 99)
    noise = torch.randn(noise_shape(model, item["hidden_states"]), generator=g)
    teacher = sample_latents(model, item, sched, 3, noise, teacher_steps=3)  # every step by the teacher
    mixed = sample_latents(model, item, sched, 3, noise, teacher_steps=2)
    student = sample_latents(model, item, sched, 3, noise)
    assert all(layer.mode == "student" for layer in hla_layers(model).values())
    peak = float(teacher.max() - teacher.min())
    assert ts["psnr_db"] == pytest.approx(psnr_db(float((mixed - teacher).pow(2).mean()), peak), rel=1e-5)
    assert report.sampling["psnr_db"] == pytest.approx(psnr_db(float((student - teacher).pow(2).mean()), peak), rel=1e-5)
    assert ts["psnr_db"] > report.sampling["psnr_db"]  # two of three steps exact: closer to the teacher
    # only the plain student is checked against min_latent_psnr; the row is in the table, unchecked
    assert sum("min_latent_psnr" in f for f in report.failures) == 1
    row = [r for r in report.summary_rows() if "first 2 of 3 steps by the teacher" in r["metric"]]
    assert len(row) == 1 and row[0]["ok"] is None
    again = DriftReport.from_dict(json.loads(json.dumps(report.to_dict(), allow_nan=False)))
    assert again.sampling["teacher_steps"] == ts
    # a recipe asking for as many teacher steps as sampling steps (a copy with fewer sampling
    # steps) runs, with one step left converted
    capped = measure_drift(model, held, recipe(teacher_steps=5), scheduler=sched)
    assert capped.sampling["teacher_steps"]["steps"] == 2
    assert capped.sampling["teacher_steps"]["psnr_db"] == pytest.approx(ts["psnr_db"], rel=1e-6)


def test_from_dict_rejects_other_json():
    with pytest.raises(ValueError, match="not a drift report"):
        DriftReport.from_dict({"passed": True})


LOOSE = dict(max_attention_rel_l2=10.0, max_output_rel_l2=10.0, min_output_cosine=-1.0, max_latent_rel_l2=10.0, min_latent_psnr=-100.0)


def test_a_nan_or_inf_metric_fails_every_threshold_also_read_back_from_json():
    from hla_convert.json_docs import dumps_document

    nan, inf = float("nan"), float("inf")
    report = DriftReport(
        attention={"blocks.0.attn1": 0.1, "blocks.1.attn1": nan},
        buckets=[{"t_min": 0.0, "t_max": 1.0, "samples": 2, "rel_l2": inf, "cosine": nan}],
        output_rel_l2=inf,
        output_cosine=nan,
        sampling={"steps": 2, "samples": 1, "rel_l2": nan, "psnr_db": nan, "peak": nan},
        thresholds=LOOSE,
    )
    report.failures = check_thresholds(report, LOOSE)
    assert not report.passed and len(report.failures) == 5  # `nan > thr` is False: not a pass
    assert "blocks.1.attn1 nan" in report.failures[0]
    assert [row["ok"] for row in report.summary_rows()] == [False, None, False, False, False, False]
    doc = json.loads(dumps_document(report.to_dict()))  # NaN / inf as the strings "nan" / "inf"
    assert doc["sampling"]["psnr_db"] == "nan" and doc["output"]["buckets"][0]["rel_l2"] == "inf"
    assert doc["passed"] is False
    assert check_thresholds(doc, LOOSE) == report.failures


def test_a_nan_model_fails_and_its_psnr_is_not_the_identical_200_db():
    import torch

    rec = recipe(**LOOSE)
    model, held = setup(rec)
    with torch.no_grad():
        for p in model.proj_out.parameters():
            p.fill_(float("nan"))
    report = measure_drift(model, held, rec, scheduler=FlowMatchEulerDiscreteScheduler())
    assert not report.passed
    assert report.sampling["psnr_db"] != report.sampling["psnr_db"]  # NaN, not PSNR_IDENTICAL
    assert any("min_latent_psnr" in f for f in report.failures) and any("max_output_rel_l2" in f for f in report.failures)
