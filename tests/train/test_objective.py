"""The flow-matching objective: Z-Image's t and sign conventions against the inference sampler, timestep sampling,
and the edit (Omni) path."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from train.config import ObjectiveSection
from train.objective import (
    FlowModel,
    OmniSegments,
    add_noise,
    dynamic_mu,
    flow_loss,
    raw_target,
    sample_sigmas,
    shift_sigmas,
    siglip_grid,
)
from zimage_core.config import DiTConfig
from zimage_core.denoiser import Denoiser
from zimage_core.dit import ZImageDiT
from zimage_core.sampling import sample_euler
from zimage_core.schedules import flow_sigmas

CFG = DiTConfig.tiny()


class OracleDiT(ZImageDiT):
    """Returns, for any input, exactly the training target of the (known) clean latent ``x0``.

    At ``x = add_noise(x0, n, sigma)`` the target is ``raw_target(x0, n)``; the oracle recovers ``n`` from ``x``
    with ``sigma = 1 - t``, i.e. it relies on the same conventions the objective uses.
    """

    def __init__(self, x0: torch.Tensor):
        super().__init__(CFG)
        self.x0 = x0

    def denoise(self, x, t, plan):
        sigma = (1.0 - t.float()).view(-1, 1, 1, 1)
        noise = (x.float() - (1.0 - sigma) * self.x0) / sigma
        return raw_target(self.x0, noise)


def test_exact_target_makes_the_inference_sampler_recover_x0():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    noise = torch.randn(2, 16, 8, 8, generator=g)
    dit = OracleDiT(x0).eval()
    caps = [torch.randn(5, CFG.cap_feat_dim, generator=g) for _ in range(2)]
    fn = Denoiser(dit, caps, None, (8, 8))
    sigmas = flow_sigmas(8, 3.0)
    out = sample_euler(fn, noise.clone(), sigmas)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    # and the sampler's velocity is noise - x0 on the straight path, as documented
    xs = add_noise(x0, noise, torch.tensor([0.4, 0.4]))
    torch.testing.assert_close(fn(xs, torch.tensor([0.4, 0.4])), noise - x0, atol=1e-5, rtol=0)


def test_a_flipped_convention_does_not_recover_x0():
    """The check above can fail: an oracle trained on the diffusers sign (target noise - x0) misses x0 badly."""

    class NoFlip(OracleDiT):
        def denoise(self, x, t, plan):
            return -super().denoise(x, t, plan)

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    fn = Denoiser(NoFlip(x0).eval(), [torch.randn(5, CFG.cap_feat_dim, generator=g)], None, (8, 8))
    out = sample_euler(fn, noise.clone(), flow_sigmas(8, 3.0))
    assert torch.isfinite(out).all() and (out - x0).abs().max() > 0.5


def test_dynamic_shift_matches_the_reference_constants():
    assert dynamic_mu(256) == pytest.approx(0.5)
    assert dynamic_mu(4096) == pytest.approx(1.15)
    assert dynamic_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    u = torch.linspace(0.05, 0.95, 19)
    mu = 1.15
    flux = math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))
    torch.testing.assert_close(shift_sigmas(u, math.exp(mu)), flux, atol=1e-6, rtol=0)


def test_sigma_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    plain = ObjectiveSection(shift="none")
    s = sample_sigmas(20000, 256, plain, g)
    assert s.dtype == torch.float32 and 0 < float(s.min()) and float(s.max()) < 1
    assert float(s.median()) == pytest.approx(0.5, abs=0.02)  # logit-normal(0, 1): median 0.5
    # logit(sigma) ~ N(mean, std)
    z = torch.log(s / (1 - s))
    assert float(z.std()) == pytest.approx(1.0, abs=0.03)
    shifted = sample_sigmas(20000, 4096, ObjectiveSection(shift="dynamic"), torch.Generator().manual_seed(0))
    assert float(shifted.median()) == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), abs=0.02)
    uni = sample_sigmas(
        20000,
        256,
        ObjectiveSection(timesteps="uniform", shift="static", static_shift=1.0),
        torch.Generator().manual_seed(0),
    )
    assert float(uni.mean()) == pytest.approx(0.5, abs=0.01) and float(uni.std()) == pytest.approx(12**-0.5, abs=0.01)


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, caps, refs=None, siglip=None):
        self.calls.append((x.clone(), t.clone(), caps, refs, siglip))
        return torch.zeros_like(x) + self.w


def t2i_batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        latents=torch.randn(b, 16, 4, 6, generator=g),
        kind="t2i",
        ref_latents=None,
        siglip=None,
        cap_feats=[torch.randn(4 + i, CFG.cap_feat_dim, generator=g) for i in range(b)],
    )


def test_flow_loss_builds_inputs_and_target_in_zimage_conventions():
    batch, obj = t2i_batch(), ObjectiveSection()
    gen = torch.Generator().manual_seed(5)
    replay = torch.Generator().manual_seed(5)
    rec = Recorder()
    loss, info = flow_loss(rec, batch, obj, gen, torch.device("cpu"))
    noise = torch.randn(batch.latents.shape, generator=replay)
    sigma = sample_sigmas(3, (4 // 2) * (6 // 2), obj, replay)
    x, t, caps, refs, _ = rec.calls[0]
    torch.testing.assert_close(x, (1 - sigma.view(-1, 1, 1, 1)) * batch.latents + sigma.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(t, 1 - sigma)
    assert refs is None and len(caps) == 3
    # zero output: the loss is |x0 - noise|^2
    assert float(loss.detach()) == pytest.approx(float(((batch.latents - noise) ** 2).mean()), rel=1e-6)
    assert info["tokens"] == 6


def test_edit_batch_goes_through_forward_omni_and_uses_the_references():
    torch.manual_seed(0)
    dit = ZImageDiT(DiTConfig.tiny(omni=True))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = FlowModel(dit)
    g = torch.Generator().manual_seed(0)
    seg = OmniSegments(
        *(torch.randn(n, 32, generator=g) for n in (3, 2, 4)), prompts={"b": torch.randn(7, 32, generator=g)}
    )
    batch = SimpleNamespace(
        latents=torch.randn(2, 16, 4, 4, generator=g),
        kind="edit",
        cap_feats=[torch.randn(6, 32, generator=g), torch.randn(9, 32, generator=g)],
        captions=["a", "b"],
        ref_latents=[
            [torch.randn(16, 4, 4, generator=g)],
            [torch.randn(16, 6, 4, generator=g), torch.randn(16, 4, 4, generator=g)],
        ],
        siglip=[
            [torch.randn(2, 2, 24, generator=g)],
            [torch.randn(6, 24, generator=g), torch.randn(2, 2, 24, generator=g)],
        ],
    )  # the 6 flattened tokens of a 6x4 latent's reference become a 3x2 grid
    loss, _ = flow_loss(model, batch, ObjectiveSection(), torch.Generator().manual_seed(1), torch.device("cpu"), seg)
    loss.backward()
    assert torch.isfinite(loss)
    assert dit.siglip_embedder[1].weight.grad is not None and dit.siglip_embedder[1].weight.grad.abs().sum() > 0
    # other references, same noise: another loss (the conditioning is used)
    batch.ref_latents = [[r + 1.0 for r in rs] for rs in batch.ref_latents]
    loss2, _ = flow_loss(model, batch, ObjectiveSection(), torch.Generator().manual_seed(1), torch.device("cpu"), seg)
    assert abs(float(loss2.detach()) - float(loss.detach())) > 1e-6
    assert siglip_grid(torch.zeros(6, 24), torch.zeros(16, 6, 4)).shape == (3, 2, 24)
    assert siglip_grid(torch.zeros(6, 24), torch.zeros(16, 4, 6)).shape == (2, 3, 24)
    # the segments: first, between..., prompt, last
    assert [s.shape[0] for s in seg.build(2, batch.cap_feats[1], "b")] == [3, 2, 7, 4]  # the Omni prompt segment
    assert [s.shape[0] for s in seg.build(1, batch.cap_feats[0], "a")] == [3, 6, 4]  # not stored: T2I features
    with pytest.raises(ValueError, match="segments"):
        seg.build(2, [batch.cap_feats[1]])
