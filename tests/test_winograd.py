"""Winograd F(2x2, 3x3): the same convolution as the direct one, to float32 rounding, and only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zimage_core import onednn, winograd

pytestmark = pytest.mark.skipif(
    onednn._op() is None or not torch.backends.mkldnn.is_available(),
    reason="this PyTorch build has no oneDNN (mkldnn) linear op",
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def conv_and_input(cin: int, cout: int, n: int, h: int, w: int, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    return conv, x


def test_kernel_transform_is_g_g_gt():
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    want = torch.einsum("ka,ocab,lb->kloc", g, w, g).reshape(16, 6, 5)
    assert torch.allclose(winograd.kernel_transform(w), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "cin,cout,n,h,w,bias,band_bytes",
    [
        (8, 8, 1, 16, 16, True, None),  # one band
        (12, 20, 2, 10, 14, True, None),  # batch 2, non-square, more outputs than inputs
        (24, 6, 1, 22, 8, False, 4096),  # no bias; many bands, the last one partial
        (16, 16, 3, 2, 6, True, 1),  # one tile row per band, a 2-pixel-high image
    ],
)
def test_matches_direct_convolution(monkeypatch, cin, cout, n, h, w, bias, band_bytes):
    if band_bytes is not None:
        monkeypatch.setattr(winograd, "BAND_BYTES", band_bytes)
    conv, x = conv_and_input(cin, cout, n, h, w, bias)
    with torch.no_grad():
        assert winograd.usable(conv, x, min_channels=1)
        got = winograd.conv3x3(conv, x, min_channels=1)
        direct = conv(x)
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double() if bias else None, padding=1)
    assert got.shape == direct.shape and got.is_contiguous(memory_format=torch.channels_last)
    # as close to the float64 result as oneDNN's direct kernel is (both are float32 sums of different orders)
    assert rel_err(got, exact) <= max(2 * rel_err(direct, exact), 1e-6)


def test_steps_aside_where_it_does_not_apply():
    conv, x = conv_and_input(8, 8, 1, 8, 8)
    with torch.no_grad():
        assert winograd.usable(conv, x, min_channels=1)
        assert not winograd.usable(conv, x)  # below MIN_CHANNELS: the transforms would cost more than they save
        assert not winograd.usable(conv, x.contiguous(), min_channels=1)  # NCHW: encoder activations
        assert not winograd.usable(
            conv, x[:, :, :7, :].contiguous(memory_format=torch.channels_last), min_channels=1
        )  # odd height
        assert not winograd.usable(conv, x.double(), min_channels=1)
        for other in (
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.Conv2d(8, 8, 1),
            nn.Conv2d(8, 8, 3, padding=2),
            nn.Conv2d(8, 8, 3, padding=1, groups=2),
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        ):
            assert not winograd.usable(other, x, min_channels=1)
        h = conv.register_forward_hook(lambda *a: None)
        assert not winograd.usable(conv, x, min_channels=1)
        h.remove()
        with torch.backends.mkldnn.flags(enabled=False):
            assert not winograd.usable(conv, x, min_channels=1)
    assert not winograd.usable(conv, x, min_channels=1)  # autograd: training keeps nn.Conv2d


def test_fallback_is_the_module_itself():
    conv, x = conv_and_input(8, 8, 1, 7, 8)  # odd height
    with torch.no_grad():
        assert torch.equal(winograd.conv3x3(conv, x, min_channels=1), conv(x))


@pytest.mark.parametrize("n,h,w,band_bytes", [(1, 8, 8, None), (2, 5, 7, 4096), (1, 3, 4, 1)])
def test_upsample_conv_matches_interpolate_then_conv(monkeypatch, n, h, w, band_bytes):
    """Nearest x2 read straight into the bands (odd low-res sizes: the upsampled image is always even)."""
    if band_bytes is not None:
        monkeypatch.setattr(winograd, "BAND_BYTES", band_bytes)
    conv, x = conv_and_input(12, 10, n, h, w)
    with torch.no_grad():
        up = F.interpolate(x, scale_factor=2.0, mode="nearest")
        got = winograd.upsample_conv3x3(conv, x, min_channels=1)
        exact = F.conv2d(up.double(), conv.weight.double(), conv.bias.double(), padding=1)
        direct = conv(up)
        assert torch.equal(winograd.upsample_conv3x3(conv, x), direct)  # below MIN_CHANNELS: the plain modules
    assert got.shape == (n, 10, 2 * h, 2 * w)
    assert rel_err(got, exact) <= max(2 * rel_err(direct, exact), 1e-6)
