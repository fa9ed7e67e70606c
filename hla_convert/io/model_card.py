"""The model card (README.md) of a conversion's output folder: what was converted, how, the drift
table and how to load it; `hla-convert sample` adds its section (io.sample_media)."""

from __future__ import annotations

from typing import Any

from .adapter import ADAPTER_FILE, CONFIG_FILE
from .output_guard import RECIPE_FILE, REPORT_FILE
from ..model.loading import DEMO_MODEL_NAME

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
        use += [
            f"pipe = {pipeline_class}.from_pretrained({source}, transformer=transformer)",
            "",
            "# optional: the base model runs the first k sampling steps, where the layout is decided",
            "# (closer to the base model's video, at the softmax cost of k of the steps)",
            "# import hla_convert; with hla_convert.teacher_steps(pipe, 4): video = pipe(prompt).frames[0]",
        ]
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


__all__ = ["drift_rows", "model_card", "pipeline_tag_for"]
