"""Distillation across processes (hla_convert.stages.parallel): the share of a step each process gets, the
shared relative error against a float64 reference, and real two-process runs on the CPU (accelerate
launch, gloo): equal to one process at equal global batch and written once by the main process
(conftest's `parallel_smoke`, the run benchmarks/bench_parallel.py's test reads too), and runs of
the demo under FSDP: one stopped under two processes resumed by one, one in bf16."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hla_convert.stages.distill import _relative_sq_error, _shared_relative_sq_error
from hla_convert.stages.parallel import launched, share_step
from hla_convert.recipe import recipe_text
from helpers import read_write_log, write_logging_env

# HLA / LoRA parameters after a short two-process run vs one process at the same global batch.
# Measured 1.7e-6 after 10 + 2 steps of the demo recipe: float reordering (two 2-sample forwards
# instead of one 4-sample forward, one thread each, sums across processes) amplified by Adam's
# normalised steps; the parameters are O(1).
EQUAL_BOUND = 2e-5


def _item(b: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(b, 3, 2, 4, 4, generator=g),
        "timestep": torch.rand(b, generator=g) * 1000,
        "encoder_hidden_states": torch.randn(b, 5, 8, generator=g),
        "rope": (torch.randn(7, 2, generator=g), torch.randn(7, 2, generator=g)),  # not batched: kept whole
        "num_frames": 2,
    }


def _samples(items: list[dict]) -> torch.Tensor:
    return torch.cat([it["hidden_states"] for it in items])


def test_share_step_splits_each_input_when_its_batch_divides():
    items = [_item(4, 0), _item(4, 1)]
    shares = [share_step(items, i, 2) for i in range(2)]
    assert [s.mode for s in shares] == ["split", "split"]
    assert all(len(s.items) == 2 and s.items[0]["hidden_states"].shape[0] == 2 for s in shares)
    # every sample of the global batch goes to exactly one process, each input in order
    for j in range(2):
        whole = torch.cat([s.items[j]["hidden_states"] for s in shares])
        assert torch.equal(whole, items[j]["hidden_states"])
        assert torch.equal(torch.cat([s.items[j]["timestep"] for s in shares]), items[j]["timestep"])
        assert all(s.items[j]["rope"] is items[j]["rope"] and s.items[j]["num_frames"] == 2 for s in shares)
    # back-propagation scale 1/A (sums over processes to the mean over inputs); loss weight 1/(A P)
    assert shares[0].scale == 0.5 and shares[0].weight == 0.25


def test_share_step_hands_out_whole_inputs_or_replicates():
    items = [_item(1, s) for s in range(4)]  # the 14B recipe's stage 1: 4 inputs of 1 sample
    shares = [share_step(items, i, 2) for i in range(2)]
    assert [s.mode for s in shares] == ["items", "items"]
    assert torch.equal(torch.cat([_samples(s.items) for s in shares]), _samples(items))
    assert shares[0].scale == shares[0].weight == 0.25
    one = [_item(1)]  # its stage 2: one sample cannot be shared by 2 processes
    rep = [share_step(one, i, 2) for i in range(2)]
    assert [s.mode for s in rep] == ["replicate", "replicate"] and all(s.items[0] is one[0] for s in rep)
    assert rep[0].scale == rep[0].weight == 0.5  # each process's full gradient, halved, sums to one
    solo = share_step(items, 0, 1)
    assert solo.items == items and solo.scale == 0.25


def test_shared_relative_error_sums_to_the_whole_inputs_error():
    """Process p back-propagates ||pred_p - target_p||^2 / ||target||^2 (the whole input's
    denominator): the shares add up to the one-process relative error (float64 reference)."""
    g = torch.Generator().manual_seed(3)
    target, pred = torch.randn(4, 6, 5, generator=g), torch.randn(4, 6, 5, generator=g)
    ref = float(((pred.double() - target.double()) ** 2).sum() / (target.double() ** 2).sum())
    whole_t2 = target.pow(2).sum()
    whole_err = (pred - target).pow(2).sum()

    def reduce(t):  # what the all-reduce returns: the sums over both halves
        return torch.stack([whole_err, whole_t2])

    halves = [_shared_relative_sq_error(pred[i * 2 : (i + 1) * 2], target[i * 2 : (i + 1) * 2], reduce) for i in range(2)]
    assert abs(sum(float(r) for r, _ in halves) - ref) < 1e-6
    assert all(abs(v - ref) < 1e-6 for _, v in halves)
    assert abs(float(_relative_sq_error(pred, target)) - ref) < 1e-6


def test_one_process_is_not_a_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched()
    from hla_convert.stages.parallel import Parallel

    assert Parallel.from_environment() is None


# -- two processes ------------------------------------------------------------------------------


def _recipe(tmp_path: Path) -> Path:
    """The demo recipe, made small: 8 calibration samples of 2 frames (128 tokens, a quarter of the
    demo's, still two 1-frame windows; batch 4: two 2-sample shares a step), 4 + 2 steps with a
    checkpoint every 2 resp. 1, a cheap
    drift check that passes (2 held-out samples, 1 sampling step: no test here reads the drift
    numbers, only that the check ran and passed)."""
    doc = yaml.safe_load(recipe_text("tiny-wan"))
    doc["name"] = "tiny-wan-parallel"
    doc["calibration"].update(samples=8, heldout=2, frames=2)
    doc["stage1"].update(steps=4, checkpoint_every=2)
    doc["stage2"].update(steps=2, checkpoint_every=1)
    doc["validation"].update(
        max_attention_rel_l2=10.0, max_output_rel_l2=10.0, min_output_cosine=-1.0, max_latent_rel_l2=10.0, min_latent_psnr=0.0, sampling_steps=1
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FSDP_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp_wan14b.yaml"


def _launch(tmp_path: Path, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` two CPU processes (torchrun + gloo) of `python -m hla_convert convert`,
    with an accelerate config file or without; every os.replace (each atomic write) is logged with
    the writer's rank in tmp_path/writes.log (helpers.write_logging_env)."""
    env = write_logging_env(tmp_path / "hook", tmp_path / "writes.log")
    env.pop("WORLD_SIZE", None)
    # --multi_gpu: accelerate's torchrun path, which makes a gloo group of CPU processes where no
    # GPU is (`--cpu --num_processes 2` alone starts one process)
    where = ["--config_file", str(config)] if config else ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *where, "--num_processes", "2",
        "--main_process_port", str(_free_port()),
        "-m", "hla_convert", "convert", *args,
    ]  # fmt: skip
    # cwd outside the checkout: `-m` puts the cwd first on sys.path, and a checkout's hla_convert
    # lacks the built-in recipes a (non-editable) install maps into it, as CI installs it
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same recipe in this process (one process, the same global batch)."""
    import hla_convert

    tmp = tmp_path_factory.mktemp("one")
    recipe = _recipe(tmp)
    result = hla_convert.convert(recipe=str(recipe), out=tmp / "out", device="cpu")
    assert result.passed
    return recipe, tmp / "out", result


@pytest.mark.slow
def test_two_processes_equal_one_and_only_the_main_process_writes(parallel_smoke):
    """conftest's parallel_smoke (benchmarks/bench_parallel.py --smoke, whose own test reads the same
    runs): one conversion of a tiny Wan launched with one process and with two (data parallel over
    gloo), the same global batch; each run's whole stdout and stderr are kept next to its folder."""
    doc, work, log = parallel_smoke
    runs = {r["run"]: r for r in doc["records"] if "run" in r}
    one, two = work / "out-smoke-1", work / "out-smoke-2"
    # one JSON document on stdout: the second process printed nothing there
    ours, theirs = (json.loads(Path(runs[r]["stdout_log"]).read_text()) for r in ("2", "1"))
    assert ours["exit_code"] == runs["2"]["exit_code"] in (0, 1), ours.get("error")  # 1: drift over the thresholds
    assert sorted(ours["files"]) == sorted(theirs["files"])
    assert _max_diff(_adapter(two), _adapter(one)) <= EQUAL_BOUND
    report, ref = (json.loads((folder / "drift_report.json").read_text()) for folder in (two, one))
    assert report["training"]["parallel"] == {"processes": 2, "fsdp": False}
    # the layers given back to softmax: rank 0's (shared over gloo), the ones each process chose
    assert report["training"]["selection"]["processes_disagreed"] is False
    assert report["training"]["selection"]["softmax_layers"] == ref["training"]["selection"]["softmax_layers"] != []
    for stage in ("stage1", "stage2"):
        a, b = report["training"][stage]["loss_history"], ref["training"][stage]["loss_history"]
        assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    writes = [(rank, dst) for rank, dst in read_write_log(log) if dst.startswith(str(two) + os.sep)]
    assert writes and {rank for rank, _ in writes} == {"0"}, writes
    ckpts = [Path(dst).name for _, dst in writes if dst.endswith(".checkpoint.safetensors")]
    # 2 + 1 steps, checkpoints every 50 / 25 steps and at the end: each stage's written once
    assert ckpts == ["stage1.checkpoint.safetensors", "stage2.checkpoint.safetensors"]
    assert not (two / ".hla_work").exists() and not (two / ".hla-convert.lock").exists()
    # progress shown once: the main process's stage lines only
    assert Path(runs["2"]["stderr_log"]).read_text().count("attention transfer: step 2/2") == 1


