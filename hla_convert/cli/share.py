"""The commands that look at and share a conversion: `sample` and `push` (registered on the
`hla-convert` app by cli.register_share_commands); `convert --sample` uses sample_into."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..io.checks import check_device as _check_device
from ..io.checks import check_model_path as _check_model_path
from ..io.checks import folder_arg as _folder_arg
from ..io.checks import hub_notice as _hub_notice
from ..io.checks import shown
from .checks import EXIT_BAD_INPUT, CommandFailed
from .display import stdout_console as _stdout
from .options import EXIT_CODES_HELP as _EXIT_CODES_HELP
from .options import ConfigOpt, DeviceOpt, DirRevisionOpt, HubDirArg, JsonOpt
from .run import command as _command


SAMPLE_EPILOG = (
    "Examples:\n\n  hla-convert sample demo-hla --seed 3\n\n"
    '  hla-convert sample wan-hla --prompt "a red fox runs across a snowy meadow" --steps 30 --out fox.mp4\n\n'
    "  hla-convert sample my-org/wan-hla --base ./Wan2.1-T2V-1.3B-Diffusers --inputs embeds.safetensors\n\n" + _EXIT_CODES_HELP
)


def sample(
    directory: HubDirArg,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Load the base model from here (Hub ID, folder, or a single-file .safetensors with --config) instead of "
            "the one the adapter records. A diffusers pipeline runs whole (text encoder, scheduler, VAE); a bare "
            "transformer cannot be sampled (the demo aside).",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="The pipeline's prompt. Default: \"a red fox runs across a snowy meadow\" (sampling.DEFAULT_PROMPT). The demo draws its own from --seed.", show_default=False),
    ] = None,
    inputs: Annotated[
        str | None,
        typer.Option(
            "--inputs",
            help="A safetensors file of named tensors (not JSON). With a pipeline: prompt_embeds (instead of --prompt), "
            "negative_prompt_embeds, latents (the starting noise). With the demo: its transformer's forward inputs, "
            "hidden_states [1, 3, F, H, W] setting the size, encoder_hidden_states the conditioning.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the noise (and of the demo's prompt).")] = 0,
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, max=1000, help="Scheduler steps. Default: the recipe's validation.sampling_steps.", show_default=False),
    ] = None,
    teacher_steps: Annotated[
        int,
        typer.Option(
            "--teacher-steps",
            min=0,
            max=1000,
            help="Run the first K of the student's steps with the teacher (the base model), the rest converted: the "
            "layout is decided early, so a few softmax steps buy much of the video's fidelity (K of N steps cost K/N "
            "of the softmax time). Python: hla_convert.teacher_steps(pipe, K).",
        ),
    ] = 0,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="The side-by-side video: .mp4 (H.264) or .gif (on request); a name without a suffix gets .mp4. The "
            "contact sheet goes beside it as .png. Default: DIR/sample.mp4 (listed in DIR's manifest and linked from "
            "its model card); for a Hub ID, NAME-sample.mp4 here.",
            show_default=False,
        ),
    ] = None,
    revision: DirRevisionOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Sample the base model and the conversion from the same noise, side by side.

    Writes a video (teacher | student) and a PNG contact sheet (rows teacher, student; per-frame
    PSNR under each column). The teacher is the base model (the same weights with the softmax
    attention and no LoRA), the student the conversion. With a pipeline both go through the whole
    pipeline from the same seeded generator, decoded by its VAE, at the recipe's calibration size.
    """
    with _command("sample", json_out) as doc:
        from ..io.sampling import SampleError, read_inputs_file

        if prompt is not None and inputs is not None:
            raise CommandFailed("give --prompt or --inputs, not both", EXIT_BAD_INPUT)
        folder = _folder_arg("DIR", directory)
        _check_model_path(base, "--base")
        dev = _check_device(device)
        try:
            with _hub_notice(directory):
                from ..io.hub import is_hub_id, resolve_output_dir

                local = resolve_output_dir(folder, revision)
            if out is None and is_hub_id(directory):
                out = f"{str(directory).rsplit('/', 1)[-1]}-sample"
            extra = read_inputs_file(inputs) if inputs is not None else None
            result, video = sample_into(
                local, out, base=base, inputs=extra, seed=seed, steps=steps, device=dev, prompt=prompt, config=config, teacher_steps=teacher_steps
            )
        except SampleError as exc:
            raise CommandFailed(str(exc), EXIT_BAD_INPUT) from None
        doc.update(out_dir=str(local.absolute()), device=str(dev), **result.summary())
        if not json_out:
            con = _stdout()
            psnr = ", ".join("identical" if p >= 200 else f"{p:.1f}" for p in result.psnr_db)
            what = f", {result.pipeline}" if result.pipeline else ""
            mixed = f" (first {teacher_steps} steps by the teacher)" if teacher_steps else ""
            con.print(f"teacher | student{mixed}{what}, {result.steps} steps, seed {seed}" + (f", prompt \"{result.prompt}\"" if result.prompt else ""))
            con.print(f"per-frame PSNR dB: {psnr}")
            con.print(f"saved {video} and {video.with_suffix('.png')}")


