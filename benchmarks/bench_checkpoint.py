"""What a stage-2 checkpoint of `train: full` holds the training loop: the device-to-host snapshot of
hla_convert.stages.checkpoints.CheckpointWriter, first and reused, into pinned and into pageable
host buffers, and the background write.

The state is what Wan2.1-1.3B's `train: full` checkpoints: every parameter of the 28 converted
blocks (blocks 2-29 of the published config; 2 kept softmax) as an fp32 master copy and AdamW's two
moments, ~15.6 GB, allocated on the GPU with those shapes (random values: the copy's speed does not
depend on them). Per host-buffer kind, in a fresh writer:

  first_s    the first snapshot: the host buffers are allocated (and pinned) here
  reused_s   the next snapshot into the same buffers: what every later checkpoint of a stage pays
  close_s    the buffers released at the stage's end

then, for the writer as shipped, one submit() and wait(): `submit_s` (what the loop waits) and
`write_s` (the file, on the background thread; the loop waits for it only at the next checkpoint
or the stage's end).

    python benchmarks/bench_checkpoint.py OUT.json [--blocks 28] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_bench.model import WAN_1_3B_CONFIG, build_transformer  # noqa: E402
from wan_bench.timing import _sync, environment  # noqa: E402


def block_shapes(blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of `blocks` Wan2.1-1.3B blocks (built on the meta device)."""
    model = build_transformer({**WAN_1_3B_CONFIG, "num_layers": blocks}, torch.device("meta"), torch.float32)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if n.startswith("blocks.")]


def state(shapes, device) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: master, exp_avg, exp_avg_sq (fp32) per parameter."""
    out = {}
    for name, shape in shapes:
        for part in ("master", "exp_avg", "exp_avg_sq"):
            out[f"{part}.{name}"] = torch.randn(shape, device=device, dtype=torch.float32)
    return out


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from hla_convert.stages import checkpoints

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--blocks", type=int, default=28, help="Wan2.1-1.3B blocks trained (default 28: 30 less 2 kept softmax)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the timed checkpoint file goes (removed after)")
    ap.add_argument("--blocks-only", default=None, help="only the parameters whose name holds this (tests: a small state)")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", ""))
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(n, shape) for n, shape in block_shapes(args.blocks) if args.blocks_only is None or args.blocks_only in n]
    tensors = state(shapes, device)
    gb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
    print(f"{len(tensors)} tensors, {gb:.2f} GB on {device}", file=sys.stderr, flush=True)
    records: list[dict[str, Any]] = []
    shipped = checkpoints._host_buffer
    pageable = lambda like: torch.empty(like.shape, dtype=like.dtype, device="cpu")  # noqa: E731
    for kind, make in (("pinned", shipped), ("pageable", pageable)):
        checkpoints._host_buffer = make
        try:
            writer = checkpoints.CheckpointWriter()
            first = timed(lambda: writer._snapshot(tensors), device)
            reused = timed(lambda: writer._snapshot(tensors), device)
            pinned = all(b.is_pinned() for b in writer._buffers.values()) if writer._buffers else None  # None: CPU tensors, no buffers
            rec = {"host_buffers": kind, "pinned": pinned, "gb": round(gb, 3), "first_s": round(first, 3), "reused_s": round(reused, 3)}
            if kind == "pinned":  # the writer as shipped: a whole checkpoint, the loop's wait and the file's
                path = Path(args.dir) / "bench_checkpoint.safetensors"
                rec["submit_s"] = round(timed(lambda: writer.submit(path, tensors, {"step": 1}), device), 3)
                rec["write_s"] = round(timed(writer.wait, device), 3)
                path.unlink(missing_ok=True)
            rec["close_s"] = round(timed(writer.close, device), 3)
        finally:
            checkpoints._host_buffer = shipped
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
    result = {"env": environment(device, args.commit), "args": vars(args), "records": records}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
