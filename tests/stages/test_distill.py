"""Distillation: stage 1 lowers the attention-transfer loss touching only HLA weights; resume is exact; NaN stops cleanly."""

from __future__ import annotations

import pytest
import torch

from hla_convert import convert_attention, hla_parameters
from hla_convert.model.layers import hla_layers
from hla_convert.stages.calibration import build_inputs
from hla_convert.stages.checkpoints import CheckpointError, checkpoint_path, load_checkpoint
from hla_convert.stages.distill import DistillError, attention_transfer, initialize_feature_maps, output_distillation
from helpers import wan_recipe as recipe
from tiny_models import tiny_model


def converted(rec):
    model = tiny_model("wan")
    convert_attention(model, rec.hla_config())
    inputs = build_inputs(model, rec, "train")
    initialize_feature_maps(model, inputs)
    return model, inputs


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".hla." not in k}


def hla_state(model):
    return {k: v.detach().clone() for k, v in hla_parameters(model).items()}


def test_initialisation_sets_feature_maps_from_teacher_samples():
    rec = recipe()
    model = tiny_model("wan")
    convert_attention(model, rec.hla_config())
    before = hla_state(model)
    info = initialize_feature_maps(model, build_inputs(model, rec, "train"))
    assert info["layers"] == 2 and info["tokens"] > 0
    assert all(not torch.equal(before[k], v) for k, v in hla_state(model).items())
    assert all(layer.sample_sink is None and layer.mode == "student" for layer in hla_layers(model).values())


def test_stage1_lowers_loss_and_only_hla_weights_change(tmp_path):
    rec = recipe()
    model, inputs = converted(rec)
    base, hla = base_state(model), hla_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    out = attention_transfer(model, inputs, rec, tmp_path, progress=lambda *a: seen.append(a))
    assert out["steps"] == out["steps_run"] == 40
    # one wall time per step, which add up to the stage's (what bench_parallel reads as s/step)
    assert len(out["step_seconds"]) == 40 and all(s > 0 for s in out["step_seconds"])
    assert abs(sum(out["step_seconds"]) - out["seconds"]) < 0.01 + 0.01 * out["seconds"]
    assert out["final_loss"] < 0.8 * out["initial_loss"], out["loss_history"]
    assert set(out["layers"]) == {"blocks.0.attn1", "blocks.1.attn1"}
    for k, v in base_state(model).items():
        assert torch.equal(v, base[k]), f"base weight {k} changed"
    assert all(not torch.equal(v, hla[k]) for k, v in hla_state(model).items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert [s[:3] for s in seen] == [("stage1", i, 40) for i in range(1, 41)]
    assert "loss" in seen[-1][3]
    tensors, state = load_checkpoint(checkpoint_path(tmp_path, "stage1"))
    assert state["step"] == 40 and state["stage"] == "stage1"
    assert not list(tmp_path.glob("*.tmp"))


def test_stage2_lowers_output_loss_and_only_hla_weights_change(tmp_path):
    rec = recipe()
    model, inputs = converted(rec)
    attention_transfer(model, inputs, rec.with_overrides(steps=10, stage2_steps=rec.stage2.steps), tmp_path)
    base = base_state(model)
    out = output_distillation(model, inputs, rec.with_overrides(steps=10, stage2_steps=rec.stage2.steps), tmp_path)
    assert out["steps_run"] == 12 and out["final_loss"] < out["initial_loss"]
    for k, v in base_state(model).items():
        assert torch.equal(v, base[k])
    assert not model.is_gradient_checkpointing


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, stage):
    rec = recipe()

    def run(work, stop_at=None, resume=False):
        model, inputs = converted(rec)

        def progress(st, step, total, info):
            if st == stage and step == stop_at:
                raise Interrupt  # killed mid-run: after step 17 (last checkpoint at 15 / 10)

        attention_transfer(model, inputs, rec, work, resume=resume, progress=progress)
        output_distillation(model, inputs, rec, work, resume=resume, progress=progress)
        return model

    reference = hla_state(run(tmp_path / "a"))
    stop = 17 if stage == "stage1" else 7
    with pytest.raises(Interrupt):
        run(tmp_path / "b", stop_at=stop)
    _, state = load_checkpoint(checkpoint_path(tmp_path / "b", stage))
    assert state["step"] == (10 if stage == "stage1" else 5)
    resumed = hla_state(run(tmp_path / "b", resume=True))
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), f"{k} differs after resume"


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path):
    rec = recipe()
    model, inputs = converted(rec)
    attention_transfer(model, inputs, rec.with_overrides(steps=10, stage2_steps=0), tmp_path)
    with pytest.raises(CheckpointError, match="different recipe") as err:  # bad input (exit 2), not a failed run
        attention_transfer(model, inputs, rec.with_overrides(steps=10, fields={"stage1.lr": 1e-2}), tmp_path, resume=True)
    assert "learning rate" not in str(err.value)


