"""Time cost of a Z-Image Fun ControlNet per DiT step, as a ratio to the plain step (random weights).

python bench/controlnet_cost.py [--dim 768] [--size 512] [--caption 100] [--rounds 3] [--threads N]
                                [--device cpu|cuda] [--dtype fp32|bf16]

The DiT keeps Z-Image's block counts (30 main + 2 noise-refiner layers) and each ControlNet its published ones
(1.0: 6 + 2 plain, 2.0: 15 run twice, 2.1: 15 + 2, lite: 3 + 2), at a reduced width so a CPU can run it; the
sequence is that of a ``--size`` square image plus a ``--caption``-token prompt. Steps are timed in rounds that
alternate plain and controlled steps; the ratio is the median over back-to-back (plain, controlled) pairs, so a
busy machine affects both alike; on a machine shared with
other jobs ``--threads 1`` keeps OpenMP threads from stalling each other (the ratios are what this measures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import cpu_name  # noqa: E402
from zimage_core.config import ControlNetConfig, DiTConfig, default_axes_dims  # noqa: E402
from zimage_core.controlnet import ControlInput, ControlNet  # noqa: E402
from zimage_core.dit import ZImageDiT  # noqa: E402

VARIANTS = {
    "1.0": ControlNetConfig.union_1_0,
    "2.1 lite": ControlNetConfig.union_2_1_lite,
    "2.1": ControlNetConfig.union_2_1,
    "2.0": ControlNetConfig.union_2_0,
}


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--caption", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    heads = args.dim // 128
    cfg = DiTConfig(dim=args.dim, n_heads=heads, ffn_dim=int(args.dim / 3 * 8), axes_dims=default_axes_dims(128))
    dit = ZImageDiT(cfg).eval()
    randomize(dit, 0)
    dit.to(args.device, dtype)
    lat = args.size // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, lat, lat, generator=g).to(args.device)
    t = torch.tensor([0.5], device=args.device)
    caps = [torch.randn(args.caption, cfg.cap_feat_dim, generator=g)]
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)

    def timed(control) -> float:
        sync()
        t0 = time.perf_counter()
        dit.denoise(x, t, plan, control=control)
        sync()
        return time.perf_counter() - t0

    with torch.no_grad():
        plan = dit.prepare(caps, lat, lat)
        controls = {}
        for i, (name, make) in enumerate(VARIANTS.items()):
            net = ControlNet(make(cfg)).eval()
            randomize(net, 10 + i)
            net.to(args.device, dtype)
            ctx = torch.randn(1, net.cfg.in_channels, lat, lat, generator=g).to(args.device)
            controls[name] = [ControlInput(net, ctx, 0.75)]
        timed(None)
        for c in controls.values():
            timed(c)  # warm-up (and the cached control embedding)
        times: dict[str, list[float]] = {"plain": [], **{k: [] for k in controls}}
        ratios: dict[str, list[float]] = {k: [] for k in controls}
        for _ in range(args.rounds):
            for name, c in controls.items():
                a, b = timed(None), timed(c)
                times["plain"].append(a)
                times[name].append(b)
                ratios[name].append(b / a)
    plain = statistics.median(times["plain"])
    print(f"machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}")
    print(
        f"DiT dim {cfg.dim} ({heads} heads), {cfg.n_layers} + {cfg.n_refiner_layers} layers; "
        f"{args.size}x{args.size} ({(lat // 2) ** 2} image tokens) + {args.caption}-token caption; {args.dtype}; "
        f"{args.rounds} rounds"
    )
    print("| ControlNet | control blocks | step (median, s) | ratio to plain (median of back-to-back pairs) |")
    print("|---|---|---|---|")
    print(f"| none | - | {plain:.3f} | 1.00 |")
    for name, c in controls.items():
        n = c[0].net.cfg
        blocks = f"{n.n_control_layers} + {n.n_refiner_layers}" if n.refiner != "control_layers" else "15 x 2"
        med = statistics.median(times[name])
        spread = f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}"
        print(f"| {name} | {blocks} | {med:.3f} | {statistics.median(ratios[name]):.2f} ({spread}) |")


if __name__ == "__main__":
    main()
