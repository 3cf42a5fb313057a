"""Flow matching in Z-Image's conventions: the noising, the timestep sampling and the loss.

sigma runs from 0 (clean) to 1 (noise), ``x_sigma = (1 - sigma) * x0 + sigma * noise`` (as the samplers in
:mod:`zimage_core.sampling`). The DiT is fed ``t = 1 - sigma`` and its *raw* output is regressed onto
``x0 - noise``, so that at inference ``-output`` is the velocity ``d x / d sigma = noise - x0`` that
:class:`zimage_core.denoiser.Denoiser` hands the samplers. Both Z-Image flips (timestep and sign) are
therefore applied here, exactly once (``docs/model.md``, section 4).

Timesteps: ``u`` is logit-normal (``sigmoid(mean + std * N(0, 1))``, SD3) or uniform, then shifted with
``sigma = s u / (1 + (s - 1) u)``: ``s = exp(mu)`` with ``mu`` linear in the image token count (Flux's dynamic
shift: 256 tokens -> 0.5, 4096 tokens -> 1.15, extrapolated linearly outside), a static ``s`` (Turbo 3,
Base 6), or ``s = 1``. Noise and timesteps are drawn on the CPU from the trainer's generator, so a run is
the same on any device and resumes exactly.

Edit samples condition on their clean reference latents (the DiT gives them the clean time embedding) and,
on Omni models, on SigLIP features, through :meth:`ZImageDiT.forward_omni`; the loss covers the target only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zimage_core.schedules import model_t

# Flux / Z-Image scheduler constants (calculate_shift).
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
_EPS = 1e-6


def dynamic_mu(n_img_tokens: int | float) -> float:
    """Flux's resolution-dependent ``mu``: 0.5 at 256 image tokens (256x256 px), 1.15 at 4096 (1024x1024)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (float(n_img_tokens) - BASE_SEQ_LEN)


def shift_factor(obj, n_img_tokens: int) -> float:
    """The shift ``s`` for ``sigma = s u / (1 + (s - 1) u)`` under the objective settings ``obj``."""
    if obj.shift == "dynamic":
        return math.exp(dynamic_mu(n_img_tokens))
    if obj.shift == "static":
        return float(obj.static_shift)
    return 1.0


def shift_sigmas(u: torch.Tensor, s: float) -> torch.Tensor:
    """``s u / (1 + (s - 1) u)``, which equals Flux's ``e^mu / (e^mu + 1/u - 1)`` for ``s = e^mu``."""
    return s * u / (1.0 + (s - 1.0) * u)


def sample_sigmas(n: int, n_img_tokens: int, obj, generator: torch.Generator) -> torch.Tensor:
    """``n`` training sigmas in (0, 1), float32 on the CPU."""
    if obj.timesteps == "logit_normal":
        z = torch.randn(n, generator=generator, dtype=torch.float32)
        u = torch.sigmoid(obj.logit_mean + obj.logit_std * z)
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float32)
    u = u.clamp(_EPS, 1.0 - _EPS)
    return shift_sigmas(u, shift_factor(obj, n_img_tokens)).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise`` with one sigma per sample."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise


def raw_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the DiT's raw output should be: ``x0 - noise`` (its negation is the sampler velocity)."""
    return x0 - noise


