"""Stage 3, on-policy trajectory distillation, on the embedded demo model and its scheduler: it
trains (HLA + the stage-2 LoRA), on the student's own trajectory points, resumes exactly, is a
no-op at steps 0 and is refused without a scheduler before anything trains."""

from __future__ import annotations

import math

import pytest
import torch

from hla_convert import convert_attention, hla_parameters
from hla_convert.model.layers import hla_layers
from hla_convert.model.loading import load_demo_model
from hla_convert.model.lora import has_lora, lora_parameters
from hla_convert.model.modes import attention_mode
from hla_convert.model.pipeline_loading import demo_scheduler
from hla_convert.recipe import RecipeError, load_recipe
from hla_convert.stages.calibration import build_inputs
from hla_convert.stages.checkpoints import checkpoint_path, load_checkpoint
from hla_convert.stages.distill import (
    distil,
    initialize_feature_maps,
    output_distillation,
)
from hla_convert.stages.distill_loop import _batch_indices
from hla_convert.stages.onpolicy import onpolicy_distillation, onpolicy_pick, trajectory_draw

# the demo recipe cut down: 2 inputs of 2 videos of 4 frames (256 tokens, half the demo's), one
# stage-2 step (adds the LoRA), stage 3 on
SMALL = {
    "calibration.frames": 4,
    "calibration.samples": 4,
    "calibration.heldout": 2,
    "calibration.batch_size": 2,
    "stage1.steps": 1,
    "stage1.batch_size": 2,
    "stage2.steps": 1,
    "stage2.batch_size": 2,
    "stage3.steps": 4,
    "stage3.batch_size": 2,
    "stage3.checkpoint_every": 2,
    "stage3.sampling_steps": 4,
}


def small_recipe(**fields):
    return load_recipe("tiny-wan").with_overrides(fields={**SMALL, **fields})


def after_stage2(rec, work):
    """The demo converted, feature maps initialised, one stage-2 step run (the LoRA adapters on)."""
    torch.manual_seed(0)
    model = load_demo_model().transformer
    convert_attention(model, rec.hla_config())
    inputs = build_inputs(model, rec, "train")
    initialize_feature_maps(model, inputs)
    output_distillation(model, inputs, rec, work)
    return model, inputs


def trained(model):
    return {k: v.detach().clone() for k, v in (hla_parameters(model) | lora_parameters(model)).items()}


