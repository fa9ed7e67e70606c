"""The fidelity benchmark's input sets (run.py): train and held-out inputs of one (model, seed), drawn
from the teacher's own data distribution (bench_data.py), written as a `calibration.source: folder`
with the held-out split's true flow targets, and cached by their parameters.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import bench_data as bd
import bench_models as bm


def write_inputs(arch: str, model, spec: bd.VideoSpec, seed: int, n_train: int, n_heldout: int, batch: int, folder: Path) -> None:
    """Train/held-out inputs of one (model, seed) as the `folder` calibration source, plus the true
    flow targets of the held-out split (heldout_targets.safetensors: target [N, 3, F, H, W], t [N]).

    Train: t ~ U(0, 1). Held-out: t evenly spread over (0, 1) in a seeded order, so each of the
    4 buckets has n/4 samples. Separate seed streams: held-out inputs are never training inputs.
    """
    from safetensors.torch import save_file

    from hla_convert.stages.calibration import save_inputs

    rope = bm.rotary_emb(model, spec) if arch == "cogvideox" else None
    for split, n, stream in (("train", n_train, 1), ("heldout", n_heldout, 2)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * stream)
        t_all = None
        if split == "heldout":
            t_all = ((torch.arange(n, dtype=torch.float32) + 0.5) / n)[torch.randperm(n, generator=g)]
        items, targets, ts = [], [], []
        for i in range(0, n, batch):
            b = min(batch, n - i)
            x0, text, t, noise = bd.sample_training_batch(b, spec, g, None if t_all is None else t_all[i : i + b])
            x_t, timestep, target = bd.flow_matching(x0, t, noise)
            items.append(bm.model_inputs(arch, x_t, timestep, text, rope))
            targets.append(target)
            ts.append(t)
        save_inputs(items, folder / split)
        if split == "heldout":
            save_file({"target": torch.cat(targets).contiguous(), "t": torch.cat(ts).contiguous()}, str(folder / "heldout_targets.safetensors"))
    (folder / "DONE").write_text(json.dumps({"arch": arch, "seed": seed, "train": n_train, "heldout": n_heldout, "batch": batch}))


def built_once(folder: Path, marker: str, build) -> Path:
    """`folder`, built by `build(tmp)` unless its `marker` file is there: into a folder of this
    process's own, then renamed into place whole, so that runs started at once (run.py --jobs) never
    read a half-built one. The first rename wins; the others drop theirs and use it (built from the
    same arguments: the same content)."""
    if not (folder / marker).is_file():
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        if folder.is_dir() and not (folder / marker).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # one cut off before this scheme: no writer is in it
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its own in first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / marker).is_file():
                raise
    return folder


def inputs_folder(cache: Path, arch: str, model, spec, seed: int, n_train: int, n_heldout: int, batch: int) -> Path:
    """The cached input set of these parameters, written first if it is not there (built_once: runs
    of the same (model, seed) started at once share one set, drawn from the seed)."""
    folder = cache / f"{arch}-seed{seed}-n{n_train}-h{n_heldout}-b{batch}-{spec.frames}x{spec.height}x{spec.width}"
    return built_once(folder, "DONE", lambda tmp: write_inputs(arch, model, spec, seed, n_train, n_heldout, batch, tmp))