class FlowModel(nn.Module):
    """The DiT behind one ``forward`` for both sample kinds, so DDP/FSDP wrappers see every call."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, caps, refs=None, siglip=None) -> torch.Tensor:
        if refs is None:
            return self.dit(x, t, caps)
        images = [[r.to(x.device) for r in rs] + [x[i]] for i, rs in enumerate(refs)]
        return self.dit.forward_omni(images, t, caps, siglip)


def siglip_grid(feat: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """SigLIP features as the ``[h, w, C]`` grid ``forward_omni`` takes.

    A cache may store them flattened ``[N, C]`` (row-major patches); the grid is then the factorisation
    ``h * w = N`` whose aspect ratio is closest to the reference latent's.
    """
    if feat.ndim == 3:
        return feat
    if feat.ndim != 2:
        raise ValueError(f"SigLIP features must be [N, C] or [h, w, C], got {tuple(feat.shape)}")
    n = feat.shape[0]
    aspect = ref.shape[-2] / ref.shape[-1]
    pairs = [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    h, w = min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - math.log(aspect)))
    return feat.reshape(h, w, feat.shape[1])


@dataclass
class OmniSegments:
    """The caption segments of edit samples, pre-encoded while the text encoder was loaded.

    ``first``/``between``/``last`` are the fixed pieces; ``prompts`` maps a caption text to its
    ``<|vision_end|>{prompt}<|im_end|>...<|vision_start|>`` segment (see :mod:`train.omni_prompts`).
    """

    first: torch.Tensor
    between: torch.Tensor
    last: torch.Tensor
    prompts: object = None  # text -> Tensor | None (a mapping or a callable)

    def prompt(self, text: str | None, feats: torch.Tensor) -> torch.Tensor:
        found = None
        if self.prompts is not None and text is not None:
            found = self.prompts(text) if callable(self.prompts) else self.prompts.get(text)
        return feats if found is None else found

    def build(
        self, n_refs: int, feats: torch.Tensor | list[torch.Tensor], text: str | None = None
    ) -> list[torch.Tensor]:
        """The ``n_refs + 2`` segments: ``first, between * (n - 1), prompt, last``.

        A list ``feats`` is taken as the complete segments already; otherwise the prompt segment is looked up
        by ``text`` (falling back to ``feats``, the caption's text-to-image features).
        """
        if isinstance(feats, (list, tuple)):
            if len(feats) != n_refs + 2:
                raise ValueError(f"{n_refs} reference images need {n_refs + 2} caption segments, got {len(feats)}")
            return list(feats)
        if n_refs < 1:
            raise ValueError("an edit sample needs at least one reference image")
        return [self.first] + [self.between] * (n_refs - 1) + [self.prompt(text, feats), self.last]


def flow_loss(
    model: nn.Module, batch, obj, generator: torch.Generator, device: torch.device, segments: OmniSegments | None = None
) -> tuple[torch.Tensor, dict]:
    """Mean squared error of the raw DiT output against ``x0 - noise`` for one batch.

    ``batch`` follows :class:`train.data.Batch` (latents ``[B, 16, h, w]`` in model space, ``cap_feats``,
    ``kind``, ``ref_latents``, ``siglip``). Returns the loss (float32 scalar) and a few statistics.
    """
    x0 = batch.latents.float()
    b, _, h, w = x0.shape
    patch = 2
    n_tokens = (h // patch) * (w // patch)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    sigma = sample_sigmas(b, n_tokens, obj, generator)
    x0, noise = x0.to(device), noise.to(device)
    xs = add_noise(x0, noise, sigma.to(device))
    t = model_t(sigma).to(device)
    if batch.kind == "edit":
        if segments is None and not all(isinstance(c, (list, tuple)) for c in batch.cap_feats):
            raise ValueError("edit batches need the Omni prompt segments; the trainer encodes them at start")
        refs = batch.ref_latents
        texts = getattr(batch, "captions", None) or [None] * len(refs)
        caps = [
            segments.build(len(r), c, txt) if segments is not None else list(c)
            for r, c, txt in zip(refs, batch.cap_feats, texts)
        ]
        caps = [[s.to(device) for s in seg] for seg in caps]
        siglip = batch.siglip
        if siglip is not None:
            siglip = [[siglip_grid(s, r).to(device) for s, r in zip(sample, rs)] for sample, rs in zip(siglip, refs)]
        out = model(xs, t, caps, refs=[[r.to(device) for r in rs] for rs in refs], siglip=siglip)
    else:
        out = model(xs, t, [c.to(device) for c in batch.cap_feats])
    loss = F.mse_loss(out.float(), raw_target(x0, noise))
    return loss, {"sigma_mean": float(sigma.mean()), "batch": b, "tokens": n_tokens, "kind": batch.kind}
