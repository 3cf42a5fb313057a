"""LoRA for the Z-Image DiT: load any common layout, merge or patch at runtime, save.

Reading (:func:`load_lora`, :func:`parse_lora`) accepts, detected from the keys: diffusers/PEFT
(``transformer.layers.0.attention.to_q.lora_A.weight``, raw ``base_model.model.`` saves, fused
``diffusion_model.…attention.qkv.lora_A``), ai-toolkit (``diffusion_model.…to_q.lora_A`` and LoKr
``lokr_w1/w2``), kohya/musubi (``lora_unet_layers_0_attention_to_q.lora_down.weight`` + ``.alpha``),
musubi->ComfyUI fused qkv (block-diagonal ``lora_up``, alpha x 3), ComfyUI native
(``diffusion_model.<native>``, ``lora_unet_<native>``, bare diffusers names, ``lycoris_``), dot-style
``lora.down/lora.up`` and ``.diff``/``.diff_b`` deltas. See :mod:`zimage_core.lora_formats`.

Our own format (written by :func:`save_lora` and the trainer; ComfyUI loads it as is): the ComfyUI
native layout ``diffusion_model.<native module>.lora_down.weight`` ``[r, in]``, ``.lora_up.weight``
``[out, r]`` and ``.alpha`` (scale = alpha / r), e.g. ``diffusion_model.layers.0.attention.qkv``;
full deltas as ``.diff``/``.diff_b``; safetensors metadata ``zimage_format = "lora"``.

:func:`apply_loras` modes:
- ``merge``: ``W += strength * delta`` in float32, cast back; touched weights are backed up (on
  ``backup_device``) and ``handle.remove()`` restores them bit-exactly.
- ``runtime``: linear layers are wrapped by :class:`LoraLinear`, ``y = base(x) + strength * side(x)``;
  base weights are untouched (quantized bases). Non-linear targets (norm diffs) are merged.
  Quantized linears (:mod:`zimage_core.quant`) always get the runtime path, in ``merge`` mode too.
Handles must be removed in reverse order of applying.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .errors import LoraError
from .lora_formats import (
    Diff,
    Kron,
    LoRA,
    LowRank,
    Term,
    check_lora,
    detect_format,
    parse_lora,
    rows,
    target_table,
)
from .weights import WeightSource, save_safetensors

log = logging.getLogger(__name__)

__all__ = [
    "Diff",
    "Kron",
    "LoRA",
    "LoraHandle",
    "LoraLinear",
    "LowRank",
    "Term",
    "apply_loras",
    "detect_format",
    "load_lora",
    "lora_state_dict",
    "parse_lora",
    "parse_lora_arg",
    "save_lora",
]

_STACK = "_zimage_lora_handles"
OWN_PREFIX = "diffusion_model."


def load_lora(path: str | os.PathLike, model=None) -> LoRA:
    """Read a LoRA file of any supported layout, resolved against ``model`` (a ZImageDiT, DiTConfig or
    state dict; None = the released layout, shapes checked when applied)."""
    src = WeightSource.open(path, "LoRA")
    state = {k: src[k] for k in src}
    lora = parse_lora(state, model, src.metadata, Path(path).name)
    log.info("loaded LoRA %s (%s format, %d modules)", Path(path).name, lora.format, len(lora))
    return lora


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``"FILE[:STRENGTH]"`` -> ``(FILE, STRENGTH)``; strength defaults to 1.0, ``C:\\...`` stays a path."""
    path, sep, tail = arg.rpartition(":")
    if not sep or not path or re.fullmatch(r"[A-Za-z]", path) or re.search(r"[\\/]", tail):
        return arg, 1.0
    try:
        strength = float(tail)
    except ValueError:
        # "style.safetensors:abc" names an existing file with a bad strength, not a missing file "...:abc"
        if re.fullmatch(r"[-+0-9.eE]*", tail) or (os.path.isfile(path) and not os.path.exists(arg)):
            raise LoraError(
                f"--lora '{arg}': '{tail}' is not a number; use FILE[:STRENGTH], e.g. style.safetensors:0.8"
            ) from None
        return arg, 1.0
    if not math.isfinite(strength):
        raise LoraError(f"--lora '{arg}': the strength must be a finite number")
    return path, strength


