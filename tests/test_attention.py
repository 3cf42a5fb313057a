"""Attention backends: SDPA against the math definition, and the probing / selection / fallback of the optional
kernels (FlashAttention 2/3, SageAttention), which are faked with stand-in modules (no GPU here)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from zimage_core import attention as A
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.errors import ZImageError
from zimage_core.layers import Attention, sdpa_attention


def reference_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v in float64, masked keys excluded."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).float()


def qkv(b=2, h=3, s=11, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype) for _ in range(3)]


def test_sdpa_unmasked_matches_the_math():
    q, k, v = qkv()
    out = sdpa_attention(q, k, v, None)
    ref = reference_attention(q, k, v, None)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_sdpa_padding_mask_matches_the_math_and_ignores_padding():
    q, k, v = qkv()
    lens = torch.tensor([11, 6])
    mask = (torch.arange(11)[None, :] < lens[:, None])[:, None, None, :]
    out = sdpa_attention(q, k, v, mask)
    assert ((out - reference_attention(q, k, v, mask)).norm() / out.norm()).item() < 1e-5
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 6:] = 1e3  # whatever sits in the padded keys of sample 1 changes nothing
    v2[1, :, 6:] = -7.0
    assert torch.allclose(sdpa_attention(q, k2, v2, mask), out, atol=1e-6)
    # the padded sample equals attention over its real keys alone
    alone = sdpa_attention(q[1:], k[1:, :, :6], v[1:, :, :6], None)
    assert torch.allclose(out[1:], alone, atol=1e-6)


# ---------------------------------------------------------------------------------------------- fakes
def fake_flash(calls, returns_tuple=False):
    """A stand-in FlashAttention: [B, S, H, D] in and out, computed with SDPA."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.ndim == 4 and not causal
        calls.append(tuple(q.shape))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return (out, None) if returns_tuple else out

    return flash_attn_func


@pytest.fixture()
def gpu(monkeypatch):
    """Pretend the device is a GPU of a given compute capability and that CPU tensors are on it."""
    state = types.SimpleNamespace(cap=(8, 6))
    monkeypatch.setattr(A, "_capability", lambda device: state.cap if torch.device(device).type == "cuda" else None)
    monkeypatch.setattr(A, "_on_gpu", lambda t: True)
    return state


