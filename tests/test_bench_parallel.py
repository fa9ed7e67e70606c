"""benchmarks/bench_parallel.py --smoke on the CPU: the multi-GPU benchmark's whole path (a Wan saved
with save_pretrained, the recipe written, one `accelerate launch` with 1 and with 2 processes, the
per-process peaks, the drift reports read, the adapters compared), with gloo in place of NCCL.
The run is conftest's `parallel_smoke`, which tests/stages/test_parallel.py reads too."""

from __future__ import annotations

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
def test_smoke_one_and_two_processes_give_the_same_adapter(parallel_smoke):
    doc, _, _ = parallel_smoke  # conftest: the smoke run, shared with tests/stages/test_parallel.py
    runs = {r["run"]: r for r in doc["records"] if "run" in r}
    assert set(runs) == {"1", "2"}
    for name, run in runs.items():
        assert run["exit_code"] in (0, 1), run.get("stderr_tail")  # 1: drift over the thresholds
        assert len(run["processes"]) == int(name) and run["processes"][0]["host_max_rss_gb"] > 0
        assert run["stage1"]["steps_run"] == 2 and run["stage2"]["steps_run"] == 1
        assert run["stage1"]["seconds_per_step"] > 0 and run["softmax_layers"]
        assert Path(run["stderr_log"]).read_text().endswith(run["stderr_tail"])
    (cmp,) = [r for r in doc["records"] if r.get("measurement") == "compare"]
    assert cmp["runs"] == ["1", "2"] and cmp["same_softmax_layers"] and cmp["only_in_one"] == []
    # float32 on the CPU: the 2-process gradient is the 1-process one up to summation order
    assert cmp["hla"]["rel_l2_diff"] < 1e-5 and cmp["lora"]["rel_l2_diff"] < 1e-5
