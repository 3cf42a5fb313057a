"""float16 that works: activations that overflow a plain float16 implementation are kept in range (the DiT's
matmuls stay float16), so RTX 20-series owners get the fp32 image, and a NaN/Inf result is one clear error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.factories.dit import diffusers_to_native_state, make_diffusers_dit
from tests.factories.pipeline import build_tiny_model
from zimage_core.checkpoints import load_dit, save_dit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.errors import ZImageError
from zimage_core.pipeline import GenerateOptions, ZImagePipeline


def overflowing(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the weights the way large-weight checkpoints (Base) behave: the SwiGLU product and the attention
    output exceed float16's range (65504) in a plain float16 forward."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("feed_forward.w1", "feed_forward.w3")):
                p.mul_(400)
            if any(k in name for k in ("attention.to_out", "attention.out")):
                p.mul_(100000)
    return model


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_fp16_forward_stays_finite_where_the_reference_overflows():
    cfg = DiTConfig.tiny(t_mid_dim=1024)
    ref = overflowing(make_diffusers_dit(cfg, seed=3))
    ours = ZImageDiT(cfg)
    ours.load_state_dict(diffusers_to_native_state(ref))
    ours.eval()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=torch.Generator().manual_seed(n)) for n in (9, 40)]
    with torch.no_grad():
        want = ours(x, t, caps)
        half = copy.deepcopy(ours).half()
        got = half(x, t, caps).float()
        plain = copy.deepcopy(ref).half()(
            [xi.half()[:, None] for xi in x], t.half(), [c.half() for c in caps], return_dict=False
        )[0]
    assert not all(torch.isfinite(p).all() for p in plain)  # the plain float16 implementation overflows
    assert torch.isfinite(got).all()
    assert cos(got, want) > 0.999
    assert half.layers[0].attention.qkv.weight.dtype == torch.float16  # the matmuls really ran in float16


def test_fp16_leaves_other_dtypes_untouched():
    cfg = DiTConfig.tiny(t_mid_dim=1024)
    dit = ZImageDiT(cfg).eval()
    assert dit.residual_dtype == torch.float32
    assert dit.to(torch.bfloat16).residual_dtype == torch.bfloat16
    assert dit.to(torch.float16).residual_dtype == torch.float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp16")
    model = build_tiny_model(tmp, seed=5)
    state = load_dit(model.transformer, dtype="fp32").state_dict()
    big = ZImageDiT(model.dit_config)
    big.load_state_dict(state)
    save_dit(overflowing(big).state_dict(), model.dit_config, tmp / "base_like.safetensors", "comfyui")
    broken = dict(state)
    broken["x_embedder.weight"] = torch.full_like(state["x_embedder.weight"], float("nan"))
    save_dit(broken, model.dit_config, tmp / "broken.safetensors", "comfyui")
    model.big, model.broken = tmp / "base_like.safetensors", tmp / "broken.safetensors"
    return model


def image(model, transformer, dtype: str, prompt: str = "a lighthouse at dusk"):
    pipe = ZImagePipeline.load(
        transformer=transformer,
        text_encoder=model.text_encoder,
        vae=model.vae,
        tokenizer=model.tokenizer,
        device="cpu",
        dtype=dtype,
        memory="full",
    )
    img = pipe.generate(GenerateOptions(prompt=prompt, width=64, height=48, steps=4, seed=7), progress=False)[0]
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)


def test_fp16_image_matches_fp32_on_weights_that_overflow(tiny):
    full = image(tiny, tiny.big, "fp32")
    half = image(tiny, tiny.big, "float16")  # torch's name works too
    assert cos(half, full) > 0.99


def test_nan_result_names_the_dtype_to_use(tiny):
    with pytest.raises(ZImageError, match=r"sampling in float16 produced NaN/Inf.*bf16.*fp32"):
        image(tiny, tiny.broken, "fp16")
    with pytest.raises(ZImageError, match=r"sampling in float32 produced NaN/Inf.*model file"):
        image(tiny, tiny.broken, "fp32")
