"""The engine's forward called with ComfyUI's convention (zimage_core.native): sigma in, the velocity out.

This is what a core sampler integrates on a bridged MODEL (nodes/bridge.py); every check compares it with the model
functions the engine's own samplers use (Denoiser, OmniDenoiser) on the same random weights."""

from __future__ import annotations

import pytest
import torch

from tests.factories.dit import randomize_
from zimage_core.config import DiTConfig
from zimage_core.denoiser import Denoiser
from zimage_core.dit import ZImageDiT
from zimage_core.edit import OmniCondition, OmniDenoiser
from zimage_core.errors import ZImageError
from zimage_core.native import native_forward
from zimage_core.sampling import cfg_combine, sample
from zimage_core.schedules import flow_sigmas, model_t


@pytest.fixture(scope="module")
def dit():
    return randomize_(ZImageDiT(DiTConfig.tiny()), 5).eval()


@pytest.fixture(scope="module")
def omni_dit():
    return randomize_(ZImageDiT(DiTConfig.tiny(omni=True)), 6).eval()


def feats(*lengths, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in lengths]


@torch.inference_mode()
def test_velocity_is_the_negated_native_output_at_every_sigma(dit):
    caps = feats(9, 9, seed=1)
    x = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(2))
    sig = flow_sigmas(8, 3.0)
    fn = Denoiser(dit, caps, None, (6, 8), sigmas=sig)
    for i in range(len(sig) - 1):
        sigma = sig[i].expand(2)  # what the engine's samplers pass, and what ComfyUI's model_sampling.timestep gives
        out = native_forward(dit, x, sigma, torch.stack(caps))
        assert torch.equal(fn(x, sigma), out.float())  # the engine's velocity is the native output ...
        assert torch.equal(-out, dit.forward(x, model_t(sigma), caps))  # ... which is the DiT's raw output negated
    # a host's Euler step on denoised = x - sigma * output is the engine's Euler step
    s0, s1 = sig[2], sig[3]
    out = native_forward(dit, x, s0.expand(2), torch.stack(caps)).float()
    denoised = x - out * s0
    host_step = x + (x - denoised) / s0 * (s1 - s0)
    torch.testing.assert_close(host_step, x + fn(x, s0.expand(2)) * (s1 - s0), rtol=0, atol=1e-5)


@torch.inference_mode()
def test_cfg_from_batched_native_calls_is_the_engines_cfg(dit):
    pos, neg = feats(7, 7, seed=3)  # equal lengths: ComfyUI batches cond and uncond into one call
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.75])
    out = native_forward(dit, torch.cat([x, x]), sigma.expand(2), torch.stack([pos, neg])).float()
    guided = cfg_combine(out[:1], out[1:], 4.0)
    want = Denoiser(dit, [pos], [neg], (4, 4), cfg=4.0)(x, sigma)
    torch.testing.assert_close(guided, want, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_padding_marked_in_the_mask_or_num_tokens_is_dropped(dit):
    (cap,) = feats(9, seed=5)
    x = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([0.5])
    want = native_forward(dit, x, sigma, cap[None])
    padded = torch.cat([cap, torch.randn(4, 32)])[None]
    mask = torch.cat([torch.ones(9), torch.zeros(4)]).long()[None]
    assert torch.equal(native_forward(dit, x, sigma, padded, num_tokens=13, attention_mask=mask), want)
    assert torch.equal(native_forward(dit, x, sigma, padded, num_tokens=9), want)
    assert not torch.equal(native_forward(dit, x, sigma, padded), want)
    with pytest.raises(ZImageError, match="another text encoder"):
        native_forward(dit, x, sigma, torch.zeros(1, 5, 768))


@torch.inference_mode()
def test_any_latent_size_is_padded_circularly_and_cropped(dit):
    (cap,) = feats(5, seed=7)
    x = torch.randn(1, 16, 5, 7, generator=torch.Generator().manual_seed(8))
    sigma = torch.tensor([0.9])
    out = native_forward(dit, x, sigma, cap[None])
    assert out.shape == x.shape
    big = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="circular")
    assert torch.equal(out, native_forward(dit, big, sigma, cap[None])[:, :, :5, :7])


@torch.inference_mode()
def test_omni_references_map_onto_the_omni_forward(omni_dit):
    g = torch.Generator().manual_seed(9)
    segs = feats(4, 6, 11, 3, seed=10)  # two references: [before ref 1, before ref 2, prompt, closing]
    refs = [torch.randn(16, 4, 4, generator=g), torch.randn(16, 2, 4, generator=g)]
    sig = [torch.randn(2, 3, 24, generator=g)]  # SigLIP grid for the first reference only
    cond = OmniCondition(segments=segs, references=refs, siglip=sig)
    x = torch.randn(1, 16, 4, 6, generator=g)
    sigma = torch.tensor([0.6])
    want = OmniDenoiser(omni_dit, [cond], None, (4, 6))(x, sigma)
    got = native_forward(
        omni_dit,
        x,
        sigma,
        segs[2][None],
        ref_latents=[r[None] for r in refs],
        ref_contexts=[s[None] for s in segs[:2] + segs[3:]],  # ComfyUI's order: before each reference, then closing
        siglip_feats=[f[None] for f in sig],
    )
    assert torch.equal(want, got.float())
    with pytest.raises(ZImageError, match="2 reference latents but 1 reference text"):
        native_forward(omni_dit, x, sigma, segs[2][None], ref_latents=[r[None] for r in refs], ref_contexts=[segs[0]])


@torch.inference_mode()
def test_sampling_through_the_native_call_is_the_engines_image(dit):
    caps = feats(9, seed=11)
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(12))
    sig = flow_sigmas(4, 3.0)
    want = sample(Denoiser(dit, caps, None, (4, 4), sigmas=sig), noise, sig, "euler")
    got = sample(lambda x, s: native_forward(dit, x, s, caps[0][None]).float(), noise, sig, "euler")
    assert torch.equal(got, want)