def install(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


# ---------------------------------------------------------------------------------------------- selection
def test_cpu_and_fp32_always_use_sdpa(monkeypatch):
    install(monkeypatch, "flash_attn", flash_attn_func=fake_flash([]))
    assert A.resolve("auto", "cpu", torch.float32) == ("sdpa", sdpa_attention)
    assert A.resolve("sdpa", "cuda", torch.bfloat16)[0] == "sdpa"
    status = A.available("cpu", torch.bfloat16)
    assert status["sdpa"] == "" and "CUDA GPU" in status["flash_attn"]
    with pytest.raises(ZImageError, match="flash_attn.*cannot run here.*CUDA"):
        A.resolve("flash_attn", "cpu", torch.bfloat16)
    with pytest.raises(ZImageError, match="unknown attention backend 'magic'"):
        A.resolve("magic", "cpu", torch.float32)


def test_auto_prefers_flash3_on_hopper_then_flash2(monkeypatch, gpu):
    calls2, calls3 = [], []
    install(monkeypatch, "flash_attn", flash_attn_func=fake_flash(calls2))
    install(monkeypatch, "flash_attn_interface", flash_attn_func=fake_flash(calls3, returns_tuple=True))
    gpu.cap = (9, 0)
    assert A.resolve("auto", "cuda", torch.bfloat16)[0] == "flash_attn_3"
    gpu.cap = (8, 9)
    assert A.resolve("auto", "cuda", torch.bfloat16)[0] == "flash_attn"
    assert "9.0+" in A.available("cuda", torch.bfloat16)["flash_attn_3"]
    assert A.resolve("auto", "cuda", torch.float32)[0] == "sdpa"  # fp32 weights: no flash kernel
    gpu.cap = (7, 5)
    assert A.resolve("auto", "cuda", torch.float16)[0] == "sdpa"  # Turing


def test_auto_never_picks_sage_and_missing_modules_are_reported(monkeypatch, gpu, caplog):
    install(monkeypatch, "sageattention", sageattn=lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails like an absent package
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    with caplog.at_level(logging.INFO, logger="zimage_core.attention"):
        assert A.resolve("auto", "cuda", torch.bfloat16)[0] == "sdpa"
    assert any("cannot be imported" in r.getMessage() for r in caplog.records)
    assert A.resolve("sage", "cuda", torch.bfloat16)[0] == "sage"
    with pytest.raises(ZImageError, match="flash-attn"):
        A.resolve("flash_attn", "cuda", torch.bfloat16)  # the message says how to install it


def test_broken_install_is_unavailable_not_fatal(monkeypatch, gpu):
    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise OSError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "flash_attn", Broken("flash_attn"))
    kernel, why = A.probe("flash_attn")
    assert kernel is None and "OSError" in why and "libcudart" in why
    assert "libcudart" in A.available("cuda", torch.bfloat16)["flash_attn"]
    assert A.resolve("auto", "cuda", torch.bfloat16)[0] == "sdpa"
    install(monkeypatch, "flash_attn", something_else=1)
    assert "has no flash_attn_func" in A.probe("flash_attn")[1]


# ---------------------------------------------------------------------------------------------- calls and fallback
def test_flash_backend_layout_and_fallbacks(monkeypatch, gpu, caplog):
    calls = []
    install(monkeypatch, "flash_attn", flash_attn_func=fake_flash(calls))
    name, fn = A.resolve("flash_attn", "cuda", torch.bfloat16)
    q, k, v = qkv(dtype=torch.bfloat16)
    out = fn(q, k, v, None)
    assert calls == [(2, 11, 3, 16)]  # the kernel got [B, S, H, D]
    assert out.shape == q.shape and torch.allclose(out.float(), sdpa_attention(q, k, v, None).float(), atol=1e-2)
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    mask[1, ..., 7:] = False
    with caplog.at_level(logging.INFO, logger="zimage_core.attention"):
        masked = fn(q, k, v, mask)
        fn(q, k, v, mask)
    assert len(calls) == 1 and torch.equal(masked, sdpa_attention(q, k, v, mask))  # SDPA took the masked calls
    assert sum("padding mask" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert fn.fallbacks == {"a padding mask (captions of different lengths in one batch)": 2}
    fp32 = qkv()
    assert torch.equal(fn(*fp32, None), sdpa_attention(*fp32, None)) and len(calls) == 1
    big = qkv(d=512, dtype=torch.bfloat16)
    fn(*big, None)
    assert len(calls) == 1 and any("head size 512" in r for r in fn.fallbacks)


def test_flash3_tuple_return_and_sage_layout(monkeypatch, gpu):
    calls3, sage_calls = [], []
    install(monkeypatch, "flash_attn_interface", flash_attn_func=fake_flash(calls3, returns_tuple=True))

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        sage_calls.append(tensor_layout)
        return F.scaled_dot_product_attention(q, k, v)

    install(monkeypatch, "sageattention", sageattn=sageattn)
    gpu.cap = (9, 0)
    q, k, v = qkv(dtype=torch.float16, d=64)
    _, fa3 = A.resolve("flash_attn_3", "cuda", torch.float16)
    assert fa3(q, k, v, None).shape == q.shape and calls3
    _, sage = A.resolve("sage", "cuda", torch.float16)
    assert torch.equal(sage(q, k, v, None), F.scaled_dot_product_attention(q, k, v)) and sage_calls == ["HND"]
    odd = qkv(dtype=torch.float16, d=80)
    sage(*odd, None)
    assert sage_calls == ["HND"]  # head size 80 is not one SageAttention has kernels for: SDPA


def test_set_attention_on_the_dit(monkeypatch, gpu):
    calls = []
    install(monkeypatch, "flash_attn", flash_attn_func=fake_flash(calls))
    torch.manual_seed(0)
    dit = ZImageDiT(DiTConfig.tiny()).to(torch.bfloat16).eval()
    x = torch.randn(1, 16, 4, 4)
    caps = [torch.randn(5, 32)]
    with torch.inference_mode():
        want = dit(x, torch.tensor([0.5]), caps)
        chosen = A.set_attention(dit, "auto", device="cuda")
        got = dit(x, torch.tensor([0.5]), caps)
    layers = [m for m in dit.modules() if isinstance(m, Attention)]
    assert chosen == "flash_attn" and all(m.attention_fn is layers[0].attention_fn for m in layers)
    assert len(calls) == len(layers) and torch.allclose(got.float(), want.float(), atol=3e-2)
    assert A.set_attention(dit, "sdpa") == "sdpa" and layers[0].attention_fn is sdpa_attention
