"""Proof that DMDR raises a reward while its distribution-matching term keeps the student on the teacher's images.

    python bench/dmdr.py --work /tmp/dmdrbench [--steps 150] [--seeds 32] [--jobs 2] [--reward contrast]

1. The distillation proof's setting (``bench/distill.py``): the synthetic shapes, the PCA patch VAE, its teacher
   (trained by ``bench/distill.py --work DIR`` first when ``DIR/teacher.safetensors`` is missing) and its judge
   (caption accuracy on decoded images: colour AND shape; Frechet distance to a teacher 30-step cfg-3 reference
   drawn with other seeds).
2. Three runs of ``train.rl.dmdr.DMDRTrainer`` (``[rl] method = "dmdr"``), each a 4-step CFG-free student
   initialised from the teacher, each in its own process:
   - ``distill``: Decoupled DMD alone (``reward_weight = 0``), the student without the reward;
   - ``dmdr``: the same plus the ReFL reward term after a cold start, DynaDG and DynaRS over the cold start;
   - ``reward_only``: the reward term alone (DM and CA weights 0): what the reward does unregularised;
   - optionally ``dmdr_grpo@W``: ``dmdr`` with the GRPO-advantage reward term at weight ``W``.
3. Every setting draws each caption for ``--seeds`` seeds (4 steps, cfg 1, Euler) and reports the reward (an image
   statistic of the decoded images the captions do not ask for; ``contrast`` by default), the accuracy and the FD.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DMDR_VAE = "vae_dmdr.pt"  # the PatchPCA refitted here (vae.pt pickles bench/distill.py's __main__)
sys.path.insert(0, str(ROOT))

from bench._machine import cpu_name  # noqa: E402
from bench.distill import (  # noqa: E402
    CFG,
    SIZE,
    Judge,
    PatchPCA,
    generate,
    load_student,
    save_grid,
    to_images,
    train_in_child,
    uptime,
)
from bench.distill import run_child as distill_run_child  # noqa: E402
from train.data import make_synthetic_dataset  # noqa: E402
from train.data.synthetic import CLASSES  # noqa: E402
from train.objective import dynamic_mu  # noqa: E402
from train.rl.rewards import STATISTICS  # noqa: E402
from zimage_core.vae import pil_to_tensor  # noqa: E402


def dmdr_config(work: Path, teacher: Path, name: str, args, shift: float, captions: list[str], **rl_extra) -> dict:
    distill = {
        "method": "decoupled_dmd",
        "cfg": CFG,
        "student_steps": 4,
        "student_shift": shift,
        "fake_lora_rank": 16,
        "fake_lora_alpha": 16.0,
        "ttur": args.ttur,
        "fake_lr": args.fake_lr,
        "sigma_shift": shift,
        "lora_rank": 16,
        "export_diffusers": False,
    }
    distill.update(rl_extra.pop("distill", {}))
    rl = {
        "method": "dmdr",
        "policy": str(teacher),
        "rewards": [{"name": args.reward, "weight": 1.0}],
        "prompts": captions,
        "width": SIZE,
        "height": SIZE,
        "batch": 32,
        "distill": distill,
        **rl_extra,
    }
    return {
        "name": name,
        "output_dir": str(work / f"dmdr_{name.replace('@', '_')}"),
        "seed": args.seed,
        "max_steps": args.steps,
        "log_every": 10,
        "device": "cpu",
        "model": {"text_encoder": "random-tiny", "vae": str(work / DMDR_VAE), "encoder_seed": args.seed},
        "rl": rl,
        "optim": {"lr": args.lr, "weight_decay": 0.0, "warmup_steps": 10, "schedule": "constant", "grad_clip": 1.0},
        "ema": {"enabled": True, "decay": 0.95},
        "checkpoint": {"every": 0, "keep_last": 1},
        "samples": {"every": 0},
        "export": {"dtype": "fp32"},
    }


def child(spec_path: str) -> None:
    """One DMDR run in this process; prints a JSON line with the export, the timings and the reward log."""
    from train.rl.dmdr import DMDRTrainer

    _, times, rows = train_in_child(spec_path, DMDRTrainer)
    log = [(r["step"], r.get("reward/total")) for r in rows if "loss" in r]
    print(json.dumps({**times, "reward_log": log}))


def run_child(spec: dict, work: Path) -> dict:
    return distill_run_child(spec, work, __file__, "DMDR run")


def reward_of(imgs: np.ndarray, name: str) -> float:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    return float(STATISTICS[name](x).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", default="/tmp/dmdrbench", help="bench/distill.py's work folder (teacher.safetensors, vae.pt)"
    )
    ap.add_argument("--teacher-steps", type=int, default=1000, help="if the teacher must be trained first")
    ap.add_argument("--steps", type=int, default=150, help="generator updates per run")
    ap.add_argument("--seeds", type=int, default=32, help="generations per caption and setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--reward", default="contrast", choices=sorted(STATISTICS))
    ap.add_argument("--reward-weight", type=float, default=1.0)
    ap.add_argument("--cold", type=float, default=0.3, help="share of the steps before the reward term joins")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--fake-lr", type=float, default=1e-3)
    ap.add_argument("--ttur", type=int, default=3)
    ap.add_argument("--grpo-noise", type=float, default=0.1, help="dmdr_noise of the dmdr_grpo@W runs")
    ap.add_argument("--runs", default="distill,dmdr,reward_only", help="also dmdr_grpo@W (GRPO term at weight W)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "dmdr_results.json"))
    ap.add_argument("--grids", help="write one PNG grid per setting into this folder")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    torch.set_num_threads(args.threads)
    from PIL import Image

    from train.encoders import random_tiny_text_encoder

    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher_file = work / "teacher.safetensors"
    if not teacher_file.is_file():
        cmd = [sys.executable, str(ROOT / "bench" / "distill.py"), "--work", str(work), "--runs", "", "--seeds", "4"]
        cmd += ["--teacher-steps", str(args.teacher_steps), "--json", str(work / "distill_teacher.json")]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    report: dict = {"machine": cpu_name(), "torch": torch.__version__, "load_start": uptime(), "cfg": CFG}
    report["teacher"] = json.loads((work / "teacher.json").read_text())
    data = work / "shapes"
    captions = make_synthetic_dataset(data, n_per_class=32, size=SIZE, seed=args.seed)
    files = sorted(data.glob("*.png"))
    pixels = pil_to_tensor([Image.open(p).convert("RGB") for p in files])
    labels = np.array([next(i for i, c in enumerate(CLASSES) if p.name.startswith(c[1])) for p in files])
    vae = PatchPCA.fit(pixels)  # deterministic: the teacher's VAE (vae.pt pickles bench/distill.py's __main__)
    torch.save(vae, work / DMDR_VAE)
    judge = Judge(to_images(pixels), labels)
    teacher = load_student(str(teacher_file))
    te = random_tiny_text_encoder(args.seed)
    shift = round(math.exp(dynamic_mu((SIZE // 16) ** 2)), 3)
    seeds = list(range(1000, 1000 + args.seeds))
    ref_imgs, _ = generate(teacher, te, vae, captions, list(range(5000, 5000 + args.seeds)), 30, CFG, shift)
    ref_feats = judge.calibrate(ref_imgs)
    rows = {}

    def judge_row(name: str, imgs, labs) -> dict:
        row = judge.report(imgs, labs, ref_feats)
        row["reward"] = reward_of(imgs, args.reward)
        rows[name] = row
        save_grid(args.grids, name, imgs, len(captions))
        print(f"{name}: reward {row['reward']:.4f}, accuracy {row['accuracy']:.1%}, FD {row['frechet']:.2f}")
        return row

    for name, (steps, c) in {
        "teacher 30 steps, cfg 3": (30, CFG),
        "teacher 4 steps, cfg 1 (the init)": (4, 1.0),
    }.items():
        judge_row(name, *generate(teacher, te, vae, captions, seeds, steps, c, shift))

    cold = int(round(args.cold * args.steps))
    variants = {
        "distill": {"reward_weight": 0.0},
        "dmdr": {
            "reward_weight": args.reward_weight,
            "reward_start": cold,
            "dynadg_steps": cold,
            "dynars_steps": cold,
        },
        "reward_only": {
            "reward_weight": args.reward_weight,
            "distill": {"dm_weight": 0.0, "ca_weight": 0.0, "ttur": 1},
        },
    }
    wanted = [r for r in args.runs.split(",") if r]
    for name in wanted:  # dmdr_grpo@W: the GRPO-advantage reward term at weight W (groups of 8, 4 prompts)
        if name.startswith("dmdr_grpo@"):
            variants[name] = {
                **variants["dmdr"],
                "reward_weight": float(name.split("@")[1]),
                "dmdr_reward": "grpo",
                "group_size": 8,
                "prompts_per_step": 4,
                "dmdr_noise": args.grpo_noise,
            }
    specs = {
        name: {
            "config": dmdr_config(work, teacher_file, name, args, shift, captions, **variants[name]),
            "vae": str(work / DMDR_VAE),
            "threads": args.threads,
        }
        for name in wanted
    }
    report["hyperparameters"] = {
        k: getattr(args, k) for k in ("steps", "reward", "reward_weight", "cold", "lr", "fake_lr", "ttur", "grpo_noise")
    }
    print(f"DMDR runs {wanted}, {args.steps} generator updates each, {args.jobs} at a time (load {uptime()})")
    with ThreadPoolExecutor(args.jobs) as pool:
        infos = dict(zip(specs, pool.map(lambda sp: run_child(sp, work), specs.values())))
    for name, info in infos.items():
        student = load_student(info["student"])
        row = judge_row(f"student {name}, 4 steps, cfg 1", *generate(student, te, vae, captions, seeds, 4, 1.0, shift))
        row["sec_per_step"] = round(info["sec_per_step"], 3)
        row["peak_rss_mb"] = round(info["peak_rss_mb"], 1)
        row["train_reward_log"] = info["reward_log"]
    report.update(
        {
            "rows": rows,
            "seeds_per_caption": args.seeds,
            "shift": shift,
            "threads": args.threads,
            "load_end": uptime(),
            "total_seconds": round(time.perf_counter() - t_start, 1),
        }
    )
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\n{'setting':<40} {'reward':>8} {'acc':>6} {'FD':>8} {'sat':>6} {'off':>6}")
    for name, r in rows.items():
        print(
            f"{name:<40} {r['reward']:>8.4f} {r['accuracy']:>6.1%} {r['frechet']:>8.2f} {r['saturation']:>6.3f} "
            f"{r['in_between']:>6.3f}"
        )
    print(f"total {report['total_seconds']:.0f}s; load {report['load_start']} -> {report['load_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
