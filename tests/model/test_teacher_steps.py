"""model.teacher_steps: which sampling step a denoiser forward belongs to, and the hooks' errors."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler

from hla_convert import HLAConfig, convert_attention, teacher_steps
from hla_convert.model.teacher_steps import step_of
from tiny_models import tiny_model


def test_step_of_a_scheduler_with_a_step_index_counts_its_steps():
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    x = torch.zeros(1, 2)
    seen = []
    for t in sched.timesteps:
        seen.append(step_of(sched, torch.tensor([999.0])))  # the index, not the timestep, decides
        x = sched.step(torch.zeros_like(x), t, x, return_dict=False)[0]
    assert seen == [0, 1, 2, 3]


def test_step_of_a_scheduler_without_one_is_the_nearest_timestep():
    sched = CogVideoXDDIMScheduler()  # CogVideoX's: no step_index
    assert not hasattr(sched, "step_index")
    sched.set_timesteps(5)
    for i, t in enumerate(sched.timesteps):
        assert step_of(sched, t.expand(2)) == i
        assert step_of(sched, t + 0.4) == i  # a timestep cast through a low precision
        per_token = torch.zeros(2, 6)  # Wan2.2 TI2V: 0 on the clean first frame, t elsewhere
        per_token[:, 2:] = t
        assert step_of(sched, per_token) == i
    with pytest.raises(RuntimeError, match="without a timestep"):
        step_of(sched, None)
    with pytest.raises(RuntimeError, match="no timesteps set"):  # not a scheduler at all
        step_of(types.SimpleNamespace(timesteps=None), torch.tensor([500.0]))


def test_teacher_steps_refuses_what_it_cannot_hook_in_one_line():
    model = tiny_model("wan")
    with pytest.raises(ValueError, match="no converted transformer"):
        teacher_steps(model, 2, scheduler=FlowMatchEulerDiscreteScheduler())
    convert_attention(model, HLAConfig(kind="hadamard", feature_dim=8))
    with pytest.raises(ValueError, match="needs its scheduler"):
        teacher_steps(model, 2)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="first must be a whole number"):
            teacher_steps(model, bad, scheduler=FlowMatchEulerDiscreteScheduler())
    with teacher_steps(model, 0, scheduler=FlowMatchEulerDiscreteScheduler()) as hooks:
        assert hooks.first == 0