@pytest.mark.slow
def test_a_run_stopped_under_two_fsdp_processes_resumes_under_one(tmp_path, one_process):
    """The 14B recipe's FSDP config (2 processes here): the frozen base sharded with FSDP2 over
    gloo, LoRA added to sharded blocks in stage 2; stopped after 4 + 1 steps (every process at the
    same step, as a Ctrl-C), then resumed by one process: the same adapter as the uninterrupted run."""
    import hla_convert

    recipe, ref_out, _ = one_process
    out = tmp_path / "stopped"
    run = _launch(tmp_path, "--recipe", str(recipe), "--out", str(out), "--device", "cpu", "--stop-after-steps", "5", config=FSDP_CONFIG)
    assert run.returncode != 0
    assert run.stderr.count("hla-convert: error: interrupted") == 1  # the main process's line only
    assert run.stderr.count("FSDP: the frozen base is sharded over 2 processes (3 blocks)") == 1
    work = out / ".hla_work"
    assert (work / "stage1.checkpoint.safetensors").is_file() and (work / "stage2.checkpoint.safetensors").is_file()
    writes = read_write_log(tmp_path / "writes.log")
    assert {rank for rank, _ in writes} == {"0"}, writes
    result = hla_convert.convert(recipe=str(recipe), out=out, device="cpu", resume=True)
    assert result.passed and result.report["training"]["stage2"]["resumed_from"] == 1
    assert _max_diff(_adapter(out), _adapter(ref_out)) <= EQUAL_BOUND


