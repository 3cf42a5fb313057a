"""Proof that distillation works: a tiny teacher that needs ~30 steps with CFG, distilled into 4- and 8-step students
that need neither, judged on the decoded images.

    python bench/distill.py [--teacher-steps 1500] [--distill-steps 300] [--seeds 256] [--jobs 2] [--work DIR]

1. The synthetic shapes of ``bench/learn.py`` (4 captions x 32 images, 64x64) and its teacher recipe (a tiny DiT
   trained from scratch with ``train.trainer.Trainer``, EMA weights), with one change: the VAE is a **PCA patch
   autoencoder** (:class:`PatchPCA`): each 8x8x3 pixel patch is projected on the 16 principal components of the
   training images' patches (scaled to unit variance), and decoded by the transpose. It is fixed and deterministic,
   the best linear autoencoder of these images in the L2 sense, and its decode *is* the image (reconstruction PSNR
   is reported); the random tiny Flux VAE of ``learn.py`` decodes to noise, useless for judging pictures.
2. Distillation with ``train.distill.Distiller`` (each run in its own process, for its peak RSS): Decoupled DMD and
   DMD2 to 4 and 8 steps, and the CFG-augmentation-only ablation to 4 steps. Fake score = LoRA on the frozen
   teacher, TTUR 3, student AdamW lr 3e-5, 300 generator updates, backward simulation with the Euler sampler, teacher cfg 3.
   ``--runs`` adds per-run overrides (``dmd2:4+gan_weight=0.02``); ``--teacher-data N`` draws N images per caption
   from the teacher (30 steps, cfg 3, seeds of their own) as a folder dataset, the real latents of runs with
   ``+data=teacher`` (the GAN head then learns the teacher's outputs, as LADD does, instead of the training shapes).
3. Every setting draws each caption for ``--seeds`` seeds with the engine's pipeline (Euler, the training shift);
   images are decoded and judged by their structure, never by latents (256 seeds = 1024 images per setting: with
   64 the Frechet distance's finite-sample bias, the teacher's own floor of 0.39, hides differences of 0.1-0.2;
   with 256 that floor is 0.09):
   - *caption accuracy*: the object (pixels away from the grey background) must have the caption's colour (nearest
     class colour of its mean) AND its shape (the bounding-box-normalised mask's best IoU among the training
     images' masks must be an image of the caption's class);
   - *Frechet distance* to a reference draw of the teacher's 30-step CFG images made with other seeds (so the
     teacher's own 30-step row is the noise floor), on a 26-number structural descriptor standardised by the
     reference's spread: object area, colour mean/spread, background colour/spread,
     box fill/aspect/size/position, edge energy, a gradient-orientation histogram, compactness, high-frequency energy;
   - *saturation* (mean HSV saturation of the object, share of clipped pixels) and *sharpness* (share of pixels that
     are neither background nor object colour): over-saturation and blur show here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._child import peak_rss_mb  # noqa: E402
from bench._machine import cpu_name  # noqa: E402
from bench.learn import SIZE, ema_dit, make_config, train_for  # noqa: E402
from train.config import config_from_dict  # noqa: E402
from train.data import make_synthetic_dataset  # noqa: E402
from train.data.synthetic import BACKGROUND, CLASSES  # noqa: E402
from train.objective import dynamic_mu  # noqa: E402
from zimage_core.vae import pil_to_tensor  # noqa: E402

PATCH, CHANNELS = 8, 16
VAE_FILE = "vae.pt"  # the fitted PatchPCA in the work folder; runs name it as model.vae
TEACHER_DATA = "teacher_shapes"  # --teacher-data: the teacher's 30-step CFG images, the data of runs with data=teacher
CFG = 3.0


# ---------------------------------------------------------------------------------------------
# The VAE: PCA of 8x8 patches
# ---------------------------------------------------------------------------------------------
class PatchPCA(nn.Module):
    """``encode``: 8x8x3 patches -> 16 principal-component coefficients at unit variance; ``decode``: back."""

    def __init__(self, basis: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.basis = nn.Parameter(basis, requires_grad=False)  # [16, 192]
        self.mean = nn.Parameter(mean, requires_grad=False)  # [192]
        self.scale = nn.Parameter(scale, requires_grad=False)  # [16]

    @classmethod
    def fit(cls, pixels: torch.Tensor) -> PatchPCA:
        """From images ``[N, 3, H, W]`` in [-1, 1]."""
        p = cls._patches(pixels.double())
        mean = p.mean(0)
        _, s, vh = torch.linalg.svd(p - mean, full_matrices=False)
        basis = vh[:CHANNELS]
        scale = (s[:CHANNELS] / math.sqrt(p.shape[0] - 1)).clamp_min(1e-6)
        return cls(basis.float(), mean.float(), scale.float())

    @staticmethod
    def _patches(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
        return p.reshape(-1, c * PATCH * PATCH)

    def encode(self, pixels: torch.Tensor, tile=None) -> torch.Tensor:
        b, _, h, w = pixels.shape
        z = (self._patches(pixels.float()) - self.mean) @ self.basis.T / self.scale
        return z.reshape(b, h // PATCH, w // PATCH, CHANNELS).permute(0, 3, 1, 2).contiguous()

    def decode(self, latents: torch.Tensor, tile=None) -> torch.Tensor:
        b, _, hl, wl = latents.shape
        p = (latents.float().permute(0, 2, 3, 1).reshape(-1, CHANNELS) * self.scale) @ self.basis + self.mean
        p = p.reshape(b, hl, wl, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        return p.reshape(b, 3, hl * PATCH, wl * PATCH)


@contextmanager
def pca_vae(vae: PatchPCA, path: str | Path):
    """The trainers load ``model.vae = path`` (the saved ``vae``) as this VAE (cache building; their samples are
    off); the file exists, so the trainers' start checks pass."""
    import train.encoders as enc

    real = enc.load_vae_for

    def load(m, device):
        return vae.to(device) if Path(m.vae) == Path(path) else real(m, device)

    enc.load_vae_for = load
    try:
        yield
    finally:
        enc.load_vae_for = real


