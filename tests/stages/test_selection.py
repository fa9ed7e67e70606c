"""The per-layer softmax budget: the worst layers after stage 1 go back to exact softmax, and stay so."""

from __future__ import annotations

import pytest
import torch

from hla_convert import convert_attention, hla_layers, load_adapter, save_adapter, set_attention_mode
from hla_convert.stages.calibration import build_inputs
from hla_convert.model.modes import forward
from hla_convert.stages.distill import distil
from hla_convert.recipe import RecipeError, parse_recipe
from hla_convert.stages.selection import choose_softmax_layers, give_back_to_softmax, largest_errors, measure_layer_errors
from hla_convert.model.surgery import ConversionError
from tiny_models import tiny_model


def recipe(softmax_layers: int = 1, **stage):
    return parse_recipe(
        {
            "name": "t",
            "model": {"architecture": "WanTransformer3DModel"},
            "attention": {"kind": "hadamard", "feature_dim": 8, "softmax_layers": softmax_layers},
            "calibration": {"frames": 5, "height": 32, "width": 32, "samples": 8, "heldout": 4, "batch_size": 4, "text_len": 6},
            "stage1": {"steps": 4, "lr": 5e-3, "batch_size": 4, "checkpoint_every": 2},
            "stage2": {"steps": 2, "lr": 1e-3, "batch_size": 4, "checkpoint_every": 1, **stage},
        }
    )


def test_choose_takes_the_largest_errors_in_model_order():
    errors = {"blocks.0.attn1": 0.3, "blocks.1.attn1": 0.1, "blocks.2.attn1": 0.5, "blocks.3.attn1": 0.3}
    assert largest_errors(errors, 2) == ["blocks.0.attn1", "blocks.2.attn1"]
    assert largest_errors(errors, 0) == []


def test_a_nan_or_inf_layer_error_counts_as_the_largest():
    nan = float("nan")
    errors = {"blocks.0.attn1": 0.2, "blocks.1.attn1": 0.9, "blocks.2.attn1": nan, "blocks.3.attn1": 0.1}
    assert largest_errors(errors, 1) == ["blocks.2.attn1"]  # not wherever the sort left it
    assert largest_errors(errors, 2) == ["blocks.1.attn1", "blocks.2.attn1"]
    assert largest_errors({**errors, "blocks.0.attn1": float("inf")}, 2) == ["blocks.0.attn1", "blocks.2.attn1"]


def test_the_worst_layer_goes_back_to_softmax_and_the_adapter_leaves_it_out(tmp_path):
    rec = recipe(1)
    model = tiny_model("wan", num_layers=3)
    base = tiny_model("wan", num_layers=3)
    convert_attention(model, rec.hla_config())
    inputs = build_inputs(model, rec, "train")
    errors = measure_layer_errors(model, inputs)
    assert set(errors) == set(hla_layers(model)) and all(e > 0 for e in errors.values())

    out = distil(model, inputs, rec, work_dir=tmp_path / "work")
    errors = out["selection"]["errors"]  # measured after stage 1, as the choice is
    worst = max(errors, key=errors.get)
    assert out["selection"]["softmax_layers"] == [worst]
    assert worst not in hla_layers(model) and len(hla_layers(model)) == 2
    # the reverted module runs the model's own softmax again: a teacher-mode forward is unchanged
    set_attention_mode(model, "teacher")
    with torch.no_grad():
        assert torch.equal(forward(model, inputs[0]), forward(base, inputs[0]))

    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model("wan", num_layers=3)
    load_adapter(fresh, tmp_path / "adapter")
    assert sorted(hla_layers(fresh)) == sorted(hla_layers(model))
    set_attention_mode(model, "student")
    with torch.no_grad():
        assert torch.allclose(forward(fresh, inputs[0]), forward(model, inputs[0]), atol=1e-6)


def test_a_budget_that_would_revert_every_layer_is_refused():
    rec = recipe(2)
    model = tiny_model("wan", num_layers=2)
    convert_attention(model, rec.hla_config())
    with pytest.raises(ConversionError, match="at least one must stay converted"):
        give_back_to_softmax(model, build_inputs(model, rec, "train"), 2)


