"""The output folder of a conversion: what `hla-convert convert` writes, `validate` and
`load_converted` read.

    DIR/
      adapter_model.safetensors  the HLA weights + metadata (hla_convert.adapter)
      hla_config.json            the same metadata, readable
      recipe.yaml                the recipe exactly as run (command-line overrides applied)
      drift_report.json          held-out drift, thresholds, pass/fail, training summary
      README.md                  the model card
      .hla_work/                 only while a run is unfinished: run.json + training checkpoints

`.hla_work/` exists from the start of a run until its outputs are saved, then it is removed: a
folder that still has one is a run that was interrupted (or failed) and that `--resume` continues.
`run.json` there records what the run is (model, recipe text, dtype), so that `--resume` never
continues a different run.

Every file is written atomically (temporary file, then rename), so a killed run leaves whole files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .adapter import ADAPTER_FILE, CONFIG_FILE, load_adapter, read_adapter_info, save_adapter
from .checkpoints import atomic_write_text, write_json_atomic

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "drift_report.json"
CARD_FILE = "README.md"
WORK_DIR = ".hla_work"
RUN_FILE = "run.json"
OUTPUT_FILES = (ADAPTER_FILE, CONFIG_FILE, RECIPE_FILE, REPORT_FILE, CARD_FILE)

# Pipeline classes per transformer class, for the model card's loading example when the base was a
# bare transformer (a pipeline folder names its own class in model_index.json).
PIPELINE_FOR_TRANSFORMER = {
    "WanTransformer3DModel": "WanPipeline",
    "WanVACETransformer3DModel": "WanVACEPipeline",
    "SkyReelsV2Transformer3DModel": "SkyReelsV2Pipeline",
    "CogVideoXTransformer3DModel": "CogVideoXPipeline",
    "HunyuanVideoTransformer3DModel": "HunyuanVideoPipeline",
    "LTXVideoTransformer3DModel": "LTXPipeline",
    "MochiTransformer3DModel": "MochiPipeline",
    "AllegroTransformer3DModel": "AllegroPipeline",
    "LatteTransformer3DModel": "LattePipeline",
    "EasyAnimateTransformer3DModel": "EasyAnimatePipeline",
}


class OutputError(ValueError):
    """An output folder that cannot be used as asked; the message is one line saying why."""


# -- starting, resuming and finishing a run ----------------------------------------------------


def run_identity(model: str, revision: str | None, subfolder: str | None, recipe_yaml: str, dtype: str | None) -> dict[str, Any]:
    """What makes two invocations the same run (device and progress display do not)."""
    return {
        "model": model,
        "revision": revision,
        "subfolder": subfolder,
        "dtype": dtype,
        "recipe_sha256": hashlib.sha256(recipe_yaml.encode()).hexdigest(),
    }


def _ours(entry: Path) -> bool:
    name = entry.name
    return name in OUTPUT_FILES or name == WORK_DIR or (name.startswith(".") and name.endswith(".tmp"))


def prepare_output(out: str | Path, run: dict[str, Any], overwrite: bool = False, resume: bool = False) -> Path:
    """Make `out` ready for the run and return its work folder (`out/.hla_work`).

    A missing or empty `out` is created. A non-empty one is refused unless `overwrite` (only when
    everything in it is an hla-convert output: the tool never deletes files it did not write) or
    `resume` (only when it holds the unfinished work of the same run).
    """
    out = Path(out)
    work = out / WORK_DIR
    if overwrite and resume:
        raise OutputError("--overwrite and --resume exclude each other: resume keeps the run, overwrite discards it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if resume:
        saved = _read_run(work)
        if saved is None:
            if (out / ADAPTER_FILE).is_file() and (out / REPORT_FILE).is_file():
                raise OutputError(f"{out} holds a finished conversion, nothing to resume; use --overwrite to run it again")
            raise OutputError(f"{out} holds no interrupted run to resume ({WORK_DIR}/{RUN_FILE} is missing)")
        diff = [k for k in sorted(set(run) | set(saved)) if run.get(k) != saved.get(k)]
        if diff:
            what = ", ".join(f"{k} {saved.get(k)!r} -> {run.get(k)!r}" if k != "recipe_sha256" else "recipe" for k in diff)
            raise OutputError(f"{out} holds a different run ({what} differ); resume it with the same MODEL, recipe and options")
        return work
    if entries:
        if not overwrite:
            raise OutputError(f"--out {out} is not empty; pass --overwrite to replace it or --resume to continue its run")
        foreign = [e.name for e in entries if not _ours(e)]
        if foreign:
            raise OutputError(
                f"--out {out} holds files hla-convert did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); refusing to overwrite it, choose another folder"
            )
        for e in entries:
            shutil.rmtree(e) if e.is_dir() else e.unlink()
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / RUN_FILE, run)
    return work


def _read_run(work: Path) -> dict[str, Any] | None:
    try:
        return json.loads((work / RUN_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise OutputError(f"{work / RUN_FILE} is unreadable ({exc}); start the run again with --overwrite") from None


@dataclass
class SavedRun:
    """What `save_output` wrote."""

    out_dir: Path
    files: list[str]


def save_output(
    out: str | Path,
    model: nn.Module,
    *,
    base_source: str,
    base_revision: str | None,
    base_subfolder: str | None,
    base_class: str,
    pipeline_class: str | None,
    recipe_name: str,
    recipe_yaml: str,
    report: dict[str, Any],
    keep_work: bool = False,
) -> SavedRun:
    """Write the adapter, recipe, drift report and model card; then drop the work folder.

    The work folder goes last, so a run killed while saving is still resumable.
    """
    out = Path(out)
    extra = {"recipe": recipe_name, "base_subfolder": base_subfolder, "pipeline_class": pipeline_class}
    save_adapter(model, out, base_source=base_source, base_revision=base_revision, extra_metadata=extra)
    atomic_write_text(out / RECIPE_FILE, recipe_yaml)
    write_json_atomic(out / REPORT_FILE, report)
    card = model_card(
        base_source=base_source,
        base_revision=base_revision,
        base_class=base_class,
        pipeline_class=pipeline_class,
        recipe_name=recipe_name,
        config=read_adapter_info(out)["config"],
        report=report,
    )
    atomic_write_text(out / CARD_FILE, card)
    if not keep_work:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return SavedRun(out, [name for name in OUTPUT_FILES if (out / name).is_file()])


def pipeline_class_for(transformer_class: str, pipeline_dir: str | None) -> str | None:
    """The diffusers pipeline class to load the converted transformer into, when one is known."""
    if pipeline_dir:
        index = Path(pipeline_dir) / "model_index.json"
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError):
            name = None
        if name:
            return name
    return PIPELINE_FOR_TRANSFORMER.get(transformer_class)


# -- reading a finished output folder --------------------------------------------------------


def read_output(out: str | Path) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """(adapter metadata, recipe.yaml path, saved drift report) of a finished output folder."""
    out = Path(out)
    if not out.is_dir():
        raise OutputError(f"{out} is not a folder")
    info = read_adapter_info(out)
    recipe = out / RECIPE_FILE
    if not recipe.is_file():
        raise OutputError(f"{out} has no {RECIPE_FILE}: not a folder written by hla-convert convert")
    try:
        report = json.loads((out / REPORT_FILE).read_text())
    except FileNotFoundError:
        report = {}
    except (OSError, ValueError) as exc:
        raise OutputError(f"{out / REPORT_FILE} is unreadable ({exc})") from None
    return info, recipe, report


def base_of(info: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(MODEL argument for load_transformer, revision, subfolder) of the base an adapter records.

    The demo's recorded name maps to None (the embedded model).
    """
    from .loading import resolve_source

    extra = info.get("extra") or {}
    return resolve_source(info.get("base_source") or ""), info.get("base_revision"), extra.get("base_subfolder")


