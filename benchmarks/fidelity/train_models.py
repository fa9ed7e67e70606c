"""Train the fidelity benchmark's teacher models: a Wan and a CogVideoX video DiT on moving objects.

One command trains both (each for a fixed wall-clock budget, or a fixed number of steps) and saves
each with ``save_pretrained`` (bf16 safetensors, a few MB) plus ``bench_info.json`` (the data
spec, the model and training config, final losses, attention entropy) to ``OUT/<arch>/``::

    python benchmarks/fidelity/train_models.py --out benchmarks/fidelity/models --minutes 3.5
    python benchmarks/fidelity/train_models.py --out benchmarks/fidelity/models-deep --layers 15 --steps 2400

(the fast tier, 6 blocks, and the deep tier, 15 blocks; see bench_models.py.)

(CPU smoke test: ``--tiny --minutes 0.05 --device cpu``.) See bench_data.py for the videos and
bench_models.py for the two architectures. Training is rectified flow as Wan is used with
``FlowMatchEulerDiscreteScheduler``: ``x_t = (1 - t) x0 + t noise``, ``timestep = 1000 t``,
target ``noise - x0``, MSE, t ~ U(0, 1); AdamW with warm-up and a cosine decay over the budget,
bf16 autocast on CUDA, gradient clipping. Seeded; a time-boxed run is not bitwise reproducible
(the step count depends on the machine) but records its step count: ``--steps N`` repeats it.

At the end, per model: the held-out loss per t bucket (weights rounded to bf16, as saved, run in
float32 as the benchmark runs them) and the mean self-attention entropy of the trained model and
of its random-init twin against log N (uniform): a sign that attention is learned.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(1, str(HERE.parents[1]))  # hla_convert (CogVideoX RoPE) from this checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import bench_data as bd  # noqa: E402
import bench_models as bm  # noqa: E402

sys.path.insert(2, str(HERE.parents[1] / "scripts"))
from train_demo_model import param_groups  # noqa: E402  (the demo's AdamW groups: q/k norm gains faster)

T_BUCKETS = 4


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# --------------------------------------------------------------------------- attention entropy


class SelfAttentionEntropy(TorchFunctionMode):
    """Mean entropy (nats) of softmax(q k^T scale) of every SDPA call whose query and key have the
    same length (self-attention; Wan's cross-attention has 8 keys). The call itself runs unchanged.
    For CogVideoX the joint attention's text rows and columns are included (N = video + text)."""

    def __init__(self):
        super().__init__()
        self.entropies: list[float] = []
        self.seq_len = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = dict(zip(("query", "key"), args)) | kwargs
            q, k = named["query"], named["key"]  # [B, H, N, D]
            if q.shape[-2] == k.shape[-2] and kwargs.get("attn_mask") is None:
                scale = kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
                with torch.no_grad():
                    ent = []
                    for h in range(q.shape[1]):  # one head at a time: [B, N, N] stays small
                        logp = torch.log_softmax((q[:, h].float() @ k[:, h].float().transpose(-1, -2)) * scale, dim=-1)
                        ent.append(-(logp.exp() * logp).sum(-1).mean())
                self.entropies.append(float(torch.stack(ent).mean()))
                self.seq_len = q.shape[-2]
        return func(*args, **kwargs)


@torch.no_grad()
def attention_entropy(arch, model, batches) -> dict:
    per_layer, n = [], 0
    for item in batches:
        with SelfAttentionEntropy() as rec:
            model(**item)
        per_layer.append(rec.entropies)
        n = rec.seq_len
    layers = torch.tensor(per_layer).mean(0)
    return {"mean": round(float(layers.mean()), 4), "per_layer": [round(v, 3) for v in layers.tolist()], "uniform_log_n": round(math.log(n), 4), "n": n}


# --------------------------------------------------------------------------- training


def lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.05 over the run's progress."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def heldout_batches(arch, model, spec, device, seed, batch, chunk):
    """A fixed held-out set: `batch` videos at evenly spread t, in chunks of `chunk` forward kwargs,
    with the true flow target. Seeded on the CPU so it is the same on every device."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.arange(batch, dtype=torch.float32) + 0.5) / batch
    x0, text, t, noise = bd.sample_training_batch(batch, spec, g, t)
    x_t, timestep, target = bd.flow_matching(x0, t, noise)
    rope = bm.rotary_emb(model, spec, device) if arch == "cogvideox" else None
    out = []
    for i in range(0, batch, chunk):
        sl = slice(i, i + chunk)
        item = bm.model_inputs(arch, x_t[sl].to(device), timestep[sl].to(device), text[sl].to(device), rope)
        out.append((item, target[sl].to(device), t[sl]))
    return out


@torch.no_grad()
def heldout_loss(arch, model, batches) -> dict:
    per_sample, ts = [], []
    for item, target, t in batches:
        pred = bm.model_output(arch, model(**item).sample).float()
        per_sample.append((pred - target).pow(2).flatten(1).mean(1).cpu())
        ts.append(t)
    loss, t = torch.cat(per_sample), torch.cat(ts)
    idx = (t * T_BUCKETS).long().clamp(0, T_BUCKETS - 1)
    buckets = [
        {"t_min": k / T_BUCKETS, "t_max": (k + 1) / T_BUCKETS, "loss": round(float(loss[idx == k].mean()), 5)}
        for k in range(T_BUCKETS)
        if bool((idx == k).any())
    ]
    return {"mean": round(float(loss.mean()), 5), "buckets": buckets, "samples": int(loss.numel())}


def train_one(arch: str, args, spec: bd.VideoSpec, device: torch.device) -> dict:
    seed = args.seed + (0 if arch == "wan" else 1000)
    config = bm.model_config(arch, spec, args.tiny, args.layers)
    model = bm.build_model(arch, spec, seed, args.tiny, args.layers).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{arch}] {bm.CLASSES[arch]}: {n_params:,} parameters, {bm.video_tokens(arch, spec)} video tokens", flush=True)
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.qk_norm_lr_mult), lr=args.lr, betas=(0.9, 0.99))
    g = torch.Generator(device=device).manual_seed(seed + 1)
    rope = bm.rotary_emb(model, spec, device) if arch == "cogvideox" else None
    amp = device.type == "cuda"
    budget = args.minutes * 60.0
    t0 = time.time()
    step, ema, recent = 0, None, []
    while True:
        elapsed = time.time() - t0
        if args.steps is not None:
            if step >= args.steps:
                break
            progress = step / args.steps
        else:
            if elapsed >= budget and step > 0:
                break
            progress = elapsed / budget if budget > 0 else 1.0
        f = lr_factor(progress, step, args.warmup)
        for group in opt.param_groups:
            group["lr"] = args.lr * f * group["lr_mult"]
        x0, text, t, noise = bd.sample_training_batch(args.batch_size, spec, g)
        x_t, timestep, target = bd.flow_matching(x0, t, noise)
        item = bm.model_inputs(arch, x_t, timestep, text, rope)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = bm.model_output(arch, model(**item).sample)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1:
            value = loss.item()  # syncs; only when printing
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            recent = (recent + [value])[-10:]
            el = time.time() - t0
            print(f"[{arch}] step {step:6d}  loss {value:.4f}  ema {ema:.4f}  lr {args.lr * f:.2e}  {el:6.0f}s  {step / max(el, 1e-9):.1f} steps/s", flush=True)
    train_s = time.time() - t0
    final = loss.item()
    model.eval()
    # What the benchmark will load: bf16-rounded weights, run in float32.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    chunk = min(8, args.heldout)
    held = heldout_loss(arch, model, heldout_batches(arch, model, spec, device, 10_000 + args.seed, args.heldout, chunk))
    ent_batches = [
        item for item, _, _ in heldout_batches(arch, model, spec, device, 20_000 + args.seed, 3 * args.entropy_videos, args.entropy_videos)
    ]
    ent = attention_entropy(arch, model, ent_batches)
    twin = bm.build_model(arch, spec, seed, args.tiny, args.layers).to(device).eval()
    ent_twin = attention_entropy(arch, twin, ent_batches)
    del twin
    print(
        f"[{arch}] {step} steps x batch {args.batch_size} in {train_s:.0f}s; last batch loss {final:.4f}; "
        f"held-out loss {held['mean']:.4f} (" + ", ".join(f"t {b['t_min']:.2f}-{b['t_max']:.2f}: {b['loss']:.4f}" for b in held["buckets"]) + ")",
        flush=True,
    )
    print(
        f"[{arch}] self-attention entropy (nats, uniform log N = {ent['uniform_log_n']:.3f}, N = {ent['n']}): "
        f"trained {ent['mean']:.3f} per layer {ent['per_layer']}; random-init {ent_twin['mean']:.3f}",
        flush=True,
    )
    out = Path(args.out) / arch
    out.mkdir(parents=True, exist_ok=True)
    # Every weight in bf16 (a few MB); the benchmark loads them as float32. Casting the whole
    # model is what we want here, so diffusers' warning about its float32-kept modules is muted.
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    finally:
        dlogging.set_verbosity(level)
    info = {
        "architecture": arch,
        "class": bm.CLASSES[arch],
        "description": f"{bm.CLASSES[arch]} trained by benchmarks/fidelity/train_models.py on bench_data moving objects (pixel space).",
        "data": spec.to_dict(),
        "data_generator": "benchmarks/fidelity/bench_data.py sample_videos",
        "tiny": args.tiny,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "parameters": n_params,
        "video_tokens": bm.video_tokens(arch, spec),
        "flow_matching": {"x_t": "(1 - t) * x0 + t * noise", "timestep": "1000 * t", "target": "noise - x0", "t_sampling": "uniform"},
        "training": {
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "seed": seed,
            "steps": step,
            "minutes": args.minutes if args.steps is None else None,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "qk_norm_lr_mult": args.qk_norm_lr_mult,
            "bf16_autocast": amp,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "wall_seconds": round(train_s, 1),
            "last_batch_loss": round(final, 5),
        },
        "heldout_loss": held,
        "attention_entropy": {"trained": ent, "random_init": ent_twin},
        "saved_dtype": "bfloat16",
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }
    tmp = out / (bm.INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / bm.INFO_FILE)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"[{arch}] saved to {out} ({size / 1e6:.2f} MB)", flush=True)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder; each model goes to OUT/<arch>/")
    ap.add_argument("--models", nargs="+", default=list(bm.ARCHITECTURES), choices=bm.ARCHITECTURES)
    ap.add_argument("--minutes", type=float, default=3.5, help="wall-clock training budget per model")
    ap.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead (reproducible)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--qk-norm-lr-mult", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and models: a CPU smoke test")
    ap.add_argument("--layers", type=int, default=None, help=f"transformer blocks (default {bm.DEPTHS['fast']}, the fast tier; {bm.DEPTHS['deep']}: the deep tier)")
    ap.add_argument("--heldout", type=int, default=64, help="held-out videos for the final loss")
    ap.add_argument("--entropy-videos", type=int, default=2, help="videos per t (0.17, 0.5, 0.83) for the entropy")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = bd.TINY if args.tiny else bd.VideoSpec()
    if args.tiny:
        args.heldout = min(args.heldout, 8)
        args.warmup = min(args.warmup, 5)
    summary = {}
    for arch in args.models:
        info = train_one(arch, args, spec, device)
        summary[arch] = {"steps": info["training"]["steps"], "heldout_loss": info["heldout_loss"]["mean"], "entropy": info["attention_entropy"]["trained"]["mean"]}
    print("summary: " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
