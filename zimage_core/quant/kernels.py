"""Weight formats of the quantized linears: int8 (row-wise absmax), nf4 (blockwise 64), fp8 (e4m3/e5m2 + scales).

Formats are bitsandbytes-compatible where bitsandbytes defines them:
- ``int8``: ``q = round(w * 127 / absmax_row)`` (``bitsandbytes.functional.int8_vectorwise_quant``), stored
  with the per-row scale ``absmax / 127``;
- ``nf4``: the flattened weight in blocks of 64, each normalised by its absmax and rounded to the nearest of
  the 16 NF4 levels, two 4-bit codes per byte, first code in the high nibble
  (``bitsandbytes.functional.quantize_4bit(..., blocksize=64, quant_type="nf4")``).

Every function here is plain PyTorch, so CPU and CUDA run the same code. Where bitsandbytes is installed its
NF4 dequantization kernel is used instead (several times faster, bit-identical: checked in the tests).
Scales are computed and applied in float32 and the result cast to the compute dtype at the end.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NF4_BLOCK = 64
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}

# The 16 NF4 levels (bitsandbytes' table: quantiles of N(0, 1) normalised to [-1, 1]).
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


# ---------------------------------------------------------------------------------------------
# int8, row-wise
# ---------------------------------------------------------------------------------------------
CHUNK = 1 << 22  # values quantized at a time: bounds the float32 temporaries of quantize-on-load
DEQUANT_CHUNK = 1 << 18  # values dequantized at a time by the torch kernels (1 MB float32 temporaries)


def _row_chunks(w: torch.Tensor):
    """``(row slice, float32 rows)`` in pieces of about :data:`CHUNK` values."""
    step = max(1, CHUNK // max(1, w.shape[1]))
    for i in range(0, w.shape[0], step):
        yield slice(i, i + step), w[i : i + step].to(torch.float32, copy=True)  # a copy: modified in place


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` -> (int8 ``[out, in]``, float32 scale ``[out]``) with ``w ~ q * scale[:, None]``."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for rows, wf in _row_chunks(w):
        absmax = wf.abs().amax(dim=1)
        q[rows] = torch.round(wf.mul_((127.0 / absmax.clamp(min=1e-30))[:, None])).clamp_(-127, 127)
        scale[rows] = absmax / 127.0
    return q, scale


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``q * scale[:, None]`` computed in float32, stored in ``dtype`` (into ``out`` when given)."""
    if out is None:
        return (q.float() * scale.view(-1, 1)).to(dtype)
    return out.copy_(q).mul_(scale.view(-1, 1))  # the in-place multiply runs in float32 too


