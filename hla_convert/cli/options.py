"""The options and arguments the `hla-convert` commands share (Typer annotations), and the exit
codes' help text."""

from __future__ import annotations

from typing import Annotated

import typer

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 drift over the recipe's thresholds; 2 bad input (usage, recipe, model, "
    "--out, adapter); 3 the run failed (training diverged, or the model could not run); 130 interrupted "
    "(--resume continues from the last checkpoint)."
)

ModelArg = Annotated[
    str | None,
    typer.Argument(
        metavar="[MODEL]",
        help="Hub ID (owner/name) or local diffusers folder: a full pipeline or a bare transformer; or a single-file "
        "checkpoint (one .safetensors in the original layout, e.g. Wan-AI's) with --config. "
        "Left out: the embedded demo model (a tiny Wan transformer).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there (progress and errors stay on stderr).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="torch device, e.g. cuda, cuda:1, cpu. Default: cuda when available, else cpu.", show_default=False)]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="Weights dtype: float32, bfloat16 (bf16) or float16 (fp16). Default: the checkpoint's own.", show_default=False),
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) of MODEL.", show_default=False)]
SubfolderOpt = Annotated[
    str | None,
    typer.Option("--subfolder", help="Subfolder of MODEL holding the transformer (found by itself for pipelines).", show_default=False),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="The diffusers config of a single-file MODEL / --base (.safetensors): a local pipeline or transformer "
        "folder, or a Hub ID in the local cache; a pipeline's also gives its scheduler. Default: the recipe's "
        "model.config (convert), the one recorded at conversion (validate, sample).",
        show_default=False,
    ),
]
HubDirArg = Annotated[
    str,
    typer.Argument(
        metavar="DIR",
        help="An output folder written by `hla-convert convert`, or a conversion pushed to the Hub (ORG/NAME; read "
        "through the local Hugging Face cache, so HF_HUB_OFFLINE=1 works once it is cached).",
        show_default=False,
    ),
]
DirRevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) of DIR when it is a Hub ID. Default: main.", show_default=False)
]


__all__ = [
    "ConfigOpt",
    "DeviceOpt",
    "DirRevisionOpt",
    "DtypeOpt",
    "EXIT_CODES_HELP",
    "HubDirArg",
    "JsonOpt",
    "ModelArg",
    "RevisionOpt",
    "SubfolderOpt",
]