@pytest.mark.slow
def test_fsdp_shards_a_bf16_model_whose_norms_stay_float32(tmp_path, one_process):
    """--dtype bf16 keeps the class's _keep_in_fp32_modules (Wan: norms, scale_shift_table) in
    float32 inside each block, and FSDP2 shards one dtype per unit: those few parameters stay whole
    on every process (found on 2 H100s with the 14B shape; float32 runs never mixed dtypes)."""
    recipe, _, _ = one_process
    out = tmp_path / "bf16"
    run = _launch(tmp_path, "--recipe", str(recipe), "--out", str(out), "--device", "cpu", "--dtype", "bf16", "--json", config=FSDP_CONFIG)
    assert run.returncode in (0, 1), run.stderr[-3000:]  # 1: drift over the thresholds, not a failure
    doc = json.loads(run.stdout)
    assert doc.get("dtype") == "bfloat16", doc.get("error") or doc
    assert (out / "adapter_model.safetensors").is_file()
    report = json.loads((out / "drift_report.json").read_text())
    assert report["training"]["parallel"] == {"processes": 2, "fsdp": True}
    assert report["training"]["stage2"]["steps_run"] == 2


@pytest.mark.slow
def test_full_training_of_a_bf16_model_under_two_processes_equals_one(tmp_path):
    """stage 2 `train: full` (wan2.1-t2v-1.3b's since 2026-12-07) on a bf16 model, data parallel over
    two processes: the fp32 masters start from the main process's values, each step's gradients are
    summed over the processes, and the saved block weights equal a one-process run's up to bf16
    rounding of the summation order."""
    import hla_convert
    from hla_convert.model.modes import attention_mode

    doc = yaml.safe_load(_recipe(tmp_path).read_text())
    doc["stage2"].update(train="full", lr=1e-3)
    recipe = tmp_path / "full.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    one = hla_convert.convert(recipe=str(recipe), out=tmp_path / "one", device="cpu", dtype="bf16")
    assert one.passed
    done = _launch(tmp_path, "--recipe", str(recipe), "--out", str(tmp_path / "two"), "--device", "cpu", "--dtype", "bf16", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    full = [k for k in a if k.startswith("full.")]
    assert full and any(a[k].dtype == torch.bfloat16 for k in full)  # the linears (diffusers keeps norms in fp32)
    base = hla_convert.load_converted(tmp_path / "one", device="cpu", dtype="bf16")
    with attention_mode(base, "teacher"):
        originals = {f"full.{n}": p.detach().clone() for n, p in base.named_parameters() if f"full.{n}" in a}
    moved = [k for k in full if k in originals and not torch.equal(a[k], originals[k])]
    assert len(moved) > len(full) // 2  # it trained
    assert _max_diff({k: a[k] for k in full}, {k: b[k] for k in full}) <= 2e-2
    close = sum(torch.isclose(a[k].float(), b[k].float(), rtol=1e-2, atol=1e-3).float().mean().item() for k in full) / len(full)
    assert close > 0.99
