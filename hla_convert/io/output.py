"""The output folder of a conversion: what `hla-convert convert` writes, `validate` and
`load_converted` read.

    DIR/
      adapter_model.safetensors  the HLA weights (and LoRA weights) + metadata (hla_convert.io.adapter)
      hla_config.json            the same metadata, readable
      recipe.yaml                the recipe exactly as run (command-line overrides applied)
      drift_report.json          held-out drift, thresholds, pass/fail, training summary
      README.md                  the model card
      sample.mp4|gif, sample.png after `hla-convert sample DIR` or `convert --sample` (sample_media)
      .hla-convert-manifest.json every file above with its sha256: what --overwrite may delete
      .hla-convert.lock          only while a run is going on (output_guard.output_lock)
      .hla_work/                 only while a run is unfinished: run.json + training checkpoints

A two-expert pipeline (Wan2.2 A14B: `transformer` for the high-noise steps, `transformer_2` for
the low-noise ones; hla_convert.model.experts) adds one subfolder per further expert, and the
top-level adapter is the first expert's (so a reader that knows one adapter per folder reads the
first one, never a mix):

    DIR/
      adapter_model.safetensors, hla_config.json   the `transformer` expert's adapter
      transformer_2/adapter_model.safetensors      the `transformer_2` expert's adapter
      transformer_2/hla_config.json
      recipe.yaml, README.md                      one recipe (both experts ran it), one card
      drift_report.json                           a row per expert and the whole-pipeline check
                                                  (stages.experts' docstring has its structure)

Each adapter's metadata records "expert" (its component name) and "experts" (all of them, in the
pipeline's order) under "extra"; a folder from a one-transformer model has neither, and no
subfolder. The manifest lists the subfolder's files as "transformer_2/NAME".

`.hla_work/` exists from the start of a run until its outputs are saved, then it is removed: a
folder that still has one is a run that was interrupted (or failed) and that `--resume` continues.
`run.json` there records what the run is (model, recipe text, dtype), so that `--resume` never
continues a different run.

Every file is written atomically: the outputs are written into `.hla_work/save/`, the manifest
listing them is put in place, then each file is renamed into the folder; a killed save leaves whole
files that the manifest lists, and the work folder, so `--resume` finishes it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .adapter import ADAPTER_FILE, CONFIG_FILE, read_adapter_info, save_adapter
from ..atomic_files import atomic_write_text, write_json_atomic
from ..json_docs import json_safe
from .model_card import model_card
from ..model.architectures import with_field
from ..model.loading import DEMO_MODEL_NAME, LoadedModel
from .output_guard import (
    CARD_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    SUBFOLDERS,
    RUN_FILE,
    WORK_DIR,
    OutputError,
    check_replaceable,
    clear_ours,
    describe,
    foreign_entries,
    read_manifest,
    read_run_file,
    run_file_content,
    sha256_file,
    write_manifest,
)
from ..recipe import Recipe

STAGING_DIR = "save"  # in WORK_DIR: the outputs are written here, then renamed into the folder
OUTPUT_FILES = (ADAPTER_FILE, CONFIG_FILE, RECIPE_FILE, REPORT_FILE, CARD_FILE)
# What validate and push believe (weights, what they are, the thresholds, the verdict): checked
# against the manifest's hashes by read_output. The card is prose, not checked.
TRUSTED_FILES = (ADAPTER_FILE, CONFIG_FILE, RECIPE_FILE, REPORT_FILE)
RESUME_AGAIN = "then continue the run with --resume"  # how a refused write of a run proceeds

# Pipeline classes per transformer class, for the model card's loading example when the base was a
# bare transformer (a pipeline folder names its own class in model_index.json).
PIPELINE_FOR_TRANSFORMER: dict[str, str] = with_field("pipeline")  # model.architectures


# -- starting, resuming and finishing a run ----------------------------------------------------


def run_identity(
    model: str | None, revision: str | None, subfolder: str | None, recipe: Recipe, dtype: str | None, config: str | None = None
) -> dict[str, Any]:
    """What makes two invocations the same run (device and progress display do not); `config`, a
    single-file MODEL's diffusers config, only when there is one (earlier runs resume as before)."""
    if model is not None and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())  # ./pipe and /abs/pipe are the same model
    run = {
        "model": model or DEMO_MODEL_NAME,
        "revision": revision,
        "subfolder": subfolder,
        "dtype": dtype,
        "recipe_sha256": hashlib.sha256(recipe.to_yaml().encode()).hexdigest(),
    }
    if config is not None:
        run["config"] = str(Path(config).expanduser().resolve()) if Path(config).expanduser().is_dir() else config
    return run


