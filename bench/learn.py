"""Proof that the training toolkit learns: a tiny DiT trained from scratch on the CPU follows its captions.

    python bench/learn.py [--minutes 3] [--json bench/learn_results.json] [--threads 1]

1. Writes the synthetic dataset (``train.data.make_synthetic_dataset``: 4 classes of coloured shapes, 64x64).
2. Trains a tiny DiT from scratch with ``train.trainer.Trainer`` (random tiny Qwen3 text encoder and random tiny
   Flux VAE, ``model.text_encoder = vae = "random-tiny"``: classification happens in latent space, so the VAE
   need not be a good autoencoder) for a fixed time budget.
3. Generates every class caption with 8 Euler steps for several seeds (zimage's own pipeline) and classifies
   each generated latent by the nearest class mean of the training latents. Chance is 25%.

Prints the accuracy (without and with CFG), the loss curve and writes a JSON of the results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.config import config_from_dict  # noqa: E402
from train.data import make_synthetic_dataset  # noqa: E402
from train.data.synthetic import CLASSES  # noqa: E402
from train.encoders import random_tiny_text_encoder, random_tiny_vae  # noqa: E402
from train.objective import dynamic_mu  # noqa: E402
from train.trainer import Trainer  # noqa: E402
from zimage_core.pipeline import GenerateOptions, ZImagePipeline  # noqa: E402
from zimage_core.sampling import initial_noise, latent_shape  # noqa: E402
from zimage_core.vae import pil_to_tensor  # noqa: E402

SIZE = 64


def make_config(work: Path, data: Path, seed: int, steps: int) -> dict:
    return {
        "name": "learn",
        "output_dir": str(work / "run"),
        "seed": seed,
        "max_steps": steps,
        "log_every": 25,
        "model": {
            "preset": "tiny",
            "dims": {"dim": 96, "n_heads": 3, "ffn_dim": 256},
            "text_encoder": "random-tiny",
            "vae": "random-tiny",
            "encoder_seed": seed,
        },
        "data": {
            "sources": [{"type": "folder", "path": str(data)}],
            "resolution": SIZE,
            "aspect_buckets": False,
            "token_budget": 1024,
            "max_batch": 64,
            "caption_levels": {"caption": 1.0},
            "caption_dropout": 0.1,
            "cache_dir": str(work / "cache"),
        },
        "optim": {
            "lr": 2e-3,
            "weight_decay": 0.0,
            "warmup_steps": 20,
            "schedule": "cosine",
            "min_lr_ratio": 0.05,
            "grad_clip": 1.0,
        },
        "objective": {"timesteps": "logit_normal", "shift": "dynamic"},
        "ema": {"enabled": True, "decay": 0.99},
        "checkpoint": {"every": 0, "keep_last": 1},
        "export": {"final": False},
    }


@torch.no_grad()
def class_latents(data: Path, vae) -> dict[str, torch.Tensor]:
    """Model-space latents of the training images, per class caption."""
    from PIL import Image

    out = {}
    for caption, slug, *_ in CLASSES:
        imgs = [Image.open(p).convert("RGB") for p in sorted(data.glob(f"{slug}_*.png"))]
        out[caption] = vae.encode(pil_to_tensor(imgs)).flatten(1)
    return out


@torch.no_grad()
def generate(dit, te, vae, captions: list[str], seeds: list[int], cfg: float, shift: float) -> dict[str, torch.Tensor]:
    pipe = ZImagePipeline(dit, te, vae, "cpu")
    cond = pipe.encode_prompts(captions)
    uncond = pipe.encode_prompts([""] * len(captions)) if cfg > 1 else None
    opts = GenerateOptions(prompt=captions, width=SIZE, height=SIZE, steps=8, cfg=cfg, shift=shift)
    out = {c: [] for c in captions}
    for seed in seeds:
        lat = pipe.sample(cond, uncond, initial_noise(latent_shape(len(captions), SIZE, SIZE), seed), opts)
        for c, z in zip(captions, lat):
            out[c].append(z.flatten())
    return {c: torch.stack(v) for c, v in out.items()}


def classify(generated: dict[str, torch.Tensor], means: torch.Tensor, names: list[str]) -> dict:
    confusion = np.zeros((len(names), len(names)), dtype=int)
    for i, c in enumerate(names):
        pred = torch.cdist(generated[c], means).argmin(dim=1)
        for p in pred.tolist():
            confusion[i, p] += 1
    acc = float(np.trace(confusion) / confusion.sum())
    return {"accuracy": acc, "confusion": confusion.tolist()}


def train_for(trainer, budget: float, steps: int | None = None) -> tuple[list[float], float]:
    """Train for ``budget`` seconds; the cosine schedule's length follows the measured speed (re-estimated as the
    run goes), so it ends on time. With ``steps`` the schedule is that long and the budget is ignored (results
    that do not depend on the machine's load). Returns the losses and the seconds spent."""
    torch.set_flush_denormal(True)
    schedule = trainer.schedule.lr_lambdas[0]
    if steps is not None:
        schedule.total, budget = steps, float("inf")
    t0 = time.perf_counter()
    losses = []
    while True:
        elapsed = time.perf_counter() - t0
        if steps is None and trainer.step >= 10 and trainer.step % 10 == 0:
            schedule.total = max(trainer.step + 1, int(budget / (elapsed / trainer.step)))
        if elapsed >= budget or trainer.step >= schedule.total:
            break
        losses.append(trainer.train_step()[0])
    return losses, time.perf_counter() - t0


def ema_dit(trainer):
    """The trainer's DiT in eval mode holding its EMA weights."""
    dit = trainer.dit.eval()
    with trainer.ema.applied(trainer.params):
        dit_state = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    dit.load_state_dict(dit_state)
    return dit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    ap.add_argument("--seeds", type=int, default=8, help="generations per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny model)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "learn_results.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zimage-learn-") as tmp:
        work = Path(tmp)
        data = work / "shapes"
        captions = make_synthetic_dataset(data, n_per_class=32, size=SIZE, seed=args.seed)
        # Train for the time budget; the cosine schedule's length follows the measured speed (re-estimated as
        # the run goes), so it ends on time.
        trainer = Trainer(config_from_dict(make_config(work, data, args.seed, 10_000)), progress=False)
        trainer.setup()
        losses, t_train = train_for(trainer, args.minutes * 60.0)
        steps = trainer.step
        dit = ema_dit(trainer)
        te, vae = random_tiny_text_encoder(args.seed), random_tiny_vae(args.seed + 1)
        names = list(captions)
        train_lat = class_latents(data, vae)
        means = torch.stack([train_lat[c].mean(0) for c in names])
        sanity = classify(train_lat, means, names)["accuracy"]
        shift = round(math.exp(dynamic_mu((SIZE // 16) ** 2)), 3)
        seeds = list(range(1000, 1000 + args.seeds))
        t1 = time.perf_counter()
        results = {c: classify(generate(dit, te, vae, names, seeds, c, shift), means, names) for c in (1.0, 3.0)}
        t_gen = time.perf_counter() - t1
    window = max(1, steps // 10)
    curve = [(min(steps, i + window), float(np.mean(losses[i : i + window]))) for i in range(0, steps, window)]
    report = {
        "accuracy_cfg1": results[1.0]["accuracy"],
        "accuracy_cfg3": results[3.0]["accuracy"],
        "confusion_cfg1": results[1.0]["confusion"],
        "confusion_cfg3": results[3.0]["confusion"],
        "classes": names,
        "generations_per_class": args.seeds,
        "sampler": "euler",
        "steps": 8,
        "shift": shift,
        "train_steps": steps,
        "train_seconds": round(t_train, 1),
        "sec_per_step": round(t_train / steps, 3),
        "batch": 64,
        "image": f"{SIZE}x{SIZE}",
        "dit_params": sum(p.numel() for p in dit.parameters()),
        "loss_first10": float(np.mean(losses[:10])),
        "loss_last10": float(np.mean(losses[-10:])),
        "loss_curve": curve,
        "train_latents_self_accuracy": sanity,
        "generate_seconds": round(t_gen, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(
        f"trained {steps} steps in {t_train:.0f}s ({t_train / steps:.3f} s/step, batch 64, {report['dit_params']:,} params)"
    )
    print("loss curve (step: mean loss over the preceding window):")
    print("  " + ", ".join(f"{s}: {v:.3f}" for s, v in curve))
    print(f"nearest-class-mean accuracy of the training latents themselves: {sanity:.0%}")
    for c in (1.0, 3.0):
        print(
            f"generated ({args.seeds} seeds x 4 captions, 8 Euler steps, cfg {c:g}): accuracy "
            f"{results[c]['accuracy']:.1%} (chance 25%)  confusion {results[c]['confusion']}"
        )
    print(f"total {report['total_seconds']:.0f}s; results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