def _edit_checkpoint(path, tensors_change=None, state_change=None, raw_state=None):
    import json

    from safetensors.torch import save_file

    tensors, state = load_checkpoint(path)
    if tensors_change:
        tensors_change(tensors)
    if state_change:
        state_change(state)
    save_file(tensors, str(path), metadata={"hla_convert_checkpoint": raw_state if raw_state is not None else json.dumps(state)})


def _first(tensors, prefix):
    return tensors[next(k for k in sorted(tensors) if k.startswith(prefix) and tensors[k].is_floating_point())]


def _retype(tensors, prefix, dtype):
    key = next(k for k in sorted(tensors) if k.startswith(prefix))
    tensors[key] = tensors[key].to(dtype)


def _folder_in_its_place(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda p: _edit_checkpoint(p, raw_state="{not json"), "not readable JSON"),
        (lambda p: _edit_checkpoint(p, raw_state="[1, 2]"), "is a list, not an object"),
        (lambda p: _edit_checkpoint(p, state_change=lambda s: s.__setitem__("step", "3")), "records step '3'"),
        (lambda p: _edit_checkpoint(p, state_change=lambda s: s.__setitem__("step", 10**9)), "records step '1000000000'"),
        (lambda p: _edit_checkpoint(p, state_change=lambda s: s.__setitem__("history", 5)), "damaged state"),
        (lambda p: _edit_checkpoint(p, state_change=lambda s: s.__setitem__("optimizer", {"indices": "x"})), "damaged optimizer"),
        (lambda p: _edit_checkpoint(p, tensors_change=lambda t: t.pop(next(k for k in t if k.startswith("param.")))), "lacks param."),
        (lambda p: _edit_checkpoint(p, tensors_change=lambda t: t.__setitem__("rng.torch", torch.zeros(7, dtype=torch.uint8))), "RNG state"),
        (lambda p: p.write_bytes(b"garbage"), "not a readable safetensors checkpoint"),
        # the fresh hostile pass: these loaded, then diverged (exit 3, "lower the learning rate"),
        # failed inside torch (exit 3) or trained on silently changed weights / wrote junk into the report
        (lambda p: _edit_checkpoint(p, tensors_change=lambda t: _first(t, "param.").fill_(float("nan"))), "with NaN or infinite values"),
        (lambda p: _edit_checkpoint(p, tensors_change=lambda t: _first(t, "optimizer.").fill_(float("inf"))), "with NaN or infinite values"),
        (lambda p: _edit_checkpoint(p, tensors_change=lambda t: _retype(t, "param.", torch.int32)), "of dtype int32"),
        (lambda p: _edit_checkpoint(p, tensors_change=lambda t: t.__setitem__(next(k for k in t if k.endswith(".step")), torch.zeros(5, 7, 3))),
         "a moment of another shape"),
        (lambda p: _edit_checkpoint(p, state_change=lambda s: s["optimizer"]["param_groups"][0].__setitem__("betas", ["a", "b"])), "param_groups"),
        (lambda p: _edit_checkpoint(p, state_change=lambda s: s.__setitem__("history", ["a", "b"])), "loss history"),
        (lambda p: _edit_checkpoint(p, state_change=lambda s: s.__setitem__("layers", {"blocks.0.attn1": "x"})), "per-layer values"),
        (_folder_in_its_place, "not a regular file"),
    ],
)
def test_resume_refuses_a_damaged_checkpoint_in_one_line(tmp_path, damage, expect):
    rec = recipe(calibration__samples=4, calibration__height=32, calibration__width=32, stage1__batch_size=4).with_overrides(steps=2, stage2_steps=0)
    model, inputs = converted(rec)
    attention_transfer(model, inputs, rec, tmp_path)
    before = {k: v.clone() for k, v in hla_parameters(model).items()}
    damage(checkpoint_path(tmp_path, "stage1"))
    with pytest.raises(CheckpointError, match=expect) as err:
        attention_transfer(model, inputs, rec, tmp_path, resume=True)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, hla_parameters(model)[k]) for k, v in before.items())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    rec = recipe()
    model, inputs = converted(rec)
    first = next(iter(hla_parameters(model).values()))

    def poison(stage, step, total, info):
        if step == 10:
            with torch.no_grad():
                first.fill_(float("nan"))

    with pytest.raises(DistillError) as e:
        attention_transfer(model, inputs, rec, tmp_path, progress=poison)
    msg = str(e.value)
    assert msg.startswith("stage 1 step 11: loss is nan; the last good checkpoint (step 10) is kept in")
    assert str(tmp_path) in msg
    tensors, state = load_checkpoint(checkpoint_path(tmp_path, "stage1"))
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("param."))