def check_output(out: str | Path, run: dict[str, Any], overwrite: bool = False, resume: bool = False) -> None:
    """Refuse an `out` the run cannot use, before any slow work; changes nothing on disk.

    A missing or empty `out` is fine (the lock file of this run aside). A non-empty one is refused
    unless `overwrite` (only when everything in it is hla-convert's own: files its manifest lists
    with unchanged content, its work folder, no symlinks) or `resume` (only when it holds the
    unfinished work of the same run, and no file of its outputs that it did not write).
    """
    out = Path(out)
    if overwrite and resume:
        raise OutputError("--overwrite and --resume exclude each other: resume keeps the run, overwrite discards it")
    if out.is_symlink() and not out.exists():
        raise OutputError(f"--out {out} is a dangling symlink")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    try:
        entries = sorted(e for e in os.listdir(out) if e != LOCK_FILE) if out.is_dir() else []
    except OSError as exc:
        raise OutputError(f"--out {out} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if resume:
        saved = read_run_file(out / WORK_DIR)
        if saved is None:
            if (out / WORK_DIR).is_symlink():
                raise OutputError(f"{out / WORK_DIR} is a symlink, not the work folder of a run; nothing to resume")
            if (out / ADAPTER_FILE).is_file() and (out / REPORT_FILE).is_file():
                raise OutputError(f"{out} holds a finished conversion, nothing to resume; use --overwrite to run it again")
            raise OutputError(f"{out} holds no interrupted run to resume ({WORK_DIR}/{RUN_FILE} is missing)")
        diff = [k for k in sorted(set(run) | set(saved)) if run.get(k) != saved.get(k)]
        if diff:
            what = ", ".join("recipe" if k == "recipe_sha256" else f"{k} {_short_repr(saved.get(k))} -> {_short_repr(run.get(k))}" for k in diff)
            raise OutputError(f"{out} holds a different run ({what}); resume it with the same MODEL, recipe and options")
        check_replaceable(out, OUTPUT_FILES, RESUME_AGAIN)  # a file put there while the run was stopped
        return
    if entries:
        if not overwrite:
            raise OutputError(f"--out {out} is not empty; pass --overwrite to replace it or --resume to continue its run")
        foreign = foreign_entries(out)
        if foreign:
            hint = "" if read_manifest(out) is not None else f" (no {MANIFEST_FILE}: not an hla-convert output folder)"
            raise OutputError(
                f"--out {out} holds entries hla-convert did not write: {describe(foreign)}{hint}; "
                "refusing to overwrite it: move them away or choose another folder"
            )


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def start_run(out: str | Path, run: dict[str, Any], overwrite: bool = False, resume: bool = False) -> Path:
    """Check `out` (check_output), clear it for a new run or keep it for a resumed one; returns the
    work folder `out/.hla_work` holding run.json and the training checkpoints.

    Only what hla-convert wrote is deleted (see output_guard); the caller holds `out`'s lock.
    """
    check_output(out, run, overwrite, resume)
    out = Path(out)
    work = out / WORK_DIR
    if resume:
        return work
    if out.is_dir():
        clear_ours(out)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / RUN_FILE, run_file_content(run))
    return work


@dataclass
class SavedRun:
    """What `save_output` wrote."""

    out_dir: Path
    files: list[str]


