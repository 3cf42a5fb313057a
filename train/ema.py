"""Exponential moving average of the trainable weights, kept in float32.

``shadow = decay_n * shadow + (1 - decay_n) * param`` every ``every`` optimizer steps after ``start_step``
(before it the shadow copies the weights). With ``warmup`` the decay ramps up as
``decay_n = min(decay, (1 + n) / (10 + n))`` over the ``n`` averaging updates done so far, so that a short
run's EMA is not dominated by the initial weights. Works on plain tensors and on FSDP2 shards (DTensors):
every rank averages its own shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


class EMA:
    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        decay: float = 0.9999,
        start_step: int = 0,
        every: int = 1,
        warmup: bool = True,
    ):
        self.decay, self.start_step, self.every, self.warmup = float(decay), int(start_step), int(every), warmup
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor], step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (1-based)."""
        if step % self.every:
            return
        if step <= self.start_step:
            for n, p in params.items():
                self.shadow[n].copy_(p.detach().float())
            return
        d = self.current_decay()
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @contextmanager
    def applied(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Temporarily put the averaged weights into ``params`` (e.g. to draw samples), then restore them."""
        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "every": self.every,
            "warmup": self.warmup,
            "updates": self.updates,
        }

    def load_state_dict(self, meta: Mapping, shadow: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(shadow))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.updates = int(meta.get("updates", 0))
        with torch.no_grad():
            for n, t in self.shadow.items():
                t.copy_(shadow[n])  # same kind as the shadow: a plain tensor, or a DTensor shard under FSDP2
