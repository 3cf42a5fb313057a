"""Samplers, CFG helpers and img2img / inpainting plumbing for the Z-Image flow-matching models.

Conventions (shared with the pipeline):

- Latents are float32 ``[B, 16, h, w]``; sigma goes 1 (noise) -> 0 (clean);
  ``x_sigma = (1 - sigma) * x0 + sigma * noise``.
- ``model_fn(x, sigma) -> v`` takes ``sigma`` as a float32 ``[B]`` tensor on ``x.device`` and returns the
  velocity ``v = noise - x0`` (the DiT output after the sign flip), so an Euler step is
  ``x + (sigma_next - sigma) * v`` and ``denoised = x - v * sigma``. The DiT timestep is
  :func:`model_t` ``(sigma)``; CFG is done inside ``model_fn`` with :func:`cfg_combine` / :func:`cfg_active`.
- A sampler is ``fn(model_fn, x, sigmas, callback=None, cancel=None) -> x``. ``callback(i, total, x, denoised)``
  runs after step ``i`` with the updated ``x`` and that step's ``denoised``; ``cancel()`` is polled before every
  step and a true result raises :class:`Cancelled`. Sigmas are read to the host once; the step loop never
  syncs with the device.

``euler`` is diffusers ``FlowMatchEulerDiscreteScheduler.step`` bit for bit. ``res_multistep``, ``heun`` and
``dpmpp_2m`` follow ComfyUI's k-diffusion functions for a CONST (flow) model with the same float32 op order:
``denoised = x - v * sigma`` and per-step scalar coefficients computed as 0-dim tensors on the device.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import Cancelled, ZImageError
from .schedules import comfy_simple_sigmas, flow_sigmas, img2img_sigmas, model_t

__all__ = [
    "SAMPLERS",
    "Cancelled",
    "cfg_active",
    "cfg_combine",
    "comfy_simple_sigmas",
    "flow_sigmas",
    "get_sampler",
    "img2img_sigmas",
    "inpaint_blend",
    "inpaint_model_fn",
    "model_t",
    "noise_latent",
    "perturb_initial",
    "prepare_mask",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "sample_res_multistep",
]

logger = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
CancelFn = Callable[[], bool]


class _Run:
    """Per-call state: sigmas as host floats and as a device tensor, model calls, callback and cancel."""

    def __init__(self, name: str, model_fn: ModelFn, x: torch.Tensor, sigmas, callback, cancel):
        s = torch.as_tensor(sigmas, dtype=torch.float32)
        if s.ndim != 1:
            raise ZImageError(f"sigmas must be a 1-D schedule, got shape {tuple(s.shape)}.")
        self.sf = s.detach().cpu().tolist()  # the only device->host read; done before the loop
        self.sig = s.to(device=x.device, dtype=torch.float32)
        self.steps = max(len(self.sf) - 1, 0)
        self.batch = x.shape[0]
        self.model_fn = model_fn
        self.callback = callback
        self.cancel = cancel
        logger.debug("%s: %d steps, sigmas %s", name, self.steps, self.sf)

    def check(self, i: int) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"Sampling cancelled before step {i + 1} of {self.steps}.")

    def velocity(self, x: torch.Tensor, i: int) -> torch.Tensor:
        v = self.model_fn(x, self.sig[i].expand(self.batch))
        return v if v.dtype == x.dtype else v.to(x.dtype)

    def done(self, i: int, x: torch.Tensor, denoised: Optional[torch.Tensor]) -> None:
        if self.callback is not None:
            self.callback(i, self.steps, x, denoised)


def _t(sigma: torch.Tensor) -> torch.Tensor:
    # k-diffusion t_fn: t = -log(sigma). Finite at sigma = 1 (t = 0); +inf at sigma = 0.
    return sigma.log().neg()


def sample_euler(model_fn: ModelFn, x: torch.Tensor, sigmas, callback=None, cancel=None) -> torch.Tensor:
    """First-order Euler, ``x + (sigma_next - sigma) * v``: diffusers FlowMatchEulerDiscreteScheduler.step."""
    run = _Run("euler", model_fn, x, sigmas, callback, cancel)
    sig = run.sig
    for i in range(run.steps):
        run.check(i)
        v = run.velocity(x, i)
        denoised = x - v * sig[i] if callback is not None else None
        dt = sig[i + 1] - sig[i]
        x = x + dt * v
        run.done(i, x, denoised)
    return x


def sample_res_multistep(model_fn: ModelFn, x: torch.Tensor, sigmas, callback=None, cancel=None) -> torch.Tensor:
    """ComfyUI ``sample_res_multistep`` (eta 0): 2nd-order exponential multistep on denoised.

    The first step and the step to sigma 0 are Euler steps ``x + (x - denoised)/sigma * dt``.
    """
    run = _Run("res_multistep", model_fn, x, sigmas, callback, cancel)
    sig, sf = run.sig, run.sf
    old = None
    for i in range(run.steps):
        run.check(i)
        s = sig[i]
        v = run.velocity(x, i)
        denoised = x - v * s
        if old is None or sf[i + 1] == 0:
            d = (x - denoised) / s
            x = x + d * (sig[i + 1] - s)
        else:
            # With eta 0 the previous step's sigma_down is sigma_i, so t_old == t.
            t, t_next, t_prev = _t(s), _t(sig[i + 1]), _t(sig[i - 1])
            h = t_next - t
            c2 = (t_prev - t) / h
            neg_h = -h
            phi1 = torch.expm1(neg_h) / neg_h
            phi2 = (phi1 - 1.0) / neg_h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            x = h.neg().exp() * x + h * (b1 * denoised + b2 * old)
        old = denoised
        run.done(i, x, denoised)
    return x


def sample_heun(model_fn: ModelFn, x: torch.Tensor, sigmas, callback=None, cancel=None) -> torch.Tensor:
    """k-diffusion / ComfyUI Heun (2 model calls per step; plain Euler on the final step to sigma 0)."""
    run = _Run("heun", model_fn, x, sigmas, callback, cancel)
    sig, sf = run.sig, run.sf
    for i in range(run.steps):
        run.check(i)
        s, s_next = sig[i], sig[i + 1]
        v = run.velocity(x, i)
        denoised = x - v * s
        d = (x - denoised) / s
        dt = s_next - s
        if sf[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            v_2 = run.velocity(x_2, i + 1)
            denoised_2 = x_2 - v_2 * s_next
            d_2 = (x_2 - denoised_2) / s_next
            x = x + (d + d_2) / 2 * dt
        run.done(i, x, denoised)
    return x


def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, sigmas, callback=None, cancel=None) -> torch.Tensor:
    """ComfyUI ``sample_dpmpp_2m`` (DPM-Solver++(2M)) applied to a flow model.

    Like ComfyUI, it uses ``t = -log(sigma)`` for every model type (not the flow log-SNR
    ``log((1-sigma)/sigma)``), so sigma = 1 is finite (t = 0) and needs no offset. The first step and the step
    to sigma 0 are first order; the latter returns ``denoised`` exactly.
    """
    run = _Run("dpmpp_2m", model_fn, x, sigmas, callback, cancel)
    sig, sf = run.sig, run.sf
    old = None
    for i in range(run.steps):
        run.check(i)
        s = sig[i]
        v = run.velocity(x, i)
        denoised = x - v * s
        t, t_next = _t(s), _t(sig[i + 1])
        h = t_next - t
        ratio = t_next.neg().exp() / t.neg().exp()
        if old is None or sf[i + 1] == 0:
            x = ratio * x - (-h).expm1() * denoised
        else:
            r = (t - _t(sig[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = ratio * x - (-h).expm1() * denoised_d
        old = denoised
        run.done(i, x, denoised)
    return x


#: Sampler name -> ``fn(model_fn, x, sigmas, callback=None, cancel=None) -> x``.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "res_multistep": sample_res_multistep,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Return the sampler called ``name``; an unknown name raises ZImageError listing the valid ones."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ZImageError(f"Unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}.") from None


# ----------------------------------------------------------------------------------------------------------
# Classifier-free guidance (ComfyUI convention: cfg == 1 is off; diffusers guidance_scale g = cfg - 1)


def cfg_combine(pos_v: torch.Tensor, neg_v: torch.Tensor, cfg: float, normalization: float = 0.0) -> torch.Tensor:
    """diffusers Z-Image CFG in float32: ``pos + (cfg-1) * (pos - neg)``, per sample.

    ``normalization > 0`` (diffusers ``cfg_normalization``; True means 1.0) rescales a sample whose global
    vector norm exceeds ``normalization * ||pos||`` down to that norm. ``cfg == 1`` returns ``pos_v`` as is.
    Matches diffusers bit for bit when ``cfg - 1`` equals its ``guidance_scale`` exactly (e.g. integer cfg).
    """
    if math.isclose(cfg, 1.0):
        return pos_v
    g = float(cfg) - 1.0
    pos, neg = pos_v.float(), neg_v.float()
    pred = pos + g * (pos - neg)
    c = float(normalization or 0.0)
    if c > 0.0:
        rows = []
        for j in range(pred.shape[0]):  # per sample, like diffusers; torch.where avoids a host sync
            max_norm = torch.linalg.vector_norm(pos[j]) * c
            norm = torch.linalg.vector_norm(pred[j])
            rows.append(torch.where(norm > max_norm, pred[j] * (max_norm / norm), pred[j]))
        pred = torch.stack(rows, dim=0)
    return pred


def cfg_active(cfg: float, sigma: float, truncation: Optional[float] = 1.0) -> bool:
    """Whether to run the negative branch at ``sigma`` (a python float).

    Off when ``cfg == 1`` (ComfyUI), or when diffusers' ``cfg_truncation`` (applied only if <= 1) is exceeded by
    ``t_norm = (1000 - 1000*sigma)/1000`` in float32. Unlike diffusers, cfg < 1 still counts as active.
    """
    if math.isclose(cfg, 1.0):
        return False
    if truncation is not None and float(truncation) <= 1.0:
        t_norm = float(model_t(float(sigma)))
        if t_norm > float(truncation):
            return False
    return True


# ----------------------------------------------------------------------------------------------------------
# img2img / inpainting


def _sigma_like(sigma, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 1:
        s = s.reshape((-1,) + (1,) * (x.ndim - 1))
    return s


def noise_latent(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """``sigma * noise + (1 - sigma) * x0`` (diffusers scale_noise / ComfyUI CONST noise_scaling).

    ``sigma`` is a float, a 0-dim tensor or a per-sample ``[B]`` tensor.
    """
    s = _sigma_like(sigma, x0)
    return s * noise + (1.0 - s) * x0


def inpaint_model_fn(model_fn: ModelFn, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> ModelFn:
    """Wrap ``model_fn`` like ComfyUI ``KSamplerX0Inpaint`` (``mask`` 1 = repaint, 0 = keep ``x0``).

    Before each call the kept region of ``x`` is replaced by ``noise_latent(x0, noise, sigma)``; the model's
    denoised prediction is then blended ``denoised * mask + x0 * (1 - mask)`` and returned as the velocity
    ``(x - denoised) / sigma`` with respect to the sampler's own ``x``. Finish with :func:`inpaint_blend`.
    Start sampling from ``noise_latent(x0, noise, sigmas[0])``.
    """
    mask = mask.to(device=x0.device, dtype=torch.float32)
    keep = 1.0 - mask

    def wrapped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = _sigma_like(sigma, x)
        x_in = x * mask + noise_latent(x0, noise, s) * keep
        v = model_fn(x_in, sigma)
        if v.dtype != x.dtype:
            v = v.to(x.dtype)
        denoised = (x_in - v * s) * mask + x0 * keep
        return (x - denoised) / s

    return wrapped


def inpaint_blend(x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final blend ``x * mask + x0 * (1 - mask)``: the kept region becomes exactly ``x0``."""
    mask = mask.to(device=x.device, dtype=x.dtype)
    return x * mask + x0 * (1.0 - mask)