def test_stage3_trains_hla_and_the_stage2_lora_on_the_demo(tmp_path):
    rec = small_recipe()
    model, inputs = after_stage2(rec, tmp_path)
    assert has_lora(model)
    before = trained(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".hla." not in k and "lora_" not in k}
    seen = []
    out = onpolicy_distillation(model, inputs, rec, demo_scheduler(), tmp_path, progress=lambda *a: seen.append(a[:3]))
    assert out["steps_run"] == 4 and len(out["loss_history"]) == 4
    assert all(math.isfinite(x) and x > 0 for x in out["loss_history"])
    assert out["sampling_steps"] == 4 and out["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert out["lora"] == sum(p.numel() for p in lora_parameters(model).values()) > 0
    after = trained(model)
    assert any(not torch.equal(after[k], v) for k, v in before.items() if ".hla." in k), "no HLA parameter moved"
    assert any(not torch.equal(after[k], v) for k, v in before.items() if "lora_" in k), "no LoRA parameter moved"
    for k, v in model.state_dict().items():  # the teacher (the base weights) never trains
        if k in base:
            assert torch.equal(v, base[k]), k
    assert seen == [("stage3", i, 4) for i in range(1, 5)]
    _, state = load_checkpoint(checkpoint_path(tmp_path, "stage3"))
    assert state["step"] == 4 and state["stage"] == "stage3"
    assert all(layer.mode == "student" for layer in hla_layers(model).values())


def test_stage3_trains_on_the_students_own_trajectory_points(tmp_path):
    """Every input the student is trained on is x_k of its own Euler sampler from trajectory_draw's
    noise, k steps in, at t_k; the teacher's target is taken at that same point."""
    rec = small_recipe(**{"stage3.steps": 1, "stage3.batch_size": 4, "stage3.sampling_steps": 6})
    model, inputs = after_stage2(rec, tmp_path)
    sched = demo_scheduler()
    sched.set_timesteps(6)
    draws = [trajectory_draw(rec, 0, j, inputs[0]) for j in range(2)]  # noise: the inputs' shape
    assert max(k for k, _ in draws) >= 1  # the seeds of this recipe do leave the noise
    expected = []
    with attention_mode(model, "student"), torch.no_grad():  # the reference: x += (s_next - s) v
        for j, (k, noise) in enumerate(draws):
            item = inputs[_batch_indices(0, 2, len(inputs), rec.calibration.seed, "stage3")[j]]
            x = noise.clone()
            for i in range(k):
                t = sched.timesteps[i].expand(x.shape[0])
                v = model(**{**item, "hidden_states": x, "timestep": t}, return_dict=False)[0]
                x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v.float()
            expected.append((x, sched.timesteps[k], item["encoder_hidden_states"]))

    calls = []

    def record(module, args, kwargs):
        modes = {layer.mode for layer in hla_layers(module).values()}
        calls.append((torch.is_grad_enabled(), modes, kwargs["hidden_states"].detach().clone(), kwargs["timestep"].clone(), kwargs["encoder_hidden_states"]))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        onpolicy_distillation(model, inputs, rec, demo_scheduler(), tmp_path)
    finally:
        hook.remove()
    trained_on = [c for c in calls if c[0]]  # the forwards with gradients: the student's
    teacher = [c for c in calls if not c[0] and c[1] == {"teacher"}]
    assert len(trained_on) == 2 and len(teacher) == 2
    assert sum(1 for c in calls if not c[0] and c[1] == {"student"}) == sum(k for k, _ in draws)  # k sampler forwards each
    for (x, t, text), student, target in zip(expected, trained_on, teacher):
        assert student[1] == {"student"}
        torch.testing.assert_close(student[2], x, rtol=0, atol=1e-6)
        assert torch.equal(student[3], t.expand(x.shape[0]))
        assert student[4] is text  # the calibration input's conditioning, as it is
        assert torch.equal(target[2], student[2]) and torch.equal(target[3], student[3])


def test_onpolicy_share_mixes_calibration_inputs_as_stage2_saw_them(tmp_path):
    """stage3.onpolicy_share 0.5: each input is the student's trajectory point or, as onpolicy_pick
    draws, the calibration input itself (no sampler forwards); share 0 is stage 2 on live targets."""
    steps, per_step = 3, 2  # 2 calibration batches a step
    rec = small_recipe(**{"stage3.steps": steps, "stage3.batch_size": 4, "stage3.onpolicy_share": 0.5})
    picks = [onpolicy_pick(rec, step, j) for step in range(steps) for j in range(per_step)]
    assert 0 < sum(picks) < len(picks)  # this recipe's seeds draw both kinds
    assert picks == [onpolicy_pick(rec, step, j) for step in range(steps) for j in range(per_step)]  # a pure function
    model, inputs = after_stage2(rec, tmp_path)
    trained_on = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            trained_on.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].clone()))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = onpolicy_distillation(model, inputs, rec, demo_scheduler(), tmp_path)
    finally:
        hook.remove()
    assert (out["onpolicy_inputs"], out["calibration_inputs"]) == (sum(picks), len(picks) - sum(picks))
    assert out["onpolicy_share"] == 0.5 and len(trained_on) == len(picks)
    for n, ((hs, t), on) in enumerate(zip(trained_on, picks)):
        step, j = divmod(n, per_step)
        item = inputs[_batch_indices(step, per_step, len(inputs), rec.calibration.seed, "stage3")[j]]
        as_is = torch.equal(hs, item["hidden_states"]) and torch.equal(t, item["timestep"])
        assert as_is != on, (n, on)  # a calibration pick is the input itself; a trajectory point is not
    off = small_recipe(**{"stage3.steps": 2, "stage3.onpolicy_share": 0.0})
    model, inputs = after_stage2(off, tmp_path / "off")
    out = onpolicy_distillation(model, inputs, off, demo_scheduler(), tmp_path / "off")
    assert out["sampler_forwards"] == 0 and out["onpolicy_inputs"] == 0 and out["calibration_inputs"] == 2