def test_softmax_layers_must_be_a_non_negative_integer():
    with pytest.raises(RecipeError, match=r"^attention\.softmax_layers: must be an integer >= 0"):
        recipe(-1)


# -- attention.softmax_select: output ----------------------------------------------------------------


def _converted(num_layers: int, bad: str | None = None):
    """A tiny Wan with every self-attention converted (untrained HLA), its inputs; `bad`: that layer's
    HLA projection scaled up 30x, so its student attention is far from its softmax."""
    rec = recipe(1)
    model = tiny_model("wan", num_layers=num_layers)
    convert_attention(model, rec.hla_config())
    if bad is not None:
        with torch.no_grad():
            hla_layers(model)[bad].proj.mul_(30.0)
    return model, build_inputs(model, rec, "train")


def _drift_after_revert(model, inputs, names) -> float:
    """Brute force: a deep copy with `names` really reverted (revert_attention), its output rel L2
    against the teacher over all inputs."""
    import copy

    from hla_convert.model.surgery import revert_attention

    reverted = revert_attention(copy.deepcopy(model), names)
    err2 = ref2 = 0.0
    with torch.no_grad():
        for item in inputs:
            set_attention_mode(reverted, "teacher")
            ref = forward(reverted, item)
            set_attention_mode(reverted, "student")
            err2 += float((forward(reverted, item) - ref).pow(2).sum())
            ref2 += float(ref.pow(2).sum())
    return (err2 / ref2) ** 0.5


def test_output_selection_picks_the_layer_that_costs_the_output_most_and_records_every_effect():
    model, inputs = _converted(3, bad="blocks.1.attn1")
    out = give_back_to_softmax(model, inputs, 1, select="output")
    assert out["select"] == "output" and out["softmax_layers"] == ["blocks.1.attn1"]
    assert sorted(hla_layers(model)) == ["blocks.0.attn1", "blocks.2.attn1"]  # really reverted
    (rnd,) = out["output_effects"]
    assert rnd["picked"] == "blocks.1.attn1" and set(rnd["with_softmax"]) == {f"blocks.{i}.attn1" for i in range(3)}
    assert rnd["with_softmax"]["blocks.1.attn1"] < rnd["drift"]  # giving it back lowers the drift
    assert out["output_drift"] == {"all_converted": rnd["drift"], "after": rnd["with_softmax"]["blocks.1.attn1"]}
    assert set(out["errors"]) == {f"blocks.{i}.attn1" for i in range(3)}  # the attention errors too, to compare
    # the measured drift after the pick is the reverted model's own
    assert out["output_drift"]["after"] == pytest.approx(_drift_after_revert(model, inputs[:4], []), rel=1e-5)


def test_output_selection_equals_brute_force_and_is_deterministic():
    """Each greedy round's choice is the one a brute-force search over really reverted copies
    makes, and the mode switches leave the model as it was (a second run chooses the same)."""
    model, inputs = _converted(3)
    with torch.no_grad():
        hla_layers(model)["blocks.2.attn1"].proj.mul_(3.0)
    from hla_convert.stages.selection import choose_by_output

    picked, rounds = choose_by_output(model, inputs, 2)
    assert choose_by_output(model, inputs, 2) == (picked, rounds)
    first = {n: _drift_after_revert(model, inputs, [n]) for n in hla_layers(model)}
    assert rounds[0]["picked"] == min(first, key=first.get)
    for n, d in first.items():
        assert rounds[0]["with_softmax"][n] == pytest.approx(d, rel=1e-5)
    second = {n: _drift_after_revert(model, inputs, [rounds[0]["picked"], n]) for n in hla_layers(model) if n != rounds[0]["picked"]}
    assert rounds[1]["picked"] == min(second, key=second.get)
    assert picked == sorted({rounds[0]["picked"], rounds[1]["picked"]})  # model order
    assert all(layer.mode == "student" for layer in hla_layers(model).values())