def prepare_mask(mask: torch.Tensor, h: int, w: int, batch_size: Optional[int] = None) -> torch.Tensor:
    """Resize a pixel mask ``[H,W]``, ``[B,H,W]`` or ``[B,1,H,W]`` to a latent mask ``[B,1,h,w]`` (float32).

    Like ComfyUI's noise_mask handling (``comfy.utils.reshape_mask``): bilinear interpolation (align_corners
    False), no rounding or thresholding; ``batch_size`` repeats or truncates the batch like
    ``repeat_to_batch_size``.
    """
    m = torch.as_tensor(mask)
    if m.ndim not in (2, 3, 4) or (m.ndim == 4 and m.shape[1] != 1):
        raise ZImageError(f"A mask must be [H,W], [B,H,W] or [B,1,H,W]; got shape {tuple(m.shape)}.")
    m = m.to(torch.float32).reshape((-1, 1, m.shape[-2], m.shape[-1]))
    m = F.interpolate(m, size=(int(h), int(w)), mode="bilinear")
    if batch_size is not None and m.shape[0] != batch_size:
        if m.shape[0] < batch_size:
            m = m.repeat(math.ceil(batch_size / m.shape[0]), 1, 1, 1)
        m = m[:batch_size]
    return m


# ----------------------------------------------------------------------------------------------------------
# Seed variance for Turbo


