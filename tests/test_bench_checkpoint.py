"""benchmarks/bench_checkpoint.py on the CPU, on a small part of one Wan block's state: it runs and
writes a record per host-buffer kind with the fields RESULTS.md reads (the GPU run is its point)."""

from __future__ import annotations

import json

from helpers import BENCHMARKS, load_script


def test_the_checkpoint_bench_writes_a_record_per_buffer_kind(tmp_path):
    bench = load_script(BENCHMARKS / "bench_checkpoint.py", "bench_checkpoint")
    out = tmp_path / "checkpoint.json"
    assert bench.main([str(out), "--blocks", "1", "--blocks-only", "attn1.to_q", "--dir", str(tmp_path)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["host_buffers"] for r in recs] == ["pinned", "pageable"]
    assert all(r["gb"] > 0 and r["first_s"] >= 0 and r["reused_s"] >= 0 for r in recs)
    assert recs[0]["write_s"] >= 0 and not (tmp_path / "bench_checkpoint.safetensors").exists()