# ---------------------------------------------------------------------------------------------
# Applying
# ---------------------------------------------------------------------------------------------
class LoraLinear(nn.Module):
    """A linear layer plus LoRA side paths: ``base(x) + sum(strength * term.side(x))`` on each term's rows."""

    is_lora_wrapper = True

    def __init__(self, base: nn.Module, adapters: Iterable[tuple[Term, float]]):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = [(t, s, *rows(t.chunk, self.out_features)) for t, s in adapters]
        self._cache: dict = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _terms_for(self, x: torch.Tensor):
        key = (x.device, x.dtype)
        if key not in self._cache:  # one copy, on the device and in the dtype of the activations
            self._cache = {key: [(t.to(x.device, x.dtype), s, o, n) for t, s, o, n in self.adapters]}
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for term, strength, off, n in self._terms_for(x):
            side = (term.side(x) * strength).to(y.dtype)
            if n == self.out_features:
                y = y + side
            else:
                y[..., off : off + n] += side
        return y


class LoraHandle:
    """What :func:`apply_loras` changed; ``remove()`` puts the model back exactly."""

    def __init__(self, model: nn.Module, mode: str):
        self.model, self.mode, self.active = model, mode, True
        self.keeps_original, self.lossy = True, False  # lossy: merged without a copy of the original weights
        self._weights: list[tuple[nn.Module, str, torch.Tensor]] = []  # (module, param, original values)
        self._modules: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original module)

    def _restore(self) -> None:
        for parent, attr, original in reversed(self._modules):
            setattr(parent, attr, original)
        with torch.no_grad():
            for module, param, original in reversed(self._weights):
                getattr(module, param).copy_(original)
        self._weights, self._modules, self.active = [], [], False

    def remove(self) -> None:
        if not self.active:
            return
        if self.lossy:
            raise LoraError(
                "this LoRA was merged without keeping the original weights (keep_original=False); "
                "load the model again to drop it."
            )
        stack = getattr(self.model, _STACK, [])
        if stack and stack[-1] is not self:
            raise LoraError("LoRAs applied after this one are still active; remove them first (reverse order).")
        self._restore()
        if stack:
            stack.pop()

    def __enter__(self) -> LoraHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _merge(handle: LoraHandle, module: nn.Module, name: str, items, backup_device) -> None:
    by_param: dict[str, list] = {}
    for term, strength in items:
        by_param.setdefault(term.param, []).append((term, strength))
    for param, group in by_param.items():
        p = getattr(module, param)
        if not p.is_floating_point():
            raise LoraError(
                f"cannot merge a LoRA into '{name}.{param}' stored as {p.dtype}; "
                "use the runtime LoRA mode with quantized weights."
            )
        total = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        for term, strength in group:
            off, n = rows(term.chunk, p.shape[0])
            total[off : off + n] += term.to(p.device).delta() * strength  # factors first: the product on-device
        if handle.keeps_original:
            handle._weights.append((module, param, p.detach().to(backup_device or p.device, copy=True)))
        else:
            handle.lossy = True
        with torch.no_grad():
            p.copy_((p.float() + total).to(p.dtype))


def _wrap(handle: LoraHandle, model: nn.Module, name: str, items) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    base = getattr(parent, attr)
    handle._modules.append((parent, attr, base))
    setattr(parent, attr, LoraLinear(base, items))