def test_output_selection_with_count_0_measures_nothing(monkeypatch):
    from hla_convert.stages import selection

    model, inputs = _converted(2)
    monkeypatch.setattr(selection, "forward", lambda *a, **k: pytest.fail("a forward pass with count 0"))
    assert give_back_to_softmax(model, inputs, 0, select="output") == {"select": "output", "errors": {}, "softmax_layers": []}
    assert len(hla_layers(model)) == 2


def test_softmax_select_is_read_from_the_recipe_and_checked():
    assert recipe(1).attention.softmax_select == "attention"  # the default: as before
    assert recipe(1).with_overrides(fields={"attention.softmax_select": "output"}).attention.softmax_select == "output"
    with pytest.raises(RecipeError, match=r"^attention\.softmax_select: 'outputs' is not one of attention, output$"):
        recipe(1).with_overrides(fields={"attention.softmax_select": "outputs"})
    model, inputs = _converted(2)
    with pytest.raises(RecipeError, match=r"^attention\.softmax_select: "):
        give_back_to_softmax(model, inputs, 1, select="loss")


def test_distil_uses_softmax_select_output(tmp_path):
    rec = recipe(1).with_overrides(fields={"attention.softmax_select": "output", "stage2.steps": 0})
    model = tiny_model("wan", num_layers=3)
    convert_attention(model, rec.hla_config())
    out = distil(model, build_inputs(model, rec, "train"), rec, work_dir=tmp_path / "work")
    sel = out["selection"]
    assert sel["select"] == "output" and len(sel["softmax_layers"]) == 1
    assert sel["softmax_layers"] == [sel["output_effects"][0]["picked"]] and len(hla_layers(model)) == 2


# -- several processes: every one trains rank 0's choice ---------------------------------------------


class FakeParallel:
    """One process of a two-process launch, the other simulated: `share_object` gives `rank0`'s
    selection summary (None: this process is rank 0, its own), `reduce_sum` adds `others` (what the
    other process contributes); `note` keeps every line asked for (Parallel.note prints those of the main process)."""

    def __init__(self, rank0_layers=None, others: float = 0.0):
        self.rank0_layers, self.others = rank0_layers, others
        self.is_main, self.fsdp, self.device = rank0_layers is None, False, "cpu"
        self.notes: list[str] = []

    def share_object(self, obj):
        return obj if self.rank0_layers is None else {**obj, "softmax_layers": list(self.rank0_layers), "errors": {"rank": 0.0}}

    def reduce_sum(self, tensor):
        return tensor.detach().clone() + self.others

    def note(self, text):
        self.notes.append(text)

    def main_first(self, fn):  # Parallel.main_first: the main process runs it, the others get None
        return fn() if self.is_main else None


def _distil_selecting(tmp_path, parallel, resume=False):
    """distil with no training steps (selection on the freshly initialised HLA layers) on a tiny Wan of
    3 layers, one of them given back; (the model, the selection summary)."""
    rec = recipe(1).with_overrides(fields={"stage1.steps": 0, "stage2.steps": 0})
    model = tiny_model("wan", num_layers=3)
    convert_attention(model, rec.hla_config())
    out = distil(model, build_inputs(model, rec, "train"), rec, work_dir=tmp_path / "work", parallel=parallel, resume=resume)
    return model, out["selection"]


def test_every_process_reverts_the_layers_rank_0_chose_and_the_summary_says_they_disagreed(tmp_path):
    _, alone = _distil_selecting(tmp_path / "one", None)  # this process's own choice
    (mine,) = alone["softmax_layers"]
    assert "processes_disagreed" not in alone  # one process: the summary as before
    theirs = next(n for n in (f"blocks.{i}.attn1" for i in range(3)) if n != mine)
    parallel = FakeParallel(rank0_layers=[theirs])
    model, sel = _distil_selecting(tmp_path / "two", parallel)
    assert sorted(hla_layers(model)) == sorted({f"blocks.{i}.attn1" for i in range(3)} - {theirs})  # rank 0's reverted, not mine
    assert sel["softmax_layers"] == [theirs] and sel["processes_disagreed"] is True
    assert sel["errors"] == {"rank": 0.0}  # the summary recorded is rank 0's
    assert len(parallel.notes) == 1  # Parallel.note prints it from the main process only


