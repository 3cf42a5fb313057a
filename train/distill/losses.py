"""The distillation losses on tensors, in the sampler's conventions (sigma 1 = noise, ``x = (1 - s) x0 + s noise``,
velocity ``v = noise - x0``, ``x0 = x - s v``). The DiT flips (``t = 1 - sigma``, negated output) live only in the
engine's model functions (:class:`zimage_core.denoiser.Denoiser`); everything here sees velocities.

**DMD2** (distribution matching in x0 space; Yin et al. 2024, "Improved Distribution Matching Distillation"): at a re-noised
``x_t`` of the generator's ``x0`` the real score (the teacher with CFG at scale ``cfg``) predicts ``r0`` and the
fake score ``f0``; ``x0`` should move along ``r0 - f0`` (the KL gradient up to a positive factor), divided per
sample by ``mean |x0 - r0|`` (DMD2's normalisation). The surrogate ``0.5 * mean((x0 - stopgrad(x0 + delta))^2)``
has exactly ``-delta / numel`` as its gradient, computed in float32.

**Decoupled DMD** (arXiv 2511.22677): the same gradient split into ``DM = r0_cond - f0`` (no guidance), evaluated at
``sigma_DM`` over the whole range, and ``CA = (cfg - 1) (r0_cond - r0_uncond)`` (the CFG augmentation), evaluated
at ``sigma_CA`` *cleaner than the student's input* ``sigma_k``, each normalised on its own and weighted on its own.
``cfg`` is the CLI's (ComfyUI's): guided = ``cond + (cfg - 1)(cond - uncond)``, so the standard scale alpha equals
``cfg`` and the CA weight ``alpha - 1 = cfg - 1`` equals diffusers' / Z-Image's guidance ``s``; cfg 1 has no CA.

**Fake score**: flow matching on generator samples, ``mse(v_fake(x_s, s), noise - x0)``.
**GAN** (DMD2, optional): non-saturating softplus losses on a head over fake-score features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[B]`` (or scalar) sigma shaped to broadcast over ``like`` ``[B, ...]``, float32."""
    s = torch.as_tensor(s, dtype=torch.float32, device=like.device)
    return s.reshape(-1, *([1] * (like.ndim - 1))) if s.ndim else s


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    s = per_sample(sigma, x0)
    return (1.0 - s) * x0.float() + s * noise.float()


def denoised(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """``x0 = x - sigma v`` (the samplers' ``denoised``)."""
    return x.float() - per_sample(sigma, x) * v.float()


def normalize(delta: torch.Tensor, ref: torch.Tensor, on: bool = True) -> torch.Tensor:
    """``delta / mean |ref|`` per sample (DMD2), NaN/inf-free; ``on = False`` returns ``delta``."""
    delta = delta.float()
    if not on:
        return delta
    scale = ref.float().abs().mean(dim=tuple(range(1, ref.ndim)), keepdim=True)
    return torch.nan_to_num(delta / scale.clamp_min(EPS))


def dmd2_direction(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, norm: bool = True) -> torch.Tensor:
    """DMD2: ``(r0 - f0) / mean|x0 - r0|`` (``real_x0`` from the guided teacher)."""
    return normalize(real_x0.float() - fake_x0.float(), x0.float() - real_x0.float(), norm)


def dm_direction(x0: torch.Tensor, cond_x0: torch.Tensor, fake_x0: torch.Tensor, norm: bool = True) -> torch.Tensor:
    """Decoupled DMD's distribution-matching term: ``(r0_cond - f0) / mean|x0 - r0_cond|``."""
    return normalize(cond_x0.float() - fake_x0.float(), x0.float() - cond_x0.float(), norm)


def ca_direction(
    x0: torch.Tensor, cond_x0: torch.Tensor, uncond_x0: torch.Tensor, cfg: float, norm: bool = True
) -> torch.Tensor:
    """Decoupled DMD's CFG-augmentation term: ``(cfg - 1)(r0_cond - r0_uncond) / mean|x0 - r0_guided|`` with
    ``r0_guided = r0_cond + (cfg - 1)(r0_cond - r0_uncond)`` (CLI cfg; 1 = no term)."""
    ca = (float(cfg) - 1.0) * (cond_x0.float() - uncond_x0.float())
    return normalize(ca, x0.float() - (cond_x0.float() + ca), norm)


def matching_loss(x0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((x0 - stopgrad(x0 + delta))^2)`` in float32: its gradient w.r.t. ``x0`` is ``-delta / numel``."""
    x = x0.float()
    return 0.5 * F.mse_loss(x, (x + delta.float()).detach())


def fake_score_loss(v_fake: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow matching of the fake score on generator samples: ``mse(v, noise - x0)`` (float32)."""
    return F.mse_loss(v_fake.float(), noise.float() - x0.float())


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()