def load_converted(
    out_dir: str | Path,
    base: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> nn.Module:
    """The converted transformer of an output folder, ready for a diffusers pipeline.

    base: where to load the base model from (Hub ID or folder); None = the one the adapter records.
    Its weights must match the recorded fingerprint.

        pipe = WanPipeline.from_pretrained(base, transformer=load_converted("wan-hla"))
    """
    from .loading import ModelLoadError, load_transformer

    info = read_adapter_info(out_dir)
    source, revision, subfolder = base_of(info)
    if base is not None:
        source, revision, subfolder = base, None, None
    elif source == "":
        raise ModelLoadError(f"{out_dir} does not record its base model; pass base=")
    loaded = load_transformer(source, revision=revision, subfolder=subfolder, dtype=dtype, device=device)
    model = load_adapter(loaded.transformer, out_dir)
    if device is not None:
        model.to(device)
    return model.eval()


# -- the model card --------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hla-convert")
    except PackageNotFoundError:
        return "(source checkout)"


def drift_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, value, threshold, verdict) rows of a drift report, for tables."""
    metrics = report.get("metrics") or {}
    thresholds = report.get("thresholds") or {}
    rows = []
    for name in metrics:
        value = metrics[name]
        limit = thresholds.get(name)
        if limit is None:
            verdict = ""
        else:
            verdict = "pass" if value is not None and value <= limit else "FAIL"
        rows.append((name, _fmt(value), _fmt(limit) if limit is not None else "-", verdict))
    return rows


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def model_card(
    *,
    base_source: str,
    base_revision: str | None,
    base_class: str,
    pipeline_class: str | None,
    recipe_name: str,
    config: dict[str, Any],
    report: dict[str, Any],
) -> str:
    version = _version()
    passed = report.get("passed")
    verdict = "passed" if passed else "FAILED" if passed is not None else "not checked"
    rev = f" (revision `{base_revision}`)" if base_revision else ""
    table = ["| metric | value | threshold | |", "|---|---|---|---|"]
    table += [f"| {m} | {v} | {t} | {ok} |" for m, v, t, ok in drift_rows(report)]
    cfg = ", ".join(f"{k}={v}" for k, v in config.items())
    lines = [
        "---",
        f"base_model: {base_source}",
        "library_name: diffusers",
        "tags: [hla-convert, hadamard-linear-attention, linear-attention, video-diffusion]",
        "---",
        "",
        f"# {base_source} with Hadamard Linear Attention",
        "",
        f"The self-attention of `{base_source}`{rev} ({base_class}) converted to HLA by "
        f"hla-convert {version} and distilled with the recipe `{recipe_name}` (in `{RECIPE_FILE}`).",
        "",
        f"Attention: {cfg}.",
        "",
        f"## Output drift on held-out inputs: {verdict}",
        "",
        *table,
        "",
        f"The full report is in `{REPORT_FILE}`; `hla-convert validate <this folder>` measures it again.",
        "",
        "## Use it",
        "",
        "```python",
        "from hla_convert import load_converted",
        "",
        'transformer = load_converted("<this folder>")   # loads the base, converts it, loads the HLA weights',
    ]
    if pipeline_class:
        lines += [
            f"from diffusers import {pipeline_class}",
            "",
            f'pipe = {pipeline_class}.from_pretrained("{base_source}", transformer=transformer)',
        ]
    lines += [
        "```",
        "",
        "`load_converted(folder, base=None, device=None, dtype=None)`: pass `base=` when the base model "
        "lives elsewhere now; its weights must match the fingerprint in `hla_config.json`.",
        "",
        "## Files",
        "",
        f"- `{ADAPTER_FILE}`: the HLA parameters only (safetensors, metadata in the header)",
        f"- `{CONFIG_FILE}`: the adapter metadata (base model, base fingerprint, HLAConfig, converted modules)",
        f"- `{RECIPE_FILE}`: the recipe as run",
        f"- `{REPORT_FILE}`: drift metrics, thresholds and the training summary",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "OutputError",
    "SavedRun",
    "load_converted",
    "model_card",
    "pipeline_class_for",
    "prepare_output",
    "read_output",
    "run_identity",
    "save_output",
]
