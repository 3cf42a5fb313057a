"""The student's pinned grid and the backward simulation that produces its training inputs.

The grid is :func:`zimage_core.schedules.flow_sigmas` of ``student_steps`` with ``student_shift``: exactly the
schedule ``zimage generate --steps N --shift S`` and the nodes sample with, so the student trains on the sigmas it is
used at. The default (8 steps, shift 3) is the released Turbo grid 1, .9545, .9, .8333, .75, .6429, .5, .3 (, 0).

Backward simulation (DMD2): for a step index ``k`` (drawn from a generator every process seeds alike, so all ranks
share it), the student runs without gradients from pure noise through the first ``k`` grid steps with the engine's
sampling loop (:func:`zimage_core.sampling.run_solver`): ``euler`` is the sampler users run (its states are exactly
the ones the student meets at inference), ``renoise`` is DMD2's rule (:class:`Renoise`: ``x0`` re-noised to the next
grid point with fresh noise). The gradient-carrying student call then happens at ``sigma_k``.
"""

from __future__ import annotations

import torch

from zimage_core.sampling import Solver, run_solver
from zimage_core.schedules import flow_sigmas


def student_grid(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` sigmas ending in 0 (float32, CPU)."""
    return flow_sigmas(steps, shift)


class Renoise(Solver):
    """DMD2's backward-simulation step: ``x0 = x - sigma v``, then ``(1 - sigma') x0 + sigma' noise`` with fresh
    noise from ``generator`` (CPU, so any device draws the same); the step to sigma 0 returns ``x0``."""

    name = "renoise"

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def step(self, run, i, x):
        v = run.velocity(x, i)
        x0 = x - v * run.sig[i]
        if run.sf[i + 1] == 0:
            return x0, x0
        noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device, x.dtype)
        s = run.sig[i + 1]
        return (1 - s) * x0 + s * noise, x0


def simulate(model_fn, noise: torch.Tensor, grid: torch.Tensor, k: int, solver: str | Solver = "euler") -> torch.Tensor:
    """The state at ``grid[k]`` reached from ``noise`` (at ``grid[0]``) by ``k`` steps of ``solver`` (no grad)."""
    if k <= 0:
        return noise
    with torch.no_grad():
        return run_solver(model_fn, noise, grid[: k + 1].to(noise.device), solver)
