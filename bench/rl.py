"""Proof that RL post-training moves a reward on the CPU synthetic setup, and that a KL keeps it from hacking.

    python bench/rl.py [--base-minutes 3] [--minutes 3] [--reward contrast] [--json bench/rl_results.json]

1. Trains the tiny text-to-image DiT of ``bench/learn.py`` (4 coloured-shape captions, random tiny encoders) for
   ``--base-minutes`` (or takes ``--base FILE``), and exports it: this is the policy.
2. Measures the policy: the reward (an image statistic of the decoded images that the captions do not ask for,
   ``contrast`` by default) and the caption accuracy (each generated latent classified by the nearest class mean
   of the training latents; chance 25%), over every caption x ``--seeds`` seeds, 8 Euler steps, no CFG.
3. Runs GRPO (``python -m train.run``'s trainer, ``[rl] method = "grpo"``) for ``--minutes`` without a KL and
   again with ``kl_beta``, and DPO (candidates scored by the same reward, curriculum pairs) for ``--minutes``,
   measuring each result the same way.

Prints and writes: the reward before/after (and the factor), the accuracy before/after, the machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import learn  # noqa: E402
from _machine import cpu_name  # noqa: E402

from train.config import config_from_dict  # noqa: E402
from train.data import make_synthetic_dataset  # noqa: E402
from train.encoders import random_tiny_text_encoder, random_tiny_vae  # noqa: E402
from train.objective import dynamic_mu  # noqa: E402
from train.rl.rewards import STATISTICS  # noqa: E402
from train.rl.trainer import RLTrainer  # noqa: E402
from train.trainer import Trainer  # noqa: E402
from zimage_core.checkpoints import save_dit  # noqa: E402

SIZE = learn.SIZE
SHIFT = round(math.exp(dynamic_mu((SIZE // 16) ** 2)), 3)  # the shift the base was trained around


_NOISE = torch.Generator().manual_seed(12345)


def noise_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward of pure noise (the control run: what GRPO's updates do to the model with no signal at all)."""
    return torch.rand(images.shape[0], generator=_NOISE)