def test_rank_0_keeps_its_choice_and_hears_that_another_process_chose_otherwise(tmp_path):
    _, alone = _distil_selecting(tmp_path / "one", None)
    parallel = FakeParallel(others=1.0)  # the other process's flag: it chose differently
    model, sel = _distil_selecting(tmp_path / "two", parallel)
    assert sel["softmax_layers"] == alone["softmax_layers"] and sel["processes_disagreed"] is True
    assert alone["softmax_layers"][0] not in hla_layers(model)
    assert len(parallel.notes) == 1 and alone["softmax_layers"][0] in parallel.notes[0]
    agreed = FakeParallel()
    _, sel = _distil_selecting(tmp_path / "three", agreed)
    assert sel["processes_disagreed"] is False and agreed.notes == []


def test_choose_softmax_layers_leaves_the_model_as_it_was():
    model, inputs = _converted(3, bad="blocks.1.attn1")
    names, summary = choose_softmax_layers(model, inputs, 1, select="output")
    assert names == summary["softmax_layers"] == ["blocks.1.attn1"]
    assert len(hla_layers(model)) == 3  # nothing reverted: give_back_to_softmax or the caller does that


# -- resume: the layers the stage-2 checkpoint was trained with -------------------------------------


class Interrupt(Exception):
    pass


def _other_layer(model_layers, chosen):
    """Any converted layer other than `chosen` (a chooser that now decides otherwise)."""
    return next(n for n in model_layers if n not in chosen)


def _run_to_stage2(work, stop_at=None, resume=False, select="attention"):
    """distil on a tiny Wan of 3 layers, 1 given back; stop_at: killed after that stage-2 step
    (checkpoint_every 1: its checkpoint is written). (the model, the summary)."""
    rec = recipe(1).with_overrides(fields={"attention.softmax_select": select})
    model = tiny_model("wan", num_layers=3)
    convert_attention(model, rec.hla_config())
    inputs = build_inputs(model, rec, "train")

    def progress(stage, step, total, info):
        if stage == "stage2" and step == stop_at:
            raise Interrupt

    out = distil(model, inputs, rec, work_dir=work, resume=resume, progress=progress)
    return model, out


def _trained(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".hla." in k}


@pytest.mark.parametrize("select", ["attention", "output"])
def test_a_resumed_run_reverts_the_recorded_layers_even_if_the_chooser_now_picks_others(tmp_path, monkeypatch, select):
    """The choice is made once, after stage 1, and recorded in the work folder; a run resumed in
    stage 2 (another device, process count or torch version could measure the drifts differently)
    trains the layers its checkpoint was trained with, and ends as the uninterrupted run."""
    from hla_convert.stages import selection
    from hla_convert.stages.checkpoints import selection_path

    reference, ref = _run_to_stage2(tmp_path / "a", select=select)
    chosen = ref["selection"]["softmax_layers"]
    with pytest.raises(Interrupt):
        _run_to_stage2(tmp_path / "b", stop_at=1, select=select)
    assert selection_path(tmp_path / "b").is_file()

    real = selection.choose_softmax_layers

    def chooses_otherwise(model, inputs, count, max_batches=4, select="attention"):
        names, summary = real(model, inputs, count, max_batches, select)
        other = [_other_layer(hla_layers(model), names)]
        return other, {**summary, "softmax_layers": other}

    monkeypatch.setattr(selection, "choose_softmax_layers", chooses_otherwise)
    model, out = _run_to_stage2(tmp_path / "b", resume=True, select=select)
    assert out["stage2"]["resumed_from"] == 1
    assert out["selection"]["softmax_layers"] == chosen and out["selection"]["reused_on_resume"] is True
    assert out["selection"]["errors"] == ref["selection"]["errors"]  # the recorded summary, not a new one
    assert sorted(hla_layers(model)) == sorted(hla_layers(reference))
    want, got = _trained(reference), _trained(model)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(v, got[k]), k


