"""Drift of the converted model from the original, on held-out inputs, against the recipe's thresholds.

Metrics (all from one copy of the weights, switching attention modes):

- attention: per converted layer, relative L2 ||hla - softmax|| / ||softmax|| of the layer's
  output, pooled over all held-out inputs, in mode "both" (each layer sees the teacher's inputs,
  so this is the layer's own error, not accumulated drift).
- output: the denoiser output of the student ("student" mode) against the teacher's (the output
  of the same "both" forward, which is exactly the "teacher" mode output: in "both" the teacher's
  attention flows on). With LoRA adapters in the model (or base weights trained by `train: full`),
  "both" runs the adapted projections, so the teacher gets its own "teacher" forward (adapters
  disabled, original weights swapped in: the base model); the attention
  errors are then those of the HLA core on the adapted model's q/k/v. Per sample: relative L2
  and cosine similarity of the flattened outputs; reported as means per noise-level bucket
  (t = timestep / 1000 split into validation.timestep_buckets equal ranges) and over all samples.
- sampling (when a scheduler is given and validation.sampling_steps > 0): the first held-out
  batch's conditioning, the same seeded noise, `sampling_steps` scheduler steps in teacher and in
  student mode; the final latents are compared by relative L2 and PSNR. PSNR is
  10 log10(R^2 / MSE) with R = the teacher's final latent range (max - min): for the demo's
  pixel-space latents in [-1, 1] that is the usual peak-to-peak 2; for VAE latents it is the
  nearest analogue. Identical latents report 200 dB; a NaN or infinite output reports NaN.
  With validation.teacher_steps = k > 0, a third run from the same noise has its first k steps by
  the teacher (model.teacher_steps, the sampling-time lever; at most sampling_steps - 1) and is
  reported beside it, unchecked.

Thresholds come from recipe.validation (null = not checked); a NaN or infinite metric fails its
threshold (`within`), in the table's "ok" as in `failures`. `check_thresholds` re-checks a saved
report against any validation spec (the CLI's `validate`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import noise_levels
from ..json_docs import number
from ..model.layers import hla_layers
from ..model.modes import attention_mode, forward, set_attention_mode, streamed_pairs, teacher_needs_own_forward
from ..recipe import Recipe, ValidationSpec
from .selection import LayerErrors

Progress = Callable[[str, int, int, dict[str, Any]], None]
PSNR_IDENTICAL = 200.0
_FORMAT = 1


@dataclass
class DriftReport:
    """What measure_drift found. `to_dict()` is the JSON of drift_report.json."""

    attention: dict[str, float] = field(default_factory=dict)  # layer -> relative L2
    buckets: list[dict[str, Any]] = field(default_factory=list)  # t_min, t_max, samples, rel_l2, cosine
    output_rel_l2: float = 0.0
    output_cosine: float = 1.0
    sampling: dict[str, Any] | None = None  # steps, samples, rel_l2, psnr_db, peak[, teacher_steps: {steps, rel_l2, psnr_db}]
    heldout_samples: int = 0
    kind: str = ""
    thresholds: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def attention_mean(self) -> float:
        return sum(self.attention.values()) / len(self.attention) if self.attention else 0.0

    @property
    def attention_max(self) -> float:
        """The largest layer error; NaN when any layer's is (max() would skip a NaN after the first)."""
        values = list(self.attention.values())
        return math.nan if any(math.isnan(x) for x in values) else max(values, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "passed": self.passed,
            "failures": list(self.failures),
            "kind": self.kind,
            "heldout_samples": self.heldout_samples,
            "attention": {"per_layer": dict(self.attention), "mean": self.attention_mean, "max": self.attention_max},
            "output": {"rel_l2": self.output_rel_l2, "cosine": self.output_cosine, "buckets": [dict(b) for b in self.buckets]},
            "sampling": dict(self.sampling) if self.sampling is not None else None,
            "thresholds": dict(self.thresholds),
            "table": self.summary_rows(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DriftReport":
        try:
            att, out = data["attention"], data["output"]
            sampling = dict(data["sampling"]) if data.get("sampling") else None
            if sampling is not None:
                sampling.update({k: number(sampling[k]) for k in ("rel_l2", "psnr_db")})
                if isinstance(sampling.get("teacher_steps"), dict):
                    ts = dict(sampling["teacher_steps"])
                    sampling["teacher_steps"] = {**ts, **{k: number(ts[k]) for k in ("rel_l2", "psnr_db")}}
            return cls(
                attention={k: number(v) for k, v in att["per_layer"].items()},
                buckets=[{**b, "rel_l2": number(b["rel_l2"]), "cosine": number(b["cosine"])} for b in out["buckets"]],
                output_rel_l2=number(out["rel_l2"]),
                output_cosine=number(out["cosine"]),
                sampling=sampling,
                heldout_samples=int(data.get("heldout_samples", 0)),
                kind=str(data.get("kind", "")),
                thresholds=dict(data.get("thresholds", {})),
                failures=list(data.get("failures", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a drift report: {e!r} missing or malformed") from None

    def summary_rows(self) -> list[dict[str, Any]]:
        """Rows for a table: {"metric", "value", "threshold", "ok"} (threshold/ok None when unchecked)."""
        t = self.thresholds
        rows: list[dict[str, Any]] = []

        def row(metric: str, value: float, key: str, higher_is_better: bool) -> None:
            thr = t.get(key)
            ok = None if thr is None else within(value, thr, higher_is_better)
            rows.append({"metric": metric, "value": value, "threshold": thr, "ok": ok})

        if self.attention:
            row("attention rel L2 (max over layers)", self.attention_max, "max_attention_rel_l2", False)
            rows.append({"metric": "attention rel L2 (mean over layers)", "value": self.attention_mean, "threshold": None, "ok": None})
        for b in self.buckets:
            span = f"t {b['t_min']:.2f}-{b['t_max']:.2f}"
            row(f"output rel L2, {span}", b["rel_l2"], "max_output_rel_l2", False)
            row(f"output cosine, {span}", b["cosine"], "min_output_cosine", True)
        if self.sampling is not None:
            row(f"final latent rel L2 ({self.sampling['steps']} steps)", self.sampling["rel_l2"], "max_latent_rel_l2", False)
            row(f"final latent PSNR dB ({self.sampling['steps']} steps)", self.sampling["psnr_db"], "min_latent_psnr", True)
            ts = self.sampling.get("teacher_steps")
            if isinstance(ts, dict):
                metric = f"final latent PSNR dB, first {ts['steps']} of {self.sampling['steps']} steps by the teacher"
                rows.append({"metric": metric, "value": ts["psnr_db"], "threshold": None, "ok": None})
        return rows


def within(value: float, threshold: float, higher_is_better: bool) -> bool:
    """Does a metric meet its threshold? A NaN or infinite metric never does: `nan > thr` is False,
    so a plain comparison would let a diverged model pass."""
    return math.isfinite(value) and (value >= threshold if higher_is_better else value <= threshold)


def psnr_db(mse: float, peak: float) -> float:
    """10 log10(peak^2 / mse), capped at PSNR_IDENTICAL (also for mse 0); NaN when mse is not finite
    (a NaN output is not "identical")."""
    if not math.isfinite(mse):
        return math.nan
    if mse == 0:
        return PSNR_IDENTICAL
    return min(PSNR_IDENTICAL, 10 * math.log10(max(peak, 1e-12) ** 2 / mse))


def _spec_dict(spec: ValidationSpec | dict[str, Any] | None) -> dict[str, Any]:
    if spec is None:
        return {}
    if dataclasses.is_dataclass(spec):
        return dataclasses.asdict(spec)
    return dict(spec)


def check_thresholds(report: dict[str, Any] | DriftReport, validation: ValidationSpec | dict[str, Any]) -> list[str]:
    """Human-readable failures of a drift report (dict or DriftReport) against a validation spec."""
    r = report if isinstance(report, DriftReport) else DriftReport.from_dict(report)
    v = _spec_dict(validation)
    fails: list[str] = []
    thr = v.get("max_attention_rel_l2")
    if thr is not None:
        bad = sorted(((x, n) for n, x in r.attention.items() if not within(x, thr, False)), key=_worst_first)
        if bad:
            worst = ", ".join(f"{n} {x:.4f}" for x, n in bad[:5]) + (f", ... ({len(bad)} layers)" if len(bad) > 5 else "")
            fails.append(f"attention rel L2 above {thr} (validation.max_attention_rel_l2) in {len(bad)} layer(s): {worst}")
    for b in r.buckets:
        span = f"t in [{b['t_min']:.2f}, {b['t_max']:.2f}]"
        thr = v.get("max_output_rel_l2")
        if thr is not None and not within(b["rel_l2"], thr, False):
            fails.append(f"output rel L2 {b['rel_l2']:.4f} > {thr} (validation.max_output_rel_l2) for {span}, {b['samples']} samples")
        thr = v.get("min_output_cosine")
        if thr is not None and not within(b["cosine"], thr, True):
            fails.append(f"output cosine {b['cosine']:.4f} < {thr} (validation.min_output_cosine) for {span}, {b['samples']} samples")
    s = r.sampling
    if s is not None:
        thr = v.get("max_latent_rel_l2")
        if thr is not None and not within(s["rel_l2"], thr, False):
            fails.append(f"final latent rel L2 {s['rel_l2']:.4f} > {thr} (validation.max_latent_rel_l2) after {s['steps']} sampling steps")
        thr = v.get("min_latent_psnr")
        if thr is not None and not within(s["psnr_db"], thr, True):
            fails.append(f"final latent PSNR {s['psnr_db']:.2f} dB < {thr} dB (validation.min_latent_psnr) after {s['steps']} sampling steps")
    return fails


def _worst_first(pair: tuple[float, str]) -> tuple[bool, float, str]:
    """Sort key of (error, layer): NaN errors first, then the largest."""
    x, name = pair
    return (not math.isnan(x), -x if not math.isnan(x) else 0.0, name)


def _per_sample(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative L2 and cosine per sample [B] of flattened outputs."""
    s, t = student.detach().float().flatten(1), teacher.detach().float().flatten(1)
    rel = (s - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=1, eps=1e-12)
    return rel.cpu(), cos.cpu()


def noise_shape(model: nn.Module, hidden_states: torch.Tensor) -> tuple[int, ...]:
    """The shape of the latent a sampling run denoises for these hidden_states: all of them, or for
    an image-to-video model (in_channels > out_channels, [B, C, F, H, W]: the conditioning channels
    follow the noisy latent, Wan I2V's 16 + 4 mask + 16 image latent) the first out_channels."""
    cfg = model.config
    c_in, c_out = getattr(cfg, "in_channels", None), getattr(cfg, "out_channels", None)
    hs = hidden_states
    if isinstance(c_in, int) and isinstance(c_out, int) and c_out < c_in == hs.shape[1] and hs.dim() == 5:
        return (hs.shape[0], c_out, *hs.shape[2:])
    return tuple(hs.shape)


def sampling_noise(model: nn.Module, hidden_states: torch.Tensor, seed: int, batch: int = 0) -> torch.Tensor:
    """The seeded noise the sampling check starts from (float32, noise_shape, on hidden_states' device)
    for calibration seed `seed`; batch = n for the n-th held-out batch (the check samples batch 0;
    benchmarks sample more with the same stream)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 99 + batch)
    return torch.randn(noise_shape(model, hidden_states), generator=g, dtype=torch.float32).to(hidden_states.device)


def sampler_points(
    model: nn.Module, item: dict[str, Any], scheduler: Any, steps: int, noise: torch.Tensor, teacher_steps: int = 0
) -> Iterator[tuple[torch.Tensor, dict[str, Any] | None]]:
    """A plain scheduler loop from `noise` with one input dict's conditioning (no guidance), one
    step at a time. Yields (latents, point) before each of the `steps` steps: the latents x_i
    [B, C, F, H, W] (float32, as the scheduler keeps them) and the model's input there (the item
    with hidden_states = the scaled latents in the item's dtype, timestep [B] = the scheduler's t);
    then (final latents, None). Each step runs the model (no_grad) in whatever mode it is in, so
    stopping after k points leaves the trajectory at step k (stages.onpolicy trains there).
    teacher_steps = k > 0: the first k steps run in teacher mode and the rest in student mode (the
    sampling-time lever of model.teacher_steps); the model is left in student mode.

    Image-to-video: `noise` has the latent's channels (noise_shape) and each step's input is it
    followed by the item's conditioning channels, as WanImageToVideoPipeline concatenates them. A
    per-token timestep [B, N] (Wan2.2 TI2V) is t on every token: the text-to-video mode of its
    WanPipeline (the clean first frame of image conditioning is not in an input dict)."""
    sched = copy.deepcopy(scheduler)  # the scheduler keeps a step index: every run starts afresh
    sched.set_timesteps(steps)
    latents = noise * getattr(sched, "init_noise_sigma", 1.0)
    given = item.get("timestep")
    t_dtype = given.dtype if isinstance(given, torch.Tensor) else torch.float32
    hs = item["hidden_states"]
    condition = hs[:, noise.shape[1] :] if hs.dim() == 5 and noise.shape[1] < hs.shape[1] else None
    b = latents.shape[0]
    for i, t in enumerate(sched.timesteps):
        model_in = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        model_in = model_in.to(hs.dtype)
        if condition is not None:
            model_in = torch.cat([model_in, condition], dim=1)
        ts = t.to(device=latents.device, dtype=t_dtype).expand(b)
        if isinstance(given, torch.Tensor) and given.dim() == 2:
            ts = ts[:, None].expand(b, given.shape[1])
        point = {**item, "hidden_states": model_in, "timestep": ts}
        yield latents, point
        if teacher_steps > 0:
            set_attention_mode(model, "teacher" if i < teacher_steps else "student")
        with torch.no_grad():
            out = forward(model, point)
            latents = sched.step(out.float(), t, latents, return_dict=False)[0]
    if teacher_steps > 0:
        set_attention_mode(model, "student")
    yield latents, None


@torch.no_grad()
def sample_latents(model: nn.Module, item: dict[str, Any], scheduler: Any, steps: int, noise: torch.Tensor, teacher_steps: int = 0) -> torch.Tensor:
    """The final latents of `sampler_points`' whole loop (float32 as the scheduler keeps them);
    teacher_steps: the first k steps by the teacher (sampler_points)."""
    *_, (latents, _) = sampler_points(model, item, scheduler, steps, noise, teacher_steps)
    return latents


def measure_drift(
    model: nn.Module,
    heldout_inputs: Sequence[dict[str, Any]],
    recipe: Recipe,
    scheduler: Any = None,
    progress: Progress | None = None,
) -> DriftReport:
    """Drift of the converted model on held-out inputs; see the module docstring for the metrics."""
    val = recipe.validation
    n_buckets = val.timestep_buckets
    errors = LayerErrors()
    rels: list[torch.Tensor] = []
    coss: list[torch.Tensor] = []
    levels: list[torch.Tensor] = []
    with_sampling = scheduler is not None and val.sampling_steps > 0 and bool(heldout_inputs)
    k_teacher = min(val.teacher_steps, val.sampling_steps - 1)  # a step must stay converted
    runs = ("teacher", "student") + (("teacher_steps",) if k_teacher > 0 else ())
    total = len(heldout_inputs) + (len(runs) if with_sampling else 0)

    layers = hla_layers(model)
    with attention_mode(model), torch.no_grad():
        for name, layer in layers.items():
            if layer.config.kind == "softmax":  # identity conversion: no student, zero drift
                errors.err2[name], errors.ref2[name] = 0.0, 1.0
        adapted = teacher_needs_own_forward(model)  # LoRA or train: full: "both" is not the base
        for i, item in enumerate(heldout_inputs):
            set_attention_mode(model, "both")
            with streamed_pairs(model, errors):
                teacher = forward(model, item)
            if adapted:
                set_attention_mode(model, "teacher")
                teacher = forward(model, item)
            set_attention_mode(model, "student")
            student = forward(model, item)
            rel, cos = _per_sample(student, teacher)
            rels.append(rel)
            coss.append(cos)
            levels.append(noise_levels(item))
            if progress:
                progress("drift", i + 1, total, {})
        sampling = None
        if with_sampling:
            item = heldout_inputs[0]
            hs = item["hidden_states"]
            noise = sampling_noise(model, hs, recipe.calibration.seed)
            finals = {}
            for j, run in enumerate(runs):
                set_attention_mode(model, "student" if run == "teacher_steps" else run)
                k = k_teacher if run == "teacher_steps" else 0
                finals[run] = sample_latents(model, item, scheduler, val.sampling_steps, noise, teacher_steps=k).float()
                if progress:
                    progress("drift", len(heldout_inputs) + j + 1, total, {"sampling": run})
            t, s = finals["teacher"], finals["student"]
            peak = float(t.max() - t.min())
            sampling = {
                "steps": val.sampling_steps,
                "samples": int(hs.shape[0]),
                "rel_l2": float((s - t).norm() / t.norm().clamp_min(1e-12)),
                "psnr_db": psnr_db(float((s - t).pow(2).mean()), peak),
                "peak": peak,
                "scheduler": type(scheduler).__name__,
            }
            if "teacher_steps" in finals:  # the same noise, the first k steps by the teacher
                m = finals["teacher_steps"]
                sampling["teacher_steps"] = {
                    "steps": k_teacher,
                    "rel_l2": float((m - t).norm() / t.norm().clamp_min(1e-12)),
                    "psnr_db": psnr_db(float((m - t).pow(2).mean()), peak),
                }
    rel_all = torch.cat(rels) if rels else torch.zeros(0)
    cos_all = torch.cat(coss) if coss else torch.zeros(0)
    lev_all = torch.cat(levels) if levels else torch.zeros(0)
    buckets = []
    index = (lev_all * n_buckets).long().clamp(0, n_buckets - 1)
    for k in range(n_buckets):
        sel = index == k
        if not bool(sel.any()):
            continue
        buckets.append(
            {
                "t_min": k / n_buckets,
                "t_max": (k + 1) / n_buckets,
                "samples": int(sel.sum()),
                "rel_l2": float(rel_all[sel].mean()),
                "cosine": float(cos_all[sel].mean()),
            }
        )
    report = DriftReport(
        attention=errors.rel_l2(),
        buckets=buckets,
        output_rel_l2=float(rel_all.mean()) if rel_all.numel() else 0.0,
        output_cosine=float(cos_all.mean()) if cos_all.numel() else 1.0,
        sampling=sampling,
        heldout_samples=int(rel_all.numel()),
        kind=recipe.hla_config().kind,
        thresholds={k: v for k, v in dataclasses.asdict(val).items()},
    )
    report.failures = check_thresholds(report, val)
    return report


__all__ = ["DriftReport", "PSNR_IDENTICAL", "check_thresholds", "measure_drift", "noise_shape", "psnr_db", "sample_latents", "sampler_points", "sampling_noise", "within"]
