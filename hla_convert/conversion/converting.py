"""convert(): plan (every refusal before the slow load), then run: load -> convert -> calibrate
-> distil -> validate -> save."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.checks import check_arg_types, check_device, check_model_path, folder_arg, hub_notice, note_sampling, shown
from ..model.single_file import is_single_file
from ..recipe import Recipe, RecipeError
from .common import ConversionPlan, ConversionResult, Progress, _bad_recipe, _check_calibration, _check_stage3_model, _Stages, override_recipe, resolve_recipe
from .experts import _run_experts


def plan_conversion(
    model: str | None = None,
    recipe: str | Recipe | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    steps: int | None = None,
    attention: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    causal_block_frames: int | None = None,
    images: str | os.PathLike | None = None,
    config: str | None = None,
) -> ConversionPlan:
    """Refuse everything that can be refused before the (slow) model load; see `convert`."""
    from ..model.loading import parse_dtype
    from ..io.output import run_identity

    check_arg_types(
        model=(model, (str,)), recipe=(recipe, (str, Recipe)), out=(out, (str, os.PathLike)), device=(device, (str,)),
        dtype=(dtype, (str,)), revision=(revision, (str,)), subfolder=(subfolder, (str,)), steps=(steps, (int,)),
        attention=(attention, (str,)), causal_block_frames=(causal_block_frames, (int,)), images=(images, (str, os.PathLike)),
        config=(config, (str,)),
    )
    if out is None:
        raise InputError("--out is missing; give the output folder")
    out = folder_arg("--out", str(out))
    check_model_path(model)
    single = is_single_file(model)
    if config is not None and not single:
        raise InputError(f"--config applies to a single-file MODEL (a .safetensors checkpoint), not to {shown(model or 'the demo model')}")
    rec = resolve_recipe(recipe, model, config)
    if single and config is None:
        config = rec.model.config  # None: resolve_model says that --config is needed
    fields: dict[str, Any] = {} if causal_block_frames is None else {"attention.causal_block_frames": causal_block_frames}
    if images is not None:  # absolute in the saved recipe.yaml, so `validate` finds them from any folder
        fields["calibration.images"] = str(Path(images).expanduser().absolute())
    rec = override_recipe(rec, f"recipe {rec.name}", steps=steps, kind=attention, fields=fields)
    parse_dtype(dtype)
    dev = check_device(device)
    _check_calibration(rec, model)
    _check_stage3_model(rec, model, revision, subfolder)
    run = run_identity(model, revision, subfolder, rec, dtype, config)
    experts = () if single else _experts_of(model, revision, subfolder)
    if experts and rec.stage3.steps > 0:
        # stage 3 samples a trajectory from noise, which runs both experts; each expert trains alone
        raise RecipeError("stage3.steps", "on-policy distillation (stage 3) is not supported on a two-expert pipeline (transformer_2) yet; set stage3.steps: 0")
    return ConversionPlan(model, rec, out, dev, dtype, revision, subfolder, resume, overwrite, run, experts, config)


def _experts_of(model: str | None, revision: str | None, subfolder: str | None) -> tuple[str, ...]:
    """The experts of a two-expert pipeline (Wan2.2 A14B), () otherwise; a MODEL that cannot be
    resolved is left to the load, which says why in its own words."""
    from ..model.experts import expert_names
    from ..model.loading import ModelLoadError

    try:
        return expert_names(model, revision, subfolder)
    except ModelLoadError:
        return ()


def run_conversion(plan: ConversionPlan, progress: Progress | None = None) -> ConversionResult:
    """Load -> convert -> calibrate -> distil -> validate -> save, under OUT's lock.

    Under `accelerate launch` (several processes, hla_convert.stages.parallel) every process runs every
    stage in lockstep, each on its accelerate device (plan.device is not used) and its share of
    each training step; the main process alone takes the lock and writes, the others wait for it.
    `progress` is called in every process (the command line shows the main process's).
    A two-expert pipeline (plan.experts) converts each expert in turn: _run_experts."""
    if plan.experts:
        return _run_experts(plan, progress)
    from ..stages import calibration, distill, drift
    from ..model.loading import load_transformer
    from ..io.output import WORK_DIR, check_output, save_output, start_run
    from ..io.output_guard import output_lock
    from ..stages.parallel import Parallel, main_only
    from ..model.pipeline_loading import load_scheduler
    from ..model.surgery import convert_attention
    from ..stages.onpolicy import check_stage3_scheduler

    par = Parallel.from_environment()
    p, rec, out, dev = plan, plan.recipe, plan.out, plan.device if par is None else par.device
    writer = main_only(par)
    stages = _Stages(progress)
    with output_lock(out) if par is None or par.is_main else contextlib.nullcontext():
        writer(lambda: check_output(out, p.run, p.overwrite, p.resume))  # under the lock: nothing else changes it now
        with stages.stage("load"), hub_notice(p.model):
            # FSDP: the whole model on the host first; each process keeps its shard on the device
            where = "cpu" if par is not None and par.fsdp else dev
            loaded = load_transformer(p.model, revision=p.revision, subfolder=p.subfolder, dtype=p.dtype, device=where, config=p.config)
        net = loaded.transformer
        with stages.stage("convert"):
            config = rec.hla_config()
            convert_attention(net, config, include=rec.attention.include, exclude=rec.attention.exclude)
            _bad_recipe(rec, lambda: distill.check_stage2_parallel(rec, par))  # train: full under FSDP, before sharding
            if par is not None and par.fsdp:
                from ..model.layers import hla_parameters

                units = par.shard_frozen_base(net, list(hla_parameters(net).values()))  # and moves the rest to dev
                par.note(f"FSDP: the frozen base is sharded over {par.count} processes ({units} blocks); HLA / LoRA stay whole")
            _bad_recipe(rec, lambda: distill.check_lora_rank(net, rec))  # before --overwrite clears anything
            scheduler = load_scheduler(loaded)  # stage 3's sampler and the drift check's
            _bad_recipe(rec, lambda: check_stage3_scheduler(rec, scheduler is not None))
        work = writer(lambda: start_run(out, p.run, p.overwrite, p.resume)) or out / WORK_DIR
        with stages.stage("calibrate"):
            inputs = calibration.build_input_sets(
                net, rec, pipeline_dir=loaded.pipeline_dir, device=dev, dtype=net.dtype, progress=stages.step
            )
            train, heldout = inputs["train"], inputs["heldout"]
        with stages.stage("distil"):
            trained = distill.distil(
                net, train, rec, work_dir=work, resume=p.resume, progress=stages.step, parallel=par, scheduler=scheduler
            )
        with stages.stage("validate"):
            report = drift.measure_drift(net, heldout, rec, scheduler=scheduler, progress=stages.step).to_dict()
            note_sampling(report, rec, scheduler, "MODEL is a bare transformer: no pipeline scheduler to sample with")
        report["training"] = {k: trained[k] for k in ("stage1", "selection", "stage2", "stage3")}
        if par is not None:
            report["training"]["parallel"] = {"processes": par.count, "fsdp": par.fsdp}
        with stages.stage("save"), par.full_weights(net) if par is not None else contextlib.nullcontext():
            saved = writer(lambda: save_output(out, net, loaded, rec, report))
            files = saved.files if par is None else par.share_object(saved.files if saved is not None else None)
    if par is not None:
        par.finish()  # every process is done: the process group ends here, not at interpreter exit
    return ConversionResult(
        out_dir=out.absolute(),
        recipe=rec.name,
        resumed=p.resume,
        report=report,
        passed=bool(report.get("passed")),
        files=files,
        seconds=stages.seconds,
        model={"source": loaded.source, "revision": loaded.revision, "class": type(net).__name__, "demo": loaded.is_demo},
        device=str(dev),
        dtype=str(net.dtype).removeprefix("torch."),
        attention=config.to_dict(),
    )


def convert(
    model: str | None = None,
    recipe: str | Recipe | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    steps: int | None = None,
    attention: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    causal_block_frames: int | None = None,
    images: str | os.PathLike | None = None,
    config: str | None = None,
) -> ConversionResult:
    """Convert MODEL's self-attention to HLA, distil it, measure the drift, save the adapter in `out`.

    model: Hub ID or diffusers folder (pipeline or bare transformer), or a single-file checkpoint
    (one .safetensors in the family's original layout, e.g. Wan-AI's); None = the embedded demo.
    config: a single-file model's diffusers config, a local pipeline or transformer folder or a
    Hub ID in the local cache (default: the recipe's model.config); recorded in the adapter.
    recipe: a Recipe, a built-in name or a YAML path; None = the built-in recipe made for MODEL.
    steps: stage-1 steps (stages 2 and 3 scaled in proportion); attention: override the attention kind.
    causal_block_frames: override the recipe's attention.causal_block_frames (SkyReels-V2
    diffusion forcing: latent frames per causal block, set on the model before calibration).
    images: a folder of png / jpg images conditioning an image-to-video pipeline's calibration
    trajectories (recipe field calibration.images; default: the recipe's, null = synthetic images).
    device: default cuda when available, else cpu; dtype: "float32", "bf16", ... (default: the
    checkpoint's). resume continues the interrupted run in `out`; overwrite replaces the
    hla-convert output there (never other files). progress(ProgressEvent) is called at each
    stage's start and end and at the engine's steps.

    Returns the result whether or not the drift is within the recipe's thresholds: check `passed`.
    """
    plan = plan_conversion(
        model, recipe, out, device, dtype, revision, subfolder, steps, attention, resume, overwrite, causal_block_frames, images, config
    )
    return run_conversion(plan, progress)