def test_a_work_folder_without_a_recorded_choice_chooses_again(tmp_path, monkeypatch):
    """An older work folder (no recorded choice): the layers are chosen after stage 1 as before."""
    from hla_convert.stages import selection
    from hla_convert.stages.checkpoints import selection_path

    _, ref = _run_to_stage2(tmp_path / "a")
    with pytest.raises(Interrupt):
        _run_to_stage2(tmp_path / "b", stop_at=1)
    selection_path(tmp_path / "b").unlink()
    calls = []
    real = selection.choose_softmax_layers
    monkeypatch.setattr(selection, "choose_softmax_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, out = _run_to_stage2(tmp_path / "b", resume=True)
    assert calls == [1] and "reused_on_resume" not in out["selection"]
    assert out["selection"]["softmax_layers"] == ref["selection"]["softmax_layers"]
    assert selection_path(tmp_path / "b").is_file()  # recorded now, for a later resume


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda doc: doc.update(softmax_layers=["blocks.9.attn1"]), "blocks.9.attn1"),
        (lambda doc: doc.update(softmax_layers=["blocks.0.attn1", "blocks.1.attn1"]), "different recipe"),
        (lambda doc: doc.update(select="output"), "different recipe"),
        (lambda doc: doc.update(softmax_layers="blocks.0.attn1"), "damaged"),
        (None, "damaged"),
    ],
)
def test_a_recorded_choice_that_does_not_fit_the_model_or_recipe_is_one_line(tmp_path, edit, expect):
    import json

    from hla_convert.stages.checkpoints import CheckpointError, selection_path

    with pytest.raises(Interrupt):
        _run_to_stage2(tmp_path, stop_at=1)
    path = selection_path(tmp_path)
    if edit is None:
        path.write_text("{not json")
    else:
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=expect) as err:
        _run_to_stage2(tmp_path, resume=True)
    assert "\n" not in str(err.value) and "--resume" in str(err.value)


def test_a_fresh_stage_1_forgets_an_earlier_choice(tmp_path):
    from hla_convert.stages.checkpoints import checkpoint_path, selection_path

    with pytest.raises(Interrupt):
        _run_to_stage2(tmp_path, stop_at=1)
    checkpoint_path(tmp_path, "stage1").unlink()  # stage 1 starts afresh: the choice is made again
    selection_path(tmp_path).write_text('{"select": "attention", "softmax_layers": ["blocks.9.attn1"], "errors": {}}')
    _, out = _run_to_stage2(tmp_path, resume=True)
    assert "reused_on_resume" not in out["selection"] and out["selection"]["softmax_layers"] != ["blocks.9.attn1"]


class SharesRecord(FakeParallel):
    """A process other than rank 0 on resume: Parallel.main_first runs only on rank 0, and
    share_object gives rank 0's object, here `record` (what rank 0 read from its work folder)."""

    def __init__(self, record):
        super().__init__(rank0_layers=[])
        self.record = record

    def share_object(self, obj):
        assert obj is None  # this process read nothing itself
        return self.record


def test_under_several_processes_rank_0_records_the_choice_and_every_process_resumes_it(tmp_path):
    import json

    from hla_convert.stages.checkpoints import selection_path

    _, first = _distil_selecting(tmp_path / "main", FakeParallel())  # rank 0 writes the record
    record = json.loads(selection_path(tmp_path / "main" / "work").read_text())
    assert record["softmax_layers"] == first["softmax_layers"] and record["processes_disagreed"] is False
    _distil_selecting(tmp_path / "other", FakeParallel(rank0_layers=first["softmax_layers"]))
    assert not selection_path(tmp_path / "other" / "work").exists()  # only the main process writes

    theirs = next(n for n in (f"blocks.{i}.attn1" for i in range(3)) if n not in first["softmax_layers"])
    model, sel = _distil_selecting(tmp_path / "other", SharesRecord({**record, "softmax_layers": [theirs]}), resume=True)
    assert sel["softmax_layers"] == [theirs] and sel["reused_on_resume"] is True
    assert theirs not in hla_layers(model) and len(hla_layers(model)) == 2
    assert not selection_path(tmp_path / "other" / "work").exists()
