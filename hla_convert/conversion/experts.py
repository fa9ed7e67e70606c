"""A two-expert pipeline (Wan2.2 A14B: transformer and transformer_2, switched at boundary_ratio):
converting and validating each expert in turn, and the whole-pipeline sampling check."""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..io.checks import hub_notice, shown
from ..recipe import Recipe
from .common import ConversionPlan, ConversionResult, Progress, ValidationPlan, ValidationResult, _bad_recipe, _Stages


def _run_experts(plan: ConversionPlan, progress: Progress | None) -> ConversionResult:
    """A two-expert pipeline (model.experts): load both, record both experts' teacher inputs in one
    pass of trajectories (each expert's calibration = the inputs the pipeline served it), then
    distil and measure each expert in turn with only it on the device (the others wait on the CPU;
    training state in .hla_work/EXPERT, so a killed run resumes into the expert it was on), then the
    whole-pipeline sampling check with all of them, and one save (io.output: one adapter per expert)."""
    from ..stages import calibration, distill, drift
    from ..stages.calibration_sources import load_pipeline
    from ..stages.experts import experts_report, pipeline_check
    from ..stages.parallel import Parallel
    from ..model.experts import boundary_timestep, load_experts
    from ..io.output import check_output, save_output, start_run
    from ..io.output_guard import output_lock
    from ..model.surgery import convert_attention

    if Parallel.from_environment() is not None:
        raise InputError("a two-expert pipeline (transformer_2) converts in one process for now; run it without accelerate launch")
    p, rec, out, dev = plan, plan.recipe, plan.out, plan.device
    stages = _Stages(progress)
    with output_lock(out):
        check_output(out, p.run, p.overwrite, p.resume)
        with stages.stage("load"), hub_notice(p.model):
            loaded = load_experts(p.model, revision=p.revision, dtype=p.dtype, device="cpu")  # each goes to the device in turn
            pipeline_dir = loaded[p.experts[0]].pipeline_dir
            boundary = boundary_timestep(pipeline_dir, p.revision)
        nets = {name: one.transformer for name, one in loaded.items()}
        with stages.stage("convert"):
            config = rec.hla_config()
            for net in nets.values():
                convert_attention(net, config, include=rec.attention.include, exclude=rec.attention.exclude)
                _bad_recipe(rec, lambda net=net: distill.check_lora_rank(net, rec))
        work = start_run(out, p.run, p.overwrite, p.resume)
        dtype = nets[p.experts[0]].dtype
        with stages.stage("calibrate"):
            for net in nets.values():  # the teacher trajectories run the whole pipeline
                net.to(dev)
            inputs = calibration.build_expert_input_sets(nets, rec, boundary, pipeline_dir, device=dev, dtype=dtype, progress=stages.step)
            for net in nets.values():
                net.to("cpu")
        reports: dict[str, dict[str, Any]] = {}
        training: dict[str, dict[str, Any]] = {}
        for name, net in nets.items():
            net.to(dev)
            with stages.stage("distil"):
                trained = distill.distil(net, inputs[name]["train"], rec, work_dir=work / name, resume=p.resume, progress=stages.step)
                training[name] = {k: trained[k] for k in ("stage1", "selection", "stage2")}
            with stages.stage("validate"):
                reports[name] = drift.measure_drift(net, inputs[name]["heldout"], rec, progress=stages.step).to_dict()
                reports[name]["training"] = training[name]
            net.to("cpu")
        with stages.stage("validate"):
            check = _pipeline_check(nets, pipeline_dir, rec, dev, load_pipeline, pipeline_check)
            report = experts_report(reports, check, rec, boundary)
        report["training"] = training
        with stages.stage("save"):
            first, rest = p.experts[0], p.experts[1:]
            saved = save_output(out, nets[first], loaded[first], rec, report, experts={n: (nets[n], loaded[n]) for n in rest})
    return ConversionResult(
        out_dir=out.absolute(),
        recipe=rec.name,
        resumed=p.resume,
        report=report,
        passed=bool(report.get("passed")),
        files=saved.files,
        seconds=stages.seconds,
        model={"source": loaded[first].source, "revision": loaded[first].revision, "class": type(nets[first]).__name__, "demo": False, "experts": list(p.experts)},
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        attention=config.to_dict(),
    )


def _pipeline_check(nets: dict[str, Any], pipeline_dir: str, rec: Recipe, dev: str, load_pipeline: Any, pipeline_check: Any) -> dict[str, Any] | None:
    """The whole-pipeline sampling check (stages.experts.pipeline_check) with every expert on the device."""
    names = list(nets)
    for net in nets.values():
        net.to(dev)
    try:
        pipe = load_pipeline(nets[names[0]], pipeline_dir, dev, **{n: nets[n] for n in names[1:]})
        return pipeline_check(pipe, nets, rec)
    finally:
        for net in nets.values():
            net.to("cpu")


def _validate_experts(plan: ValidationPlan, progress: Progress | None) -> ValidationResult:
    """validate on a two-expert folder: each expert's drift on the held-out inputs it serves (one
    pass of trajectories records them all) and the whole-pipeline check, as _run_experts measured them."""
    from ..stages import calibration, drift
    from ..stages.calibration_sources import load_pipeline
    from ..stages.experts import experts_report, pipeline_check
    from ..io.adapter import load_adapter
    from ..io.output import expert_dir, experts_of
    from ..model.experts import boundary_timestep, load_experts

    p, rec, dev = plan, plan.recipe, plan.device
    names = experts_of(p.info)
    stages = _Stages(progress)
    with stages.stage("load"), hub_notice(p.source):
        if p.source is None:
            raise InputError("--base: a two-expert conversion needs its pipeline (folder or Hub ID)")
        loaded = load_experts(p.source, revision=p.revision, dtype=p.dtype, device="cpu")
        if list(loaded) != names:
            raise InputError(f"--base {shown(p.source)}: its experts {', '.join(loaded)} are not the folder's {', '.join(names)}")
        nets = {name: load_adapter(loaded[name].transformer, expert_dir(p.out, p.info, name)) for name in names}
        pipeline_dir = loaded[names[0]].pipeline_dir
        boundary = boundary_timestep(pipeline_dir, p.revision)
    dtype = nets[names[0]].dtype
    with stages.stage("calibrate"):
        for net in nets.values():
            net.to(dev)
        inputs = calibration.build_expert_input_sets(nets, rec, boundary, pipeline_dir, device=dev, dtype=dtype, progress=stages.step, splits=("heldout",))
        for net in nets.values():
            net.to("cpu")
    reports = {}
    with stages.stage("validate"):
        for name, net in nets.items():
            net.to(dev)
            reports[name] = drift.measure_drift(net, inputs[name]["heldout"], rec, progress=stages.step).to_dict()
            net.to("cpu")
        check = _pipeline_check(nets, pipeline_dir, rec, dev, load_pipeline, pipeline_check)
        report = experts_report(reports, check, rec, boundary)
    return p.result(report, stages.seconds, dev)
