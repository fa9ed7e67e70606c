"""Train the embedded demo model: a tiny diffusers ``WanTransformer3DModel`` on moving shapes.

The model works directly in pixel space on the procedural videos of ``hla_convert.stages.demo_data``
(``[B, 3, 8, 16, 16]``, 512 tokens after the (1, 2, 2) patch embedding) and is trained with
rectified flow exactly as Wan is used with diffusers' ``FlowMatchEulerDiscreteScheduler``:
``x_t = (1 - t) x0 + t noise``, timestep ``1000 t``, target ``noise - x0``, MSE.

After training it

* measures the mean self-attention entropy of the trained model and of its own random
  initialisation (the "random-init twin") on the same inputs, to show that attention is learned;
* samples a few videos with 20 Euler steps of ``FlowMatchEulerDiscreteScheduler`` and checks
  that the prompted colour and direction of motion come out (and writes a PNG to look at);
* saves the transformer with ``save_pretrained`` plus ``demo_info.json`` (data shape, training
  and entropy numbers) to ``hla_convert/demo_model``.

The shipped weights were made with (see docs/demo_model.md)::

    python scripts/train_demo_model.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from torch.overrides import TorchFunctionMode

from hla_convert.stages import demo_data as dd

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "hla_convert" / "demo_model"


def model_config(num_layers: int) -> dict:
    """Config of the demo transformer: 4 heads x 32 = 128 wide, in pixel space."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        # Wan's RoPE splits the head dim into t/h/w parts: 32 -> 12 / 10 / 10, all even.
        attention_head_dim=32,
        in_channels=dd.DEMO_CHANNELS,
        out_channels=dd.DEMO_CHANNELS,
        text_dim=dd.DEMO_TEXT_DIM,
        freq_dim=64,
        ffn_dim=256,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=64,
        pos_embed_seq_len=None,
    )


def build_model(config: dict, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**config)


# --------------------------------------------------------------------------- attention entropy


class SelfAttentionEntropy(TorchFunctionMode):
    """Records the entropy of softmax(q kᵀ · scale) for every self-attention SDPA call.

    Self-attention is recognised by query and key having the same sequence length (the
    cross-attention keys are the DEMO_TEXT_LEN prompt tokens). The call itself runs unchanged.
    """

    def __init__(self):
        super().__init__()
        self.entropies: list[float] = []  # one mean over [B, H, N] per call, in nats
        self.seq_len: int | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = dict(zip(("query", "key"), args)) | kwargs
            q, k = named["query"], named["key"]  # [B, H, N, D]
            if q.shape[-2] == k.shape[-2] and kwargs.get("attn_mask") is None:
                scale = kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
                with torch.no_grad():
                    logp = torch.log_softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
                    ent = -(logp.exp() * logp).sum(-1)  # [B, H, N]
                self.entropies.append(ent.mean().item())
                self.seq_len = q.shape[-2]
        return func(*args, **kwargs)


@torch.no_grad()
def attention_entropy(model, inputs) -> dict:
    """Mean self-attention entropy over heads, queries, layers and all given inputs."""
    per_layer = []
    seq_len = None
    for x_t, timestep, ehs in inputs:
        with SelfAttentionEntropy() as rec:
            model(x_t, timestep, ehs)
        per_layer.append(rec.entropies)
        seq_len = rec.seq_len
    per_layer = torch.tensor(per_layer).mean(0)  # [layers]
    return {
        "mean": per_layer.mean().item(),
        "per_layer": [round(v, 4) for v in per_layer.tolist()],
        "uniform": math.log(seq_len),
    }


def entropy_inputs(seed: int, batch: int, t_values: tuple[float, ...]):
    g = torch.Generator().manual_seed(seed)
    x0, ehs = dd.sample_videos(batch, g)
    out = []
    for t in t_values:
        x_t, timestep, _ = dd.flow_matching_inputs(x0, g, torch.full((batch,), t))
        out.append((x_t, timestep, ehs))
    return out


# --------------------------------------------------------------------------- sampling check


