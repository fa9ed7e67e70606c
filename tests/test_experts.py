"""Wan2.2 A14B-style two-expert pipelines, end to end on the CPU.

A WanPipeline folder with `transformer` and `transformer_2` (two different tiny random Wan
transformers of 4 blocks) and boundary_ratio 0.5, saved with save_pretrained as a user's folder
is, converted by `hla-convert convert` with the shipped `wan2.1-t2v-1.3b` recipe cut to tiny sizes
(calibration from the pipeline's own trajectories, as shipped): both experts converted, each
calibrated only on the timesteps the pipeline served it, both adapters in the folder, the drift
report with a row per expert and the whole-pipeline check; `load_converted`, `validate` and
`sample` read the folder back; a run killed in the second expert resumes into it.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TWO_EXPERT_CUT, invoke
from safetensors.torch import load_file
from tiny_models import forward, save_tiny_wan_pipeline, tiny_inputs, tiny_wan

import hla_convert
from hla_convert.conversion import convert
from hla_convert.io.output import OutputError
from hla_convert.model.layers import hla_parameters
from hla_convert.recipe import load_recipe

LAYERS = 4  # the recipe keeps 2 layers softmax
BOUNDARY = 500.0  # boundary_ratio 0.5 x 1000 train timesteps
CUT = TWO_EXPERT_CUT


def _experts():
    return tiny_wan(seed=0, num_layers=LAYERS), tiny_wan(seed=1, num_layers=LAYERS)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    save_tiny_wan_pipeline(root / "model", *_experts(), boundary_ratio=0.5)
    recipe = root / "wan-cut.yaml"
    recipe.write_text(load_recipe("wan2.1-t2v-1.3b").with_overrides(fields=CUT).to_yaml())
    out = root / "out"
    done = invoke("convert", root / "model", "--recipe", recipe, "--out", out, "--device", "cpu", "--json")
    assert done.exit_code in (0, 1), done.stderr
    return root, out, json.loads(done.stdout)


def test_both_experts_are_converted_into_one_folder(two):
    _, out, doc = two
    assert (out / "adapter_model.safetensors").is_file() and (out / "transformer_2" / "adapter_model.safetensors").is_file()
    first, second = hla_convert.read_adapter_info(out), hla_convert.read_adapter_info(out / "transformer_2")
    assert first["extra"]["expert"] == "transformer" and second["extra"]["expert"] == "transformer_2"
    assert first["extra"]["experts"] == second["extra"]["experts"] == ["transformer", "transformer_2"]
    assert first["base_fingerprint"] != second["base_fingerprint"]  # each adapter bound to its own expert
    assert len(first["modules"]) == len(second["modules"]) == LAYERS - 2
    report = json.loads((out / "drift_report.json").read_text())
    assert set(report["experts"]) == {"transformer", "transformer_2"} and report["pipeline"]["steps"] == 2
    assert report["passed"] == doc["passed"] == (not report["failures"])
    metrics = [row["metric"] for row in report["table"]]
    assert any(m.startswith("transformer: ") for m in metrics) and any(m.startswith("transformer_2: ") for m in metrics)
    assert any(m.startswith("pipeline: ") for m in metrics)
    # each expert's held-out buckets are on its side of the boundary (t = timestep / 1000)
    assert all(b["t_min"] >= 0.5 for b in report["experts"]["transformer"]["output"]["buckets"])
    assert all(b["t_max"] <= 0.5 for b in report["experts"]["transformer_2"]["output"]["buckets"])
    assert set(report["training"]) == {"transformer", "transformer_2"}


def test_each_expert_is_calibrated_only_on_the_timesteps_it_serves(two):
    from hla_convert.stages.calibration import build_expert_input_sets

    root, _, _ = two
    recipe = load_recipe("wan2.1-t2v-1.3b").with_overrides(fields=CUT)
    nets = dict(zip(("transformer", "transformer_2"), _experts()))
    sets = build_expert_input_sets(nets, recipe, BOUNDARY, str(root / "model"))
    for name, high in (("transformer", True), ("transformer_2", False)):
        for split, want in (("train", 4), ("heldout", 2)):
            ts = torch.cat([item["timestep"].reshape(-1) for item in sets[name][split]])
            assert len(ts) == want, (name, split)
            assert bool((ts >= BOUNDARY).all()) if high else bool((ts < BOUNDARY).all()), (name, split, ts)


def test_load_converted_restores_both_experts(two):
    _, out, _ = two
    pipe = hla_convert.load_converted(out, device="cpu")
    assert type(pipe).__name__ == "WanPipeline" and pipe.config.boundary_ratio == 0.5
    inputs = tiny_inputs("wan")
    for name, base in zip(("transformer", "transformer_2"), _experts()):
        net = getattr(pipe, name)
        saved = load_file(str((out if name == "transformer" else out / name) / "adapter_model.safetensors"))
        params = hla_parameters(net)
        assert params and all(torch.equal(p.detach().float(), saved[k]) for k, p in params.items()), name
        alone = hla_convert.load_converted(out, device="cpu", expert=name)
        assert torch.equal(forward(net, inputs), forward(alone, inputs)), name  # the expert alone, bit for bit
        hla_convert.set_attention_mode(net, "teacher")
        assert torch.equal(forward(net, inputs), forward(base, inputs)), name  # on its own base, bit for bit
    with pytest.raises(OutputError, match="expert 'transformer_3'"):
        hla_convert.load_converted(out, expert="transformer_3")


def test_validate_reproduces_the_drift_of_each_expert(two):
    _, out, doc = two
    done = invoke("validate", out, "--device", "cpu", "--json")
    assert done.exit_code == (0 if doc["passed"] else 1), done.stderr
    again = {row["metric"]: row["value"] for row in json.loads(done.stdout)["drift"]["table"]}
    saved = {row["metric"]: row["value"] for row in doc["drift"]["table"]}
    assert set(again) == set(saved)
    for metric, value in saved.items():
        assert again[metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric


def test_sample_runs_both_experts(two):
    root, out, _ = two
    video = root / "s.gif"
    done = invoke("sample", out, "--out", video, "--steps", 2, "--device", "cpu")
    assert done.exit_code == 0, done.stderr
    assert video.is_file() and video.stat().st_size > 0


def test_a_run_killed_in_the_second_expert_resumes_into_it(two, tmp_path):
    root, out, _ = two
    recipe = root / "wan-cut.yaml"
    steps = []

    def kill_in_second_stage2(event):
        if event.kind == "step" and event.stage in ("stage1", "stage2"):
            steps.append(event.stage)
            if steps.count("stage2") == 3:  # the second expert's first stage-2 step
                raise KeyboardInterrupt

    again = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(str(root / "model"), recipe=str(recipe), out=again, device="cpu", progress=kill_in_second_stage2)
    work = again / ".hla_work"
    assert (work / "transformer" / "stage2.checkpoint.safetensors").is_file()
    assert (work / "transformer_2" / "stage1.checkpoint.safetensors").is_file()
    done = convert(str(root / "model"), recipe=str(recipe), out=again, device="cpu", resume=True)
    ran = done.report["training"]
    assert ran["transformer"]["stage2"]["steps_run"] == 0 and ran["transformer_2"]["stage1"]["steps_run"] == 0
    for sub in ("", "transformer_2/"):  # the same adapters as the uninterrupted run, bit for bit
        a, b = load_file(str(out / f"{sub}adapter_model.safetensors")), load_file(str(again / f"{sub}adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_push_publishes_both_adapters(two):
    from hla_convert.io.converted import read_output
    from hla_convert.io.push import files_to_push

    _, out, _ = two
    read_output(out, require_manifest=True)  # push's check: every file of both experts as the run wrote it
    names = files_to_push(out)
    assert {"adapter_model.safetensors", "transformer_2/adapter_model.safetensors", "transformer_2/hla_config.json"} <= set(names)


def test_stage3_on_a_two_expert_pipeline_is_refused_before_the_load(two, tmp_path):
    """On-policy sampling runs both experts; each trains alone: refused in one line, nothing written."""
    root, _, _ = two
    recipe = tmp_path / "r.yaml"
    recipe.write_text(load_recipe("wan2.1-t2v-1.3b").with_overrides(fields={**CUT, "stage3.steps": 2}).to_yaml())
    done = invoke("convert", root / "model", "--recipe", recipe, "--out", tmp_path / "o", "--device", "cpu")
    assert done.exit_code == 2
    assert "stage3.steps" in done.stderr and "two-expert" in done.stderr
    assert not (tmp_path / "o").exists()
