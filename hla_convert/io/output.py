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

from .adapter import ADAPTER_FILE, CONFIG_FILE, load_adapter, read_adapter_info, save_adapter
from ..atomic_files import atomic_write_text, write_json_atomic
from ..json_docs import json_safe, same_json
from .checks import shown
from ..model.architectures import with_field
from ..model.loading import DEMO_MODEL_NAME, LoadedModel
from .output_guard import (
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
    lock_holder,
    read_manifest,
    read_run_file,
    run_file_content,
    sha256_file,
    verify_files,
    write_manifest,
)
from ..recipe import Recipe

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "drift_report.json"
CARD_FILE = "README.md"
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


# -- reading a finished output folder --------------------------------------------------------


def read_output(out: str | Path, require_manifest: bool = False) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """(adapter metadata, recipe.yaml path, saved drift report) of a finished output folder.

    A folder whose run is unfinished (its work folder is still there: killed in training or while
    saving) points to `--resume`; an hla_config.json that disagrees with the adapter's own metadata
    (types included: true is not 1) is refused, since it is what people read to know what the
    adapter is; so is a JSON file with a duplicate key. The adapter, hla_config.json, recipe.yaml
    and drift_report.json must have the sha256 the folder's manifest lists (output_guard.verify_files;
    a folder without a manifest is not checked unless `require_manifest`).
    """
    out = Path(out)
    try:
        is_dir, exists = out.is_dir(), out.exists()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise OutputError(f"{_short_repr(str(out))} is not a usable path ({getattr(exc, 'strerror', None) or exc})") from None
    if not is_dir:
        raise OutputError(f"{out} is not a folder" if exists else f"{out} does not exist")
    holder = lock_holder(out)
    if holder is not None:
        raise OutputError(f"{out} is being written by a running hla-convert ({holder}); validate it once that run has finished")
    if (out / WORK_DIR).is_dir() and not (out / WORK_DIR).is_symlink():
        raise OutputError(
            f"{out} holds an unfinished conversion (its {WORK_DIR} folder is still there: the run was stopped "
            f"before its save completed); finish it with `hla-convert convert ... --out {out} --resume`"
        )
    info = read_adapter_info(out)
    _check_config_file(out, info)
    recipe = out / RECIPE_FILE
    if not recipe.is_file():
        raise OutputError(f"{out} has no {RECIPE_FILE}: not a folder written by hla-convert convert")
    report = _read_json_file(out / REPORT_FILE, missing={})
    table = report.get("table", []) if isinstance(report, dict) else None
    if not isinstance(table, list) or not all(isinstance(r, dict) and "metric" in r and "value" in r for r in table):
        raise OutputError(f"{out / REPORT_FILE} is not a drift report written by hla-convert")
    verify_files(out, TRUSTED_FILES, require_manifest)
    for name in experts_of(info)[1:]:
        sub = out / name
        if not (sub / ADAPTER_FILE).is_file():
            raise OutputError(f"{out} is a two-expert conversion without {name}/{ADAPTER_FILE}; the folder is incomplete (run the conversion again)")
        _check_config_file(sub, read_adapter_info(sub))
        verify_files(out, (f"{name}/{ADAPTER_FILE}", f"{name}/{CONFIG_FILE}"), require_manifest)
    return info, recipe, report


def _read_json_file(path: Path, missing: Any = None) -> Any:
    from ..user_files import MAX_JSON_BYTES, read_json_file

    if not (path.exists() or path.is_symlink()):
        return missing
    return read_json_file(path, str(path), MAX_JSON_BYTES, OutputError)


def _check_config_file(out: Path, header: dict[str, Any]) -> None:
    """hla_config.json must say what the adapter's header (`header`: read_adapter_info's metadata,
    authoritative) says, as JSON: same keys, same values of the same types (true is not 1)."""
    config = _read_json_file(out / CONFIG_FILE)
    if config is None:
        raise OutputError(f"{out} has no {CONFIG_FILE}; the folder is incomplete (run the conversion again)")
    if not isinstance(config, dict):
        raise OutputError(f"{out / CONFIG_FILE} is not the adapter's metadata (a JSON object)")
    differ = sorted(k for k in set(config) | set(header) if k not in config or k not in header or not same_json(config[k], header[k]))
    if differ:
        raise OutputError(
            f"{out / CONFIG_FILE} disagrees with the metadata in {ADAPTER_FILE} ({', '.join(differ[:4])}); "
            "it was edited or belongs to another adapter: restore it or run the conversion again"
        )