# ---------------------------------------------------------------------------------------------
# Judging decoded images
# ---------------------------------------------------------------------------------------------
BG = np.array(BACKGROUND, dtype=np.float32) / 255.0
COLORS = np.array([c[2] for c in CLASSES], dtype=np.float32) / 255.0
MASK_SIZE = 24


def to_images(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensors -> float RGB in [0, 1], ``[N, H, W, 3]`` (clipped like a saved PNG)."""
    return (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def foreground(img: np.ndarray) -> np.ndarray:
    return np.linalg.norm(img - BG, axis=-1) > 0.25


def norm_mask(mask: np.ndarray) -> np.ndarray | None:
    """The mask cropped to its bounding box and resized to 24x24 (nearest), or None when there is no object."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 6:
        return None
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    yi = (np.arange(MASK_SIZE) * crop.shape[0] / MASK_SIZE).astype(int)
    xi = (np.arange(MASK_SIZE) * crop.shape[1] / MASK_SIZE).astype(int)
    return crop[yi][:, xi]


class Judge:
    """Caption accuracy and structural descriptors, calibrated on the training images."""

    def __init__(self, train_imgs: np.ndarray, train_labels: np.ndarray):
        masks = [norm_mask(foreground(im)) for im in train_imgs]
        keep = [i for i, m in enumerate(masks) if m is not None]
        self.masks = np.stack([masks[i] for i in keep]).reshape(len(keep), -1).astype(np.float32)
        self.mask_labels = train_labels[keep]
        self.mu, self.sd = 0.0, 1.0

    def calibrate(self, ref_imgs: np.ndarray) -> np.ndarray:
        """Standardise descriptors by the reference set's mean and spread; returns the reference's features."""
        feats = np.stack([self.descriptor(im) for im in ref_imgs])
        self.mu, self.sd = feats.mean(0), feats.std(0) + 1e-3
        return (feats - self.mu) / self.sd

    def classify(self, img: np.ndarray) -> tuple[int, int]:
        """(colour class, shape class); -1 when there is no object."""
        fg = foreground(img)
        m = norm_mask(fg)
        if m is None:
            return -1, -1
        color = int(np.argmin(np.linalg.norm(COLORS - img[fg].mean(0), axis=1)))
        flat = m.reshape(1, -1).astype(np.float32)
        inter = flat @ self.masks.T
        union = flat.sum() + self.masks.sum(1) - inter
        shape = int(self.mask_labels[np.argmax(inter[0] / np.maximum(union, 1))])
        return color, shape

    def descriptor(self, img: np.ndarray) -> np.ndarray:
        fg = foreground(img)
        area = fg.mean()
        obj = img[fg] if fg.any() else np.zeros((1, 3), np.float32)
        bgpx = img[~fg] if (~fg).any() else np.zeros((1, 3), np.float32)
        ys, xs = np.nonzero(fg)
        if len(ys):
            bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            fill, aspect, box = fg.sum() / (bh * bw), bw / bh, bh * bw / fg.size
            cy, cx = ys.mean() / img.shape[0] - 0.5, xs.mean() / img.shape[1] - 0.5
        else:
            fill = aspect = box = cy = cx = 0.0
        gray = img.mean(-1)
        gy, gx = np.gradient(gray)
        mag = np.hypot(gx, gy)
        ang = np.mod(np.arctan2(gy, gx), np.pi)
        hist = np.histogram(ang, bins=8, range=(0, np.pi), weights=mag)[0] / (mag.sum() + 1e-6)
        edge = np.abs(np.diff(fg.astype(np.int8), axis=0)).sum() + np.abs(np.diff(fg.astype(np.int8), axis=1)).sum()
        compact = edge**2 / max(fg.sum(), 1) / 100.0
        lap = gray[1:-1, 1:-1] * 4 - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
        return np.array(
            [area, *obj.mean(0), *obj.std(0), np.abs(bgpx.mean(0) - BG).mean(), bgpx.std(0).mean()]
            + [fill, aspect, box, cy, cx, mag.mean(), *hist, compact, lap.var() * 100],
            dtype=np.float64,
        )

    def features(self, imgs: np.ndarray) -> np.ndarray:
        return (np.stack([self.descriptor(im) for im in imgs]) - self.mu) / self.sd

    def report(self, imgs: np.ndarray, labels: np.ndarray, ref: np.ndarray | None) -> dict:
        pred = [self.classify(im) for im in imgs]
        color = np.array([p[0] for p in pred])
        shape = np.array([p[1] for p in pred])
        ok = (color == labels) & (shape == labels)
        hsv_s = []
        for im in imgs:
            fg = foreground(im)
            px = im[fg] if fg.any() else im.reshape(-1, 3)
            mx, mn = px.max(-1), px.min(-1)
            hsv_s.append(float(((mx - mn) / np.maximum(mx, 1e-6)).mean()))
        d_bg = np.linalg.norm(imgs - BG, axis=-1)
        d_obj = np.linalg.norm(imgs[..., None, :] - COLORS, axis=-1).min(-1)
        out = {
            "accuracy": float(ok.mean()),
            "color_accuracy": float((color == labels).mean()),
            "shape_accuracy": float((shape == labels).mean()),
            "saturation": float(np.mean(hsv_s)),
            "clipped": float(((imgs <= 0.0) | (imgs >= 1.0)).mean()),
            "in_between": float(((d_bg > 0.1) & (d_obj > 0.25)).mean()),  # neither background nor object colour
        }
        if ref is not None:
            out["frechet"] = frechet(self.features(imgs), ref)
        return out


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``,
    the trace of the square root as the sum of the square roots of the eigenvalues of ``S1 S2`` (a small ridge keeps
    the covariances positive definite)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    eye = np.eye(a.shape[1]) * 1e-6
    s1, s2 = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    root_trace = np.sqrt(np.abs(np.linalg.eigvals(s1 @ s2).real)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root_trace)


# ---------------------------------------------------------------------------------------------
# Generating
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(dit, te, vae, captions, seeds, steps: int, cfg: float, shift: float):
    """Decoded images ``[N, H, W, 3]`` and labels, every caption for every seed (the engine's pipeline)."""
    from zimage_core.pipeline import GenerateOptions, ZImagePipeline
    from zimage_core.sampling import initial_noise, latent_shape

    pipe = ZImagePipeline(dit, te, None, "cpu")
    cond = pipe.encode_prompts(captions)
    uncond = pipe.encode_prompts([""] * len(captions)) if cfg > 1 else None
    opts = GenerateOptions(prompt=captions, width=SIZE, height=SIZE, steps=steps, cfg=cfg, shift=shift)
    imgs, labels = [], []
    for seed in seeds:
        lat = pipe.sample(cond, uncond, initial_noise(latent_shape(len(captions), SIZE, SIZE), seed), opts)
        imgs.append(to_images(vae.decode(lat)))
        labels += list(range(len(captions)))
    return np.concatenate(imgs), np.array(labels)


# ---------------------------------------------------------------------------------------------
# Distillation runs (each in a child process)
# ---------------------------------------------------------------------------------------------
def parse_run(text: str) -> tuple[str, int, dict]:
    """``method:steps[+key=value...]`` -> (method, steps, overrides); ``max_steps``, ``seed``, ``lr`` and
    ``ema_decay`` are the run's and the student's, ``data`` picks the run's data (``real`` shapes or the
    ``teacher``'s images), other keys are ``[distill]`` keys (values read as JSON where they parse, e.g.
    ``dmd2:4+gan_weight=0.005+max_steps=600``)."""
    head, *pairs = text.split("+")
    method, steps = head.split(":")
    extra = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    return method, int(steps), extra


def run_label(method: str, steps: int, extra: dict) -> str:
    tail = f" [{', '.join(f'{k}={v}' for k, v in extra.items())}]" if extra else ""
    return f"student {method}, {steps} steps, cfg 1{tail}"


def distill_config(
    work: Path,
    data: Path,
    teacher: Path,
    method: str,
    steps: int,
    max_steps: int,
    seed: int,
    shift: float,
    hp: dict,
    extra: dict | None = None,
) -> dict:
    extra = dict(extra or {})
    name = f"{method}_{steps}" + "".join(f"_{k}{v}" for k, v in extra.items())  # every override: its own folder
    max_steps = extra.pop("max_steps", max_steps)
    run_seed = extra.pop("seed", seed)  # the run's randomness; the text encoder stays the teacher's (encoder_seed)
    source = extra.pop("data", "real")  # real: the training shapes; teacher: the teacher's own images (--teacher-data)
    if source not in ("real", "teacher"):
        raise SystemExit(f"data={source}: the data of a run is 'real' (the training shapes) or 'teacher'")
    if source == "teacher":
        data = work / TEACHER_DATA
    cfg = {
        "name": name,
        "output_dir": str(work / name),
        "seed": run_seed,
        "max_steps": max_steps,
        "log_every": 10,
        "device": "cpu",
        "model": {"text_encoder": "random-tiny", "vae": str(work / VAE_FILE), "encoder_seed": seed},
        "data": {
            "sources": [{"type": "folder", "path": str(data)}],
            "resolution": SIZE,
            "aspect_buckets": False,
            "token_budget": 512,
            "max_batch": 32,
            "caption_levels": {"caption": 1.0},
            "caption_dropout": 0.0,
            "cache_dir": str(work / ("cache_distill" if source == "real" else "cache_distill_teacher")),
        },
        "distill": {
            "method": method,
            "teacher": str(teacher),
            "cfg": CFG,
            "student_steps": steps,
            "student_shift": shift,
            "fake_lora_rank": 16,
            "fake_lora_alpha": 16.0,
            "ttur": hp["ttur"],
            "fake_lr": hp["fake_lr"],
            "sigma_shift": shift,
            "lora_rank": 16,
            "export_diffusers": False,
        },
        "optim": {"lr": hp["lr"], "weight_decay": 0.0, "warmup_steps": 10, "schedule": "constant", "grad_clip": 1.0},
        "ema": {"enabled": True, "decay": 0.95},
        "checkpoint": {"every": 0, "keep_last": 1},
        "samples": {"every": 0},
        "export": {"dtype": "fp32"},
    }
    if "lr" in extra:
        cfg["optim"]["lr"] = extra.pop("lr")
    if "ema_decay" in extra:
        cfg["ema"]["decay"] = extra.pop("ema_decay")
    cfg["distill"].update(extra)
    return cfg


def train_in_child(spec_path: str, trainer_cls) -> tuple[object, dict, list[dict]]:
    """Run one training of ``trainer_cls`` (``spec`` JSON: config, vae file, threads) in this process, fresh: the
    result, its timings and the metric rows."""
    import shutil

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    vae = torch.load(spec["vae"], weights_only=False)
    shutil.rmtree(spec["config"]["output_dir"], ignore_errors=True)  # a fresh run, also in a kept --work folder
    with pca_vae(vae, spec["vae"]):
        run = trainer_cls(config_from_dict(spec["config"]), progress=False)
        t0 = time.perf_counter()
        run.setup()
        t_setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = run.train()
        t_train = time.perf_counter() - t1
    rows = [json.loads(x) for x in (Path(spec["config"]["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    times = {
        "student": str(res.export),
        "steps": res.step,
        "setup_s": t_setup,
        "train_s": t_train,
        "sec_per_step": t_train / max(1, res.step),
        "peak_rss_mb": peak_rss_mb(),
    }
    return res, times, rows


def child(spec_path: str) -> None:
    """Run one distillation; print a JSON line with the timings."""
    from train.distill import Distiller

    _, times, rows = train_in_child(spec_path, Distiller)
    print(json.dumps({**times, "last": rows[-1]}))


def spec_path(spec: dict, work: Path, script: str) -> Path:
    """Where :func:`run_child` writes a run's spec (its result beside it, ``.result.json``)."""
    return work / f"{Path(script).stem}_{spec['config']['name'].replace('@', '_')}.json"


def run_child(spec: dict, work: Path, script: str = __file__, what: str = "distillation") -> dict:
    """Run ``script --child SPEC`` in a fresh process; its last stdout line (JSON)."""
    path = spec_path(spec, work, script)
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, script, "--child", str(path)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{what} {spec['config']['name']} failed:\n{out.stderr[-4000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    path.with_suffix(".result.json").write_text(json.dumps(info))  # for --reuse
    return info


def reused_run(spec: dict, work: Path, script: str = __file__) -> dict | None:
    """The info of a finished run of exactly ``spec`` (the spec file ``run_child`` wrote, the export, all
    ``max_steps`` in its metrics), or None; its timings from the result ``run_child`` saved, else the metrics."""
    c = spec["config"]
    spec_file = spec_path(spec, work, script)
    student = Path(c["output_dir"]) / "export" / f"{c['name']}_{c['distill']['student_steps']}step_student.safetensors"
    metrics = Path(c["output_dir"]) / "metrics.jsonl"
    if not (spec_file.is_file() and student.is_file() and metrics.is_file()):
        return None
    if json.loads(spec_file.read_text()) != spec:
        return None
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    if not rows or rows[-1]["step"] != c["max_steps"]:
        return None
    saved = spec_file.with_suffix(".result.json")
    if saved.is_file():
        return {**json.loads(saved.read_text()), "reused": True}
    sec = float(np.mean([r["sec_per_step"] for r in rows if "sec_per_step" in r]))
    return {
        "student": str(student),
        "steps": rows[-1]["step"],
        "sec_per_step": sec,
        "peak_rss_mb": None,
        "reused": True,
        "last": rows[-1],
    }


def load_student(path: str):
    from zimage_core.checkpoints import load_dit

    return load_dit(path, dtype=torch.float32, device="cpu").eval()


def save_grid(folder: str | None, name: str, imgs: np.ndarray, n_captions: int, max_rows: int = 8) -> None:
    """The first ``max_rows`` seeds x every caption as one PNG (rows = seeds)."""
    if not folder:
        return
    from PIL import Image

    rows = imgs[: max_rows * n_captions]
    h, w = rows.shape[1:3]
    grid = rows.reshape(-1, n_captions, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(-1, n_captions * w, 3)
    Path(folder).mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(Path(folder) / f"{slug}.png")


def write_teacher_data(work: Path, teacher, te, vae, captions: list[str], per_caption: int, shift: float) -> dict:
    """The teacher's 30-step cfg-3 images (seeds 20000 + i: neither the judge's nor the reference's) as a folder
    dataset (PNG + ``.txt`` caption) in ``work/teacher_shapes``; kept while its size matches."""
    import shutil

    from PIL import Image

    folder = work / TEACHER_DATA
    if len(list(folder.glob("*.png"))) == per_caption * len(captions):
        return {"images": per_caption * len(captions), "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(work / "cache_distill_teacher", ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    imgs, labels = generate(teacher, te, vae, captions, list(range(20000, 20000 + per_caption)), 30, CFG, shift)
    for i, (img, lab) in enumerate(zip(imgs, labels)):
        stem = folder / f"teacher_{i:05d}"
        Image.fromarray((img * 255).round().astype(np.uint8)).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(captions[lab] + "\n", encoding="utf-8")
    return {"images": len(imgs), "seconds": round(time.perf_counter() - t0, 1)}


def uptime() -> str:
    try:
        return open("/proc/loadavg").read().split(" ")[:3].__str__()
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher-steps", type=int, default=1500, help="teacher training steps (batch 64)")
    ap.add_argument("--distill-steps", type=int, default=300, help="generator updates per distillation run")
    ap.add_argument("--seeds", type=int, default=256, help="generations per caption and setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-5, help="the student's AdamW learning rate")
    ap.add_argument("--fake-lr", type=float, default=1e-3, help="the fake-score LoRA's learning rate")
    ap.add_argument("--ttur", type=int, default=3, help="fake-score updates per generator update")
    ap.add_argument("--jobs", type=int, default=1, help="distillation runs at a time (each in its own process)")
    ap.add_argument(
        "--runs",
        default="decoupled_dmd:4,dmd2:4,ca_only:4,decoupled_dmd:8,dmd2:8",
        help="METHOD:STEPS[+KEY=VALUE...], comma-separated (KEY: max_steps, seed, lr, ema_decay, data=real|teacher or a [distill] key)",
    )
    ap.add_argument(
        "--teacher-data",
        type=int,
        default=0,
        help="draw this many images per caption from the teacher (30 steps, cfg 3, other seeds than the judge's) as the "
        "data of runs with +data=teacher (LADD-style synthetic data for the GAN head)",
    )
    ap.add_argument(
        "--judge-seeds",
        default="1000",
        help="first seed of each judged seed set, comma-separated: the table uses the first, the others add the FD "
        "of every few-step setting on their seeds (the reference draw keeps seeds 5000 + i)",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="judge a run's saved student again instead of retraining it, when its folder in --work holds the "
        "finished export of the same spec (its time per step and peak RSS from the result saved with it; runs older than "
        "that: the time from its metrics.jsonl, no peak RSS)",
    )
    ap.add_argument("--json", default=str(ROOT / "bench" / "distill_results.json"))
    ap.add_argument("--work", help="keep the work folder here; a teacher.safetensors already in it is reused")
    ap.add_argument("--grids", help="write one PNG grid of the generated images per setting into this folder")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    torch.set_num_threads(args.threads)
    from PIL import Image

    from train.encoders import random_tiny_text_encoder
    from train.trainer import Trainer
    from zimage_core.checkpoints import save_dit

    t_start = time.perf_counter()
    report: dict = {"machine": cpu_name(), "torch": torch.__version__, "load_start": uptime(), "cfg": CFG}
    with tempfile.TemporaryDirectory(prefix="zimage-distill-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "shapes"
        captions = make_synthetic_dataset(data, n_per_class=32, size=SIZE, seed=args.seed)
        files = sorted(data.glob("*.png"))
        pixels = pil_to_tensor([Image.open(p).convert("RGB") for p in files])
        labels = np.array([next(i for i, c in enumerate(CLASSES) if p.name.startswith(c[1])) for p in files])
        vae = PatchPCA.fit(pixels)
        torch.save(vae, work / VAE_FILE)
        recon = vae.decode(vae.encode(pixels))
        mse = float(((recon.clamp(-1, 1) - pixels) / 2).pow(2).mean())
        report["vae_psnr_db"] = round(10 * math.log10(1.0 / mse), 2)
        train_imgs = to_images(pixels)
        judge = Judge(train_imgs, labels)
        report["train_images"] = judge.report(train_imgs, labels, None)
        report["train_reconstructions"] = judge.report(to_images(recon), labels, None)
        print(
            f"PCA patch VAE: reconstruction PSNR {report['vae_psnr_db']} dB; judge on the training images: {report['train_images']['accuracy']:.0%}, on their reconstructions {report['train_reconstructions']['accuracy']:.0%}"
        )

        # 1. the teacher (bench/learn.py's recipe, PCA VAE)
        teacher_file = work / "teacher.safetensors"
        if teacher_file.is_file():
            teacher = load_student(str(teacher_file))
            report["teacher"] = json.loads((work / "teacher.json").read_text())
            print(f"teacher reused from {teacher_file}: {report['teacher']}")
        else:
            cfg = make_config(work, data, args.seed, 10_000)
            cfg["model"]["vae"] = str(work / VAE_FILE)
            with pca_vae(vae, work / VAE_FILE):
                trainer = Trainer(config_from_dict(cfg), progress=False)
                trainer.setup()
                losses, t_teacher = train_for(trainer, 0.0, steps=args.teacher_steps)
            teacher = ema_dit(trainer)
            save_dit(teacher.state_dict(), teacher.cfg, teacher_file, "comfyui")
            report["teacher"] = {
                "train_steps": trainer.step,
                "train_seconds": round(t_teacher, 1),
                "sec_per_step": round(t_teacher / trainer.step, 3),
                "params": sum(p.numel() for p in teacher.parameters()),
                "loss_first10": float(np.mean(losses[:10])),
                "loss_last10": float(np.mean(losses[-10:])),
                "load": uptime(),
            }
            (work / "teacher.json").write_text(json.dumps(report["teacher"]))
            t = report["teacher"]
            print(
                f"teacher: {t['train_steps']} steps in {t_teacher:.0f}s, loss {t['loss_first10']:.3f} -> {t['loss_last10']:.3f}"
            )
            trainer.batches.close()
            del trainer

        te = random_tiny_text_encoder(args.seed)
        shift = round(math.exp(dynamic_mu((SIZE // 16) ** 2)), 3)
        # the reference draw uses its own seeds: a setting drawn from the same noise would look closer than it is
        bases = [int(b) for b in args.judge_seeds.split(",")]
        seeds = list(range(bases[0], bases[0] + args.seeds))
        ref_seeds = list(range(5000, 5000 + args.seeds))
        if any(set(range(b, b + args.seeds)) & set(ref_seeds) for b in bases):
            raise SystemExit("--judge-seeds: a judged seed set overlaps the reference's (5000 + i)")

        def fd_by_seeds(dit, steps: int, c: float, first: float) -> dict:
            """The FD of a few-step setting on every judged seed set (``--judge-seeds``; ``first``: the first's)."""
            out = {str(bases[0]): first}
            for b in bases[1:]:
                imgs, _ = generate(dit, te, vae, captions, list(range(b, b + args.seeds)), steps, c, shift)
                out[str(b)] = frechet(judge.features(imgs), ref_feats)
            return out

        t_gen = time.perf_counter()
        ref_imgs, _ = generate(teacher, te, vae, captions, ref_seeds, 30, CFG, shift)
        ref_feats = judge.calibrate(ref_imgs)
        save_grid(args.grids, "reference", ref_imgs, len(captions))
        rows = {}
        settings = {
            "teacher 30 steps, cfg 3": (teacher, 30, CFG, seeds),
            "teacher 4 steps, cfg 1": (teacher, 4, 1.0, seeds),
            "teacher 4 steps, cfg 3": (teacher, 4, CFG, seeds),
            "teacher 8 steps, cfg 3": (teacher, 8, CFG, seeds),
        }
        for name, (dit, steps, c, sd) in settings.items():
            imgs, labs = generate(dit, te, vae, captions, sd, steps, c, shift)
            rows[name] = judge.report(imgs, labs, ref_feats)
            if steps <= 8 and len(bases) > 1:
                rows[name]["frechet_by_seeds"] = fd_by_seeds(dit, steps, c, rows[name]["frechet"])
            save_grid(args.grids, name, imgs, len(captions))
            print(f"{name}: {rows[name]}")
        report["teacher_generate_seconds"] = round(time.perf_counter() - t_gen, 1)

        if args.teacher_data:
            report["teacher_data"] = write_teacher_data(work, teacher, te, vae, captions, args.teacher_data, shift)

        # 2. the students
        runs = {}
        hp = {"lr": args.lr, "fake_lr": args.fake_lr, "ttur": args.ttur}
        report["hyperparameters"] = hp
        items = [parse_run(x) for x in filter(None, args.runs.split(","))]
        specs = {
            run: {
                "config": distill_config(
                    work,
                    data,
                    teacher_file,
                    run[0],
                    run[1],
                    args.distill_steps,
                    args.seed,
                    shift,
                    hp,
                    json.loads(run[2]),
                ),
                "vae": str(work / VAE_FILE),
                "threads": args.threads,
            }
            for run in ((m, n, json.dumps(e)) for m, n, e in items)
        }
        print(
            f"distilling {items}, {args.distill_steps} generator updates each, {args.jobs} at a time (load {uptime()})"
        )
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            infos = dict(
                zip(
                    specs,
                    pool.map(lambda sp: (args.reuse and reused_run(sp, work)) or run_child(sp, work), specs.values()),
                )
            )
        for (method, steps, extra), info in infos.items():
            info["load_after"] = uptime()
            runs[f"{method}:{steps}{extra if extra != '{}' else ''}"] = info
            student = load_student(info["student"])
            imgs, labs = generate(student, te, vae, captions, seeds, steps, 1.0, shift)
            name = run_label(method, steps, json.loads(extra))
            rows[name] = judge.report(imgs, labs, ref_feats)
            if len(bases) > 1:
                rows[name]["frechet_by_seeds"] = fd_by_seeds(student, steps, 1.0, rows[name]["frechet"])
            save_grid(args.grids, name, imgs, len(captions))
            rows[name]["sec_per_step"] = round(info["sec_per_step"], 3)
            rows[name]["peak_rss_mb"] = info["peak_rss_mb"] and round(info["peak_rss_mb"], 1)
            rows[name]["reused"] = bool(info.get("reused"))
            print(f"{name}: {rows[name]}  ({info['sec_per_step']:.2f} s/step, peak RSS {info['peak_rss_mb']} MB)")
        report["runs"] = runs
        report["rows"] = rows
    ref = rows["teacher 30 steps, cfg 3"]
    four = rows["teacher 4 steps, cfg 3"]
    goals = {}

    def fd_sets(r: dict) -> dict:
        return r.get("frechet_by_seeds") or {"": r["frechet"]}

    for name, r in rows.items():
        if name.startswith("student ") and ", 4 steps, cfg 1" in name:
            goals[name[len("student ") :]] = {
                "within_5_points": r["accuracy"] >= ref["accuracy"] - 0.05,
                "closer_than_teacher_4_steps_cfg": r["frechet"] < four["frechet"],
                "closer_on_every_judged_seed_set": all(v < fd_sets(four)[b] for b, v in fd_sets(r).items()),
            }
    report.update(
        {
            "goals": goals,
            "seeds_per_caption": args.seeds,
            "judge_seeds": args.judge_seeds,
            "shift": shift,
            "distill_steps": args.distill_steps,
            "threads": args.threads,
            "load_end": uptime(),
            "total_seconds": round(time.perf_counter() - t_start, 1),
        }
    )
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\n{'setting':<52} {'acc':>6} {'FD':>8} {'sat':>6} {'between':>8}")
    for name, r in rows.items():
        print(
            f"{name:<52} {r['accuracy']:>6.1%} {r.get('frechet', float('nan')):>8.2f} {r['saturation']:>6.3f} {r['in_between']:>8.4f}"
            + (
                "  FD by seed set " + " ".join(f"{v:.2f}" for v in r["frechet_by_seeds"].values())
                if "frechet_by_seeds" in r
                else ""
            )
        )
    print(f"goals: {goals}; total {report['total_seconds']:.0f}s; load {report['load_start']} -> {report['load_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
