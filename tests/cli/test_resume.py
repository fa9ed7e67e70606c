"""`hla-convert convert --resume` after an interrupted run (exit 130), what it refuses, and a run
that diverges (exit 3, its checkpoint kept).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hla_convert.recipe import load_recipe
from helpers import assert_one_line_error, invoke

# -- resume -------------------------------------------------------------------------------------


def test_resume_after_an_interrupted_run_gives_the_same_adapter(converted, tmp_path, fast_recipe):
    """Stopped in stage 1 and resumed, through the command line and the Python API (one stopped
    run serves both: --stop-after-steps is a KeyboardInterrupt raised from the progress callback,
    as a Ctrl-C during hla_convert.convert, and --resume is convert(resume=True))."""
    import hla_convert
    from hla_convert.io.output_guard import OutputError

    # The reference is the shared uninterrupted run of the same recipe (one CPU thread there and here:
    # float sums depend on the thread count).
    reference, _ = converted
    out = tmp_path / "interrupted"
    stopped = invoke("convert", "--recipe", fast_recipe, "--out", out, "--device", "cpu", "--stop-after-steps", "4")
    assert stopped.exit_code == 130, stopped.stderr
    assert "--resume" in stopped.stderr
    assert (out / ".hla_work" / "stage1.checkpoint.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists() and not (out / ".hla-convert.lock").exists()

    with pytest.raises(OutputError, match="resume"):  # the API refuses to start over it as well
        hla_convert.convert(recipe=str(fast_recipe), out=out, device="cpu")
    again = invoke("convert", "--recipe", fast_recipe, "--out", out, "--device", "cpu")
    assert_one_line_error(again, contains="--resume")
    assert_one_line_error(invoke("validate", out), contains="unfinished")

    resumed = invoke("convert", "--recipe", fast_recipe, "--out", out, "--device", "cpu", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["resumed"] is True and doc["drift"]["training"]["stage1"]["resumed_from"] == 4
    assert not (out / ".hla_work").exists()
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(reference / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_resume_refuses_a_different_run_and_a_finished_one(converted, tmp_path, fast_recipe):
    out, _ = converted
    assert_one_line_error(invoke("convert", "--recipe", fast_recipe, "--out", out, "--resume"), contains="nothing to resume")
    stopped = tmp_path / "stopped"
    invoke("convert", "--recipe", fast_recipe, "--out", stopped, "--device", "cpu", "--stop-after-steps", "2")
    line = assert_one_line_error(
        invoke("convert", "--recipe", fast_recipe, "--out", stopped, "--steps", "3", "--resume"), contains="different run"
    )
    assert "recipe" in line


def test_a_diverging_run_stops_with_exit_3_and_keeps_its_checkpoint(tmp_path, fast_recipe):
    recipe = tmp_path / "diverges.yaml"
    fields = {"stage1.lr": 1e30, "stage1.grad_clip": 1e30, "stage1.checkpoint_every": 1}
    recipe.write_text(load_recipe(str(fast_recipe)).with_overrides(fields=fields).to_yaml())
    out = tmp_path / "out"
    line = assert_one_line_error(invoke("convert", "--recipe", recipe, "--out", out, "--device", "cpu"), code=3)
    assert "loss is nan" in line and "step 1" in line
    assert (out / ".hla_work" / "stage1.checkpoint.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()


def test_a_run_resumed_in_stage_2_keeps_the_softmax_layers_it_chose(converted, tmp_path, fast_recipe, monkeypatch):
    """Stopped after stage 2's first step (6 + 1 steps) and resumed where the chooser would now pick
    another layer (as another device or torch version could): the recorded layers are reverted, and
    the adapter is the uninterrupted run's."""
    from hla_convert.stages import selection

    reference, ref_doc = converted
    chosen = ref_doc["drift"]["training"]["selection"]["softmax_layers"]
    out = tmp_path / "stopped"
    stopped = invoke("convert", "--recipe", fast_recipe, "--out", out, "--device", "cpu", "--stop-after-steps", "7")
    assert stopped.exit_code == 130, stopped.stderr
    assert (out / ".hla_work" / "stage2.checkpoint.safetensors").is_file()
    assert json.loads((out / ".hla_work" / "softmax_selection.json").read_text())["softmax_layers"] == chosen

    def chooses_otherwise(model, inputs, count, max_batches=4, select="attention"):
        from hla_convert.model.layers import hla_layers

        other = [n for n in hla_layers(model) if n not in chosen][:count]
        return other, {"select": select, "errors": {}, "softmax_layers": other}

    monkeypatch.setattr(selection, "choose_softmax_layers", chooses_otherwise)
    resumed = invoke("convert", "--recipe", fast_recipe, "--out", out, "--device", "cpu", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    training = json.loads(resumed.stdout)["drift"]["training"]
    assert training["stage2"]["resumed_from"] == 1
    assert training["selection"]["softmax_layers"] == chosen and training["selection"]["reused_on_resume"] is True
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(reference / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
