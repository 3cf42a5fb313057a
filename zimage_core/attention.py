"""Attention backends for the DiT: PyTorch SDPA by default, FlashAttention 2/3 and SageAttention when installed.

The optional kernels are never dependencies: they are imported when asked for (``probe``), and each call
checks that the kernel supports what it is given (a CUDA tensor in fp16/bf16, the head size, no padding
mask: batches whose captions differ in length carry a key mask, which only SDPA takes). Anything it does
not support goes to SDPA, with one log line per reason. ``auto`` picks the fastest *exact* kernel available
for the device and dtype: FlashAttention 3 on Hopper, FlashAttention 2 on Ampere or newer, else SDPA.
SageAttention quantizes q/k to int8 (results differ slightly), so it is used only when named.

Every backend takes and returns ``[B, H, S, D]`` (the layout :class:`~zimage_core.layers.Attention` uses).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch

from .errors import ZImageError
from .layers import Attention, sdpa_attention

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash_attn", "flash_attn_3", "sage")
_HALF = (torch.float16, torch.bfloat16)
# name -> (module, function, minimum compute capability, install hint)
_OPTIONAL = {
    "flash_attn_3": (
        "flash_attn_interface",
        "flash_attn_func",
        (9, 0),
        "FlashAttention 3 (hopper/ in the flash-attention repository, 'python setup.py install')",
    ),
    "flash_attn": ("flash_attn", "flash_attn_func", (8, 0), "pip install flash-attn --no-build-isolation"),
    "sage": ("sageattention", "sageattn", (8, 0), "pip install sageattention"),
}
_AUTO_ORDER = ("flash_attn_3", "flash_attn")


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def probe(name: str) -> tuple[Callable | None, str]:
    """``(kernel, '')`` if the optional backend imports, else ``(None, why not)``."""
    module, fn, _, hint = _OPTIONAL[name]
    try:
        kernel = getattr(importlib.import_module(module), fn, None)
    except Exception as e:  # noqa: BLE001 - a broken install (missing .so, CUDA mismatch) is just "unavailable"
        return None, f"'{module}' cannot be imported ({type(e).__name__}: {e}); {hint}"
    if not callable(kernel):
        return None, f"'{module}' has no {fn}(); {hint}"
    return kernel, ""


class AttentionBackend:
    """A kernel with SDPA as the fallback for inputs it does not support."""

    def __init__(
        self,
        name: str,
        kernel: Callable,
        layout: str,
        head_dims: tuple[int, ...] | None = None,
        max_head_dim: int = 256,
    ):
        self.name, self.kernel, self.layout = name, kernel, layout
        self.head_dims, self.max_head_dim = head_dims, max_head_dim
        self.calls = 0
        self.fallbacks: dict[str, int] = {}

    def unsupported(self, q: torch.Tensor, mask: torch.Tensor | None) -> str:
        if mask is not None:
            return "a padding mask (captions of different lengths in one batch)"
        if not _on_gpu(q):
            return f"tensors on {q.device.type}"
        if q.dtype not in _HALF:
            return f"dtype {str(q.dtype).removeprefix('torch.')} (needs fp16 or bf16)"
        d = q.shape[-1]
        if d > self.max_head_dim or d % 8 or (self.head_dims is not None and d not in self.head_dims):
            return f"head size {d}"
        return ""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        reason = self.unsupported(q, mask)
        if reason:
            if reason not in self.fallbacks:
                log.info("attention %s: %s is not supported; using SDPA for these calls", self.name, reason)
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
            return sdpa_attention(q, k, v, mask)
        self.calls += 1
        if self.layout == "HND":
            return self.kernel(q, k, v, tensor_layout="HND", is_causal=False)
        out = self.kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
        if isinstance(out, tuple):  # some FlashAttention 3 builds also return the log-sum-exp
            out = out[0]
        return out.transpose(1, 2)

    def __repr__(self) -> str:
        return f"<attention {self.name}>"


def _build(name: str, kernel: Callable) -> AttentionBackend:
    if name == "sage":
        return AttentionBackend(name, kernel, "HND", head_dims=(64, 96, 128))
    return AttentionBackend(name, kernel, "NHD")


def available(device: torch.device | str, dtype: torch.dtype) -> dict[str, str]:
    """``{backend: ''}`` for usable backends and ``{backend: why not}`` for the others."""
    dev = torch.device(device)
    cap = _capability(dev)
    out = {"sdpa": ""}
    for name, (_, _, need, _) in _OPTIONAL.items():
        if cap is None:
            out[name] = f"needs a CUDA GPU (the device is {dev.type})"
        elif cap < need:
            out[name] = f"needs compute capability {need[0]}.{need[1]}+ (this GPU is {cap[0]}.{cap[1]})"
        elif dtype not in _HALF:
            out[name] = f"needs fp16/bf16 weights (they are {str(dtype).removeprefix('torch.')})"
        else:
            out[name] = probe(name)[1]
    return out


def resolve(name: str, device: torch.device | str, dtype: torch.dtype) -> tuple[str, Callable]:
    """``(chosen backend, attention_fn)``; ``auto`` never fails, a named backend that cannot run does."""
    if name not in BACKENDS:
        raise ZImageError(f"unknown attention backend '{name}'; choose one of {', '.join(BACKENDS)}.")
    if name == "sdpa":
        return "sdpa", sdpa_attention
    status = available(device, dtype)
    if name == "auto":
        for cand in _AUTO_ORDER:
            if not status[cand]:
                log.info("attention auto: %s (available on this device)", cand)
                return cand, _build(cand, probe(cand)[0])
        why = "; ".join(f"{c}: {status[c]}" for c in _AUTO_ORDER)
        log.info("attention auto: sdpa (%s)", why)
        return "sdpa", sdpa_attention
    if status[name]:
        raise ZImageError(f"attention '{name}' cannot run here: {status[name]}. Use sdpa or auto.")
    return name, _build(name, probe(name)[0])


def set_attention(
    model: torch.nn.Module,
    name: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Point every DiT attention layer of ``model`` at backend ``name``; returns the backend chosen.

    ``device``/``dtype`` default to the model's (pass the compute device when the model is still on the CPU).
    """
    p = next(model.parameters())
    dtype = dtype or getattr(model, "dtype", p.dtype)
    chosen, fn = resolve(name, device if device is not None else p.device, dtype)
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.attention_fn = fn
            n += 1
    log.debug("attention %s set on %d layers", chosen, n)
    return chosen
