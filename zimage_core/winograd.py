"""Winograd F(2x2, 3x3) convolution for the VAE decoder on the CPU: 2.25x fewer multiplications.

Decoding a 512x512 image is ~2.5 TFLOP of 3x3 convolutions, which oneDNN's direct kernel already runs at
the CPU's peak; the only way to go faster is to do less arithmetic. Winograd's minimal filtering computes
each 2x2 block of outputs from a 4x4 input tile with 16 products per channel pair instead of 36:

    Y = A^T [ (G g G^T) * (B^T d B) ] A

``G g G^T`` (the kernel transform) and ``B^T d B`` (the input transform) only add, subtract and halve, the
16 products become 16 matrix multiplications over all tiles ``[tiles, C_in] x [C_in, C_out]`` (oneDNN,
at full rate), and ``A^T . A`` (the output transform) adds them back into 2x2 blocks. F(2x2, 3x3) is the
variant whose transforms are exact in binary (coefficients 0, +-1, 1/2): measured against float64 it is
as accurate as the direct convolution (relative error ~5e-7 vs ~7e-7 on the decoder's shapes). The larger
F(4x4, 3x3) would save more but loses about a digit, so it is not used.

The work runs in bands of tile rows (a few MB of scratch each, which the allocator recycles instead of
faulting in fresh pages) and writes straight into the channels-last output. Used where it wins and is the
same computation: a CPU float32 channels-last activation (the decoder's layout, see ``vae._cpu_layout``),
a plain ``nn.Conv2d`` 3x3 / stride 1 / padding 1 with at least :data:`MIN_CHANNELS` input channels (below
that the transforms' memory traffic eats the gain), even height and width, no autograd, no hooks, not
compiling. Everything else goes to ``conv(x)``; ``torch.backends.mkldnn.flags(enabled=False)`` turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import onednn

MIN_CHANNELS = 256  # measured on Zen 4: 1.7x at 512 channels, 1.35x at 256, none at 128
BAND_BYTES = 16 * 2**20  # transformed tiles per band: under glibc's 32 MB mmap ceiling, so freed scratch is recycled


def usable(conv: nn.Module, x: torch.Tensor, min_channels: int | None = None) -> bool:
    """True when ``conv(x)`` may run as a Winograd convolution (see the module docstring); ``min_channels``
    defaults to :data:`MIN_CHANNELS`."""
    if type(conv) is not nn.Conv2d or conv._forward_hooks or conv._forward_pre_hooks:
        return False
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode) != (
        (3, 3),
        (1, 1),
        (1, 1),
        (1, 1),
        1,
        "zeros",
    ):
        return False
    if (
        x.ndim != 4
        or x.dtype != torch.float32
        or conv.weight.dtype != x.dtype
        or x.device.type != "cpu"
        or conv.weight.device.type != "cpu"
        or conv.in_channels < (MIN_CHANNELS if min_channels is None else min_channels)
    ):
        return False
    if x.shape[2] % 2 or x.shape[3] % 2 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return onednn.enabled_for(x)  # CPU, no grad, not compiling, oneDNN on


def kernel_transform(weight: torch.Tensor) -> torch.Tensor:
    """``G g G^T`` for every (out, in) pair: ``[C_out, C_in, 3, 3]`` -> ``[16, C_out, C_in]`` (index 4k + l).

    ``G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]``, applied along the kernel's rows, then
    its columns, each written straight into the ``[C_out, C_in]``-major layout the matmuls read.
    """
    co, c = weight.shape[:2]
    rows = torch.empty((4, 3, co, c), dtype=weight.dtype, device=weight.device)
    _apply_g(weight.permute(2, 3, 0, 1), rows)
    u = torch.empty((4, 4, co, c), dtype=weight.dtype, device=weight.device)
    _apply_g(rows.transpose(0, 1), u.transpose(0, 1))
    return u.view(16, co, c)


def _apply_g(g: torch.Tensor, out: torch.Tensor) -> None:
    """``out[k] = sum_j G[k, j] g[j]`` along the first dimension (3 -> 4)."""
    g0, g1, g2 = g.unbind(0)
    half = g1 * 0.5
    torch.add(g0, g2, out=out[1]).mul_(0.5)
    out[2].copy_(out[1]).sub_(half)
    out[1].add_(half)
    out[0].copy_(g0)
    out[3].copy_(g2)


def conv3x3(conv: nn.Module, x: torch.Tensor, min_channels: int | None = None) -> torch.Tensor:
    """``conv(x)``, as a Winograd convolution where :func:`usable`; the output is channels-last."""
    if not usable(conv, x, min_channels):
        return conv(x)
    return _run(conv, x, upsampled=False)


def upsample_conv3x3(conv: nn.Module, x: torch.Tensor, min_channels: int | None = None) -> torch.Tensor:
    """``conv(nearest_upsample_x2(x))``: the upsampled image is never built where the Winograd path runs
    (each band reads its rows straight from ``x``), which saves a pass over the largest activation."""
    if not usable(conv, x, min_channels):  # x's size doubled is always even
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return _run(conv, x, upsampled=True)


def _run(conv: nn.Conv2d, x: torch.Tensor, upsampled: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    if upsampled:
        h, w = 2 * h, 2 * w
    co, th, tw = conv.out_channels, h // 2, w // 2
    rb = max(1, min(th, BAND_BYTES // (16 * n * tw * max(c, co) * x.element_size())))
    out = torch.empty((n, co, h, w), dtype=x.dtype, memory_format=torch.channels_last)
    band = _Band(conv, x.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1), rb, upsampled)  # NHWC views, contiguous
    for a in range(0, th, rb):
        band(a, min(a + rb, th))
    return out


class _Band:
    """One convolution's transformed kernel and scratch (reused by every band of tile rows)."""

    def __init__(self, conv: nn.Conv2d, src: torch.Tensor, dst: torch.Tensor, rb: int, upsampled: bool):
        n, w, c = dst.shape[0], dst.shape[2], src.shape[3]
        self.src, self.dst, self.bias, self.upsampled = src, dst, conv.bias, upsampled
        self.u = kernel_transform(conv.weight)
        co, tw, f = conv.out_channels, w // 2, src.dtype
        self.pad = torch.empty((n, 2 * rb + 2, w + 2, c), dtype=f)
        self.t = torch.empty((4, n, rb, tw, 4, c), dtype=f)
        self.v = torch.empty((4, 4, n, rb, tw, c), dtype=f)
        self.r = torch.empty((2, 4, n, rb, tw, co), dtype=f)
        self.op = onednn._op()

    def _rows(self, out: torch.Tensor, lo: int, hi: int) -> None:
        """Input image rows ``lo..hi-1`` into ``out`` ``[n, hi-lo, w, c]`` (of the upsampled image if so)."""
        if not self.upsampled:
            out.copy_(self.src[:, lo:hi])
            return
        n, rows, w, c = out.shape
        low = self.src.index_select(1, torch.arange(lo, hi) // 2)  # [n, rows, w/2, c]: nearest rows
        out.view(n, rows, w // 2, 2, c).copy_(low.unsqueeze(3).expand(n, rows, w // 2, 2, c))  # nearest columns

    def __call__(self, a: int, b: int) -> None:
        """Output tile rows ``a..b-1`` (image rows ``2a..2b-1``)."""
        dst = self.dst
        n, h, w, _ = dst.shape
        c = self.src.shape[3]
        co, rb, tw = self.u.shape[1], b - a, w // 2
        # the zero-padded input rows 2a-1 .. 2b (inclusive), columns -1 .. w
        r0, r1 = 2 * a - 1, 2 * b + 1
        pad = self.pad[:, : r1 - r0]
        pad[:, :, 0].zero_()
        pad[:, :, w + 1].zero_()
        lo, hi = max(r0, 0), min(r1, h)
        if lo > r0:
            pad[:, : lo - r0].zero_()
        if hi < r1:
            pad[:, hi - r0 :].zero_()
        self._rows(pad[:, lo - r0 : hi - r0, 1 : w + 1], lo, hi)
        s_n, s_h, s_w, _ = pad.stride()
        d = pad.as_strided((n, rb, tw, 4, 4, c), (s_n, 2 * s_h, 2 * s_w, s_h, s_w, 1))  # 4x4 tiles, stride 2

        # input transform B^T d B, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        t, v = self.t[:, :, :rb], self.v[:, :, :, :rb]
        _bt(d, t, 3)
        _bt(t, v, 4, out_dim=1)
        v = v.reshape(16, n * rb * tw, c)  # a view while the band is full height, else a compact copy

        # the 16 products as matrix multiplications; the bias rides on the (1, 1) term, which A^T . A adds
        # exactly once into each of the four outputs of a tile
        m = [
            self.op(v[i], self.u[i], self.bias if i == 5 else None, "none", [], "").view(n, rb, tw, co)
            for i in range(16)
        ]

        # output transform A^T M A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], into the output's 2x2 blocks
        r = self.r[:, :, :, :rb]
        for col in range(4):
            torch.add(m[col], m[4 + col], out=r[0, col]).add_(m[8 + col])
            torch.sub(m[4 + col], m[8 + col], out=r[1, col]).sub_(m[12 + col])
        blocks = dst[:, 2 * a : 2 * b].view(n, rb, 2, tw, 2, co)
        for i in range(2):
            torch.add(r[i, 0], r[i, 1], out=blocks[:, :, i, :, 0]).add_(r[i, 2])
            torch.sub(r[i, 1], r[i, 2], out=blocks[:, :, i, :, 1]).sub_(r[i, 3])


def _bt(d: torch.Tensor, out: torch.Tensor, dim: int, out_dim: int = 0) -> None:
    """Apply B^T along ``dim`` of ``d`` (size 4), writing the 4 results along ``out_dim`` of ``out``."""
    d0, d1, d2, d3 = d.unbind(dim)
    o0, o1, o2, o3 = out.unbind(out_dim)
    torch.sub(d0, d2, out=o0)
    torch.add(d1, d2, out=o1)
    torch.sub(d2, d1, out=o2)
    torch.sub(d1, d3, out=o3)
