"""Text-to-image (and img2img / inpainting) with the Z-Image family, matching diffusers' ZImagePipeline.

Conventions (../shared/reference/zimage-architecture.md section 5):
- initial noise ``randn((B, 16, H/8, W/8))`` from a CPU generator seeded with ``seed``, in float32;
- latents stay float32, the DiT input is cast to the DiT dtype, the DiT sees ``t = 1 - sigma``;
- the raw DiT output is negated into the velocity the samplers step with;
- CFG in ComfyUI's convention: ``cfg = 1`` is off, diffusers' guidance scale is ``cfg - 1``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoints import load_dit, resolve_dtype
from .config import PIXEL_MULTIPLE, VAE_DOWNSCALE
from .dit import PreparedCaptions, ZImageDiT
from .errors import ZImageError
from .sampling import cfg_active, cfg_combine, get_sampler, inpaint_model_fn, noise_latent
from .schedules import flow_sigmas, img2img_sigmas, model_t

log = logging.getLogger(__name__)


@dataclass
class GenerateOptions:
    """One generation request; defaults are Z-Image-Turbo's (8 steps, shift 3, no CFG)."""

    prompt: str | list[str]
    negative: str | list[str] | None = None
    width: int = 1024
    height: int = 1024
    steps: int = 8
    cfg: float = 1.0
    shift: float = 3.0
    sampler: str = "euler"
    seed: int = 0
    batch: int = 1
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    max_length: int | None = 512
    denoise: float = 1.0
    loras: list[tuple[str, float]] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < PIXEL_MULTIPLE or v % PIXEL_MULTIPLE:
                raise ZImageError(
                    f"{name} {v} is not a positive multiple of {PIXEL_MULTIPLE} (VAE x8 times patch 2); "
                    f"try {max(PIXEL_MULTIPLE, round(v / PIXEL_MULTIPLE) * PIXEL_MULTIPLE) if isinstance(v, int) else 1024}."
                )
        if self.steps < 1:
            raise ZImageError(f"steps must be at least 1, got {self.steps}.")
        if self.batch < 1:
            raise ZImageError(f"batch must be at least 1, got {self.batch}.")
        if self.cfg < 1.0:
            raise ZImageError(f"cfg {self.cfg} is below 1 (ComfyUI convention: 1 = off, 4 = Base default).")
        if not 0.0 < self.denoise <= 1.0:
            raise ZImageError(f"denoise must be in (0, 1], got {self.denoise}.")
        get_sampler(self.sampler)

    def prompts(self) -> list[str]:
        p = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        return [x for x in p for _ in range(self.batch)]

    def negatives(self) -> list[str]:
        n = self.negative if self.negative is not None else ""
        n = [n] if isinstance(n, str) else list(n)
        base = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if len(n) == 1:
            n = n * len(base)
        if len(n) != len(base):
            raise ZImageError(f"{len(n)} negative prompts for {len(base)} prompts; give one, or one per prompt.")
        return [x for x in n for _ in range(self.batch)]


