"""GGUF files: reading them lazily, and PyTorch dequantization kernels for the ggml block formats.

The kernels mirror the reference decoders of the ``gguf`` package (``gguf.quants.dequantize``, numpy) bit for
bit in float32, but run on any torch device, so a GGUF model keeps its quantized blocks in (GPU) memory and
dequantizes one matrix per Linear forward (like city96's ComfyUI-GGUF). Types with a kernel here:
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, plus the plain F32/F16/BF16. Any other ggml
type is decoded once at load time by the ``gguf`` package (slow, and stored in the compute dtype).

Tensor data is read with ``pread`` into fresh buffers, never through the file's memory map, so loading a
GGUF costs its size in memory once (see :mod:`zimage_core.weights`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

QK_K = 256
CHUNK = 1 << 20  # values decoded at a time (4 MB float32 temporaries, reused from call to call)
# ggml type id -> (name, values per block, bytes per block)
TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def type_name(qtype: int) -> str:
    if qtype in TYPES:
        return TYPES[qtype][0]
    try:
        import gguf

        return gguf.GGMLQuantizationType(qtype).name
    except (ImportError, ValueError):
        return f"type{qtype}"


# ---------------------------------------------------------------------------------------------
# Kernels: uint8 blocks [n, bytes per block] -> float32 values [n, values per block]
# ---------------------------------------------------------------------------------------------
def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two little-endian bytes per row -> float32 ``[n, 1]``."""
    return b.contiguous().view(torch.float16).float()


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 16]`` bytes -> ``[n, 32]`` codes: low nibbles first, then high nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _bits(x: torch.Tensor, width: int, count: int, dim: int) -> torch.Tensor:
    """Fields ``(x >> (width*i)) & mask`` for ``i < count``, stacked along a new ``dim``.

    Shifts are Python ints, so no small index tensor is copied to the device on every call.
    """
    mask = (1 << width) - 1
    return torch.stack([(x >> (width * i)) & mask for i in range(count)], dim=dim)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes of a little-endian uint32 -> its 32 bits ``[n, 32]`` (bit i of the word at i)."""
    return _bits(qh, 1, 8, -1).reshape(qh.shape[0], 32)


def _q8_0(b):
    return b[:, 2:].view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b):
    return (_nibbles32(b[:, 2:]).float() - 8.0) * _f16(b[:, :2])


def _q4_1(b):
    return _nibbles32(b[:, 4:]).float() * _f16(b[:, :2]) + _f16(b[:, 2:4])


def _q5_0(b):
    q = (_nibbles32(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)).float() - 16.0
    return q * _f16(b[:, :2])


def _q5_1(b):
    q = (_nibbles32(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)).float()
    return q * _f16(b[:, :2]) + _f16(b[:, 2:4])


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block from its 12 packed bytes."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc.float(), mn.float()


def _low_high_32(qs: torch.Tensor) -> torch.Tensor:
    """K-quant 4-bit codes: byte ``j*32 + l`` holds value ``j*64 + l`` (low) and ``j*64 + 32 + l`` (high)."""
    n = qs.shape[0]
    return _bits(qs.reshape(n, -1, 32), 4, 2, 2).reshape(n, -1, 32)


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).unsqueeze(-1)
    dm = (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    return torch.addcmul(dm.neg(), d, _low_high_32(b[:, 16:]).float()).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).unsqueeze(-1)
    dm = (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    qh = _bits(b[:, 16:48], 1, 8, 1)  # [n, 8, 32]: bit s of byte l -> value s*32 + l
    q = _low_high_32(b[:, 48:]) | (qh << 4)
    return torch.addcmul(dm.neg(), d, q.float()).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql = _bits(b[:, :128].reshape(n, 2, 64), 4, 2, 2).reshape(n, -1, 32)
    qh = _bits(b[:, 128:192].reshape(n, 2, 32), 2, 4, 2).reshape(n, -1, 32)
    q = (ql | (qh << 4)).float() - 32.0
    scales = b[:, 192:208].view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    return (d * q.reshape(n, QK_K // 16, -1)).reshape(n, QK_K)


def _q2_k(b):
    n = b.shape[0]
    scales = b[:, :16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 15).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(b[:, 16:80].reshape(n, 2, 32), 2, 4, 2)
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = torch.cat([scales[:, :8], scales[:, :8] >> 4], dim=-1) & 15
    high = _bits(scales[:, 8:12], 2, 4, 1).reshape(n, 16)
    sc = (low | (high << 4)).float() - 32.0
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 2, 4, 2).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), 1, 8, 2).reshape(n, 16, 16) ^ 1
    q = ql.float() - (qh << 2).float()
    return (dl * q).reshape(n, QK_K)


KERNELS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: _q4_0,
    3: _q4_1,
    6: _q5_0,
    7: _q5_1,
    8: _q8_0,
    10: _q2_k,
    11: _q3_k,
    12: _q4_k,
    13: _q5_k,
    14: _q6_k,
}


def has_kernel(qtype: int) -> bool:
    return qtype in KERNELS or qtype in FLOAT_TYPES


def check_kernel(qtype: int) -> None:
    if not has_kernel(qtype):
        raise ValueError(f"no dequantization kernel for GGUF type {type_name(qtype)}")


def dequantize(
    raw: torch.Tensor,
    qtype: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw ggml bytes (uint8, any shape holding ``prod(shape)`` values) -> a ``dtype`` tensor of ``shape``
    (written into ``out`` when given)."""
    if qtype in FLOAT_TYPES:
        w = raw.contiguous().view(FLOAT_TYPES[qtype]).reshape(shape)
        return w.to(dtype) if out is None else out.copy_(w)
    check_kernel(qtype)
    _, block, type_size = TYPES[qtype]
    blocks = raw.reshape(-1, type_size)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=raw.device)
    flat = out.view(blocks.shape[0], block)
    step = max(1, CHUNK // block)  # bounds the float32 temporaries of the kernels
    for i in range(0, blocks.shape[0], step):
        flat[i : i + step] = KERNELS[qtype](blocks[i : i + step])
    return out


def row_bytes(qtype: int, n: int) -> int:
    _, block, size = TYPES[qtype]
    if n % block:
        raise ValueError(f"a row of {n} values is not a whole number of {type_name(qtype)} blocks ({block})")
    return n // block * size


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


class GGUFTensor:
    """One tensor of a GGUF file: torch-order shape, ggml type, where its bytes are."""

    __slots__ = ("name", "qtype", "shape", "offset", "nbytes")

    def __init__(self, name: str, qtype: int, shape: tuple[int, ...], offset: int, nbytes: int):
        self.name, self.qtype, self.shape, self.offset, self.nbytes = name, qtype, shape, offset, nbytes

    @property
    def quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES


class GGUFSource:
    """The tensors of a GGUF file, read one at a time with ``pread`` (raw bytes or dequantized)."""

    def __init__(self, path: str | os.PathLike, what: str = "GGUF file"):
        self.path = Path(path)
        self.what = what
        try:
            import gguf
        except ImportError as e:
            raise CheckpointError(
                f"{what}: '{path}' is a GGUF file; reading it needs the 'gguf' package (pip install gguf)."
            ) from e
        try:
            reader = gguf.GGUFReader(str(self.path), "r")
        except (ValueError, OSError, IndexError) as e:
            raise CheckpointError(f"{what}: cannot read '{path}' as GGUF ({e}). Is the download complete?") from e
        self.metadata: dict[str, object] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or not field.types:
                continue
            try:
                self.metadata[name] = field.contents()
            except (ValueError, TypeError, IndexError):
                continue
        self.tensors: dict[str, GGUFTensor] = {}
        size = self.path.stat().st_size
        for t in reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            orig = self.metadata.get(f"comfy.gguf.orig_shape.{t.name}")
            if isinstance(orig, list) and int(np.prod(orig)) == int(np.prod(shape)):
                shape = tuple(int(x) for x in orig)
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{what}: tensor '{t.name}' in '{path}' is truncated. Is the download complete?")
            self.tensors[t.name] = GGUFTensor(t.name, int(t.tensor_type), shape, int(t.data_offset), int(t.n_bytes))
        del reader  # drops the file's memory map: nothing of it stays resident

    def __iter__(self):
        return iter(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def nbytes(self) -> int:
        return self.path.stat().st_size

    def read_raw(self, key: str) -> torch.Tensor:
        """The tensor's bytes as uint8 ``[nbytes]``."""
        t = self.tensors[key]
        buf = torch.empty(t.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(t.offset)
            got = 0
            while got < t.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"'{self.path}' ended early while reading '{key}'.")
                got += n
        return buf

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as a float tensor (float types keep their dtype unless ``dtype`` is given)."""
        t = self.tensors[key]
        raw = self.read_raw(key)
        if t.qtype in FLOAT_TYPES:
            out = raw.view(FLOAT_TYPES[t.qtype]).reshape(t.shape)
            return out if dtype is None else out.to(dtype)
        if has_kernel(t.qtype):
            return dequantize(raw, t.qtype, t.shape, dtype or torch.float32)
        import gguf

        log.warning(
            "GGUF tensor '%s' is %s, which has no fast kernel here: decoding it with the gguf package",
            key,
            type_name(t.qtype),
        )
        values = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(t.qtype))
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(t.shape).to(dtype or torch.float32)


def summary(src: GGUFSource) -> dict[str, int]:
    """``{type name: tensor count}``."""
    out: dict[str, int] = {}
    for t in src.tensors.values():
        out[type_name(t.qtype)] = out.get(type_name(t.qtype), 0) + 1
    return dict(sorted(out.items()))
