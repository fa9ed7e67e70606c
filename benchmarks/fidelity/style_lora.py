"""Does a user's "style" LoRA trained on the softmax teacher still do its job through the converted attention?

    # CPU, the embedded demo model and a conversion of it (made here with the demo recipe unless --converted)
    python benchmarks/fidelity/style_lora.py --demo [--converted DIR] --out style-demo.json
    # GPU, the fidelity benchmark's fast-tier Wan teacher and a conversion of it made by run.py / hla_convert.convert
    python benchmarks/fidelity/style_lora.py --model benchmarks/fidelity/models/wan --converted DIR --device cuda --out style-wan.json

1. A LoRA (peft through diffusers' `add_adapter`, rank 8, on every block's attn1 and attn2 to_q /
   to_k / to_v / to_out.0 and ffn linears) is trained on the SOFTMAX teacher with the teacher's own
   data shifted in colour: +0.3 on the red channel of every video (flow matching, the data's
   velocity target), and saved in diffusers' LoRA format (`WanPipeline.save_lora_weights`).
2. Videos are sampled from the same noise and prompts (FlowMatch Euler, shift 1) with the teacher,
   the teacher + style (the LoRA file loaded with diffusers' `load_lora_adapter`), the converted
   model (`load_converted`), and the converted model + style (the same file; the conversion's own
   LoRA stays on beside it, hla_convert.model.user_loras).
3. The style effect is the mean colour shift per channel (sampled pixels clamped to [-1, 1]):
   e_teacher = mean(teacher + style) - mean(teacher), e_converted = mean(converted + style) -
   mean(converted). Reported: both, their per-channel ratio, and rel = |e_converted - e_teacher| /
   |e_teacher| over the three channels; pass when rel <= 0.10. Also: the converted model in
   teacher mode with the style loaded against the plain teacher (teacher mode is the base model).

One JSON document (--out, and printed), with the command, date, device and settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # hla_convert from this checkout when it is not installed

import torch  # noqa: E402

STYLE_SHIFT = (0.3, 0.0, 0.0)  # added to (R, G, B) of every training video
PASS_REL = 0.10
ADAPTER = "style"
STYLE_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes


class Data:
    """The teacher's own data: clean videos [B, 3, F, H, W] in [-1, 1] and prompts [B, L, D]."""

    def __init__(self, model_dir: str | None):
        self.model_dir = model_dir
        if model_dir is None:
            from hla_convert.stages import demo_data as dd

            self._videos = lambda b, g: dd.sample_videos(b, g)
        else:
            import bench_data as bd
            import bench_models as bm

            arch, _, spec, _ = bm.load_model(model_dir)
            if arch != "wan":
                raise SystemExit(f"style_lora.py: the style measurement runs on a Wan teacher; {model_dir} is {arch}")
            self._videos = lambda b, g: bd.sample_videos(b, spec, g)

    def videos(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self._videos(batch, g)


def load_teacher(model_dir: str | None, device: str) -> torch.nn.Module:
    if model_dir is None:
        from hla_convert.model.loading import load_transformer

        return load_transformer(None, device=device).transformer.eval()
    import bench_models as bm

    return bm.load_model(model_dir, device=device)[1]


def style_targets(model: torch.nn.Module) -> list[str]:
    """Every block's attn1 / attn2 projections and feed-forward linears (Wan: 10 per block)."""
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and len(parts) > 2 and parts[0] == "blocks" and parts[2] in ("attn1", "attn2", "ffn"):
            names.append(name)
    return names


def train_style(model_dir: str | None, data: Data, folder: Path, args, device: str) -> dict[str, Any]:
    """Train the style LoRA on the softmax teacher; save it in diffusers' format in `folder`."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = load_teacher(model_dir, device)
    targets = style_targets(model)
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets, lora_dropout=0.0), adapter_name=ADAPTER)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    shift = torch.tensor(STYLE_SHIFT).view(1, 3, 1, 1, 1)
    model.train()
    losses = []
    for _ in range(args.train_steps):
        x0, text = data.videos(args.batch_size, g)
        x0 = x0 + shift
        t = torch.rand(x0.shape[0], generator=g)
        noise = torch.randn(x0.shape, generator=g)
        tb = t.view(-1, 1, 1, 1, 1)
        item = {"hidden_states": ((1 - tb) * x0 + tb * noise).to(device), "timestep": (t * 1000).to(device), "encoder_hidden_states": text.to(device)}
        out = model(**item, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), (noise - x0).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    WanPipeline.save_lora_weights(folder, transformer_lora_layers={k: v.detach().cpu() for k, v in state.items()})
    k = max(1, len(losses) // 10)
    return {"targets": len(targets), "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}


def sample(model: torch.nn.Module, noise: torch.Tensor, text: torch.Tensor, steps: int, device: str) -> torch.Tensor:
    from hla_convert.model.pipeline_loading import demo_scheduler
    from hla_convert.stages.drift import sample_latents

    item = {"hidden_states": noise.to(device), "timestep": torch.zeros(noise.shape[0], device=device), "encoder_hidden_states": text.to(device)}
    with torch.no_grad():
        return sample_latents(model, item, demo_scheduler(), steps, noise.to(device)).float().cpu().clamp(-1, 1)


def channel_means(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.mean(dim=(0, 2, 3, 4))]


def measure(args, device: str, work: Path) -> dict[str, Any]:
    import hla_convert
    from hla_convert.model.modes import attention_mode
    from hla_convert.model.user_loras import active_adapters

    data = Data(args.model)
    converted_dir = args.converted
    seconds = {}
    if converted_dir is None:
        t0 = time.perf_counter()
        converted_dir = work / "converted"
        hla_convert.convert(args.model, None, out=converted_dir, device=device)
        seconds["convert"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    style_dir = Path(args.save_style) if args.save_style else work / "style"
    training = train_style(args.model, data, style_dir, args, device)
    seconds["train_style"] = time.perf_counter() - t0

    g = torch.Generator().manual_seed(args.seed + 1)  # held-out prompts and noise
    x0, text = data.videos(args.samples, g)
    noise = torch.randn(x0.shape, generator=g)
    t0 = time.perf_counter()
    teacher = load_teacher(args.model, device)
    runs = {"teacher": sample(teacher, noise, text, args.sampling_steps, device)}
    teacher.load_lora_adapter(str(style_dir), adapter_name=ADAPTER, prefix="transformer", weight_name=STYLE_FILE)
    runs["teacher+style"] = sample(teacher, noise, text, args.sampling_steps, device)
    model = hla_convert.load_converted(converted_dir, base=args.model, device=device)
    runs["converted"] = sample(model, noise, text, args.sampling_steps, device)
    model.load_lora_adapter(str(style_dir), adapter_name=ADAPTER, prefix="transformer", weight_name=STYLE_FILE)
    adapters = active_adapters(model)
    runs["converted+style"] = sample(model, noise, text, args.sampling_steps, device)
    with attention_mode(model, "teacher"):
        teacher_mode = sample(model, noise, text, args.sampling_steps, device)
    seconds["sample"] = time.perf_counter() - t0

    means = {k: channel_means(v) for k, v in runs.items()}
    e_t = [a - b for a, b in zip(means["teacher+style"], means["teacher"])]
    e_c = [a - b for a, b in zip(means["converted+style"], means["converted"])]
    norm = sum(v * v for v in e_t) ** 0.5
    rel = sum((a - b) ** 2 for a, b in zip(e_c, e_t)) ** 0.5 / norm if norm > 0 else float("inf")
    return {
        "model": args.model or "demo (embedded)",
        "converted": str(converted_dir) if args.converted else "made here with the model's built-in recipe",
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "style_shift_rgb": list(STYLE_SHIFT),
        "settings": {k: getattr(args, k) for k in ("rank", "lr", "train_steps", "batch_size", "samples", "sampling_steps", "seed")},
        "training": training,
        "active_adapters_after_load": adapters,
        "mean_rgb": means,
        "effect_teacher": e_t,
        "effect_converted": e_c,
        "ratio_per_channel": [c / t if t else None for c, t in zip(e_c, e_t)],
        "rel_error": rel,
        "passed": rel <= PASS_REL,
        "teacher_mode_vs_teacher_max_abs": float((teacher_mode - runs["teacher"]).abs().max()),
        "seconds": seconds,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--demo", action="store_true", help="the embedded demo model (CPU, minutes)")
    which.add_argument("--model", help="a benchmark teacher folder written by train_models.py (Wan)")
    p.add_argument("--converted", help="its conversion (an hla-convert output folder); default: convert it here")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="videos sampled per model (same noise and prompts for all four)")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-style", help="keep the style LoRA in this folder (diffusers format)")
    p.add_argument("--out", help="write the JSON document here too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model and not args.converted:
        raise SystemExit("style_lora.py: --model needs --converted (a conversion of it made by run.py or hla_convert.convert)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="style-lora-") as work:
        doc = measure(args, args.device, Path(work))
    doc = {
        "command": "python benchmarks/fidelity/style_lora.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        **doc,
    }
    text = json.dumps(doc, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    e_t, e_c = doc["effect_teacher"], doc["effect_converted"]
    print(
        f"style effect (R, G, B): teacher {', '.join(f'{v:+.4f}' for v in e_t)}; converted {', '.join(f'{v:+.4f}' for v in e_c)}; "
        f"rel {doc['rel_error']:.3f} -> {'pass' if doc['passed'] else 'FAIL'} (<= {PASS_REL})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
