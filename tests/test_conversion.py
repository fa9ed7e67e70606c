"""hla_convert.convert / validate, the one-call Python API, on the embedded demo model: the same
run as the `hla-convert convert` command (same report, same files), its progress events, its
errors for bad input, and a validate round trip. An interrupted call and its resume=True are
tests/cli/test_resume.py's resume test (the command's --stop-after-steps is a KeyboardInterrupt from
the progress callback; its --resume is resume=True), against the same reference.

The CLI run is the session's demo conversion (conftest's `converted`, the console script in a
subprocess); CPU float sums depend on the thread count, which conftest sets to one for this process
and for every subprocess, so the two runs must agree to the last bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import hla_convert
from hla_convert.conversion import STAGES
from hla_convert.io.output_guard import OutputError
from helpers import FAST


@pytest.fixture(scope="module")
def library_run(tmp_path_factory, fast_recipe):
    events = []
    out = tmp_path_factory.mktemp("lib") / "demo-hla"
    result = hla_convert.convert(recipe=str(fast_recipe), out=out, device="cpu", progress=events.append)
    return out, result, events


def test_convert_gives_what_the_cli_reports(library_run, converted):
    out, result, _ = library_run
    cli_out, doc = converted
    assert result.passed is True and result.out_dir == out.absolute()
    assert _measured(result.report) == _measured(doc["drift"])  # the same numbers, to the last bit
    assert result.files == doc["files"] and result.recipe == doc["recipe"] == "tiny-wan"
    mine = json.loads(json.dumps([result.model, result.device, result.dtype, result.attention]))
    assert mine == [doc["model"], doc["device"], doc["dtype"], doc["attention"]]
    assert list(result.seconds) == list(STAGES) == list(doc["seconds"])
    # the same folder: the same files, the same adapter weights, the report as returned
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in cli_out.iterdir())
    got, want = load_file(str(out / "adapter_model.safetensors")), load_file(str(cli_out / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "drift_report.json").read_text()) == json.loads(json.dumps(result.report))


def _measured(report: dict) -> dict:
    """A report without what differs between two identical runs: wall times, checkpoint paths."""
    report = json.loads(json.dumps(report))
    for stage in ("stage1", "stage2", "stage3"):
        for key in ("seconds", "step_seconds", "checkpoint"):
            report["training"][stage].pop(key, None)
    report["training"]["stage2"].get("teacher", {}).pop("seconds", None)  # computing the cached targets
    return report


def test_progress_events_bracket_each_stage_in_order(library_run):
    _, result, events = library_run
    bracket = [(e.kind, e.stage) for e in events if e.kind != "step"]
    assert bracket == [(kind, stage) for stage in STAGES for kind in ("start", "end")]
    ends = {e.stage: e.seconds for e in events if e.kind == "end"}
    assert ends == result.seconds
    steps = [e for e in events if e.kind == "step" and e.stage == "stage1"]
    assert [e.step for e in steps] == list(range(1, FAST["stage1.steps"] + 1))
    assert all(e.total == FAST["stage1.steps"] and isinstance(e.info["loss"], float) for e in steps)


def test_bad_input_raises_one_line_errors_before_loading(library_run, tmp_path):
    out, _, _ = library_run
    fresh = tmp_path / "o"
    cases = [
        (dict(out=fresh, device="banana"), hla_convert.InputError, "--device"),
        (dict(model=str(tmp_path / "nowhere"), recipe="tiny-wan", out=fresh), hla_convert.InputError, "does not exist"),
        (dict(out=""), hla_convert.InputError, "--out is empty"),
        (dict(out=None), hla_convert.InputError, "--out"),
        (dict(recipe="no-such-recipe", out=fresh), hla_convert.InputError, "unknown recipe"),
        (dict(attention="quadratic", out=fresh), hla_convert.InputError, "attention.kind"),
        (dict(out=fresh, dtype="float7"), ValueError, "float7"),
        (dict(out=out, device="cpu"), OutputError, "not empty"),
        (dict(out=out, device="cpu", resume=True), OutputError, "nothing to resume"),
    ]
    for kwargs, error, contains in cases:
        with pytest.raises(error) as info:
            hla_convert.convert(**kwargs)
        message = str(info.value)
        assert contains in message and "\n" not in message, (kwargs, message)
    assert not fresh.exists()


def test_validate_round_trip(library_run):
    out, result, _ = library_run
    again = hla_convert.validate(out, device="cpu")
    assert again.passed is True and again.recipe == result.recipe and again.out_dir == out.absolute()
    assert again.saved_report == json.loads(json.dumps(result.report))
    saved = {row["metric"]: row["value"] for row in result.report["table"]}
    for row in again.report["table"]:  # the held-out inputs are seeded: the same drift again
        assert row["value"] == pytest.approx(saved[row["metric"]], rel=1e-4, abs=1e-6)
    assert list(again.seconds) == ["load", "calibrate", "validate"]

    tight = hla_convert.validate(out, thresholds={"max_output_rel_l2": 1e-9}, device="cpu")
    assert tight.passed is False and any("output" in f for f in tight.report["failures"])
    with pytest.raises(hla_convert.InputError, match="validation.max_output_rel_l2"):
        hla_convert.validate(out, thresholds={"max_output_rel_l2": -1.0})
    with pytest.raises(OutputError, match="does not exist"):
        hla_convert.validate(out.parent / "missing")