def initial_noise(batch: int, height: int, width: int, seed: int, channels: int = 16) -> torch.Tensor:
    """Seeded CPU float32 noise, identical to diffusers and native ComfyUI for the whole batch."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    shape = (batch, channels, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZImageError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto.")
    return dev


class Denoiser:
    """The velocity field the samplers integrate: DiT call, ``t = 1 - sigma``, sign flip and CFG.

    Captions are embedded and refined once; the plan for the CFG batch (``[cond..., uncond...]``) and
    for the conditional batch alone are both built up front, so no step repeats that work.
    """

    def __init__(self, dit: ZImageDiT, cond: list[torch.Tensor], uncond: list[torch.Tensor] | None,
                 latent_hw: tuple[int, int], cfg: float = 1.0, normalization: float = 0.0, truncation: float = 1.0):
        self.dit, self.cfg, self.normalization, self.truncation = dit, cfg, normalization, truncation
        self.use_cfg = uncond is not None and cfg > 1.0
        h, w = latent_hw
        caps = dit.prepare_captions(list(cond) + (list(uncond) if self.use_cfg else []))
        n = len(cond)
        self.plan_cond = dit.plan(PreparedCaptions(caps.tokens[:n], caps.padded_lens[:n]), h, w)
        self.plan_cfg = dit.plan(caps, h, w) if self.use_cfg else None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = model_t(sigma)
        xin = x.to(self.dit.dtype)
        # cfg_truncation >= 1 never switches guidance off: skip reading sigma (a host sync on GPU).
        if self.use_cfg and (self.truncation >= 1.0 or cfg_active(self.cfg, float(sigma[0]), self.truncation)):
            out = self.dit.denoise(torch.cat([xin, xin]), torch.cat([t, t]), self.plan_cfg).float()
            pos, neg = out.chunk(2)
            v = cfg_combine(pos, neg, self.cfg, self.normalization)
        else:
            v = self.dit.denoise(xin, t, self.plan_cond).float()
        return -v


class ZImagePipeline:
    """DiT + text encoder + VAE. Components may be swapped or offloaded by the caller."""

    def __init__(self, dit: ZImageDiT, text_encoder, vae, device: torch.device | str = "cpu"):
        self.dit, self.text_encoder, self.vae = dit, text_encoder, vae
        self.device = torch.device(device)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        transformer: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        device: str | None = "auto",
        dtype: str | None = "auto",
    ) -> ZImagePipeline:
        """From a diffusers-layout folder (``model``) or the three single files (any may override ``model``)."""
        from .text_encoder import TextEncoder
        from .vae import load_vae

        dev = pick_device(device)
        wdtype = resolve_dtype(dtype, dev)
        root = Path(model) if model is not None else None
        if root is not None and not root.is_dir():
            raise ZImageError(
                f"--model '{root}' is not a folder. Give the diffusers-layout folder (with transformer/, "
                "text_encoder/, tokenizer/, vae/), or use --transformer/--text-encoder/--vae for single files."
            )
        missing = [n for n, v in (("--transformer", transformer), ("--text-encoder", text_encoder), ("--vae", vae))
                   if v is None and root is None]
        if missing:
            raise ZImageError(f"no model given: pass --model DIR, or all of {', '.join(missing)}.")
        te_path = text_encoder or root
        dit = load_dit(transformer or root, dtype=wdtype, device=dev)
        te = TextEncoder.load(te_path, tokenizer=tokenizer, dtype=wdtype, device=dev)
        ae = load_vae(vae or root, dtype=torch.float32, device=dev)
        return cls(dit, te, ae, dev)

    # ---- stages ------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], max_length: int | None = 512) -> list[torch.Tensor]:
        return self.text_encoder.encode(prompts, max_length=max_length)

    def sample(
        self,
        cond: list[torch.Tensor],
        uncond: list[torch.Tensor] | None,
        noise: torch.Tensor,
        opts: GenerateOptions,
        init_latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        callback: Callable | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run the sampler; returns model-space latents ``[B, 16, h, w]`` (float32)."""
        noise = noise.to(self.device)
        b, _, h, w = noise.shape
        if len(cond) != b:
            raise ZImageError(f"{len(cond)} conditionings for a batch of {b} latents.")
        fn = Denoiser(self.dit, cond, uncond, (h, w), opts.cfg, opts.cfg_normalization, opts.cfg_truncation)
        if init_latents is None:
            sigmas = flow_sigmas(opts.steps, opts.shift)
            x = noise_latent(torch.zeros_like(noise), noise, float(sigmas[0]))
        else:
            x0 = init_latents.to(self.device, torch.float32)
            sigmas = img2img_sigmas(opts.steps, opts.shift, opts.denoise)
            x = noise_latent(x0, noise, float(sigmas[0]))
            if mask is not None:
                fn = inpaint_model_fn(fn, x0, noise, mask.to(self.device))
        sampler = get_sampler(opts.sampler)
        with torch.inference_mode():
            x = sampler(fn, x, sigmas.to(self.device), callback=callback, cancel=cancel)
        if init_latents is not None and mask is not None:
            m = mask.to(self.device)
            x = x * m + init_latents.to(self.device, torch.float32) * (1 - m)
        return x

    def decode(self, latents: torch.Tensor, tile: int | str | None = "auto") -> torch.Tensor:
        """Model-space latents -> pixels in [-1, 1] (float32), checked for NaN/Inf."""
        from .vae import check_finite

        with torch.inference_mode():
            x = self.vae.decode(latents.to(self.device), tile=tile)
        check_finite(x, "decoded image")
        return x

    def generate(
        self,
        opts: GenerateOptions,
        progress: bool = True,
        callback: Callable | None = None,
        init_latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        tile: int | str | None = "auto",
    ):
        """Prompt in, PIL images out (``len = prompts * batch``); img2img/inpainting with ``init_latents``/``mask``."""
        from .vae import tensor_to_pil

        opts.validate()
        prompts = opts.prompts()
        use_cfg = opts.cfg > 1.0
        texts = prompts + (opts.negatives() if use_cfg else [])
        unique = list(dict.fromkeys(texts))
        embeds = dict(zip(unique, self.encode_prompts(unique, opts.max_length)))
        cond = [embeds[p] for p in prompts]
        uncond = [embeds[n] for n in opts.negatives()] if use_cfg else None
        noise = initial_noise(len(prompts), opts.height, opts.width, opts.seed)
        if init_latents is not None:
            init_latents = init_latents.expand(len(prompts), -1, -1, -1)
            mask = mask.expand(len(prompts), -1, -1, -1) if mask is not None else None
        bar = _progress(opts.steps, "sampling", progress)

        def on_step(i, n, x, denoised):
            bar.update(1)
            if callback is not None:
                callback(i, n, x, denoised)

        try:
            latents = self.sample(cond, uncond, noise, opts, init_latents, mask, callback=on_step)
        finally:
            bar.close()
        return tensor_to_pil(self.decode(latents, tile=tile))

def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False)


def options_metadata(opts: GenerateOptions, **extra) -> dict:
    """Generation parameters as a flat dict (for PNG metadata)."""
    d = asdict(opts)
    d.update(extra)
    return d