def save_output(
    out: str | Path,
    model: nn.Module,
    loaded: LoadedModel,
    recipe: Recipe,
    report: dict[str, Any],
    experts: dict[str, tuple[nn.Module, LoadedModel]] | None = None,
) -> SavedRun:
    """Write the adapter, recipe, drift report and model card, and the manifest listing them; then
    drop the work folder.

    Everything is written into the work folder first; the manifest (new hashes, plus the hashes of
    files a killed earlier save left, which are about to be replaced) goes in place before the
    renames, so whatever moment the run is killed at, every output in the folder is listed. The
    work folder goes last, so a run killed while saving is still resumable.

    experts: a two-expert pipeline's further experts, {component: (converted model, its load)};
    `model` is then the first expert (its adapter at the top, theirs in DIR/COMPONENT/).
    """
    out = Path(out)
    staging = out / WORK_DIR / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    pipeline_class = pipeline_class_for(type(model).__name__, loaded)
    extra = {
        "recipe": recipe.name,
        "base_subfolder": loaded.subfolder,
        "pipeline": loaded.pipeline_dir,
        "pipeline_class": pipeline_class,
    }
    if experts:
        extra |= {"expert": loaded.subfolder, "experts": [loaded.subfolder, *experts]}
    if loaded.config is not None:  # a single-file base (base_source: the .safetensors): the config it loads with
        extra["base_config"] = loaded.config
    save_adapter(model, staging, base_source=loaded.source, base_revision=loaded.revision, extra_metadata=extra)
    for name, (net, where) in (experts or {}).items():
        meta = extra | {"expert": name, "base_subfolder": where.subfolder}
        save_adapter(net, staging / name, base_source=where.source, base_revision=where.revision, extra_metadata=meta)
    atomic_write_text(staging / RECIPE_FILE, recipe.to_yaml())
    write_json_atomic(staging / REPORT_FILE, json_safe(report))  # a NaN metric as "nan", as --json writes it
    card = model_card(read_adapter_info(staging), report)
    atomic_write_text(staging / CARD_FILE, card)
    names = sorted(p.name for p in staging.iterdir() if p.is_file() and not p.name.startswith("."))
    names += [f"{sub}/{f}" for sub in (experts or {}) for f in (ADAPTER_FILE, CONFIG_FILE)]
    new = {name: sha256_file(staging / name) for name in names}
    check_replaceable(out, names, RESUME_AGAIN)  # files that appeared in `out` while the run trained
    before = read_manifest(out) or {}
    listed = {name: [new[name]] + [h for h in before.get(name, []) if h != new[name]] for name in names}
    write_manifest(out, listed, staging)
    for name in names:
        (out / name).parent.mkdir(exist_ok=True)
        os.replace(staging / name, out / name)
    write_manifest(out, {name: [new[name]] for name in names}, staging)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return SavedRun(out, [name for name in OUTPUT_FILES if (out / name).is_file()] + [n for n in names if "/" in n])


def experts_of(info: dict[str, Any]) -> list[str]:
    """The experts an output folder holds, from its top-level adapter's metadata: [] for a folder
    converted from a one-transformer model, else the component names (the first at the top)."""
    names = (info.get("extra") or {}).get("experts")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        return []
    bad = [n for n in names[1:] if n not in SUBFOLDERS]
    if bad:
        raise OutputError(f"the adapter's metadata names an expert {_short_repr(bad[0])} that hla-convert never writes")
    return names


def expert_dir(out: Path, info: dict[str, Any], name: str) -> Path:
    """The folder holding expert `name`'s adapter (the top for the first expert)."""
    return out if name == experts_of(info)[0] else out / name


def pipeline_class_for(transformer_class: str, loaded: LoadedModel) -> str | None:
    """The diffusers pipeline class to load the converted transformer into, when one is known."""
    if loaded.is_demo:
        return None  # the demo is a bare transformer in pixel space: no VAE, no text encoder
    if loaded.pipeline_dir and Path(loaded.pipeline_dir).is_dir():
        from ..user_files import read_json_file

        try:
            index = read_json_file(Path(loaded.pipeline_dir) / "model_index.json", "model_index.json")
            name = index.get("_class_name") if isinstance(index, dict) else None
        except ValueError:
            name = None
        if name:
            return name
    return PIPELINE_FOR_TRANSFORMER.get(transformer_class)


__all__ = [
    "CARD_FILE",
    "OutputError",
    "RECIPE_FILE",
    "REPORT_FILE",
    "SavedRun",
    "check_output",
    "expert_dir",
    "experts_of",
    "pipeline_class_for",
    "run_identity",
    "save_output",
    "start_run",
]
