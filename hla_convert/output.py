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
from .loading import DEMO_MODEL_NAME, LoadedModel
from .recipes import Recipe

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


def run_identity(model: str | None, revision: str | None, subfolder: str | None, recipe: Recipe, dtype: str | None) -> dict[str, Any]:
    """What makes two invocations the same run (device and progress display do not)."""
    if model is not None and Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())  # ./pipe and /abs/pipe are the same model
    return {
        "model": model or DEMO_MODEL_NAME,
        "revision": revision,
        "subfolder": subfolder,
        "dtype": dtype,
        "recipe_sha256": hashlib.sha256(recipe.to_yaml().encode()).hexdigest(),
    }


def _ours(entry: Path) -> bool:
    name = entry.name
    return name in OUTPUT_FILES or name == WORK_DIR or (name.startswith(".") and name.endswith(".tmp"))


def check_output(out: str | Path, run: dict[str, Any], overwrite: bool = False, resume: bool = False) -> None:
    """Refuse an `out` the run cannot use, before any slow work; changes nothing on disk.

    A missing or empty `out` is fine. A non-empty one is refused unless `overwrite` (only when
    everything in it is an hla-convert output: the tool never deletes files it did not write) or
    `resume` (only when it holds the unfinished work of the same run).
    """
    out = Path(out)
    if overwrite and resume:
        raise OutputError("--overwrite and --resume exclude each other: resume keeps the run, overwrite discards it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if resume:
        saved = _read_run(out / WORK_DIR)
        if saved is None:
            if (out / ADAPTER_FILE).is_file() and (out / REPORT_FILE).is_file():
                raise OutputError(f"{out} holds a finished conversion, nothing to resume; use --overwrite to run it again")
            raise OutputError(f"{out} holds no interrupted run to resume ({WORK_DIR}/{RUN_FILE} is missing)")
        diff = [k for k in sorted(set(run) | set(saved)) if run.get(k) != saved.get(k)]
        if diff:
            what = ", ".join("recipe" if k == "recipe_sha256" else f"{k} {saved.get(k)!r} -> {run.get(k)!r}" for k in diff)
            raise OutputError(f"{out} holds a different run ({what}); resume it with the same MODEL, recipe and options")
        return
    if entries:
        if not overwrite:
            raise OutputError(f"--out {out} is not empty; pass --overwrite to replace it or --resume to continue its run")
        foreign = [e.name for e in entries if not _ours(e)]
        if foreign:
            raise OutputError(
                f"--out {out} holds files hla-convert did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); refusing to overwrite it, choose another folder"
            )


def start_run(out: str | Path, run: dict[str, Any], overwrite: bool = False, resume: bool = False) -> Path:
    """Check `out` (check_output), clear it for a new run or keep it for a resumed one; returns the
    work folder `out/.hla_work` holding run.json and the training checkpoints."""
    check_output(out, run, overwrite, resume)
    out = Path(out)
    work = out / WORK_DIR
    if resume:
        return work
    for entry in sorted(out.iterdir()) if out.is_dir() else []:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
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


def save_output(out: str | Path, model: nn.Module, loaded: LoadedModel, recipe: Recipe, report: dict[str, Any]) -> SavedRun:
    """Write the adapter, recipe, drift report and model card; then drop the work folder.

    The work folder goes last, so a run killed while saving is still resumable.
    """
    out = Path(out)
    pipeline_class = pipeline_class_for(type(model).__name__, loaded)
    extra = {
        "recipe": recipe.name,
        "base_subfolder": loaded.subfolder,
        "pipeline": loaded.pipeline_dir,
        "pipeline_class": pipeline_class,
    }
    save_adapter(model, out, base_source=loaded.source, base_revision=loaded.revision, extra_metadata=extra)
    atomic_write_text(out / RECIPE_FILE, recipe.to_yaml())
    write_json_atomic(out / REPORT_FILE, report)
    card = model_card(read_adapter_info(out), report)
    atomic_write_text(out / CARD_FILE, card)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return SavedRun(out, [name for name in OUTPUT_FILES if (out / name).is_file()])


def pipeline_class_for(transformer_class: str, loaded: LoadedModel) -> str | None:
    """The diffusers pipeline class to load the converted transformer into, when one is known."""
    if loaded.is_demo:
        return None  # the demo is a bare transformer in pixel space: no VAE, no text encoder
    if loaded.pipeline_dir and Path(loaded.pipeline_dir).is_dir():
        try:
            name = json.loads((Path(loaded.pipeline_dir) / "model_index.json").read_text()).get("_class_name")
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
    if not (out / ADAPTER_FILE).is_file() and (out / WORK_DIR / RUN_FILE).is_file():
        raise OutputError(f"{out} holds an unfinished conversion; finish it with `hla-convert convert ... --out {out} --resume`")
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


def drift_rows(report: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(metric, value, threshold, verdict) rows of a drift report's table, formatted for display."""
    rows = []
    for row in (report or {}).get("table") or []:
        ok, limit = row.get("ok"), row.get("threshold")
        verdict = "" if ok is None else "pass" if ok else "FAIL"
        rows.append((str(row["metric"]), _fmt(row["value"]), "-" if limit is None else _fmt(limit), verdict))
    return rows


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def model_card(info: dict[str, Any], report: dict[str, Any]) -> str:
    """README.md of an output folder: base model, recipe, drift table, how to load it."""
    extra = info.get("extra") or {}
    base = info.get("base_source") or "the base model"
    revision = info.get("base_revision")
    pipeline_class, pipeline = extra.get("pipeline_class"), extra.get("pipeline")
    recipe_name = extra.get("recipe", "?")
    passed = report.get("passed")
    verdict = "passed" if passed else "FAILED" if passed is not None else "not checked"
    table = ["| metric | value | threshold | |", "|---|---|---|---|"]
    table += [f"| {m} | {v} | {t} | {ok} |" for m, v, t, ok in drift_rows(report)]
    failures = [f"- {f}" for f in report.get("failures") or []]
    cfg = ", ".join(f"{k}={v}" for k, v in (info.get("config") or {}).items())
    front = ["---", "library_name: diffusers"]
    if "/" in base and not Path(base).is_absolute() and not base.startswith("hla-convert/"):
        front.append(f"base_model: {base}")  # a Hub ID, which the Hub links to
    front += ["tags: [hla-convert, hadamard-linear-attention, linear-attention, video-diffusion]", "---"]
    use = [
        "```python",
        "from hla_convert import load_converted",
        "",
        "# loads the base model, converts its attention, loads the HLA weights",
        'transformer = load_converted("<this folder>")',
    ]
    if pipeline_class:
        source = f'"{pipeline}"' if pipeline else f'"<a {pipeline_class} folder or Hub ID>"'
        use[1:1] = [f"from diffusers import {pipeline_class}"]
        use += [f"pipe = {pipeline_class}.from_pretrained({source}, transformer=transformer)"]
    elif info.get("base_source") == DEMO_MODEL_NAME:
        use += [
            "# the demo model is a bare pixel-space transformer (no VAE, no text encoder):",
            "# call it as in hla_convert.demo_data.flow_matching_inputs",
        ]
    use += ["```"]
    lines = [
        *front,
        "",
        f"# {base} with Hadamard Linear Attention",
        "",
        f"The self-attention of `{base}`{f' (revision `{revision}`)' if revision else ''} "
        f"({info.get('base_class', 'transformer')}) converted to HLA by hla-convert {_version()} and "
        f"distilled with the recipe `{recipe_name}` (in `{RECIPE_FILE}`).",
        "",
        f"Attention: {cfg}. Converted modules: {len(info.get('modules') or [])}.",
        "",
        f"## Output drift on held-out inputs: {verdict}",
        "",
        *table,
        *([""] + failures if failures else []),
        "",
        f"The full report is in `{REPORT_FILE}`; `hla-convert validate <this folder>` measures it again.",
        "",
        "## Use it",
        "",
        *use,
        "",
        "`load_converted(folder, base=None, device=None, dtype=None)`: pass `base=` when the base model "
        f"lives elsewhere now; its weights must match the fingerprint in `{CONFIG_FILE}`.",
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
    "check_output",
    "read_output",
    "run_identity",
    "save_output",
    "start_run",
]
