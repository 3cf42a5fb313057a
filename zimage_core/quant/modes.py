"""Quantization modes and which layers each model quantizes (a leaf module: no model code imported)."""

from __future__ import annotations

import re

from ..errors import ZImageError

QUANT_MODES = ("none", "int8", "nf4", "fp8")
DIT_POLICY = re.compile(
    r"(noise_refiner|context_refiner|siglip_refiner|layers)\.\d+\."
    r"(attention\.(qkv|out)|feed_forward\.w[123])"
)
TEXT_ENCODER_POLICY = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
# Linears that stay quantized when a file stores them so (the block matrices and the per-block modulation);
# the file's other quantized layers (embedders, final layer) are small and are dequantized at load.
DIT_STORED_POLICY = re.compile(DIT_POLICY.pattern[:-1] + r"|adaLN_modulation\.0)")


def check_mode(quant: str | None) -> str:
    mode = "none" if quant in (None, "", "off") else str(quant).lower()
    if mode not in QUANT_MODES:
        raise ZImageError(
            f"unknown quantization '{quant}'; use one of {', '.join(QUANT_MODES)} "
            "(GGUF and pre-quantized files are recognised without it)."
        )
    return mode
