"""Quantized drop-in replacements for ``nn.Linear`` (weight-only: activations stay in the compute dtype).

Every module keeps its quantized data in *buffers of integer dtype* (float scales are stored as their
int32 bits, fp8 weights as uint8 bits). So ``module.to(device)``, ``.cuda()``, pinning and the
block-swapping helpers move them like any tensor, and a model-wide ``.to(torch.bfloat16)`` cannot
silently re-cast them: only the (high-precision) bias follows dtype casts. The compute dtype is the
dtype of the input.

``weight`` is the raw storage (for code that asks ``module.weight.device``); :meth:`QuantLinear.dequantize`
gives the real ``[out, in]`` matrix. The forward dequantizes and runs ``F.linear``, except fp8 on GPUs
with fp8 tensor cores, which uses ``torch._scaled_mm``.

On the CPU the quantized linears of one model share a :class:`Workspace`: every forward dequantizes into the
same scratch matrix instead of allocating one (glibc's heap otherwise keeps hundreds of MB of freed
weight-sized blocks resident). GPUs use PyTorch's caching allocator, which already reuses the blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

_BITS = torch.int32  # float32 scales are kept as their bit pattern
# Compute dtypes in which int8/fp8 values are exact and ``x @ q.T`` cannot overflow: the per-row scale then
# multiplies the output instead of the weight (see kernels.scaled_rows_linear). fp16 dequantizes the weight.
_OUTPUT_SCALED = (torch.bfloat16, torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous().view(_BITS)


def _f32(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float32)


class Workspace:
    """A scratch buffer per (device, dtype), shared by the quantized linears of one model (see module doc)."""

    def __init__(self):
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        buf = self._buffers.get((device, dtype))
        # A buffer made under inference mode cannot be written outside it (and vice versa): remake it then.
        if buf is None or buf.numel() < n or buf.is_inference() != torch.is_inference_mode_enabled():
            buf = self._buffers[(device, dtype)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def __deepcopy__(self, memo) -> Workspace:
        return Workspace()


def share_workspace(model: nn.Module) -> None:
    """Give every quantized linear of ``model`` one common CPU :class:`Workspace`."""
    ws = Workspace()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.workspace = ws


class QuantLinear(nn.Module):
    """Base class: ``in_features``/``out_features``, an optional high-precision bias, ``dequantize``."""

    is_quantized = True
    format = "?"
    workspace: Workspace | None = None

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[out, in]`` weight in ``dtype`` (written into ``out`` when given)."""
        raise NotImplementedError

    def _scratch(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The shared CPU scratch matrix for a forward, or None (GPU, autograd, torch.compile: allocate)."""
        if self.workspace is None or device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        return self.workspace.get((self.out_features, self.in_features), dtype, device)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(self._input(x), self.dequantize(x.dtype, self._scratch(x.dtype, x.device)), bias)

    def storage_bytes(self) -> int:
        """Bytes of the quantized data (weights + scales), bias excluded."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"bias={self.bias is not None}"
        )


class Int8Linear(QuantLinear):
    """int8 weights with one float32 scale per output row (or one for the tensor); optional Hadamard groups
    (ComfyUI ``convrot``: the stored weight is ``W @ H`` per group of inputs, so the input is rotated too)."""

    format = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, hadamard: int = 0):
        super().__init__(q.shape[1], q.shape[0], bias)
        if q.dtype != torch.int8:
            raise TypeError(f"int8 weights expected, got {q.dtype}")
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale_bits", _bits(scale.reshape(-1)))
        self.hadamard = int(hadamard)
        if hadamard:
            self.format = f"int8+hadamard{hadamard}"

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        q, scale = kernels.quantize_int8(w)
        return cls(q, scale, bias)

    @property
    def scale(self) -> torch.Tensor:
        return _f32(self.scale_bits)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rotate_groups(x, self.hadamard) if self.hadamard else x

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.hadamard:
            return kernels.dequantize_int8(self.weight, self.scale, dtype, out)
        w = kernels.rotate_groups(kernels.dequantize_int8(self.weight, self.scale, torch.float32), self.hadamard)
        return w.to(dtype) if out is None else out.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)  # convrot: rotate the (small) activation instead of un-rotating the weight
        scratch = self._scratch(x.dtype, x.device)
        if x.dtype in _OUTPUT_SCALED:
            return kernels.scaled_rows_linear(x, self.weight, self.scale, self.bias, scratch)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, kernels.dequantize_int8(self.weight, self.scale, x.dtype, scratch), bias)