def test_softmax_kind_has_nothing_to_train(tmp_path):
    rec = recipe(attention__kind="softmax")
    model, inputs = converted(rec)
    assert attention_transfer(model, inputs, rec, tmp_path)["skipped"]
    assert output_distillation(model, inputs, rec, tmp_path)["skipped"]


# -- stage 2: cached teacher targets, train: full -------------------------------------------------


def _stage2_run(rec, work, stop_at=None, resume=False):
    """A converted tiny Wan (feature maps initialised, no stage 1) after stage 2 of `rec`; stop_at
    raises Interrupt after that step (a killed run)."""
    model, inputs = converted(rec)
    model.forwards = 0
    model.register_forward_pre_hook(lambda m, a: setattr(m, "forwards", m.forwards + 1))

    def progress(stage, step, total, info):
        if stage == "stage2" and step == stop_at:
            raise Interrupt

    out = output_distillation(model, inputs, rec, work, resume=resume, progress=progress)
    return model, out


@pytest.mark.parametrize("train", ["hla", "lora"])
def test_cached_teacher_gives_the_live_runs_losses_and_weights_bit_for_bit(tmp_path, train):
    # bit for bit, not to rounding: the cached targets are the same teacher forward (teacher mode,
    # no_grad, eval, same gradient checkpointing) on the same inputs, only run before step 1; the
    # teacher does not train (HLA parameters are unused in teacher mode, LoRA is off), and a copy
    # to the host and back is exact
    runs = {}
    for teacher in ("live", "cached"):
        rec = recipe(stage2__teacher=teacher, stage2__train=train, stage2__steps=6)
        model, out = _stage2_run(rec, tmp_path / teacher)
        assert out["teacher"]["mode"] == teacher
        # 6 steps of 1 input: live runs teacher + student each step, cached one teacher forward per
        # distinct input the steps use, before step 1
        used = out["teacher"].get("targets", 0)
        assert model.forwards == (12 if teacher == "live" else 6 + used) and (teacher == "live" or 0 < used <= 6)
        runs[teacher] = (out["loss_history"], {k: v.detach().clone() for k, v in model.named_parameters()})
    assert runs["cached"][0] == runs["live"][0]
    assert runs["cached"][0][-1] != runs["cached"][0][0]  # it trained
    for k, v in runs["live"][1].items():
        assert torch.equal(v, runs["cached"][1][k]), k


