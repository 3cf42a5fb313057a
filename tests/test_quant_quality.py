"""Quality guard (issue 4): every quantization on a random mid-size DiT, full 8-step Turbo sampling with the same
seed and caption; the final latent must stay close to the full-precision one.

Bounds: cosine similarity >= 0.99 for int8, fp8, GGUF Q8_0 (and Q6_K, Q5_K); >= 0.95 for nf4, GGUF Q4_0, Q4_K.
GGUF files are written the way city96's converter does: every 2-D weight whose rows are whole blocks is
quantized (embedders and modulation included), the rest stays F32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.factories.dit import randomize_
from zimage_core.checkpoints import load_dit, save_dit
from zimage_core.config import DiTConfig, default_axes_dims
from zimage_core.denoiser import Denoiser
from zimage_core.dit import ZImageDiT
from zimage_core.quant import QuantLinear
from zimage_core.sampling import get_sampler, initial_noise, latent_shape, noise_latent
from zimage_core.schedules import flow_sigmas

MID = DiTConfig.tiny(
    dim=512,
    n_layers=4,
    n_refiner_layers=1,
    n_heads=8,
    ffn_dim=1536,
    cap_feat_dim=256,
    adaln_dim=256,
    t_mid_dim=256,
    axes_dims=default_axes_dims(64),
)
LATENT = (24, 24)  # a 192x192 image
STEPS = 8
SEED = 1234
CASES = {  # name: (how to load, minimum cosine)
    "int8": ("quant", 0.99),
    "fp8": ("quant", 0.99),
    "nf4": ("quant", 0.95),
    "Q8_0": ("gguf", 0.99),
    "Q6_K": ("gguf", 0.99),
    "Q5_K": ("gguf", 0.99),
    "Q4_K": ("gguf", 0.95),
    "Q4_0": ("gguf", 0.95),
}


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mid")
    state = {k: v.clone() for k, v in randomize_(ZImageDiT(MID), 42).state_dict().items()}
    caption = [torch.randn(23, MID.cap_feat_dim, generator=torch.Generator().manual_seed(7))]
    path = save_dit(state, MID, folder / "z_image_mid.safetensors", "comfyui")
    return folder, path, state, caption


def final_latent(dit, caption) -> torch.Tensor:
    h, w = LATENT
    noise = initial_noise(latent_shape(1, h * 8, w * 8), SEED)
    sigmas = flow_sigmas(STEPS, 3.0)
    with torch.inference_mode():
        x = noise_latent(torch.zeros_like(noise), noise, float(sigmas[0]))
        return get_sampler("euler")(Denoiser(dit, caption, None, LATENT), x, sigmas)


@pytest.fixture(scope="module")
def reference(mid):
    _, path, _, caption = mid
    return final_latent(load_dit(path, dtype="fp32"), caption)


@pytest.mark.parametrize("case", sorted(CASES))
def test_final_latent_close_to_full_precision(mid, reference, case):
    from zimage_core.quant.gguf_write import save_gguf

    folder, path, state, caption = mid
    how, bound = CASES[case]
    if how == "gguf":
        path = save_gguf(state, folder / f"z_image_mid-{case}.gguf", case)
        model = load_dit(path, dtype="fp32")
    else:
        model = load_dit(path, dtype="fp32", quant=case)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) >= 5 * (MID.n_layers + 2 * MID.n_refiner_layers)
    got = final_latent(model, caption)
    similarity = float(F.cosine_similarity(got.flatten().double(), reference.flatten().double(), dim=0))
    assert torch.isfinite(got).all()
    assert similarity >= bound, f"{case}: cosine {similarity:.5f} < {bound}"
    assert not torch.equal(got, reference)  # the quantization did change the weights
