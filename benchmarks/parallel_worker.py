"""`hla-convert ARGS` in this process, then this process's peak memory into $HLA_PEAK_DIR.

bench_parallel.py launches it under `accelerate launch` in place of `-m hla_convert`, so that each
process (one per GPU) reports what it held: at exit (also on a non-zero exit) it writes
$HLA_PEAK_DIR/rank<RANK>.json = {"rank", "device", "peak_allocated_gb", "peak_reserved_gb",
"host_max_rss_gb"} (GPU peaks are torch.cuda.max_memory_allocated / max_memory_reserved of the
process's current device; null on the CPU).
"""

from __future__ import annotations

import atexit
import os
import resource
import sys


def _write_peak() -> None:
    where = os.environ.get("HLA_PEAK_DIR")
    if not where:
        return
    import torch

    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "device": "cpu",
              "peak_allocated_gb": None, "peak_reserved_gb": None,
              "host_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        record.update(
            device=f"cuda:{index} ({torch.cuda.get_device_name(index)})",
            peak_allocated_gb=torch.cuda.max_memory_allocated(index) / 2**30,
            peak_reserved_gb=torch.cuda.max_memory_reserved(index) / 2**30,
        )
    from hla_convert.atomic_files import write_json_atomic

    write_json_atomic(os.path.join(where, f"rank{rank}.json"), record)


def main() -> None:
    atexit.register(_write_peak)
    from hla_convert.cli import main as cli_main

    sys.argv = ["hla-convert", *sys.argv[1:]]
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