def test_full_trains_the_converted_blocks_and_teacher_mode_is_the_original_base_bit_for_bit(tmp_path):
    from hla_convert.model.modes import attention_mode, forward

    rec = recipe(stage2__train="full", stage2__steps=6)
    model, inputs = converted(rec)
    before = base_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = output_distillation(model, inputs, rec, tmp_path)
    assert out["full"]["blocks"] == ["blocks.0", "blocks.1"] and out["teacher"]["mode"] == "cached"
    trained = base_state(model)
    changed = {k for k, v in trained.items() if not torch.equal(v, before[k])}
    for k in ("blocks.0.attn1.to_q.weight", "blocks.1.attn1.to_out.0.weight", "blocks.0.ffn.net.2.weight", "blocks.1.attn2.to_k.weight"):
        assert k in changed, k
    assert all(k.startswith("blocks.") for k in changed), sorted(changed)  # embeddings and head stay the base's
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    item = inputs[0]
    with torch.no_grad():
        student = forward(model, item)
        with attention_mode(model, "teacher"):
            teacher = forward(model, item)
            assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
        reference = tiny_model("wan")(**item, return_dict=False)[0]  # the unconverted base
        assert torch.equal(teacher, reference)
        assert not torch.equal(student, teacher)
        assert torch.equal(forward(model, item), student)  # the trained weights are back, in the same Parameters
    assert all(torch.equal(v, trained[k]) for k, v in base_state(model).items())


def test_full_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    # the resumed run recomputes the cached targets from the originals (its store is made from the
    # freshly loaded base before the checkpoint's trained weights are restored)
    rec = recipe(stage2__train="full", stage2__steps=8, stage2__checkpoint_every=3)
    reference, ref_out = _stage2_run(rec, tmp_path / "a")
    with pytest.raises(Interrupt):
        _stage2_run(rec, tmp_path / "b", stop_at=5)
    _, state = load_checkpoint(checkpoint_path(tmp_path / "b", "stage2"))
    assert state["step"] == 3
    resumed, out = _stage2_run(rec, tmp_path / "b", resume=True)
    assert out["resumed_from"] == 3 and out["loss_history"] == ref_out["loss_history"]
    theirs = dict(resumed.named_parameters())
    for k, v in reference.named_parameters():
        assert torch.equal(v, theirs[k]), f"{k} differs after resume"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_stage2_trains_as_the_eager_one_and_leaves_the_model_eager(tmp_path, monkeypatch, checkpointing):
    """stage2.compile: the steps run through dynamo (the repeated blocks compiled in place; its
    "eager" backend here: the graphs, not inductor's code), with the same losses and weights as the
    eager run, with and without gradient checkpointing; after the stage the model is eager again
    (a converted model is validated and saved as it was), and the stage-2 fingerprint ignores the
    setting, so a run resumes under either."""
    from torch._dynamo.utils import counters

    from hla_convert.model import compiling
    from hla_convert.stages.distill_loop import stage_fingerprint

    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")
    runs = {}
    for compiled in (False, True):
        counters.clear()
        rec = recipe(stage2__train="lora", stage2__steps=4, stage2__compile=compiled, stage2__gradient_checkpointing=checkpointing)
        model, out = _stage2_run(rec, tmp_path / str(compiled))
        assert out.get("compile") == ("blocks" if compiled else None)
        assert (counters["stats"].get("unique_graphs", 0) > 0) == compiled
        assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())
        runs[compiled] = (out["loss_history"], {k: v.detach().clone() for k, v in model.named_parameters()})
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5) and runs[True][0][-1] != runs[True][0][0]
    for k, v in runs[False][1].items():
        assert torch.allclose(v, runs[True][1][k], rtol=1e-4, atol=1e-6), k
    params = {"p": torch.empty(2)}
    assert stage_fingerprint("stage2", recipe(stage2__compile=True), params, 4) == stage_fingerprint("stage2", recipe(), params, 4)


def test_compiled_stage2_is_refused_under_several_processes_in_one_line(tmp_path):
    from types import SimpleNamespace

    from hla_convert.recipe import RecipeError

    rec = recipe(stage2__compile=True, stage2__steps=2)
    model, inputs = converted(rec)
    with pytest.raises(RecipeError, match=r"^stage2\.compile: is not supported under several processes yet"):
        output_distillation(model, inputs, rec, tmp_path, parallel=SimpleNamespace(fsdp=False))


