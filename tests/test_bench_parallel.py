"""benchmarks/bench_parallel.py --smoke on the CPU: the multi-GPU benchmark's whole path (a Wan saved
with save_pretrained, the recipe written, one `accelerate launch` with 1 and with 2 processes, the
per-process peaks, the drift reports read, the adapters compared), with gloo in place of NCCL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_parallel.py"


def test_published_14b_config_is_the_14b_transformer():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from bench_parallel import WAN_14B_CONFIG
    finally:
        sys.path.remove(str(SCRIPT.parent))
    cfg = WAN_14B_CONFIG
    assert (cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]) == (40, 5120, 13824)


@pytest.mark.slow
def test_smoke_one_and_two_processes_give_the_same_adapter(tmp_path):
    out = tmp_path / "par.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # cwd outside the checkout, as the other launch tests: the processes import the installed package
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--smoke", "--work", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    runs = {r["run"]: r for r in doc["records"] if "run" in r}
    assert set(runs) == {"1", "2"}
    for name, run in runs.items():
        assert run["exit_code"] in (0, 1), run.get("stderr_tail")  # 1: drift over the thresholds
        assert len(run["processes"]) == int(name) and run["processes"][0]["host_max_rss_gb"] > 0
        assert run["stage1"]["steps_run"] == 2 and run["stage2"]["steps_run"] == 1
        assert run["stage1"]["seconds_per_step"] > 0 and run["softmax_layers"]
    (cmp,) = [r for r in doc["records"] if r.get("measurement") == "compare"]
    assert cmp["runs"] == ["1", "2"] and cmp["same_softmax_layers"] and cmp["only_in_one"] == []
    # float32 on the CPU: the 2-process gradient is the 1-process one up to summation order
    assert cmp["hla"]["rel_l2_diff"] < 1e-5 and cmp["lora"]["rel_l2_diff"] < 1e-5