def base_of(info: dict[str, Any], base: str | None = None, config: str | None = None) -> tuple[str | None, str | None, str | None, str | None]:
    """(MODEL argument for load_transformer, revision, subfolder, config) of the base an adapter
    records, checked as a MODEL argument is (checks.check_recorded_base: the metadata may have been
    edited); or of `base` (--base) when given. config: a single-file base's diffusers config
    (extra.base_config); `config` (--config) replaces the recorded one.

    The demo's recorded name maps to None (the embedded model).
    """
    from ..model.loading import resolve_source
    from ..model.single_file import is_single_file
    from .checks import check_recorded_base

    extra = info.get("extra") or {}
    recorded_config = extra.get("base_config")
    if base is not None:
        return base, None, None, (config or recorded_config) if is_single_file(base) else config
    source, revision, subfolder = resolve_source(info.get("base_source") or ""), info.get("base_revision"), extra.get("base_subfolder")
    check_recorded_base(info, source, revision, subfolder, recorded_config)
    return source, revision, subfolder, config or recorded_config


def load_converted(
    out_dir: str | Path,
    base: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    expert: str | None = None,
    config: str | None = None,
) -> nn.Module | Any:
    """The converted transformer of an output folder, or of a conversion pushed to the Hub
    (`out_dir` "ORG/NAME", at `revision`; through the local Hugging Face cache, so HF_HUB_OFFLINE
    works once it is cached), ready for a diffusers pipeline.

    base: where to load the base model from (Hub ID or folder); None = the one the adapter records.
    Its weights must match the recorded fingerprint. config: the diffusers config of a single-file
    base (a .safetensors; default: the one recorded at conversion). LoRA weights in the adapter
    (stage 2 `train: lora`) come back as enabled peft adapters, trained base weights (`train:
    full`) in place of the base's (kept on the host); set_attention_mode(model, "teacher") gives
    the base model again.

        pipe = WanPipeline.from_pretrained(base, transformer=load_converted("wan-hla"))

    A two-expert conversion (Wan2.2 A14B; the layout in this module's docstring) gives the whole
    diffusers pipeline with every expert converted (`pipe.transformer`, `pipe.transformer_2`);
    base, when given, must then be the pipeline. expert="transformer_2" (or "transformer") gives
    that expert's converted transformer alone; `expert` on a one-transformer folder is an OutputError.
    """
    from .checks import check_arg_types, check_device, check_model_path
    from .hub import resolve_output_dir
    from ..model.loading import load_transformer

    check_arg_types(
        dir=(out_dir, (str, os.PathLike)), base=(base, (str,)), device=(device, (str,)), dtype=(dtype, (str,)), revision=(revision, (str,)),
        config=(config, (str,)),
    )
    if device is not None:
        check_device(device)  # before the load: a missing GPU is an InputError, not an AssertionError after it
    check_model_path(base, "--base")
    check_arg_types(expert=(expert, (str,)))
    out_dir = resolve_output_dir(out_dir, revision)
    info = read_adapter_info(out_dir)
    experts = experts_of(info)
    if expert is not None and expert not in (experts or [None]):
        held = f"the experts {', '.join(experts)}" if experts else "one transformer (leave expert out)"
        raise OutputError(f"expert {_short_repr(expert)}: {out_dir} holds {held}")
    if experts and expert is None:
        return _load_expert_pipeline(out_dir, info, experts, base, device, dtype)
    where = expert_dir(out_dir, info, expert) if expert else out_dir
    if where != out_dir:
        info = read_adapter_info(where)
    source, revision, subfolder, config = base_of(info, base, config)
    if base is not None and expert:
        subfolder = expert
    loaded = load_transformer(source, revision=revision, subfolder=subfolder, dtype=dtype, device=device, config=config)
    model = load_adapter(loaded.transformer, where)
    if device is not None:
        model.to(device)
    return model.eval()