class NF4Linear(QuantLinear):
    """bitsandbytes NF4: 4-bit codes in blocks of 64 with a float32 absmax per block."""

    format = "nf4"

    def __init__(
        self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None = None
    ):
        super().__init__(shape[1], shape[0], bias)
        self.register_buffer("weight", packed.reshape(-1).contiguous())
        self.register_buffer("absmax_bits", _bits(absmax))
        self.use_bnb = True

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> NF4Linear:
        packed, absmax = kernels.quantize_nf4(w)
        return cls(packed, absmax, tuple(w.shape), bias)

    @property
    def absmax(self) -> torch.Tensor:
        return _f32(self.absmax_bits)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.dequantize_nf4(
            self.weight, self.absmax, (self.out_features, self.in_features), dtype, use_bnb=self.use_bnb, out=out
        )


class FP8Linear(QuantLinear):
    """fp8 (e4m3 or e5m2) weights with a float32 scale per tensor or per output row, optional static input
    scale. Uses ``torch._scaled_mm`` on GPUs with fp8 tensor cores unless ``fp8_matmul`` is off (ComfyUI's
    ``full_precision_matrix_mult``, or a LoRA that wants the exact base); dequantizes everywhere else."""

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        fp8_matmul: bool = True,
    ):
        super().__init__(q.shape[1], q.shape[0], bias)
        if q.dtype not in kernels.FP8_MAX:
            raise TypeError(f"fp8 weights expected, got {q.dtype}")
        self.fp8_dtype = q.dtype
        self.format = "fp8_e4m3" if q.dtype == torch.float8_e4m3fn else "fp8_e5m2"
        self.register_buffer("weight", q.contiguous().view(torch.uint8))
        self.register_buffer("scale_bits", _bits(scale.reshape(-1)))
        self.register_buffer("input_scale_bits", _bits(input_scale.reshape(-1)) if input_scale is not None else None)
        self.fp8_matmul = fp8_matmul

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None = None, per_row: bool = True) -> FP8Linear:
        q, scale = kernels.quantize_fp8(w, per_row=per_row)
        return cls(q, scale, bias)

    @property
    def qweight(self) -> torch.Tensor:
        return self.weight.view(self.fp8_dtype)

    @property
    def scale(self) -> torch.Tensor:
        return _f32(self.scale_bits)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.dequantize_fp8(self.qweight, self.scale, dtype, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.fp8_matmul
            and kernels.fp8_matmul_supported(x, self.fp8_dtype)
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
        ):
            inp = _f32(self.input_scale_bits) if self.input_scale_bits is not None else None
            return kernels.fp8_linear(x, self.qweight, self.scale, self.bias, inp)
        if x.dtype in _OUTPUT_SCALED:
            return kernels.scaled_rows_linear(x, self.qweight, self.scale, self.bias, self._scratch(x.dtype, x.device))
        return super().forward(x)


class GGUFLinear(QuantLinear):
    """A GGUF (ggml) quantized matrix kept as its raw blocks ``[out, bytes per row]``, dequantized per forward."""

    def __init__(self, raw: torch.Tensor, qtype: int, shape: tuple[int, int], bias: torch.Tensor | None = None):
        from . import gguf

        super().__init__(shape[1], shape[0], bias)
        gguf.check_kernel(qtype)
        self.qtype = int(qtype)
        self.format = f"gguf_{gguf.type_name(qtype)}"
        self.register_buffer("weight", raw.reshape(shape[0], -1).contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        from . import gguf

        return gguf.dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype, out=out)


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, "is_quantized", False) is True


QUANTIZERS = {"int8": Int8Linear.quantize, "nf4": NF4Linear.quantize, "fp8": FP8Linear.quantize}


def quantize_linear(weight: torch.Tensor, mode: str, bias: torch.Tensor | None = None) -> QuantLinear:
    """A quantized linear from a full-precision ``[out, in]`` weight (quantized on the weight's device)."""
    if mode not in QUANTIZERS:
        raise ValueError(f"unknown quantization '{mode}'; use one of {', '.join(QUANTIZERS)}")
    return QUANTIZERS[mode](weight, bias)