class Interrupt(Exception):
    pass


def test_stage3_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    rec = small_recipe(**{"stage3.steps": 5})

    def run(work, stop_at=None, resume=False):
        model, inputs = after_stage2(rec, work)

        def progress(stage, step, total, info):
            if stage == "stage3" and step == stop_at:
                raise Interrupt  # killed after step 3: the last checkpoint is step 2

        onpolicy_distillation(model, inputs, rec, demo_scheduler(), work, resume=resume, progress=progress)
        return model

    reference = trained(run(tmp_path / "a"))
    with pytest.raises(Interrupt):
        run(tmp_path / "b", stop_at=3)
    _, state = load_checkpoint(checkpoint_path(tmp_path / "b", "stage3"))
    assert state["step"] == 2
    resumed = trained(run(tmp_path / "b", resume=True))
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), f"{k} differs after resume"


def test_stage3_steps_0_is_a_no_op(tmp_path):
    rec = small_recipe(**{"stage3.steps": 0})
    model, inputs = after_stage2(rec, tmp_path)
    before = trained(model)
    out = onpolicy_distillation(model, inputs, rec, demo_scheduler(), tmp_path)
    assert out["skipped"] == "steps is 0" and out["steps_run"] == 0
    assert all(torch.equal(v, before[k]) for k, v in trained(model).items())
    assert not checkpoint_path(tmp_path, "stage3").exists()
    # and without a scheduler too: nothing asks for one
    assert onpolicy_distillation(model, inputs, rec, None, tmp_path)["skipped"] == "steps is 0"


def test_stage3_without_a_scheduler_is_refused_before_anything_trains(tmp_path):
    rec = small_recipe()
    model = load_demo_model().transformer
    convert_attention(model, rec.hla_config())
    inputs = build_inputs(model, rec, "train")
    before = trained(model)
    with pytest.raises(RecipeError, match=r"^stage3\.steps: must be 0 for a model without a scheduler") as e:
        distil(model, inputs, rec, tmp_path, scheduler=None)
    assert e.value.field == "stage3.steps" and "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in trained(model).items())
    assert not list(tmp_path.iterdir())  # no checkpoint of any stage


def test_distil_runs_stage3_after_stage2_with_the_scheduler(tmp_path):
    rec = small_recipe(**{"stage3.steps": 1})
    model = load_demo_model().transformer
    convert_attention(model, rec.hla_config())
    inputs = build_inputs(model, rec, "train")
    order = []
    out = distil(model, inputs, rec, tmp_path, scheduler=demo_scheduler(), progress=lambda s, *a: order.append(s))
    assert set(out) == {"init", "stage1", "selection", "stage2", "stage3"}
    assert out["stage3"]["steps_run"] == 1 and out["stage3"]["lora"] > 0
    assert [s for i, s in enumerate(order) if i == 0 or order[i - 1] != s] == ["init", "stage1", "stage2", "stage3"]


def test_stage3_after_full_training_trains_the_blocks_and_keeps_the_original_teacher(tmp_path):
    """After stage2.train full, stage 3 trains what stage 2 trained (the converted blocks' weights
    too), and teacher mode is still the original base (the host copy swapped in per teacher forward)."""
    from hla_convert.model.full_tuning import full_tuning_parameters

    rec = small_recipe(**{"stage2.train": "full"})
    model, inputs = after_stage2(rec, tmp_path)
    original = load_demo_model().transformer
    item = inputs[0]
    with torch.no_grad():
        want = original(**item).sample
    before = {k: v.detach().clone() for k, v in full_tuning_parameters(model).items()}
    out = onpolicy_distillation(model, inputs, rec, demo_scheduler(), tmp_path)
    assert out["full"] == sum(v.numel() for v in before.values()) > 0 and out["lora"] == 0
    after = full_tuning_parameters(model)
    assert any(not torch.equal(after[k], v) for k, v in before.items()), "no block weight moved in stage 3"
    with torch.no_grad(), attention_mode(model, "teacher"):
        got = model(**item).sample
    assert torch.equal(got, want)
