"""Reading a finished output folder: `read_output` (its adapter metadata, report and manifest,
checked), `base_of` (the base it was made for) and `load_converted` (base + adapter, ready to use;
the whole pipeline for a two-expert conversion). The folder's layout: io.output's docstring."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..json_docs import same_json
from .adapter import ADAPTER_FILE, CONFIG_FILE, load_adapter, read_adapter_info
from .checks import shown
from .output import TRUSTED_FILES, _short_repr, expert_dir, experts_of
from .output_guard import RECIPE_FILE, REPORT_FILE, WORK_DIR, OutputError, lock_holder, verify_files

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


__all__ = ["base_of", "load_converted", "read_output"]
