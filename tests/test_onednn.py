"""The oneDNN CPU linears compute the same thing as nn.Linear, and step aside wherever they would not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.factories.dit import diffusers_to_native_state, make_diffusers_dit
from zimage_core import onednn
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.lora import LoraLinear

pytestmark = pytest.mark.skipif(
    onednn._op() is None or not torch.backends.mkldnn.is_available(),
    reason="this PyTorch build has no oneDNN (mkldnn) linear op",
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def linears(dim: int = 96, hidden: int = 160, bias: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, dim, bias=bias), nn.Linear(dim, hidden, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 96), (2, 19, 96)])
def test_linear_and_swiglu_match_plain_modules(bias, shape):
    w1, w2, w3 = linears(bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert onednn.usable(x, w1, w2, w3)
        assert rel_err(onednn.linear(w1, x), F.linear(x, w1.weight, w1.bias)) <= 1e-6
        want = w2(F.silu(w1(x)) * w3(x))
        assert rel_err(onednn.swiglu(w1, w2, w3, x), want) <= 1e-6


def test_bfloat16_stays_bfloat16():
    w1, w2, w3 = (m.to(torch.bfloat16) for m in linears())
    x = torch.randn(33, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        got = onednn.swiglu(w1, w2, w3, x)
        want = w2(F.silu(w1(x)) * w3(x))
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 2e-2


def test_falls_back_where_it_would_not_be_the_same_computation():
    w1, w2, w3 = linears()
    x = torch.randn(8, 96)
    with torch.no_grad():
        assert not onednn.usable(x.double(), nn.Linear(96, 8, dtype=torch.float64))  # dtype it does not serve
        assert not onednn.usable(x, nn.Linear(96, 8, dtype=torch.bfloat16))  # weight and activations disagree
        assert not onednn.usable(x, LoraLinear(w1, []))  # LoRA keeps its own forward
        h = w1.register_forward_hook(lambda *a: None)
        assert not onednn.usable(x, w1)  # a hook must see the call
        h.remove()
        assert onednn.usable(x, w1)
        with torch.backends.mkldnn.flags(enabled=False):
            assert not onednn.usable(x, w1)  # PyTorch's own switch
    assert not onednn.usable(x, w1)  # autograd: training keeps nn.Linear's backward


def test_training_gradients_flow_through_the_plain_path():
    w1, w2, w3 = linears()
    x = torch.randn(5, 96, requires_grad=True)
    onednn.swiglu(w1, w2, w3, x).square().sum().backward()
    assert x.grad is not None and w1.weight.grad is not None and w3.weight.grad is not None


def test_dit_forward_same_with_and_without_onednn():
    cfg = DiTConfig.tiny(t_mid_dim=1024)
    model = ZImageDiT(cfg)
    model.load_state_dict(diffusers_to_native_state(make_diffusers_dit(cfg, 0)))
    model.eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, 12, 8, generator=g)
    t = torch.rand(2, generator=g)
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (6, 21)]
    with torch.no_grad():
        fast = model(x, t, caps)
        with torch.backends.mkldnn.flags(enabled=False):
            plain = model(x, t, caps)
    assert rel_err(fast, plain) <= 1e-5