@torch.no_grad()
def sample(model, ehs: torch.Tensor, generator: torch.Generator, steps: int, shift: float):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=dd.NUM_TRAIN_TIMESTEPS, shift=shift)
    sched.set_timesteps(steps)
    b = ehs.shape[0]
    x = torch.randn(b, dd.DEMO_CHANNELS, dd.DEMO_FRAMES, dd.DEMO_HEIGHT, dd.DEMO_WIDTH, generator=generator)
    for t in sched.timesteps:
        v = model(x, t.expand(b), ehs).sample
        x = sched.step(v, t, x).prev_sample
    return x


def _circular_centroid(mask: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Centroid angle of a wrapped-around mask [.., H, W] along dim (-2 rows, -1 cols)."""
    ang = torch.arange(size, dtype=torch.float32) * (2 * math.pi / size)
    w = mask.float().sum(dim=-1 if dim == -2 else -2)  # [.., size]
    return torch.atan2((w * ang.sin()).sum(-1), (w * ang.cos()).sum(-1))


def prompt_adherence(videos: torch.Tensor, classes: torch.Tensor) -> dict:
    """Colour and direction accuracy of videos [B, 3, F, H, W] against their classes [B, 3].

    Foreground = saturated pixels (the background is grey, every shape colour is saturated);
    colour = nearest palette entry to the mean foreground colour; direction = the palette
    direction closest to the mean wrapped displacement of the foreground centroid.
    """
    b, _, f, h, w = videos.shape
    fg = (videos.max(1).values - videos.min(1).values) > 0.9  # [B, F, H, W]
    palette = torch.tensor(list(dd.COLOURS.values()))
    mean_fg = (videos * fg[:, None]).sum((2, 3, 4)) / fg.sum((1, 2, 3)).clamp(min=1)[:, None]
    colour_pred = torch.cdist(mean_fg, palette).argmin(-1)
    cy = _circular_centroid(fg, h, -2)  # [B, F]
    cx = _circular_centroid(fg, w, -1)

    def step(c, size):
        d = torch.remainder(c[:, 1:] - c[:, :-1] + math.pi, 2 * math.pi) - math.pi
        return d.mean(-1) * size / (2 * math.pi)  # pixels per frame

    vel = torch.stack([step(cy, h), step(cx, w)], dim=-1)  # [B, 2]
    dirs = torch.tensor(list(dd.DIRECTIONS.values()), dtype=torch.float32)
    dir_pred = (vel @ dirs.T).argmax(-1)
    return {
        "colour_accuracy": (colour_pred == classes[:, 1]).float().mean().item(),
        "direction_accuracy": (dir_pred == classes[:, 2]).float().mean().item(),
        "foreground_fraction": fg.float().mean().item(),
        "mean_speed_px_per_frame": vel.norm(dim=-1).mean().item(),
    }


def save_png(videos: torch.Tensor, path: Path, scale: int = 4) -> None:
    """One row per video, one column per frame."""
    from PIL import Image

    b, c, f, h, w = videos.shape
    img = ((videos.clamp(-1, 1) + 1) * 127.5).round().byte()
    img = img.permute(0, 3, 2, 4, 1).reshape(b * h, f * w, c).numpy()
    Image.fromarray(img).resize((f * w * scale, b * h * scale), Image.NEAREST).save(path)


# --------------------------------------------------------------------------- training


def param_groups(model, lr: float, qk_norm_lr_mult: float) -> list[dict]:
    """AdamW groups: matrices with weight decay; biases and norms without; q/k norm gains faster.

    With RMS-normalised q and k the attention logits are bounded by the q/k norm gains, which
    start at 1 and move about lr per Adam step; a higher learning rate on them lets attention
    sharpen within a short run (a learnable temperature, in effect).
    """
    decay, no_decay, qk_gain = [], [], []
    for name, p in model.named_parameters():
        if ".attn1.norm_q." in name or ".attn1.norm_k." in name:
            qk_gain.append(p)
        elif p.ndim < 2 or "norm" in name or "scale_shift" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": 0.01, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": qk_gain, "weight_decay": 0.0, "lr_mult": qk_norm_lr_mult},
    ]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def heldout_loss(model, seed: int, batch: int = 32) -> float:
    """Flow-matching MSE on a fixed held-out batch at fixed, evenly spread noise levels."""
    g = torch.Generator().manual_seed(seed)
    x0, ehs = dd.sample_videos(batch, g)
    t = (torch.arange(batch, dtype=torch.float32) + 0.5) / batch
    x_t, timestep, target = dd.flow_matching_inputs(x0, g, t)
    losses = []
    for i in range(0, batch, 8):
        pred = model(x_t[i : i + 8], timestep[i : i + 8], ehs[i : i + 8]).sample
        losses.append(F.mse_loss(pred, target[i : i + 8]).item())
    return sum(losses) / len(losses)


def sample_t(batch: int, generator: torch.Generator, kind: str) -> torch.Tensor:
    """Noise levels [B] in (0, 1): uniform, or logit-normal (SD3's choice, weights mid noise)."""
    if kind == "uniform":
        return torch.rand(batch, generator=generator)
    if kind == "logit-normal":
        return torch.sigmoid(torch.randn(batch, generator=generator))
    raise ValueError(f"unknown t sampling {kind!r}")


def train(model, opt, data_gen, steps, batch_size, lr, warmup, t_sampling, log_every, device):
    """Flow-matching training loop; returns (seconds, mean loss of the last 100 steps)."""
    model.train()
    t0 = time.time()
    running, recent = None, []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup) * group.get("lr_mult", 1.0)
        x0, ehs = dd.sample_videos(batch_size, data_gen)
        x_t, timestep, target = dd.flow_matching_inputs(x0, data_gen, sample_t(batch_size, data_gen, t_sampling))
        x_t, timestep, target, ehs = (v.to(device) for v in (x_t, timestep, target, ehs))
        pred = model(x_t, timestep, ehs).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        recent = (recent + [value])[-100:]
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:5d}  loss {value:.4f}  ema {running:.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:6.0f}s",
                flush=True,
            )
    model.eval()
    return time.time() - t0, sum(recent) / len(recent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--qk-norm-lr-mult", type=float, default=10.0,
                    help="learning-rate multiplier for the self-attention q/k RMSNorm gains")
    ap.add_argument("--num-layers", type=int, default=3)
    ap.add_argument("--t-sampling", choices=("uniform", "logit-normal"), default="uniform")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="the shipped weights were trained on cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (leave cores to others)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--sample-shift", type=float, default=1.0)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument("--png", type=Path, default=Path("/tmp/demo_model_samples.png"))
    ap.add_argument("--no-save", action="store_true", help="train and report only")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    config = model_config(args.num_layers)
    model = build_model(config, args.seed).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"WanTransformer3DModel: {n_params:,} parameters, config {json.dumps(config)}")

    data_gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.qk_norm_lr_mult), lr=args.lr, betas=(0.9, 0.99))

    train_s, final_loss = train(
        model, opt, data_gen, args.steps, args.batch_size, args.lr, args.warmup,
        args.t_sampling, args.log_every, args.device,
    )
    model.to("cpu")
    held = heldout_loss(model, seed=10_000 + args.seed)
    print(f"trained {args.steps} steps x batch {args.batch_size} in {train_s:.0f}s; "
          f"mean loss of the last 100 steps {final_loss:.4f}; held-out loss {held:.4f}")

    # Attention entropy: trained model vs its own random initialisation, same inputs.
    twin = build_model(config, args.seed).eval()
    t_values = (0.1, 0.5, 0.9)
    inputs = entropy_inputs(seed=20_000 + args.seed, batch=4, t_values=t_values)
    ent_trained = attention_entropy(model, inputs)
    ent_random = attention_entropy(twin, inputs)
    print(f"mean self-attention entropy (nats, uniform = log N = {ent_trained['uniform']:.3f}):")
    print(f"  trained     {ent_trained['mean']:.3f}  per layer {ent_trained['per_layer']}")
    print(f"  random-init {ent_random['mean']:.3f}  per layer {ent_random['per_layer']}")

    # Sampling sanity check.
    g = torch.Generator().manual_seed(30_000 + args.seed)
    n_samples = 16
    classes = dd.sample_classes(n_samples, g)
    ehs = dd.prompt_embeddings(classes)
    s0 = time.time()
    samples = sample(model, ehs, g, args.sample_steps, args.sample_shift)
    adherence = prompt_adherence(samples, classes)
    ref, _ = dd.sample_videos(n_samples, torch.Generator().manual_seed(1))
    rendered = dd.render_videos(
        classes,
        start=torch.randint(dd.DEMO_HEIGHT, (n_samples, 2), generator=g),
        size=torch.full((n_samples,), dd.SIZE_RANGE[0]),
        background=dd.background_texture(n_samples, g, dd.DEMO_HEIGHT, dd.DEMO_WIDTH),
    )
    ref_adherence = prompt_adherence(rendered, classes)
    print(f"sampled {n_samples} videos with {args.sample_steps} Euler steps in {time.time() - s0:.1f}s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in adherence.items()))
    print("  (the same check on rendered data: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ref_adherence.items()) + ")")
    print(f"  sample pixel mean/std {samples.mean():.3f}/{samples.std():.3f}, "
          f"data {ref.mean():.3f}/{ref.std():.3f}")
    if args.png:
        save_png(samples, args.png)
        print(f"  samples written to {args.png} (rows: "
              + "; ".join(dd.describe_class(c) for c in classes[:4]) + "; ...)")

    if args.no_save:
        return
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    info = {
        "description": "Tiny WanTransformer3DModel trained on hla_convert.stages.demo_data moving shapes "
        "(pixel space, no VAE) with rectified flow; made by scripts/train_demo_model.py.",
        "data": {
            "channels": dd.DEMO_CHANNELS,
            "frames": dd.DEMO_FRAMES,
            "height": dd.DEMO_HEIGHT,
            "width": dd.DEMO_WIDTH,
            "text_len": dd.DEMO_TEXT_LEN,
            "text_dim": dd.DEMO_TEXT_DIM,
            "tokens": (dd.DEMO_FRAMES // config["patch_size"][0])
            * (dd.DEMO_HEIGHT // config["patch_size"][1])
            * (dd.DEMO_WIDTH // config["patch_size"][2]),
            "generator": "hla_convert.stages.demo_data.sample_videos",
        },
        "flow_matching": {
            "x_t": "(1 - t) * x0 + t * noise",
            "timestep": "1000 * t",
            "target": "noise - x0",
            "t_sampling": args.t_sampling,
            "num_train_timesteps": dd.NUM_TRAIN_TIMESTEPS,
        },
        "training": {
            "command": "python scripts/train_demo_model.py"
            + (" " + " ".join(_nondefault_args(ap, args)) if _nondefault_args(ap, args) else ""),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "qk_norm_lr_mult": args.qk_norm_lr_mult,
            "t_sampling": args.t_sampling,
            "seed": args.seed,
            "threads": args.threads,
            "wall_seconds": round(train_s, 1),
            "final_loss": round(final_loss, 5),
            "heldout_loss": round(held, 5),
            "parameters": n_params,
        },
        "attention_entropy": {
            "inputs": f"4 videos x t in {list(t_values)}, mean over heads, queries and layers",
            "uniform_log_n": round(ent_trained["uniform"], 4),
            "trained": round(ent_trained["mean"], 4),
            "trained_per_layer": ent_trained["per_layer"],
            "random_init": round(ent_random["mean"], 4),
            "random_init_per_layer": ent_random["per_layer"],
        },
        "sampling_check": {
            "scheduler": f"FlowMatchEulerDiscreteScheduler(shift={args.sample_shift})",
            "steps": args.sample_steps,
            **{k: round(v, 4) for k, v in adherence.items()},
        },
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }
    (args.output / "demo_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in args.output.iterdir() if p.is_file())
    print(f"saved to {args.output} ({size / 1e6:.2f} MB)")


def _nondefault_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    out = []
    for action in ap._actions:
        if action.dest in ("help", "output", "png"):
            continue
        value = getattr(args, action.dest)
        if value != action.default:
            flag = action.option_strings[0]
            out.append(flag if isinstance(value, bool) else f"{flag} {value}")
    return out


if __name__ == "__main__":
    main()