def _load_expert_pipeline(out: Path, info: dict[str, Any], experts: list[str], base: str | None, device: str | None, dtype: str | None) -> Any:
    """The diffusers pipeline of a two-expert conversion with every expert converted (load_converted)."""
    import diffusers

    from ..errors import first_line
    from ..model.loading import ModelLoadError, quiet_loading, resolve_model

    source, revision, _, _ = base_of(info, base)
    pipeline = resolve_model(source, revision).pipeline_dir
    if not pipeline:
        raise OutputError(f"{out} is a two-expert conversion and {shown(source)} is not its pipeline; pass a pipeline as base, or expert= one of {', '.join(experts)}")
    models = {name: load_converted(out, base=pipeline if base is not None else None, device=device, dtype=dtype, expert=name) for name in experts}
    try:
        cls = getattr(diffusers, diffusers.DiffusionPipeline.load_config(pipeline, **({"revision": revision} if revision else {}))["_class_name"])
        with quiet_loading():
            pipe = cls.from_pretrained(pipeline, torch_dtype=models[experts[0]].dtype, **models, **({"revision": revision} if revision else {}))
    except Exception as exc:  # noqa: BLE001 - many ways a folder is not a loadable pipeline
        raise ModelLoadError(f"cannot load the diffusers pipeline {pipeline!r}: {first_line(exc)}") from None
    if device is not None:
        pipe.to(device)
    return pipe


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


def pipeline_tag_for(pipeline_class: str | None) -> str:
    """The Hub's pipeline_tag of a video pipeline class (text-to-video unless its name says otherwise)."""
    name = pipeline_class or ""
    if "ImageToVideo" in name or "I2V" in name:
        return "image-to-video"
    if "VideoToVideo" in name or "V2V" in name:
        return "video-to-video"
    return "text-to-video"


def model_card(info: dict[str, Any], report: dict[str, Any]) -> str:
    """README.md of an output folder: base model, recipe, drift table, how to load it."""
    from .checks import looks_like_hub_id

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
    # The Hub's model-card metadata (checked offline by hub.check_card before a push): base_model
    # only when the base is a Hub ID (the Hub links it and lists this repo as its adapter).
    front = ["---", "library_name: diffusers", f"pipeline_tag: {pipeline_tag_for(pipeline_class)}"]
    if looks_like_hub_id(base) and not base.startswith("hla-convert/"):
        front += [f"base_model: {base}", "base_model_relation: adapter"]
    front += ["tags: [hla-convert, hadamard-linear-attention, linear-attention, video-diffusion]", "---"]
    use = [
        "```python",
        "from hla_convert import load_converted",
        "",
        "# loads the base model, converts its attention, loads the HLA (and LoRA) weights",
        'transformer = load_converted("<this folder>")',
    ]
    if pipeline_class:
        source = f'"{pipeline}"' if pipeline else f'"<a {pipeline_class} folder or Hub ID>"'
        use[1:1] = [f"from diffusers import {pipeline_class}"]
        use += [f"pipe = {pipeline_class}.from_pretrained({source}, transformer=transformer)"]
    elif info.get("base_source") == DEMO_MODEL_NAME:
        use += [
            "# the demo model is a bare pixel-space transformer (no VAE, no text encoder):",
            "# call it as in hla_convert.stages.demo_data.flow_matching_inputs",
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
        f"Attention: {cfg}. Converted modules: {len(info.get('modules') or [])}."
        + (
            f" LoRA (rank {info['lora'].get('rank')}, {len(info['lora'].get('modules') or [])} projections) trained in"
            " stage 2 and saved under `lora.` keys; the teacher is the base with them disabled."
            if isinstance(info.get("lora"), dict)
            else f" The weights of {len(info['full'].get('blocks') or [])} blocks trained in stage 2 (`train: full`) and saved"
            " whole under `full.` keys; the teacher is the base with its original weights."
            if isinstance(info.get("full"), dict)
            else ""
        ),
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
        "`load_converted(folder or Hub ID, base=None, device=None, dtype=None, revision=None)`: pass `base=` when the base model "
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
    "expert_dir",
    "experts_of",
    "load_converted",
    "model_card",
    "pipeline_class_for",
    "check_output",
    "read_output",
    "run_identity",
    "save_output",
    "start_run",
]