def test_full_is_refused_under_fsdp_in_one_line(tmp_path):
    from types import SimpleNamespace

    from hla_convert.recipe import RecipeError

    rec = recipe(stage2__train="full")
    model, inputs = converted(rec)
    with pytest.raises(RecipeError, match=r"^stage2\.train: full is not supported under FSDP yet; .*lora"):
        output_distillation(model, inputs, rec, tmp_path, parallel=SimpleNamespace(fsdp=True))


def _bf16_full_run(work, monkeypatch=None, masters=True, stop_at=None, resume=False, dtype=torch.bfloat16):
    """Stage 2 `train: full` on a bf16 tiny Wan at a small lr; (2-D block weights before, after)."""
    from hla_convert.stages import distill_loop
    from hla_convert.stages.master_weights import MasterWeights

    class NoMasters(MasterWeights):  # the bf16 weights stepped in place, as before master weights
        def __init__(self, params):
            self.params, self.masters, self.opt = params, {}, dict(params)

    if not masters:
        monkeypatch.setattr(distill_loop, "MasterWeights", NoMasters)
    rec = recipe(stage2__train="full", stage2__steps=12, stage2__lr=5e-5, stage2__checkpoint_every=4)
    model = tiny_model("wan").to(dtype)
    convert_attention(model, rec.hla_config())
    inputs = build_inputs(model, rec, "train", dtype=dtype)
    initialize_feature_maps(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("blocks.") and ".hla." not in k and v.dim() == 2}

    def progress(stage, step, total, info):
        if step == stop_at:
            raise Interrupt

    output_distillation(model, inputs, rec, work, resume=resume, progress=progress)
    return before, {k: v for k, v in model.state_dict().items() if k in before}


def test_full_on_a_bf16_model_steps_fp32_masters_so_small_updates_add_up(tmp_path, monkeypatch):
    """AdamW stepping bf16 weights in place rounds away every update below half a bf16 step: at
    lr 5e-5 over 12 steps no weight of magnitude >= 0.03 moves at all. With the fp32 masters
    (stages.master_weights) they move, and the trained weights follow the fp32 run's."""

    def moved(before, after):
        big = torch.cat([v.flatten().float() for v in before.values()]).abs() >= 0.03
        changed = torch.cat([(after[k] != v).flatten() for k, v in before.items()])
        delta = torch.cat([(after[k].float() - v.float()).flatten() for k, v in before.items()])
        return float(changed[big].float().mean()), delta

    with_masters, d_masters = moved(*_bf16_full_run(tmp_path / "a"))
    in_place, d_in_place = moved(*_bf16_full_run(tmp_path / "b", monkeypatch, masters=False))
    monkeypatch.undo()
    _, d_fp32 = moved(*_bf16_full_run(tmp_path / "c", dtype=torch.float32))
    assert in_place == 0.0 and with_masters > 0.15
    assert d_masters.abs().mean() > 0.5 * d_fp32.abs().mean() > 3 * d_in_place.abs().mean()
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a, b]))[0, 1])  # noqa: E731
    assert corr(d_masters, d_fp32) > corr(d_in_place, d_fp32) + 0.2


def test_full_on_a_bf16_model_resumes_exactly_from_its_fp32_masters(tmp_path):
    _, reference = _bf16_full_run(tmp_path / "a")
    with pytest.raises(Interrupt):
        _bf16_full_run(tmp_path / "b", stop_at=6)
    tensors, state = load_checkpoint(checkpoint_path(tmp_path / "b", "stage2"))
    assert state["step"] == 4
    masters = [t for k, t in tensors.items() if k.startswith("param.blocks.0.attn1.to_q.weight")]
    assert masters and masters[0].dtype == torch.float32  # the checkpoint holds the fp32 masters
    _, resumed = _bf16_full_run(tmp_path / "b", resume=True)
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), f"{k} differs after resume"
