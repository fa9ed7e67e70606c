"""--stage1-from: start a run's conversion from the finished stage 1 of an earlier run.

Rows that differ only after stage 1 (stage 2's schedule, LoRA or full, which layers stay softmax and
how they are chosen, stage 3) train the same stage 1: same attention config, stage-1 fields,
calibration batch, seed, parameters and number of inputs, which is exactly what a stage-1
checkpoint's fingerprint covers (hla_convert.stages.distill_loop.stage_fingerprint). A run whose
fingerprint equals that of a finished stage-1 checkpoint under one of the given folders (conversion
folders of run.py, <arch>-<config>-seed<k>/.hla_work/) starts from it: the work folder of the new
conversion is written as `hla-convert convert` writes it (run.json of this run), the checkpoint is
copied in, and the conversion is resumed, so stage 1 is restored and the rest runs as usual. The
softmax-layer choice is not copied: it is made again, by the run's own recipe.

A finished conversion drops its work folder, so every run keeps a copy of its stage-1 checkpoint
once stage 1 has ended (keep_stage1, from the progress callback): <conversions-dir>/stage1-checkpoints/
<arch>-<config>-seed<k>.safetensors. --stage1-from searches those and the work folders of conversions
cut off after their stage 1.

The saving is a benchmark's (a grid of stage-2 levers pays stage 1 once); the record says which
checkpoint it started from ("stage1_from"), and its stage-1 seconds are not its own.
"""

from __future__ import annotations

from pathlib import Path

from hla_convert.atomic_files import atomic_write_bytes
from hla_convert.io.output import run_identity, start_run
from hla_convert.io.output_guard import WORK_DIR
from hla_convert.stages.checkpoints import checkpoint_path, load_checkpoint
from hla_convert.stages.distill_loop import stage_fingerprint


KEPT_DIR = "stage1-checkpoints"
_BEFORE_STAGE2 = ("calibration", "init", "stage1")  # progress sub-stages up to the end of stage 1


def keep_stage1(conv_dir: Path, kept_as: Path):
    """A progress hook: the first time an event comes after stage 1 (a later sub-stage's step, or the
    end of the distil stage), copy conv_dir's finished stage-1 checkpoint to `kept_as` (atomically).
    Call it with every ProgressEvent; a run without a finished stage 1 keeps nothing."""
    done = [False]

    def hook(event) -> None:
        after = (event.kind == "step" and event.stage not in _BEFORE_STAGE2) or (event.kind == "end" and event.stage == "distil")
        if done[0] or not after:
            return
        done[0] = True
        ckpt = checkpoint_path(conv_dir / WORK_DIR, "stage1")
        if not ckpt.is_file():
            return
        _, state = load_checkpoint(ckpt)
        if state.get("step") == state.get("total"):
            kept_as.parent.mkdir(parents=True, exist_ok=True)
            _copy(ckpt, kept_as)

    return hook


def _copy(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, src.read_bytes())  # a stage-1 checkpoint holds the HLA parameters only (~1 MB)


def finished_stage1(folders: list[str | Path], arch: str, seed: int, recipe, n_inputs: int) -> Path | None:
    """The first finished stage-1 checkpoint under `folders` (run.py conversion folders of `arch`
    and `seed`) whose fingerprint is the one `recipe` would give its stage 1 with `n_inputs` inputs;
    None when there is none."""
    for folder in folders:
        folder = Path(folder)
        kept = sorted(folder.glob(f"{KEPT_DIR}/{arch}-*-seed{seed}.safetensors"))
        for ckpt in kept + sorted(folder.glob(f"{arch}-*-seed{seed}/.hla_work/stage1.checkpoint.safetensors")):
            try:
                tensors, state = load_checkpoint(ckpt)
            except Exception:  # noqa: BLE001 - a damaged candidate is simply not one
                continue
            if state.get("step") != recipe.stage1.steps or state.get("total") != recipe.stage1.steps:
                continue  # cut off before its end, or another step count
            params = {k.removeprefix("param."): t for k, t in tensors.items() if k.startswith("param.")}
            if params and stage_fingerprint("stage1", recipe, params, n_inputs) == state.get("fingerprint"):
                return ckpt
    return None


def seed_work_folder(conv_dir: Path, source: str, recipe, dtype: str, ckpt: Path) -> None:
    """Make `conv_dir` the interrupted conversion of (source, recipe, dtype) after its stage 1:
    a fresh work folder with this run's run.json (what `convert` writes; older hla-convert output
    there is replaced as --overwrite does) and `ckpt` as its stage-1 checkpoint."""
    work = start_run(conv_dir, run_identity(str(source), None, None, recipe, dtype), overwrite=True)
    _copy(ckpt, checkpoint_path(work, "stage1"))
