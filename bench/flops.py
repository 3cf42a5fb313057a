"""Arithmetic of one generation, and this machine's fp32 matmul rate: the compute floor a CPU run cannot beat.

FLOPs are counted with ``torch.utils.flop_counter`` while the real modules run (the VAE on the ``meta``
device), so the count follows the code (matmuls, convolutions, attention) rather than a formula.

    python bench/flops.py [--size 512] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zimage_core.config import DiTConfig, VAEConfig  # noqa: E402


def _count(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def dit_step_flops(cfg: DiTConfig, size: int, caption_tokens: int = 40) -> int:
    """One DiT evaluation (batch 1) at ``size`` x ``size`` pixels, context refiner included (runs it once)."""
    from zimage_core.dit import ZImageDiT

    model = ZImageDiT(cfg).eval()
    lat = size // 8
    x = torch.randn(1, cfg.in_channels, lat, lat)
    return _count(lambda: model(x, torch.full((1,), 0.5), [torch.randn(caption_tokens, cfg.cap_feat_dim)]))


def vae_decode_flops(cfg: VAEConfig, size: int) -> int:
    from zimage_core.vae import FluxVAE

    with torch.device("meta"):
        vae = FluxVAE(cfg)
    lat = size // cfg.downscale
    return _count(lambda: vae.decoder(torch.zeros(1, cfg.latent_channels, lat, lat, device="meta")))


def machine_gflops(seconds: float = 3.0) -> float:
    """Sustained fp32 GEMM rate (GFLOP/s) with the default thread count, on DiT-like shapes."""
    a, b = torch.randn(1088, 1536), torch.randn(1536, 4096)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0) / 1e9


def floor_report(dit_cfg: DiTConfig, vae_cfg: VAEConfig, size: int, steps: int, gflops: float | None = None) -> dict:
    step = dit_step_flops(dit_cfg, size)
    dec = vae_decode_flops(vae_cfg, size)
    rate = gflops if gflops is not None else machine_gflops()
    total = steps * step + dec
    return {
        "dit_step_gflop": step / 1e9,
        "vae_decode_gflop": dec / 1e9,
        "total_gflop": total / 1e9,
        "machine_fp32_gflops": rate,
        "floor_s": total / 1e9 / rate,
    }


def main() -> None:
    from bench.generate import MID_DIT, MID_VAE

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    print(json.dumps(floor_report(MID_DIT, MID_VAE, args.size, args.steps), indent=2))


if __name__ == "__main__":
    main()