def sample_into(directory: Path, out: str | None, **kwargs: Any) -> tuple[Any, Path]:
    """Sample a conversion and write the video and contact sheet: into `directory` (listed in its
    manifest, linked from its card) when `out` is None or inside it, else at `out`. `out` without
    a suffix gets the default one. Raises SampleError."""
    from ..atomic_files import atomic_write_bytes
    from ..io.converted import read_output
    from ..io.output_guard import check_replaceable, output_lock
    from ..io.sample_media import SAMPLE_AGAIN, check_video_folder, sample_names
    from ..io.sampling import SampleError, add_to_output, check_video_path, default_video_suffix, encode_outputs, sample_side_by_side

    try:
        if out is not None and Path(out).suffix == "" and not Path(out).is_dir():
            out = out + default_video_suffix()
        video = check_video_path(_folder_arg("--out", out) if out is not None else directory / f"sample{default_video_suffix()}")
        is_folder = video.is_dir()
    except OSError as exc:  # a name too long for the file system: bad input, not a failed run
        raise SampleError(f"--out {shown(out)} is not a usable path ({exc.strerror or type(exc).__name__})") from None
    if is_folder:
        raise SampleError(f"--out {str(video)!r} is a folder; give a file name ending in .mp4 or .gif")
    check_video_folder(video)
    into_folder = video.parent.resolve() == directory.resolve()
    if into_folder:  # before the (slow) sampling; add_to_output checks again under the lock
        check_replaceable(directory, sample_names(video), SAMPLE_AGAIN)
    with _hub_notice(kwargs.get("base")):
        result = sample_side_by_side(directory, **kwargs)
    files = encode_outputs(result, video)
    if into_folder:
        info, _, report = read_output(directory)
        with output_lock(directory):
            add_to_output(directory, info, report, files, result)
    else:
        try:
            for path, data in files.items():
                atomic_write_bytes(path, data)
        except OSError as exc:  # the folder went away or filled up while sampling: bad --out, not a failed run
            raise SampleError(f"--out {str(video)!r} cannot be written ({exc.strerror or type(exc).__name__})") from None
    result.files = {"video": str(video), "contact_sheet": str(video.with_suffix(".png"))}
    return result, video


PUSH_EPILOG = (
    "Examples:\n\n  hla-convert push demo-hla --repo-id my-org/demo-wan-hla\n\n"
    "  hla-convert push wan-hla --repo-id my-org/wan-hla --private --revision v1\n\n" + _EXIT_CODES_HELP
)


def push(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="An output folder written by `hla-convert convert`.", show_default=False)],
    repo_id: Annotated[str, typer.Option("--repo-id", help="The Hub repository to publish to (ORG/NAME); created when missing.", show_default=False)] = ...,  # type: ignore[assignment]
    private: Annotated[bool, typer.Option("--private", help="Create the repository private (an existing one keeps its visibility).")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to commit to, created from main when missing. Default: main.", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Publish even though the drift report did not pass.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Publish a conversion to the Hugging Face Hub.

    Uploads the adapter, hla_config.json, recipe.yaml, drift_report.json, the sample media (sample.*)
    and the model card (README.md, whose "<this folder>" becomes ORG/NAME) with huggingface_hub
    (create_repo, upload_folder; log in first with `hf auth login` or set HF_TOKEN). A conversion whose
    drift check failed is refused unless --force; the card's front matter is checked before anything
    is sent. Then `load_converted("ORG/NAME")` and `hla-convert validate ORG/NAME` load it.
    """
    with _command("push", json_out) as doc:
        from ..io.push import push_output

        folder = _folder_arg("DIR", directory)
        with _hub_notice(repo_id):
            result = push_output(folder, repo_id, private=private, revision=revision, force=force)
        doc.update(
            out_dir=str(folder.absolute()), repo_id=result.repo_id, url=result.url, commit=result.commit,
            commit_url=result.commit_url, revision=result.revision, files=result.files,
        )  # fmt: skip
        if not json_out:
            _stdout().print(f"pushed {len(result.files)} files to {result.url} ({', '.join(result.files)})")
            _stdout().print(f"commit {result.commit_url}")



def check_sampleable(model: str | None, revision: str | None, subfolder: str | None, config: str | None = None) -> None:
    """convert --sample needs what `sample` needs: the demo, or a pipeline (refused before the run);
    a single-file MODEL has one when its --config is a pipeline."""
    from ..model.loading import resolve_model

    with _hub_notice(model):
        ref = resolve_model(model, revision, subfolder, config)
    if not ref.is_demo and not ref.pipeline_dir:
        raise CommandFailed(f"--sample: MODEL {ref.path!r} is a bare transformer (no text encoder, no VAE); give its pipeline, or leave --sample out", EXIT_BAD_INPUT)


def register(app: typer.Typer) -> None:
    """Add `sample` and `push` to the app (after the commands defined in cli, in --help's order)."""
    app.command(epilog=SAMPLE_EPILOG)(sample)
    app.command(epilog=PUSH_EPILOG)(push)


__all__ = ["check_sampleable", "push", "register", "sample", "sample_into"]
