"""Sigma schedules for the Z-Image flow-matching models.

sigma runs from 1 (pure noise) to 0 (clean image) and ``x_sigma = (1 - sigma) * x0 + sigma * noise``.
Every schedule is a float32 CPU tensor of ``steps + 1`` values that ends with 0.

- :func:`flow_sigmas` is bit-identical to diffusers ``ZImagePipeline`` (default sigmas passed through
  ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` with a static shift).
- :func:`comfy_simple_sigmas` reproduces ComfyUI ``ModelSamplingAuraFlow(shift)`` + the "simple" scheduler,
  including ``KSampler``'s handling of ``denoise < 1``.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import ZImageError

__all__ = ["SCHEDULES", "comfy_simple_sigmas", "flow_sigmas", "img2img_sigmas", "model_t"]

#: Number of discrete training timesteps (diffusers ``num_train_timesteps``, ComfyUI ``timesteps``).
NUM_TRAIN_TIMESTEPS = 1000


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ZImageError(f"steps must be a positive integer, got {steps!r}.")
    return int(steps)


def _check_shift(shift: float) -> float:
    if not shift > 0:
        raise ZImageError(f"shift must be > 0, got {shift!r}.")
    return float(shift)


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """diffusers Z-Image schedule: ``linspace(1, 1/N, N)``, static shift in numpy float32, then a terminal 0.

    Turbo (8 steps, shift 3) gives 1, .9545, .9, .8333, .75, .6429, .5, .3, 0.
    """
    steps = _check_steps(steps)
    shift = _check_shift(shift)
    # Same sequence of roundings as diffusers: torch float32 linspace -> python floats -> numpy float32,
    # and the shift formula evaluated in numpy float32 (python scalars are weak under NEP 50).
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float32).tolist()
    sig = np.array(base).astype(np.float32)
    sig = shift * sig / (1 + (shift - 1) * sig)
    out = torch.from_numpy(np.ascontiguousarray(sig)).to(dtype=torch.float32)
    return torch.cat([out, torch.zeros(1, dtype=torch.float32)])


def model_t(sigma) -> torch.Tensor:
    """Timestep the DiT receives for ``sigma``: diffusers' ``(1000 - sigma*1000) / 1000`` in float32 (= 1 - sigma)."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    t_sched = s * NUM_TRAIN_TIMESTEPS
    return (NUM_TRAIN_TIMESTEPS - t_sched) / NUM_TRAIN_TIMESTEPS


def _comfy_flow_table(shift: float) -> torch.Tensor:
    # ModelSamplingDiscreteFlow.set_parameters(shift, timesteps=1000, multiplier=1.0) in float32.
    multiplier = 1.0
    t = (torch.arange(1, NUM_TRAIN_TIMESTEPS + 1, 1) / NUM_TRAIN_TIMESTEPS) * multiplier
    t = t / multiplier
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _comfy_simple(table: torch.Tensor, steps: int) -> torch.Tensor:
    stride = len(table) / steps
    values = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    values.append(0.0)
    return torch.tensor(values, dtype=torch.float32)


def _apply_denoise(make, steps: int, denoise: float) -> torch.Tensor:
    # ComfyUI KSampler.set_steps: full schedule above 0.9999, nothing at <= 0, otherwise the tail of a longer one.
    if denoise is None or denoise > 0.9999:
        return make(steps)
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    total = int(steps / denoise)
    return make(total)[-(steps + 1) :].clone()


def comfy_simple_sigmas(steps: int, shift: float = 3.0, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI ``ModelSamplingAuraFlow(shift)`` (1000 flow sigmas, multiplier 1) + "simple" scheduler.

    ``denoise < 1`` follows ``KSampler.set_steps``: build ``int(steps/denoise)`` steps and keep the last
    ``steps + 1`` sigmas; ``denoise <= 0`` gives an empty tensor (nothing to sample).
    """
    steps = _check_steps(steps)
    table = _comfy_flow_table(_check_shift(shift))
    return _apply_denoise(lambda n: _comfy_simple(table, n), steps, denoise)


#: Schedule name -> ``fn(steps, shift)``.
SCHEDULES = {
    "flow": flow_sigmas,
    "simple": lambda steps, shift=3.0: comfy_simple_sigmas(steps, shift),
}


def img2img_sigmas(steps: int, shift: float = 3.0, denoise: float = 1.0, schedule: str = "flow") -> torch.Tensor:
    """Schedule for img2img / inpainting with ComfyUI ``denoise`` semantics.

    ``steps`` model steps are run; the schedule is the last ``steps + 1`` sigmas of an ``int(steps/denoise)``-step
    schedule ``schedule`` ("flow" = :func:`flow_sigmas`, "simple" = :func:`comfy_simple_sigmas`). Start from
    ``noise_latent(x0, noise, sigmas[0])``. ``denoise <= 0`` gives an empty tensor.
    """
    steps = _check_steps(steps)
    _check_shift(shift)
    if schedule not in SCHEDULES:
        raise ZImageError(f"Unknown schedule {schedule!r}; valid schedules: {', '.join(sorted(SCHEDULES))}.")
    make = SCHEDULES[schedule]
    return _apply_denoise(lambda n: make(n, shift), steps, denoise)
