"""Writing GGUF files of a DiT (ComfyUI key names, as city96's ComfyUI-GGUF files use).

Encoders: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 come from the ``gguf`` package (bit-exact with ggml); Q4_K, Q5_K and
Q6_K are simple round-to-nearest encoders written here (min/max per sub-block, no importance search), so a
file written with them decodes with any ggml reader but is slightly less accurate than llama.cpp's own
quantizer. Only 2-D weights whose rows are whole blocks are quantized; everything else is stored as F32
(1-D tensors, as city96 does) or in its own 16-bit type.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _scale_to_6bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block non-negative values ``[n, 8]`` -> (fp16-rounded super scale ``[n, 1]``, 6-bit codes ``[n, 8]``)."""
    top = values.max(axis=1, keepdims=True) / 63.0
    top = top.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(top > 0, np.rint(values / top), 0)
    return top, np.clip(codes, 0, 63).astype(np.uint8)


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of ggml's ``get_scale_min_k4``: 8 six-bit scales and mins -> 12 bytes."""
    d = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    m = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return np.concatenate([d, m, md], axis=1).astype(np.uint8)


def _affine_k(blocks: np.ndarray, levels: int):
    """Shared Q4_K/Q5_K encoder: value = d*sc*q - dmin*mn, q in [0, levels]."""
    n = blocks.shape[0]
    x = blocks.reshape(n, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(axis=2), 0.0)
    hi = x.max(axis=2)
    offset = -lo
    step = np.maximum(hi + offset, 0.0) / levels
    d, sc = _scale_to_6bit(step)
    dmin, mn = _scale_to_6bit(offset)
    eff = (d * sc)[:, :, None]
    off = (dmin * mn)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(eff > 0, np.rint((x + off) / eff), 0)
    q = np.clip(q, 0, levels).astype(np.uint8)
    return d, dmin, sc, mn, q


def _low_high(q: np.ndarray) -> np.ndarray:
    """``[n, 8, 32]`` 4-bit codes -> 128 bytes: byte ``j*32+l`` = code ``2j`` (low) | code ``2j+1`` (high)."""
    n = q.shape[0]
    q = q.reshape(n, 4, 2, 32) & 15
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _affine_k(blocks, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mn), _low_high(q)], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _affine_k(blocks, 31)
    n = q.shape[0]
    high = (q >> 4) & 1  # [n, 8, 32]: bit s of byte l is the fifth bit of value s*32 + l
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate(
        [_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mn), qh.reshape(n, 32), _low_high(q)], axis=1
    )


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16).astype(np.float32)
    step = np.abs(x).max(axis=2) / 31.5  # per group of 16; codes -32..31
    d = (step.max(axis=1, keepdims=True) / 127.0).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.rint(step / d), 0)
    sc = np.clip(sc, -128, 127).astype(np.int8)
    eff = (d * sc.astype(np.float32))[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(eff > 0, np.rint(x / eff), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # value h*128 + s*32 + l
    low = q & 15
    ql = (low[:, :, 0:2].reshape(n, 2, 64) | (low[:, :, 2:4].reshape(n, 2, 64) << 4)).reshape(n, 128)
    qh = (((q >> 4) & 3) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2).astype(np.uint8)
    return np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)


_OWN = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(w: torch.Tensor | np.ndarray, qtype: str) -> np.ndarray:
    """``[rows, cols]`` float -> ggml bytes ``[rows, bytes per row]`` of type ``qtype`` (e.g. "Q4_K")."""
    import gguf

    arr = w.float().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    if arr.shape[-1] % block:
        raise ValueError(f"rows of {arr.shape[-1]} values are not whole {qtype} blocks of {block}")
    if qtype in _OWN:
        rows = arr.reshape(-1, arr.shape[-1])
        out = _OWN[qtype](rows.reshape(-1, block))
        return out.reshape(*arr.shape[:-1], arr.shape[-1] // block * size)
    return gguf.quants.quantize(arr, t)


def save_gguf(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    qtype: str,
    should_quantize: Callable[[str, torch.Tensor], bool] | None = None,
    arch: str = "lumina2",
) -> Path:
    """Write ``state`` to ``path``: 2-D weights accepted by ``should_quantize`` (default: every 2-D weight whose
    rows are whole blocks) as ``qtype``; other tensors as F32, except 2-D F16/BF16 ones, which keep their type."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("zimage.quantization", qtype)
    for name, t in state.items():
        t = t.detach().cpu()
        ok = t.ndim == 2 and t.shape[-1] % block == 0 and name.endswith(".weight")
        if ok and (should_quantize is None or should_quantize(name, t)):
            writer.add_tensor(name, quantize(t, qtype), raw_dtype=gguf.GGMLQuantizationType[qtype])
        elif t.dtype == torch.bfloat16 and t.ndim > 1:
            raw = t.contiguous().view(torch.int16).numpy().view(np.uint8)
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif t.dtype == torch.float16 and t.ndim > 1:
            writer.add_tensor(name, t.numpy())
        else:
            writer.add_tensor(name, t.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
