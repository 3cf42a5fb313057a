"""Weight-only quantization of the DiT and the text encoder: int8, nf4, fp8, GGUF and ComfyUI's quantized files.

- ``load_dit(path, quant=...)`` / ``TextEncoder.load(path, quant=...)`` quantize a full-precision file while
  loading it (``int8``, ``nf4``: bitsandbytes formats; ``fp8``: e4m3 with per-row scales). GGUF files and
  ComfyUI's fp8/int8 files are recognised from the file and stay quantized as stored.
- Only the big matrices of the transformer blocks are quantized; embedders, final layer, norms, adaLN
  modulation and pad tokens stay in the compute dtype.
- The quantized modules (:mod:`zimage_core.quant.linear`) move with ``.to(device)`` like any module; LoRAs attach
  to them as runtime side paths (:func:`zimage_core.lora.apply_loras`).
"""

from __future__ import annotations

from torch import nn

from .linear import (
    FP8Linear,
    GGUFLinear,
    Int8Linear,
    NF4Linear,
    QuantLinear,
    is_quantized,
    quantize_linear,
    share_workspace,
)
from .modes import DIT_POLICY, QUANT_MODES, TEXT_ENCODER_POLICY, check_mode

__all__ = [
    "DIT_POLICY",
    "FP8Linear",
    "GGUFLinear",
    "Int8Linear",
    "NF4Linear",
    "QUANT_MODES",
    "QuantLinear",
    "TEXT_ENCODER_POLICY",
    "check_mode",
    "describe",
    "is_quantized",
    "quantize_linear",
    "quantize_model",
    "share_workspace",
    "storage_bytes",
]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def storage_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of quantized linears, bytes of everything else: parameters and buffers)."""
    quant = other = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quant += m.storage_bytes()
            other += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        else:
            other += sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
            other += sum(t.numel() * t.element_size() for t in m.buffers(recurse=False))
    return quant, other


def describe(model: nn.Module) -> str:
    """One line: which layers are quantized, in what format, and the bytes of the weights."""
    counts: dict[str, int] = {}
    n_linear = 0
    full = 0
    dtype = None
    for m in model.modules():
        if isinstance(m, QuantLinear):
            counts[m.format] = counts.get(m.format, 0) + 1
            full += m.in_features * m.out_features
            n_linear += 1
        elif isinstance(m, nn.Linear):
            n_linear += 1
            dtype = dtype or m.weight.dtype
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    quant, other = storage_bytes(model)
    name = str(dtype or "float").replace("torch.", "")
    if not counts:
        return f"not quantized: {n_linear} linear layers, {_gb(other)} of weights in {name}"
    width = 2 if dtype is None else dtype.itemsize
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    return (
        f"quantized {sum(counts.values())} of {n_linear} linear layers ({kinds}): {_gb(quant)} "
        f"(would be {_gb(full * width)} in {name}); {_gb(other)} of other weights kept in {name}"
    )


def quantize_model(model: nn.Module, mode: str, policy=DIT_POLICY) -> nn.Module:
    """Quantize the matching ``nn.Linear`` layers of an already loaded model in place (each weight on its device).

    Loading with ``quant=`` is lighter (the full-precision model is never resident); this is for models that
    already are in memory.
    """
    mode = check_mode(mode)
    if mode == "none":
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and policy.fullmatch(name):
            if mode == "nf4" and module.weight.numel() % 64:
                continue
            q = quantize_linear(module.weight.detach(), mode, module.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
    share_workspace(model)
    return model
