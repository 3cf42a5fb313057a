"""Periodic sample images during training, drawn with zimage's own pipeline (the CLI's sampling code).

The fixed prompts are encoded once when the run starts (the text encoder is freed afterwards); each
sample uses ``zimage_core.sampling.initial_noise`` from its seed, so the images of two checkpoints are
directly comparable and equal what ``zimage generate`` draws from the exported weights.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from zimage_core.pipeline import GenerateOptions, ZImagePipeline
from zimage_core.sampling import initial_noise, latent_shape
from zimage_core.vae import tensor_to_pil

from .config import SampleSection

log = logging.getLogger(__name__)


class SampleRenderer:
    """Prompts pre-encoded, VAE kept: ``render(dit, step)`` writes ``p<i>_s<seed>.png`` per prompt and seed."""

    def __init__(self, cfg: SampleSection, text_encoder, vae, max_length: int | None = 512):
        self.cfg = cfg
        self.vae = vae
        prompts = list(cfg.prompts)
        texts = prompts + ([""] if cfg.cfg > 1.0 else [])
        embeds = dict(zip(texts, text_encoder.encode(texts, max_length=max_length)))
        self.cond = [embeds[p].detach().cpu() for p in prompts]
        self.uncond = [embeds[""].detach().cpu()] * len(prompts) if cfg.cfg > 1.0 else None
        self.opts = GenerateOptions(
            prompt=prompts,
            width=cfg.width,
            height=cfg.height,
            steps=cfg.steps,
            cfg=cfg.cfg,
            shift=cfg.shift,
            sampler=cfg.sampler,
        )
        self.opts.validate()

    def latents(self, dit, device: torch.device, seed: int, autocast=nullcontext) -> torch.Tensor:
        pipe = ZImagePipeline(dit, None, self.vae, device)
        noise = initial_noise(latent_shape(len(self.cond), self.cfg.height, self.cfg.width), seed)
        cond = [c.to(device) for c in self.cond]
        uncond = [c.to(device) for c in self.uncond] if self.uncond is not None else None
        was_training = dit.training
        dit.eval()
        try:
            with autocast():
                return pipe.sample(cond, uncond, noise, self.opts)
        finally:
            dit.train(was_training)

    def render(self, dit, device: torch.device, step: int, out_dir: Path, autocast=nullcontext, write: bool = True):
        """Draw every prompt for every seed; returns ``[(name, PIL image)]`` (files written when ``write``)."""
        out = []
        folder = Path(out_dir) / f"step-{step:08d}"
        for seed in self.cfg.seeds:
            lat = self.latents(dit, device, int(seed), autocast)
            pipe = ZImagePipeline(dit, None, self.vae, device)
            for i, img in enumerate(tensor_to_pil(pipe.decode(lat))):
                name = f"p{i}_s{seed}"
                if write:
                    folder.mkdir(parents=True, exist_ok=True)
                    img.save(folder / f"{name}.png")
                out.append((name, img))
        if write:
            log.info("step %d: %d sample images in %s", step, len(out), folder)
        return out