def left_right(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A plug-in reward: the left half's mean luminance minus the right half's (differentiable)."""
    lum = (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    w = lum.shape[-1] // 2
    return lum[..., :w].mean(dim=(1, 2)) - lum[..., w:].mean(dim=(1, 2))


REWARDS = {**STATISTICS, "left_right": left_right}


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def train_base(work: Path, data: Path, minutes: float, seed: int) -> Path:
    trainer = Trainer(config_from_dict(learn.make_config(work, data, seed, 10_000)), progress=False)
    trainer.setup()
    torch.set_flush_denormal(True)
    budget, schedule, t0 = minutes * 60.0, trainer.schedule.lr_lambdas[0], time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if trainer.step >= 10 and trainer.step % 10 == 0:
            schedule.total = max(trainer.step + 1, int(budget / (elapsed / trainer.step)))
        if elapsed >= budget or trainer.step >= schedule.total:
            break
        trainer.train_step()
    dit = trainer.dit.eval()
    with trainer.ema.applied(trainer.params):
        state = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    print(f"base: {trainer.step} steps in {time.perf_counter() - t0:.0f}s")
    return save_dit(state, dit.cfg, work / "base.safetensors", "comfyui")


class Judge:
    """Reward and caption accuracy of a DiT over every caption x seed (deterministic Euler sampling)."""

    def __init__(self, data: Path, seed: int, seeds: int, reward: str):
        self.te, self.vae = random_tiny_text_encoder(seed), random_tiny_vae(seed + 1)
        self.names = [c for c, *_ in learn.CLASSES]
        train_lat = learn.class_latents(data, self.vae)
        self.means = torch.stack([train_lat[c].mean(0) for c in self.names])
        self.seeds = list(range(1000, 1000 + seeds))
        self.fn = REWARDS[reward]

    @torch.no_grad()
    def __call__(self, dit) -> dict:
        was = dit.training
        dit.eval()
        gen = learn.generate(dit, self.te, self.vae, self.names, self.seeds, 1.0, SHIFT)
        dit.train(was)
        acc = learn.classify(gen, self.means, self.names)["accuracy"]
        lat = torch.cat([gen[c] for c in self.names]).view(-1, 16, SIZE // 8, SIZE // 8)
        img = ((self.vae.decode(lat).float() + 1) / 2).clamp(0, 1)
        r = self.fn(img, [""] * img.shape[0]) if self.fn is left_right else self.fn(img)
        return {"reward": float(r.mean()), "reward_std": float(r.std()), "accuracy": acc}


def ocr_proof() -> list[dict]:
    """The OCR reward on words rendered with PIL: exact, misspelt and blurred, English and (with a CJK font)
    Chinese."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    from train.rl.ocr import OCRReward

    fonts = {
        "en": "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
        "zh": "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    }
    cases = [
        ("en", 'a shop sign that says "BAKERY"', "BAKERY", 0),
        ("en", 'a shop sign that says "BAKERY"', "BAKREY", 0),
        ("en", 'a shop sign that says "BAKERY"', "BAKER", 0),
        ("en", 'a shop sign that says "BAKERY"', "BAKERY", 4),
        ("en", 'a shop sign that says "BAKERY"', "BAKERY", 8),
        ("en", 'a poster reading "Hello World"', "Hello World", 0),
        ("en", 'a poster reading "Hello World"', "Hello Wrld", 0),
        ("zh", "一张写着“欢迎光临”的海报", "欢迎光临", 0),
        ("zh", "一张写着“欢迎光临”的海报", "欢迎光明", 0),
        ("zh", "一张写着“欢迎光临”的海报", "欢迎光临", 8),
    ]
    reward, rows = OCRReward(), []
    for lang, prompt, text, blur in cases:
        if not Path(fonts[lang]).is_file():
            rows.append({"prompt": prompt, "rendered": text, "blur": blur, "score": None, "note": "no font"})
            continue
        img = Image.new("RGB", (320, 96), "white")
        ImageDraw.Draw(img).text((12, 24), text, fill="black", font=ImageFont.truetype(fonts[lang], 40))
        if blur:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        x = torch.from_numpy(__import__("numpy").array(img)).permute(2, 0, 1).float()[None] / 255
        t0 = time.perf_counter()
        score = float(reward(x, [prompt])[0])
        rows.append(
            {
                "prompt": prompt,
                "rendered": text,
                "blur": blur,
                "score": round(score, 3),
                "ms": round(1000 * (time.perf_counter() - t0)),
            }
        )
        print(f"  OCR {text!r:>14} blur {blur}: {score:.3f}  ({prompt})")
    return rows


def rl_tree(work: Path, base: Path, name: str, method: str, reward: str, seed: int, extra: dict) -> dict:
    rl = {
        "method": method,
        "policy": str(base),
        "rewards": [{"name": reward, "weight": 1.0} if reward in STATISTICS else {"function": f"rl:{reward}"}],
        "prompts": [c for c, *_ in learn.CLASSES],
        "width": SIZE,
        "height": SIZE,
        "steps": 8,
        "shift": SHIFT,
        **extra,
    }
    return {
        "name": name,
        "output_dir": str(work / name),
        "seed": seed,
        "max_steps": 100_000,
        "log_every": 10,
        "model": {"text_encoder": "random-tiny", "vae": "random-tiny", "encoder_seed": seed},
        "optim": {"lr": 1e-3 if method == "grpo" else 1e-4, "weight_decay": 0.0, "grad_clip": 1.0},
        "checkpoint": {"every": 0},
        "export": {"final": False},
        "rl": rl,
    }


TRACKED = ("loss", "dpo_accuracy", "margin", "kl", "approx_kl", "clipfrac", "reward/total")


def run_rl(tree: dict, minutes: float, judge: Judge, every: float) -> dict:
    trainer = RLTrainer(config_from_dict(tree), progress=False)
    trainer.setup()
    t0, curve, rewards, infos = time.perf_counter(), [], [], []
    next_eval = every
    while time.perf_counter() - t0 < minutes * 60:
        loss, info = trainer.train_step()
        rewards.append(info.get("reward/total", float("nan")))
        infos.append({"loss": loss, **{k: v for k, v in info.items() if isinstance(v, (int, float))}})
        if every and time.perf_counter() - t0 >= next_eval * 60:
            m = judge(trainer.dit)
            recent = infos[-max(1, len(infos) // 4) :]
            train = {k: round(sum(i[k] for i in recent) / len(recent), 5) for k in recent[-1] if k in TRACKED}
            curve.append({"minutes": round((time.perf_counter() - t0) / 60, 2), "step": trainer.step, **m, **train})
            print(f"  {tree['name']} {curve[-1]}")
            next_eval += every
    seconds = time.perf_counter() - t0
    final = judge(trainer.dit)
    return {
        "steps": trainer.step,
        "seconds": round(seconds, 1),
        "sec_per_step": round(seconds / max(1, trainer.step), 2),
        "final": final,
        "curve": curve,
        "train_reward_first10": sum(rewards[:10]) / max(1, len(rewards[:10])),
        "train_reward_last10": sum(rewards[-10:]) / max(1, len(rewards[-10:])),
        "load": load(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a trained base DiT file (default: train one)")
    ap.add_argument("--base-minutes", type=float, default=3.0)
    ap.add_argument("--minutes", type=float, default=3.0, help="time budget of each RL run")
    ap.add_argument("--reward", default="contrast", choices=sorted(REWARDS))
    ap.add_argument("--kl", type=float, default=1.0, help="kl_beta of the regularised GRPO run")
    ap.add_argument("--seeds", type=int, default=8, help="evaluation seeds per caption")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=float, default=1.0, help="minutes between evaluations (0 = end only)")
    ap.add_argument("--only", default="grpo,grpo_kl,grpo_noise,dpo", help="runs to do, comma-separated")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of every RL run (default: per method)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an [rl] override (TOML value)")
    ap.add_argument("--ocr", action="store_true", help="only the OCR reward check on PIL-rendered words")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", help="keep the work folder here")
    ap.add_argument("--json", default=str(ROOT / "bench" / "rl_results.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"machine": cpu_name(), "torch": torch.__version__, "threads": args.threads, "reward": args.reward}
    print(f"{report['machine']}, {load()}")
    if args.ocr:
        report["ocr"] = ocr_proof()
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    with tempfile.TemporaryDirectory(prefix="zimage-rl-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "shapes"
        if not any(data.glob("*.png")):
            make_synthetic_dataset(data, n_per_class=32, size=SIZE, seed=args.seed)
        t0 = time.perf_counter()
        base = Path(args.base) if args.base else train_base(work, data, args.base_minutes, args.seed)
        report["base_seconds"] = round(time.perf_counter() - t0, 1)
        judge = Judge(data, args.seed, args.seeds, args.reward)
        report["base"] = judge(__import__("zimage_core.checkpoints").checkpoints.load_dit(base, dtype=torch.float32))
        print(f"base policy: {report['base']}  ({load()})")
        runs = {
            "grpo": ("grpo", {"kl_beta": 0.0}),
            "grpo_kl": ("grpo", {"kl_beta": args.kl}),
            # control: a reward of pure noise, to tell drift from reward hacking
            "grpo_noise": ("grpo", {"kl_beta": 0.0, "rewards": [{"function": "rl:noise_reward", "weight": 1.0}]}),
            "dpo": ("dpo", {"candidates": 16, "pairs_per_prompt": 8, "batch": 8, "beta": 2000.0}),
        }
        common = {
            "group_size": 8,
            "prompts_per_step": 4,
            "eta": 0.7,
            "clip_range": 0.2,
            "updates_per_rollout": 1,
            "train_steps": "window",
            "window_size": 3,
            "window_shift_every": 10,
        }
        for name in [n for n in args.only.split(",") if n]:
            method, extra = runs[name]
            extra = {**(common if method == "grpo" else {}), **extra}
            from train.config import parse_value

            extra.update({k: parse_value(v) for k, _, v in (o.partition("=") for o in args.set)})
            tree = rl_tree(work, base, name, method, args.reward, args.seed, extra)
            if args.lr:
                tree["optim"]["lr"] = args.lr
            print(f"{name}: {json.dumps(tree['rl'])}")
            res = run_rl(tree, args.minutes, judge, args.eval_every)
            res["config"] = tree["rl"]
            report[name] = res
            b, f = report["base"], res["final"]
            factor = f["reward"] / b["reward"] if b["reward"] else float("nan")
            res["reward_factor"] = round(factor, 2)
            res["accuracy_change_points"] = round(100 * (f["accuracy"] - b["accuracy"]), 1)
            print(
                f"{name}: {res['steps']} steps in {res['seconds']:.0f}s; {args.reward} {b['reward']:.4f} -> "
                f"{f['reward']:.4f} (x{factor:.2f}); caption accuracy {b['accuracy']:.1%} -> {f['accuracy']:.1%}; "
                f"{res['load']}"
            )
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
