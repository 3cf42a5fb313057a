"""Diffusion-DPO for flow matching in Z-Image's conventions, chosen/rejected pairs and the curriculum.

Loss (the same noise and sigma for the chosen ``w`` and rejected ``l`` latents; ``x_sigma = (1 - sigma) x0 +
sigma noise``; the DiT sees ``t = 1 - sigma`` and its raw output is ``x0 - noise``, the negated velocity):

    e(model, x) = mean over elements of |raw(x_sigma, 1 - sigma) - (x0 - noise)|^2
    L = -log sigmoid( -beta / 2 * [ (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)) ] )

which is the flow-matching Diffusion-DPO loss with ``|v - (noise - x0)|^2`` written with both flips applied once
(``v = -raw``: the squared errors are the same numbers). The reference is the frozen base: the LoRA switched off,
or a frozen copy for a full fine-tune.

Pairs: per prompt, the candidates sorted by score; pairs whose score gap is at least ``min_gap``, the largest gap
first, at most ``pairs_per_prompt`` of them spread over the range of gaps. Curriculum: every pair gets a level
``prompt level + gap tier`` (prompt level from the prompts file, or the prompt's length in words bucketed into
``prompt_buckets`` quantiles; gap tier 0 for the largest third of the gaps, 2 for the subtlest) and is ordered
by it; at training progress ``p`` the batches are drawn from the first ``max(batch, c(p) N)`` pairs of that order
with ``c(p)`` rising linearly from ``start`` to 1 at ``warmup`` (competence-based curriculum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..objective import add_noise, raw_target


def flow_errors(raw: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of the raw DiT output against ``x0 - noise``, ``[B]`` float32."""
    d = (raw.float() - raw_target(x0.float(), noise.float())) ** 2
    return d.mean(dim=tuple(range(1, d.ndim)))


def dpo_loss(
    err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict]:
    """Per-pair Diffusion-DPO loss ``[B]`` and statistics (``accuracy``: the policy prefers the chosen latent more
    than the reference does; ``margin``: the bracket's mean)."""
    inside = (err_w - ref_w.detach()) - (err_l - ref_l.detach())
    logits = -0.5 * beta * inside
    loss = -F.logsigmoid(logits)
    with torch.no_grad():
        stats = {
            "dpo_accuracy": float((logits > 0).float().mean()),
            "margin": float(inside.mean()),
            "err_chosen": float(err_w.mean()),
            "err_rejected": float(err_l.mean()),
        }
    return loss, stats


def noised_pair(x_w: torch.Tensor, x_l: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """The chosen and rejected latents noised with the same noise and sigmas."""
    return add_noise(x_w, noise, sigma), add_noise(x_l, noise, sigma)


def grid_sigmas(n: int, grid: list[float], generator: torch.Generator) -> torch.Tensor:
    """``n`` sigmas drawn uniformly from a sampler's grid (its nonzero entries): a few-step model is trained only
    where it is used, so DPO does not de-distill it."""
    pts = torch.tensor([s for s in grid if s > 0], dtype=torch.float32)
    idx = torch.randint(len(pts), (n,), generator=generator)
    return pts[idx].clamp(max=1.0 - 1e-4)  # sigma = 1 would drop the clean latent from the input entirely


@dataclass
class Pair:
    prompt: int  # index into the prompt list
    chosen: int  # candidate indices
    rejected: int
    gap: float
    level: int = 0


def build_pairs(
    scores: dict[int, list[tuple[int, float]]], min_gap: float = 0.0, pairs_per_prompt: int = 1
) -> list[Pair]:
    """Pairs from ``{prompt: [(candidate, score), ...]}``: gaps of at least ``min_gap``, the largest first, then
    spread evenly over the remaining gaps, at most ``pairs_per_prompt`` per prompt."""
    out = []
    for p, cands in scores.items():
        ranked = sorted(cands, key=lambda c: (-c[1], c[0]))
        pairs = [
            (a[1] - b[1], a[0], b[0])
            for i, a in enumerate(ranked)
            for b in ranked[i + 1 :]
            if a[1] - b[1] >= max(min_gap, 1e-12)
        ]
        pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
        if len(pairs) > pairs_per_prompt:
            k = pairs_per_prompt
            picks = sorted({round(j * (len(pairs) - 1) / max(1, k - 1)) for j in range(k)})
            pairs = [pairs[j] for j in picks]
        out.extend(Pair(p, c, r, g) for g, c, r in pairs)
    return out


def prompt_levels(prompts: list[str], buckets: int, given: list[int | None] | None = None) -> list[int]:
    """A difficulty level per prompt: the given one, else its word count bucketed into ``buckets`` quantiles."""
    words = [len(p.split()) for p in prompts]
    order = sorted(words)
    levels = []
    for i, w in enumerate(words):
        if given is not None and given[i] is not None:
            levels.append(int(given[i]))
            continue
        below = sum(1 for o in order if o < w)
        levels.append(min(buckets - 1, below * buckets // max(1, len(order))) if buckets > 1 else 0)
    return levels


def curriculum_order(pairs: list[Pair], levels: list[int], generator: torch.Generator, tiers: int = 3) -> list[Pair]:
    """Pairs ordered easy to hard: by ``prompt level + gap tier`` (large gaps first), seeded shuffle within a level."""
    if not pairs:
        return []
    gaps = sorted((p.gap for p in pairs), reverse=True)

    def tier(gap: float) -> int:
        rank = sum(1 for g in gaps if g > gap)
        return min(tiers - 1, rank * tiers // len(gaps))

    for p in pairs:
        p.level = levels[p.prompt] + tier(p.gap)
    perm = torch.randperm(len(pairs), generator=generator).tolist()
    shuffled = [pairs[i] for i in perm]
    return sorted(shuffled, key=lambda p: p.level)  # stable: the shuffle survives inside a level


def competence(step: int, start: float, warmup: int) -> float:
    """Fraction of the ordered pairs available at ``step``: ``start`` rising linearly to 1 at ``warmup``."""
    if warmup <= 0:
        return 1.0
    return min(1.0, start + (1.0 - start) * step / warmup)


def curriculum_batch(n_pairs: int, batch: int, step: int, start: float, warmup: int, generator: torch.Generator):
    """Indices of one batch: drawn without replacement from the first ``max(batch, c N)`` pairs of the order."""
    avail = min(n_pairs, max(batch, math.ceil(competence(step, start, warmup) * n_pairs)))
    take = torch.randperm(avail, generator=generator)[: min(batch, avail)]
    return take.tolist()
