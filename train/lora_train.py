"""Trainable LoRA adapters on a frozen DiT, and their conversion to zimage's LoRA files.

An adapter is a child module ``lora`` of the ``nn.Linear`` it patches (so the base's parameter names and
checkpoints stay unchanged) and a forward hook adds ``scale * up(down(x))`` to the layer's output,
``scale = alpha / rank``. ``down`` starts Kaiming-uniform (seeded), ``up`` at zero, so a fresh adapter leaves
the model unchanged. Adapters are kept in float32 whatever the base dtype (a bf16 base is fine).

Saved with :func:`zimage_core.lora.save_lora`: ComfyUI's native LoRA layout,
``diffusion_model.<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (e.g.
``diffusion_model.layers.0.attention.qkv``), which ``ZImageLoraLoader``, ``zimage generate --lora`` and
native ComfyUI's LoraLoader all read.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zimage_core.errors import ZImageError
from zimage_core.lora import LoRA, LowRank, save_lora

log = logging.getLogger(__name__)

ADAPTER = "lora"


class LoraAdapter(nn.Module):
    """``scale * up @ down`` as a side path; ``down`` ``[r, in]``, ``up`` ``[out, r]``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        down = torch.empty(rank, in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up) * self.scale


def _add_side_path(module: nn.Linear, inputs, output):
    return output + getattr(module, ADAPTER)(inputs[0]).to(output.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], seed: int = 0) -> list[str]:
    """Freeze ``model`` and attach a trainable adapter to every ``nn.Linear`` whose name matches a regex in
    ``targets`` (``re.search``); returns the patched module names."""
    try:
        patterns = [re.compile(p) for p in targets]
    except re.error as e:
        raise ZImageError(f"lora.targets: {e.pattern!r} is not a valid regular expression ({e}).") from e
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = []
    for name, module in linears:
        if not any(p.search(name) for p in patterns):
            continue
        if hasattr(module, ADAPTER):
            raise ZImageError(f"'{name}' already has a LoRA adapter.")
        adapter = LoraAdapter(module.in_features, module.out_features, rank, alpha, gen)
        adapter.to(module.weight.device)
        module.add_module(ADAPTER, adapter)
        module.register_forward_hook(_add_side_path)
        names.append(name)
    if not names:
        examples = ", ".join(n for n, _ in linears[:6])
        raise ZImageError(
            f"lora.targets {targets} match no linear layer of the DiT. Module names look like: {examples} ...; "
            "targets are regular expressions searched in these names (e.g. 'attention\\.qkv$', 'feed_forward\\.w1$', "
            "'adaLN_modulation')."
        )
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "LoRA rank %d alpha %g on %d linear layers: %.2fM trainable parameters", rank, alpha, len(names), n_params / 1e6
    )
    return names


def adapters(model: nn.Module) -> dict[str, LoraAdapter]:
    """``{patched module name: adapter}``."""
    return {n[: -len("." + ADAPTER)]: m for n, m in model.named_modules() if isinstance(m, LoraAdapter)}


def lora_from_state(state: dict[str, torch.Tensor], alpha: float) -> LoRA:
    """A :class:`zimage_core.lora.LoRA` from adapter parameters ``<module>.lora.down`` / ``.lora.up``."""
    lora = LoRA(format="zimage-train", name="trained LoRA")
    suffix_down, suffix_up = f".{ADAPTER}.down", f".{ADAPTER}.up"
    for key in sorted(state):
        if not key.endswith(suffix_down):
            continue
        name = key[: -len(suffix_down)]
        up_key = name + suffix_up
        if up_key not in state:
            raise ZImageError(f"LoRA state: '{up_key}' is missing next to '{key}'; the checkpoint is incomplete.")
        down, up = state[key].detach().float().cpu(), state[up_key].detach().float().cpu()
        lora.add(name, LowRank(down=down.contiguous(), up=up.contiguous(), scale=float(alpha) / down.shape[0]))
    if not lora:
        raise ZImageError("this checkpoint holds no LoRA adapter parameters (was it a full fine-tune?).")
    return lora


def save_trained_lora(
    state: dict[str, torch.Tensor], alpha: float, path: str | Path, metadata: dict | None = None
) -> Path:
    """Write adapter parameters as a LoRA file that zimage and native ComfyUI load."""
    lora = lora_from_state(state, alpha)
    rank = next(iter(lora.values()))[0].down.shape[0]
    meta = {"zimage_lora_rank": str(rank), "zimage_lora_alpha": str(alpha), **(metadata or {})}
    return save_lora(lora, path, metadata=meta)