def apply_loras(
    model: nn.Module,
    loras: Iterable[tuple[LoRA, float] | LoRA],
    mode: str = "merge",
    backup_device: str | torch.device | None = "cpu",
    keep_original: bool = True,
) -> LoraHandle:
    """Apply ``[(lora, strength), ...]`` to ``model`` (``merge`` or ``runtime``); returns a handle to remove them.

    Every LoRA is checked against the model before anything changes. ``backup_device`` holds the original
    weights in merge mode (None = the weights' own device). ``keep_original=False`` keeps no copy (a model that
    is used once and dropped, e.g. by ``zimage generate``, saves the memory of every merged weight); its handle
    cannot be removed.
    """
    if mode not in ("merge", "runtime"):
        raise ValueError(f"unknown LoRA mode '{mode}'; use 'merge' or 'runtime'")
    pairs = [(x, 1.0) if isinstance(x, LoRA) else (x[0], float(x[1])) for x in loras]
    table = target_table(model)
    for lora, _ in pairs:
        check_lora(lora, table)
    plan: dict[str, list[tuple[Term, float]]] = {}
    for lora, strength in pairs:
        if strength != 0:
            for name, terms in lora.items():
                plan.setdefault(name, []).extend((t, strength) for t in terms)
    handle = LoraHandle(model, mode)
    handle.keeps_original = keep_original
    side = 0  # quantized linears: never merged, always a runtime side path
    try:
        for name, items in plan.items():
            target = model.get_submodule(name)
            while getattr(target, "is_lora_wrapper", False):  # LoRAs applied before this one
                target = target.base
            quantized = getattr(target, "is_quantized", False) is True
            if table.targets[name].linear and (mode == "runtime" or quantized):
                _wrap(handle, model, name, items)
                side += quantized and mode == "merge"
            else:
                _merge(handle, model.get_submodule(name), name, items, backup_device)
    except BaseException:
        handle._restore()
        raise
    if side:
        log.info("%d quantized layers take the LoRA as a runtime side path (quantized weights are never merged)", side)
    if not hasattr(model, _STACK):
        setattr(model, _STACK, [])
    getattr(model, _STACK).append(handle)
    log.info("applied %d LoRA(s) to %d modules (%s)", len(pairs), len(plan), mode)
    return handle


# ---------------------------------------------------------------------------------------------
# Saving (our own = ComfyUI native layout)
# ---------------------------------------------------------------------------------------------
def _out_rows(terms: list[Term]) -> int:
    sizes = {t.shape[0] * (t.chunk[1] if t.chunk else 1) for t in terms}
    if len(sizes) != 1:
        raise LoraError(f"LoRA terms on one module disagree on its size: {sorted(sizes)}")
    return sizes.pop()


def _fuse_low_rank(key: str, terms: list[LowRank]) -> dict[str, torch.Tensor]:
    """One LoRA of summed rank equal to all ``terms`` (split q/k/v become a block-diagonal ``up``)."""
    if len(terms) == 1 and terms[0].chunk is None:
        t = terms[0]
        return {
            key + ".lora_down.weight": t.down,
            key + ".lora_up.weight": t.up,
            key + ".alpha": torch.tensor(t.scale * t.down.shape[0], dtype=torch.float32),
        }
    same = len({t.scale for t in terms}) == 1
    dtype = torch.float32
    if same:
        dtype = functools.reduce(torch.promote_types, [x.dtype for t in terms for x in (t.down, t.up)])
    out_rows, rank = _out_rows(terms), sum(t.down.shape[0] for t in terms)
    up = torch.zeros(out_rows, rank, dtype=dtype)
    col = 0
    for t in terms:
        off, n = rows(t.chunk, out_rows)
        r = t.down.shape[0]
        up[off : off + n, col : col + r] = (t.up.float() * (1.0 if same else t.scale)).to(dtype)
        col += r
    down = torch.cat([t.down.to(dtype) for t in terms])
    alpha = (terms[0].scale if same else 1.0) * rank
    return {
        key + ".lora_down.weight": down,
        key + ".lora_up.weight": up,
        key + ".alpha": torch.tensor(alpha, dtype=torch.float32),
    }


def _sum_full(terms: list[Term]) -> torch.Tensor:
    n = _out_rows(terms)
    total = torch.zeros((n, *terms[0].shape[1:]), dtype=torch.float32)
    for t in terms:
        off, length = rows(t.chunk, n)
        total[off : off + length] += t.delta()
    return total


def lora_state_dict(lora: LoRA) -> dict[str, torch.Tensor]:
    """``lora`` in our own (ComfyUI native) layout; LoKr terms are written as ``.diff`` deltas."""
    out: dict[str, torch.Tensor] = {}
    for name, terms in lora.items():
        key = OWN_PREFIX + name
        low = [t for t in terms if isinstance(t, LowRank)]
        if low:
            out.update(_fuse_low_rank(key, low))
        for param, suffix in (("weight", ".diff"), ("bias", ".diff_b")):
            full = [t for t in terms if not isinstance(t, LowRank) and t.param == param]
            if full:
                out[key + suffix] = _sum_full(full)
    return out


def save_lora(lora: LoRA, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``lora`` atomically in our own format (see the module docstring)."""
    meta = {"format": "pt", "zimage_format": "lora", **(metadata or {})}
    save_safetensors(lora_state_dict(lora), path, metadata=meta)
    return Path(path)
