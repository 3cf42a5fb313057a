"""Flow-GRPO's pieces: group-relative and composite advantages, the clipped objective, the KL to the reference,
and which steps of a rollout are trained.

Advantages (one group = the ``G`` samples of one prompt):

- ``aggregate = "advantage"`` (the composite advantage, MixGRPO's ``advantage_aggr``): every reward is normalised
  within its group, ``(r_k - mean_group r_k) / (std r_k + eps)``, then the normalised rewards are weighted and
  summed. Rewards on different scales count as their weights say.
- ``aggregate = "reward"``: the weighted sum of the raw rewards is normalised within the group (Flow-GRPO).

``std = "group"`` divides by the group's standard deviation, ``"global"`` by that of the whole batch (Flow-GRPO's
``global_std``). A group whose (composite) rewards are all equal carries no signal and is masked out.
Advantages are clipped to ``[-clip, clip]``.

The objective per trained step ``t`` of sample ``i`` with ratio ``r = exp(logp_new - logp_old)``:
``max(-A r, -A clip(r, 1 - eps, 1 + eps))``, plus ``beta * |mu_theta - mu_ref|^2 / (2 s^2)`` (the closed-form KL
between the two Gaussian transitions, ``s`` their common standard deviation, mean over elements).
"""

from __future__ import annotations

import math
import random

import torch

EPS = 1e-4


def group_normalise(r: torch.Tensor, groups: torch.Tensor, std: str = "group", eps: float = EPS) -> torch.Tensor:
    """``(r - mean of its group) / (std + eps)``; ``r`` and ``groups`` are ``[B]`` (group ids)."""
    r = r.detach().float()
    out = torch.empty_like(r)
    global_std = float(r.std(unbiased=False)) if r.numel() > 1 else 0.0
    for g in torch.unique(groups):
        m = groups == g
        rg = r[m]
        s = float(rg.std(unbiased=False)) if std == "group" else global_std
        out[m] = (rg - rg.mean()) / (s + eps)
    return out


def advantages(
    scores: dict[str, torch.Tensor],
    weights: dict[str, float],
    groups: torch.Tensor,
    aggregate: str = "advantage",
    std: str = "group",
    clip: float = 5.0,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages [B], valid [B] bool)`` from per-reward scores ``{label: [B]}``; see the module docstring."""
    if aggregate == "advantage":
        adv = sum(weights[k] * group_normalise(v, groups, std, eps) for k, v in scores.items())
        spread = torch.stack([v.detach().float() for v in scores.values()])
    elif aggregate == "reward":
        total = sum(weights[k] * v.detach().float() for k, v in scores.items())
        adv = group_normalise(total, groups, std, eps)
        spread = total[None]
    else:
        raise ValueError(f"aggregate must be 'advantage' or 'reward', got {aggregate!r}")
    valid = torch.ones_like(groups, dtype=torch.bool)
    for g in torch.unique(groups):
        m = groups == g
        if bool((spread[:, m].amax(1) - spread[:, m].amin(1) <= 1e-12).all()):
            valid[m] = False
    adv = adv.clamp(-clip, clip) if clip > 0 else adv
    return torch.where(valid, adv, torch.zeros_like(adv)), valid


def clipped_objective(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (to minimise), per sample ``[B]``, and ``clipfrac`` / ``approx_kl`` statistics."""
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clipfrac": float(((ratio - 1.0).abs() > clip_range).float().mean()),
            "approx_kl": float(0.5 * ((log_prob - old_log_prob) ** 2).mean()),
            "ratio_max": float(ratio.max()),
        }
    return loss, stats


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, scale: float) -> torch.Tensor:
    """KL between two Gaussians of the same isotropic std ``scale``: ``|mu - mu_ref|^2 / (2 scale^2)``, the mean
    over a sample's elements ``[B]``."""
    d = (mean.float() - ref_mean.float().detach()) ** 2
    return d.mean(dim=tuple(range(1, d.ndim))) / (2.0 * scale**2)


def trained_steps(
    sde_steps: list[int], mode: str, fraction: float = 1.0, rng: random.Random | None = None
) -> list[int]:
    """The steps to train among the rollout's stochastic ones: ``all``, a ``random`` ``fraction`` of them (DanceGRPO /
    Flow-GRPO-Fast), or ``window`` (the window itself is chosen by :func:`window_steps`)."""
    if mode in ("all", "window"):
        return list(sde_steps)
    if mode == "random":
        n = max(1, math.ceil(fraction * len(sde_steps)))
        return sorted((rng or random).sample(list(sde_steps), n))
    raise ValueError(f"unknown train_steps mode {mode!r}")


def window_steps(n_steps: int, size: int, shift_every: int, iteration: int, stride: int = 1) -> list[int]:
    """MixGRPO's sliding window: ``size`` consecutive steps starting at ``stride * (iteration // shift_every)``,
    wrapping to the start once it would run past the last stochastic step (the final step to sigma 0 is never
    stochastic). ``shift_every = 0`` keeps it at the start."""
    last = max(1, n_steps - 1)  # steps 0 .. n_steps - 2 can be stochastic
    size = max(1, min(size, last))
    positions = last - size + 1
    start = 0 if shift_every <= 0 else (stride * (iteration // shift_every)) % positions
    return list(range(start, start + size))
