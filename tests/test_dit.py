"""S3-DiT parity with the reference (diffusers ZImageTransformer2DModel) on the same random weights."""

from __future__ import annotations

import pytest
import torch

from tests.factories.dit import diffusers_to_native_state, make_diffusers_dit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def build_pair(cfg: DiTConfig, seed: int = 0):
    ref = make_diffusers_dit(cfg, seed)
    ours = ZImageDiT(cfg)
    ours.load_state_dict(diffusers_to_native_state(ref))
    return ref, ours.eval()


@pytest.fixture(scope="module")
def pair():
    return build_pair(DiTConfig.tiny(t_mid_dim=1024))


def reference(ref, x, t, caps):
    with torch.no_grad():
        out = ref(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@pytest.mark.parametrize(
    "batch,h,w,lens",
    [
        (1, 16, 16, [7]),  # one sample, caption needs padding
        (2, 12, 20, [5, 40]),  # non-square, captions of different padded lengths -> masked batch
        (2, 10, 6, [32, 9]),  # image tokens need padding (15 -> 32), caption exactly 32
        (3, 8, 8, [3, 3, 3]),  # equal lengths -> no mask
    ],
)
def test_forward_matches_reference(pair, batch, h, w, lens):
    ref, ours = pair
    cfg = ours.cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g)
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in lens]
    with torch.no_grad():
        got = ours(x, t, caps)
    want = reference(ref, x, t, caps)
    assert got.shape == want.shape == x.shape
    assert rel_err(got, want) <= 1e-5


def test_prepared_plan_reused_across_steps(pair):
    """The cached caption/positions path gives the same result as a fresh forward at every t."""
    ref, ours = pair
    cfg = ours.cfg
    g = torch.Generator().manual_seed(2)
    caps = [torch.randn(11, cfg.cap_feat_dim, generator=g)]
    x = torch.randn(1, cfg.in_channels, 8, 12, generator=g)
    with torch.no_grad():
        plan = ours.prepare(caps, 8, 12)
        for tv in (0.0, 0.3, 0.9):
            t = torch.tensor([tv])
            assert rel_err(ours.denoise(x, t, plan), reference(ref, x, t, caps)) <= 1e-5


def test_output_depends_on_caption_and_time(pair):
    _, ours = pair
    cfg = ours.cfg
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    c1, c2 = torch.randn(5, cfg.cap_feat_dim, generator=g), torch.randn(5, cfg.cap_feat_dim, generator=g)
    with torch.no_grad():
        a = ours(x, torch.tensor([0.5]), [c1])
        b = ours(x, torch.tensor([0.5]), [c2])
        c = ours(x, torch.tensor([0.1]), [c1])
    assert rel_err(a, b) > 1e-3 and rel_err(a, c) > 1e-3


def test_bf16_close_to_fp32(pair):
    _, ours = pair
    cfg = ours.cfg
    low = ZImageDiT(cfg).eval()
    low.load_state_dict(ours.state_dict())
    low = low.to(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    caps = [torch.randn(6, cfg.cap_feat_dim, generator=g)]
    with torch.no_grad():
        assert rel_err(low(x, torch.tensor([0.4]), caps).float(), ours(x, torch.tensor([0.4]), caps)) < 0.05


def test_bad_caption_shape_is_explained(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="caption features must be"):
        ours(torch.zeros(1, 16, 8, 8), torch.zeros(1), [torch.zeros(4, 7)])


def test_omni_matches_reference():
    """Omni: two clean references + target, SigLIP features, per-token t (segment lengths multiples of 32,
    where the ComfyUI and diffusers caption numbering agree)."""
    cfg = DiTConfig.tiny(omni=True, t_mid_dim=1024)
    ref, ours = build_pair(cfg, seed=5)
    g = torch.Generator().manual_seed(6)
    c = cfg.in_channels
    imgs = [torch.randn(c, 8, 12, generator=g), torch.randn(c, 6, 6, generator=g), torch.randn(c, 8, 8, generator=g)]
    segs = [torch.randn(32 * k, cfg.cap_feat_dim, generator=g) for k in (1, 1, 2, 1)]
    sig = [
        torch.randn(4, 3, cfg.siglip_feat_dim, generator=g),
        torch.randn(2, 5, cfg.siglip_feat_dim, generator=g),
        None,
    ]
    t = torch.tensor([0.3])
    with torch.no_grad():
        want = ref(
            [[i.unsqueeze(1) for i in imgs]],
            t,
            [segs],
            return_dict=False,
            siglip_feats=[sig],
            image_noise_mask=[[0, 0, 1]],
        )[0][0].squeeze(1)
        got = ours.forward_omni([imgs], t, [segs], [sig])[0]
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5
    # the clean references really are seen at t = 1: changing t must change the output
    with torch.no_grad():
        other = ours.forward_omni([imgs], torch.tensor([0.8]), [segs], [sig])[0]
    assert rel_err(other, got) > 1e-3


def test_omni_caption_positions_follow_comfyui():
    """With padded segments diffusers misnumbers later segments (diffusers#13574); we use ComfyUI's numbering:
    each segment's tokens are consecutive from its start, so every segment is shift-equivariant."""
    cfg = DiTConfig.tiny(omni=True, t_mid_dim=1024)
    _, ours = build_pair(cfg, seed=7)
    g = torch.Generator().manual_seed(8)
    c = cfg.in_channels
    imgs = [torch.randn(c, 8, 8, generator=g), torch.randn(c, 8, 8, generator=g)]
    segs = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (5, 37, 3)]
    parts, _ = ours._omni_sample(imgs, segs, None)
    pos = parts["cap"][1]
    # segment 0 occupies 32 rows starting at 1, segment 1 starts at 1 + 5 + 2 and spans 64 rows
    assert pos[:32, 0].tolist() == list(range(1, 33))
    assert pos[32:96, 0].tolist() == list(range(8, 72))
    assert (pos[:, 1:] == 0).all()
