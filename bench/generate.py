"""End-to-end CPU benchmark: `zimage generate` vs diffusers' ZImagePipeline on the same random mid-size model.

Both run the same generation (same files, prompt, size, steps, seed) in fresh processes, alternately,
so the machine's state is shared fairly. Reports wall time (load + encode + 8 steps + decode), peak
RSS, the ratio, and checks that the two images agree.

    python bench/generate.py [--rounds 2] [--size 512] [--steps 8] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import cpu_name  # noqa: E402
from tests.factories.pipeline import build_tiny_model  # noqa: E402
from zimage_core.config import DiTConfig, TextEncoderConfig, VAEConfig  # noqa: E402

MID_TE = TextEncoderConfig.tiny(
    hidden_size=1024, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=128, intermediate_size=3072
)
MID_DIT = DiTConfig.mid(cap_feat_dim=1024, t_mid_dim=1024)
MID_VAE = VAEConfig.flux()


def run(engine: str, model: Path, out: Path, size: int, steps: int, seed: int) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "_child.py"),
        engine,
        str(model),
        str(out),
        str(size),
        str(size),
        str(steps),
        str(seed),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise SystemExit(f"{engine} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--write", type=Path, default=None, help="update this markdown file's CPU section")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp, seed=0, dit_cfg=MID_DIT, te_cfg=MID_TE, vae_cfg=MID_VAE)
        results = {"zimage": [], "diffusers": []}
        for r in range(args.rounds):
            order = ("zimage", "diffusers") if r % 2 == 0 else ("diffusers", "zimage")
            for engine in order:
                res = run(engine, model.root, tmp / f"{engine}.png", args.size, args.steps, 0)
                results[engine].append(res)
                print(json.dumps(res), flush=True)
        from PIL import Image

        a = np.asarray(Image.open(tmp / "zimage.png"), dtype=np.int16)
        b = np.asarray(Image.open(tmp / "diffusers.png"), dtype=np.int16)
        max_diff = int(np.abs(a - b).max())
    z_t = statistics.median(x["wall_s"] for x in results["zimage"])
    d_t = statistics.median(x["wall_s"] for x in results["diffusers"])
    z_m = max(x["peak_rss_mb"] for x in results["zimage"])
    d_m = max(x["peak_rss_mb"] for x in results["diffusers"])
    summary = {
        "config": f"DiT dim {MID_DIT.dim} x {MID_DIT.n_layers} layers, Qwen3 hidden {MID_TE.hidden_size} x "
        f"{MID_TE.n_layers} layers, Flux VAE (full size), {args.size}x{args.size}, {args.steps} steps, fp32, "
        "batch 1, no CFG, random weights",
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "zimage_s": z_t,
        "diffusers_s": d_t,
        "speedup": d_t / z_t,
        "zimage_peak_mb": z_m,
        "diffusers_peak_mb": d_m,
        "rss_ratio": z_m / d_m,
        "max_pixel_diff": max_diff,
        "rounds": args.rounds,
    }
    print(json.dumps(summary, indent=2))
    if args.write:
        write_markdown(args.write, summary)


def write_markdown(path: Path, s: dict) -> None:
    section = (
        "## CPU: end to end, `zimage generate` vs diffusers `ZImagePipeline`\n\n"
        f"Measured by `python bench/generate.py --rounds {s['rounds']}` (fresh process per run, engines alternated).\n\n"
        f"- Config: {s['config']}\n- Machine: {s['machine']}\n\n"
        "| engine | wall time (median, s) | peak RSS (MB) |\n|---|---|---|\n"
        f"| zimage | {s['zimage_s']:.1f} | {s['zimage_peak_mb']:.0f} |\n"
        f"| diffusers 0.42.1 | {s['diffusers_s']:.1f} | {s['diffusers_peak_mb']:.0f} |\n\n"
        f"**Speed-up {s['speedup']:.2f}x**, peak RSS ratio {s['rss_ratio']:.2f}x. "
        f"Largest pixel difference between the two images: {s['max_pixel_diff']} (of 255).\n\n"
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find("## CPU: end to end")
    if start >= 0:
        ends = [i for i in (text.find("\n## ", start + 1), text.find("\n### ", start + 1)) if i >= 0]
        end = min(ends) if ends else -1  # the hand-written ### notes under the table are kept
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