def scaled_rows_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (q * scale[:, None]).T + bias`` for int8/fp8 ``q`` whose values the compute dtype holds exactly:
    the matmul runs on ``q`` itself and the per-row scale multiplies the (small) output, so the only temporary
    the size of the weight is ``q`` in the compute dtype (``out`` when given). For bf16/fp32 inputs (fp16
    could overflow)."""
    y = F.linear(x, q.to(x.dtype) if out is None else out.copy_(q))
    y = (y * (scale if scale.numel() > 1 else scale.reshape(()))).to(x.dtype)  # the scale multiplies in float32
    return y + bias.to(x.dtype) if bias is not None else y


# ---------------------------------------------------------------------------------------------
# nf4, blockwise 64 over the flattened weight
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between levels for rounding ``[15]``, byte -> (high, low) level table ``[256, 2]``)."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    mids = (levels[1:] + levels[:-1]) / 2
    b = torch.arange(256)
    pairs = torch.stack([levels[b >> 4], levels[b & 15]], dim=-1)
    return mids.to(device), pairs.to(device)


def quantize_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (numel a multiple of 64) -> (packed uint8 ``[numel / 2]``, float32 absmax ``[numel / 64]``)."""
    if w.numel() % NF4_BLOCK:
        raise ValueError(f"nf4 needs a number of weights divisible by {NF4_BLOCK}, got {w.numel()}")
    mids, _ = _nf4_tables(w.device)
    flat = w.reshape(-1)
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(flat.numel() // NF4_BLOCK, dtype=torch.float32, device=w.device)
    for i in range(0, flat.numel(), CHUNK):
        blocks = flat[i : i + CHUNK].to(torch.float32, copy=True).view(-1, NF4_BLOCK)
        top = blocks.abs().amax(dim=1)
        codes = torch.bucketize(blocks.div_(top.clamp(min=1e-30)[:, None]), mids, out_int32=True)
        codes = codes.to(torch.uint8).view(-1, 2)
        packed[i // 2 : i // 2 + codes.shape[0]] = (codes[:, 0] << 4) | codes[:, 1]
        absmax[i // NF4_BLOCK : i // NF4_BLOCK + top.numel()] = top
    return packed, absmax


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    use_bnb: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``shape`` weight in ``dtype`` (into ``out`` when given); bitsandbytes' kernel when it is usable."""
    if use_bnb and (bnb := bitsandbytes_functional()) is not None and packed.device.type in ("cpu", "cuda"):
        state = bnb.QuantState(
            absmax=absmax,
            shape=torch.Size(shape),
            code=_nf4_code(packed.device),
            blocksize=NF4_BLOCK,
            quant_type="nf4",
            dtype=dtype,
        )
        if out is None or packed.device.type == "cuda":
            return bnb.dequantize_4bit(packed.view(-1, 1), state, out=out)
        # bitsandbytes has no CPU kernel with out=: decode fixed-size pieces and copy them (small temporaries,
        # reused, instead of one weight-sized allocation per call fragmenting the heap).
        flat, step = out.view(-1), 4 * DEQUANT_CHUNK
        for i in range(0, flat.numel(), step):
            n = min(step, flat.numel() - i)
            piece = bnb.QuantState(
                absmax=absmax[i // NF4_BLOCK : (i + n) // NF4_BLOCK],
                shape=torch.Size((n,)),
                code=state.code,
                blocksize=NF4_BLOCK,
                quant_type="nf4",
                dtype=dtype,
            )
            flat[i : i + n] = bnb.dequantize_4bit(packed.view(-1)[i // 2 : (i + n) // 2].view(-1, 1), piece)
        return out
    # Plain torch, in small fixed-size pieces (float32 temporaries reused rather than fragmenting the heap).
    _, pairs = _nf4_tables(packed.device)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    flat, codes = out.view(-1, NF4_BLOCK), packed.view(-1)
    step = DEQUANT_CHUNK // NF4_BLOCK
    for i in range(0, flat.shape[0], step):
        values = F.embedding(codes[i * NF4_BLOCK // 2 : (i + step) * NF4_BLOCK // 2].int(), pairs)
        flat[i : i + step] = values.view(-1, NF4_BLOCK) * absmax[i : i + step, None]
    return out


@functools.lru_cache(maxsize=8)
def _nf4_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=1)
def bitsandbytes_functional():
    """``bitsandbytes.functional`` if it imports (its NF4 kernels are faster), else None. Imported on first use."""
    try:
        with _quiet("bitsandbytes"):
            import bitsandbytes.functional as bnb
    except Exception as e:  # any import failure (missing, broken CUDA setup) falls back to plain torch
        log.info("bitsandbytes is not usable (%s); nf4 runs on the plain PyTorch kernels", e)
        return None
    return bnb


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Hide a library's import-time warnings (bitsandbytes warns about optional CPU kernels it cannot fetch)."""
    lg = logging.getLogger(logger_name)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


# ---------------------------------------------------------------------------------------------
# fp8 with per-tensor or per-row scales
# ---------------------------------------------------------------------------------------------
def quantize_fp8(
    w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, per_row: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` -> (fp8 ``[out, in]``, float32 scale ``[out]`` or ``[1]``) with ``w ~ q * scale``."""
    top = FP8_MAX[dtype]
    if per_row:
        absmax = torch.cat([wf.abs().amax(dim=1) for _, wf in _row_chunks(w)])
    else:
        absmax = torch.stack([wf.abs().amax() for _, wf in _row_chunks(w)]).amax().reshape(1)
    scale = absmax.clamp(min=1e-30) / top
    q = torch.empty(w.shape, dtype=dtype, device=w.device)
    for rows, wf in _row_chunks(w):
        s = scale[rows].view(-1, 1) if per_row else scale.view(1, 1)
        q[rows] = wf.div_(s).clamp_(-top, top)
    return q, scale


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    if out is None:
        return (q.float() * scale.view(-1, 1)).to(dtype)
    return out.copy_(q).mul_(scale.view(-1, 1))


def fp8_matmul_supported(x: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    """Real fp8 matmuls: CUDA compute capability >= 8.9, an e4m3 weight, a half-precision input."""
    if x.device.type != "cuda" or weight_dtype != torch.float8_e4m3fn or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 9)


def fp8_linear(
    x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (q * w_scale).T + bias`` with ``torch._scaled_mm``: x is quantized per tensor to e4m3 (static
    ``input_scale`` when the file has one, else its absmax), a per-row weight scale multiplies the output."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if input_scale is None:
        sx = (x2.abs().amax().float() / FP8_MAX[torch.float8_e4m3fn]).clamp(min=1e-12)
    else:
        sx = input_scale.float().reshape(())
    xq = (x2.float() / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    per_row = w_scale.numel() > 1
    sw = torch.ones((), device=x.device) if per_row else w_scale.float().reshape(())
    b = bias.to(x.dtype) if bias is not None and not per_row else None
    out = torch._scaled_mm(xq, q.t(), scale_a=sx, scale_b=sw, bias=b, out_dtype=x.dtype)
    if per_row:
        out = (out.float() * w_scale.view(1, -1)).to(x.dtype)
        if bias is not None:
            out = out + bias.to(x.dtype)
    return out.reshape(*shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------------------------
# Hadamard rotation (ComfyUI "convrot" int8 files)
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def regular_hadamard(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The normalised regular Hadamard matrix of ``size`` (a power of 4): Kronecker powers of the symmetric
    4x4 one, so ``H = H.T`` and ``H @ H = I``. ComfyUI rotates weights ``W_rot = W @ H`` per group of inputs."""
    n, h = 4, torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    base = h
    while n < size:
        h = torch.kron(h, base)
        n *= 4
    if n != size:
        raise ValueError(f"the Hadamard group size must be a power of 4, got {size}")
    return (h / size**0.5).to(device=device, dtype=dtype)


def rotate_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x @ blockdiag(H, H, ...)`` over the last dimension in groups of ``group``."""
    h = regular_hadamard(group, x.device, x.dtype)
    return (x.unflatten(-1, (-1, group)) @ h).flatten(-2)