def _variance_seed(seed: int) -> int:
    # A fixed, documented bijection of the seed, so the extra noise differs from the initial noise itself.
    return (int(seed) * 6364136223846793005 + 1442695040888963407) % (1 << 64)


def perturb_initial(noise: torch.Tensor, seed: int, strength: float = 0.0, scale: int = 8) -> torch.Tensor:
    """Mix a second, low-frequency seeded noise into the initial noise (off when ``strength`` is 0).

    Turbo maps different white noises to similar compositions. This adds ``strength`` times a field drawn at
    ``1/scale`` of the latent size (``torch.Generator("cpu")`` seeded with a fixed function of ``seed``),
    bilinearly upsampled and scaled to unit RMS per sample, then divides by ``sqrt(1 + strength**2)`` so the
    result keeps unit variance. The large-scale structure it adds is what varies the layout between seeds;
    ``scale=1`` (white noise) would only be equivalent to another seed. Deterministic for a given seed,
    shape and strength. Suggested strength 0.1-0.5; not tuned against the real model.
    """
    if strength is None or strength <= 0.0:
        return noise
    if scale < 1:
        raise ZImageError(f"perturb_initial scale must be >= 1, got {scale!r}.")
    b, c, h, w = noise.shape
    gen = torch.Generator("cpu").manual_seed(_variance_seed(seed))
    low = torch.randn(
        (b, c, max(1, math.ceil(h / scale)), max(1, math.ceil(w / scale))), generator=gen, dtype=torch.float32
    )
    if low.shape[-2:] != (h, w):
        low = F.interpolate(low, size=(h, w), mode="bilinear")
    rms = low.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    low = (low / rms).to(device=noise.device, dtype=noise.dtype)
    return (noise + float(strength) * low) / math.sqrt(1.0 + float(strength) ** 2)
