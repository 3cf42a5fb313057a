"""Flux VAE: parity with diffusers AutoencoderKL, key table, loading, tiling, image helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zimage_core.vae_tiling as vt
from tests.factories.vae import make_diffusers_vae, save_bfl_vae, save_diffusers_vae
from zimage_core.config import VAE_SCALE, VAE_SHIFT, VAEConfig
from zimage_core.errors import CheckpointError, ZImageError
from zimage_core.vae import (
    FluxVAE,
    bfl_to_diffusers_key,
    check_finite,
    convert_bfl_to_diffusers,
    convert_diffusers_to_bfl,
    diffusers_to_bfl_key,
    load_vae,
    pil_to_tensor,
    tensor_to_pil,
    to_model_space,
    to_raw_space,
)
from zimage_core.weights import save_safetensors

CFG = VAEConfig.tiny()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def ref():
    return make_diffusers_vae(CFG, seed=0)


@pytest.fixture(scope="module")
def paths(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    save_diffusers_vae(ref, root / "model" / "vae")
    bfl = save_bfl_vae(ref, root / "ae.safetensors")
    # An all-in-one checkpoint: VAE under "vae.", next to DiT weights.
    aio = {"vae." + k: v for k, v in convert_diffusers_to_bfl(ref.state_dict()).items()}
    aio["model.diffusion_model.layers.0.attention.qkv.weight"] = torch.zeros(4, 4)
    save_safetensors(aio, root / "aio.safetensors")
    return {"diffusers": root / "model" / "vae", "root": root / "model", "bfl": bfl, "aio": root / "aio.safetensors"}


@pytest.fixture(scope="module")
def vaes(paths):
    return {name: load_vae(p) for name, p in paths.items()}


# ---------------------------------------------------------------------------------------------
# Key table
# ---------------------------------------------------------------------------------------------
# Literal rows of the table in the architecture reference (section 4), for the 4-level Flux VAE.
DOC_PAIRS = [
    ("decoder.up.3.block.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"),
    ("decoder.up.0.block.2.conv2.bias", "decoder.up_blocks.3.resnets.2.conv2.bias"),
    ("decoder.up.2.block.0.nin_shortcut.weight", "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"),
    ("decoder.up.3.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight"),
    ("decoder.up.1.upsample.conv.bias", "decoder.up_blocks.2.upsamplers.0.conv.bias"),
    ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("encoder.down.0.block.1.norm1.weight", "encoder.down_blocks.0.resnets.1.norm1.weight"),
    ("encoder.down.2.downsample.conv.weight", "encoder.down_blocks.2.downsamplers.0.conv.weight"),
    ("encoder.mid.block_1.conv1.weight", "encoder.mid_block.resnets.0.conv1.weight"),
    ("decoder.mid.block_2.norm2.bias", "decoder.mid_block.resnets.1.norm2.bias"),
    ("encoder.mid.attn_1.norm.weight", "encoder.mid_block.attentions.0.group_norm.weight"),
    ("decoder.mid.attn_1.q.weight", "decoder.mid_block.attentions.0.to_q.weight"),
    ("decoder.mid.attn_1.k.bias", "decoder.mid_block.attentions.0.to_k.bias"),
    ("encoder.mid.attn_1.v.weight", "encoder.mid_block.attentions.0.to_v.weight"),
    ("encoder.mid.attn_1.proj_out.weight", "encoder.mid_block.attentions.0.to_out.0.weight"),
    ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
    ("encoder.conv_out.bias", "encoder.conv_out.bias"),
    ("decoder.conv_in.weight", "decoder.conv_in.weight"),
]


@pytest.mark.parametrize("bfl,diffusers", DOC_PAIRS)
def test_key_table_matches_reference(bfl, diffusers):
    assert diffusers_to_bfl_key(diffusers) == bfl
    assert bfl_to_diffusers_key(bfl) == diffusers


def test_key_table_unknown_keys():
    assert diffusers_to_bfl_key("quant_conv.weight") is None
    assert bfl_to_diffusers_key("layers.0.attention.qkv.weight") is None


def test_full_size_key_table_and_param_count():
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    with torch.device("meta"):
        ours = FluxVAE(VAEConfig.flux())
        theirs = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    sd, dsd = ours.state_dict(), theirs.state_dict()
    assert len(sd) == 244 and sum(t.numel() for t in sd.values()) == 83_819_683
    assert sum(t.numel() for k, t in sd.items() if k.startswith("decoder.")) == 49_545_475
    mapped = convert_diffusers_to_bfl(dsd)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert tuple(mapped["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    back = convert_bfl_to_diffusers(sd)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in dsd.items()}


# ---------------------------------------------------------------------------------------------
# Loading and parity with diffusers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["diffusers", "root", "bfl", "aio"])
def test_config_inferred(vaes, layout):
    assert vaes[layout].config == CFG
    assert not any(p.requires_grad for p in vaes[layout].parameters())


def test_config_inferred_other_shapes(tmp_path):
    cfg = VAEConfig.tiny(block_out_channels=(32, 64, 96), layers_per_block=2)
    save_bfl_vae(make_diffusers_vae(cfg, seed=1), tmp_path / "ae.safetensors")
    vae = load_vae(tmp_path / "ae.safetensors")
    assert vae.config == cfg and vae.config.downscale == 4


@pytest.fixture(scope="module")
def expected(ref):
    """diffusers outputs on a non-square batch of 2: raw mean, model-space mean/sample, decoded pixels."""
    x = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mode = (dist.mode() - VAE_SHIFT) * VAE_SCALE
        sample = (dist.sample(torch.Generator().manual_seed(7)) - VAE_SHIFT) * VAE_SCALE
        pixels = ref.decode(mode / VAE_SCALE + VAE_SHIFT).sample
    return {"x": x, "raw": dist.mode(), "mode": mode, "sample": sample, "pixels": pixels}


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_parity_with_diffusers(vaes, expected, layout):
    vae, e = vaes[layout], expected
    z = vae.encode(e["x"])
    assert z.dtype == torch.float32 and z.shape == (2, 16, 6, 10)
    assert rel_err(z, e["mode"]) <= 1e-5
    assert rel_err(vae.encode(e["x"], sample=True, generator=torch.Generator().manual_seed(7)), e["sample"]) <= 1e-5
    assert rel_err(vae.decode(e["mode"]), e["pixels"]) <= 1e-5


def test_raw_space_api(vaes, expected):
    vae, e = vaes["bfl"], expected
    raw = vae.encode_raw(e["x"])
    assert rel_err(raw, e["raw"]) <= 1e-5
    # decode the reference's latents: decoding our own would compound two fp32 roundings (encode, decode)
    assert rel_err(vae.decode_raw(e["raw"]), e["pixels"]) <= 1e-5


def test_decode_parity_through_winograd(monkeypatch, vaes, expected):
    """The CPU decoder's Winograd convolutions (for >= 256 channels on real VAEs) forced onto the tiny one."""
    import zimage_core.winograd as wg

    if wg.onednn._op() is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN linear op")
    calls = []
    transform = wg.kernel_transform
    monkeypatch.setattr(wg, "MIN_CHANNELS", 1)
    monkeypatch.setattr(wg, "kernel_transform", lambda w: calls.append(w.shape) or transform(w))
    got = vaes["bfl"].decode_raw(expected["raw"])
    n_up = len(CFG.block_out_channels)
    assert len(calls) == 2 * 2 + n_up * (CFG.layers_per_block + 1) * 2 + (n_up - 1)  # every resnet and upsample conv
    assert rel_err(got, expected["pixels"]) <= 1e-5


@pytest.mark.parametrize("layout", ["root", "aio"])
def test_other_layouts_load_the_same_tensors(vaes, layout):
    ours, base = vaes[layout].state_dict(), vaes["bfl"].state_dict()
    assert ours.keys() == base.keys()
    assert all(torch.equal(ours[k], base[k]) for k in base)


def test_latent_spaces():
    raw = torch.randn(1, 16, 4, 4)
    assert torch.allclose(to_raw_space(to_model_space(raw)), raw, atol=1e-6)
    assert torch.allclose(to_model_space(raw), (raw - 0.1159) * 0.3611)


def test_bfloat16_load(paths, vaes):
    vae16 = load_vae(paths["bfl"], dtype=torch.bfloat16)
    assert vae16.dtype == torch.bfloat16
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    out = vae16.decode(z)
    assert out.dtype == torch.float32
    assert rel_err(out, vaes["bfl"].decode(z)) < 0.1


def test_bad_inputs(vaes):
    vae = vaes["bfl"]
    with pytest.raises(ZImageError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 20, 24))
    with pytest.raises(ZImageError, match="latents"):
        vae.decode(torch.zeros(1, 4, 8, 8))


# ---------------------------------------------------------------------------------------------
# Wrong files
# ---------------------------------------------------------------------------------------------
def test_dit_file_rejected(tmp_path):
    f = tmp_path / "z_image_turbo.safetensors"
    save_safetensors({"layers.0.attention.qkv.weight": torch.zeros(3, 3), "x_embedder.weight": torch.zeros(3)}, f)
    with pytest.raises(CheckpointError) as e:
        load_vae(f)
    msg = str(e.value)
    assert "diffusion transformer" in msg and "ae.safetensors" in msg and "models/vae" in msg and "--vae" in msg


def test_text_encoder_file_rejected(tmp_path):
    f = tmp_path / "qwen.safetensors"
    save_safetensors(
        {"model.embed_tokens.weight": torch.zeros(3, 3), "model.layers.0.self_attn.q_proj.weight": torch.zeros(3)}, f
    )
    with pytest.raises(CheckpointError, match="text encoder"):
        load_vae(f)


def test_sd_vae_rejected(tmp_path, ref):
    sd = convert_diffusers_to_bfl(ref.state_dict())
    sd["quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
    save_safetensors(sd, tmp_path / "sdxl_vae.safetensors")
    with pytest.raises(CheckpointError, match="SD-style"):
        load_vae(tmp_path / "sdxl_vae.safetensors")


def test_truncated_vae_rejected(tmp_path, ref):
    sd = convert_diffusers_to_bfl(ref.state_dict())
    del sd["decoder.up.0.block.1.conv2.weight"]
    save_safetensors(sd, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="decoder.up.0.block.1.conv2.weight"):
        load_vae(tmp_path / "ae.safetensors")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vae(tmp_path / "nope" / "ae.safetensors")


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------
def test_feather_weights_sum_to_one():
    for size, tile, overlap in [(32, 16, 4), (37, 16, 4), (17, 16, 4), (100, 24, 8)]:
        spans = vt.tile_spans(size, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == size
        total = torch.zeros(size * 8)
        for i, (s, e) in enumerate(spans):
            w = vt.feather(spans, i, 8.0)
            assert w.shape == (8 * (e - s),)
            assert (w[1:] - w[:-1]).abs().max() <= 1.0 / (overlap * 8 // 2) + 1e-6  # no step in any weight
            total[8 * s : 8 * e] += w
        assert torch.allclose(total, torch.ones_like(total))


def test_tiled_map_exact_for_local_ops():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4, 3, 3, 3, generator=g)
    lat = torch.randn(1, 3, 37, 29, generator=g)

    def up(t):  # receptive field of one latent pixel: inside the margin the feathering discards
        return F.interpolate(F.conv2d(t, k, padding=1), scale_factor=8, mode="nearest")

    assert (vt.tiled_map(up, lat, 128, 8, upscale=True) - up(lat)).abs().max() < 1e-5
    pix = torch.randn(1, 3, 296, 232, generator=g)

    def down(t):
        return F.avg_pool2d(F.conv2d(t, k, padding=1), 8)

    assert (vt.tiled_map(down, pix, 128, 8, upscale=False) - down(pix)).abs().max() < 1e-5


def test_tiled_map_has_no_step_where_tiles_disagree():
    """A tile-dependent offset (like per-tile GroupNorm statistics) must be cross-faded, not cut."""
    lat = torch.linspace(0, 1, 32)[None, None, :, None].expand(1, 1, 32, 24).contiguous()

    def fn(t):
        return F.interpolate(t + t.mean(), scale_factor=8, mode="nearest")

    def max_step(out):
        err = out - fn(lat)
        return (err[..., 1:, :] - err[..., :-1, :]).abs().max()

    feathered = max_step(vt.tiled_map(fn, lat, 128, 8, upscale=True))
    saved = vt.feather
    try:  # the same blend with a hard cut at the middle of each overlap shows a seam
        vt.feather = lambda spans, i, scale: (saved(spans, i, scale) >= 0.5).float()
        hard = max_step(vt.tiled_map(fn, lat, 128, 8, upscale=True))
    finally:
        vt.feather = saved
    assert feathered < 0.2 * hard


def periodic(channels: int, h: int, w: int, period: int, seed: int) -> torch.Tensor:
    """A smooth pattern whose statistics are the same in every tile that spans whole periods."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(h, dtype=torch.float32)[:, None] * 2 * math.pi / period
    xx = torch.arange(w, dtype=torch.float32)[None, :] * 2 * math.pi / period
    chans = []
    for _ in range(channels):
        a, p = torch.randn(4, generator=g), torch.rand(4, generator=g) * 2 * math.pi
        chans.append(
            a[0] * torch.sin(yy + p[0])
            + a[1] * torch.sin(xx + p[1])
            + a[2] * torch.sin(yy + xx + p[2])
            + a[3] * torch.cos(yy - xx + p[3])
        )
    return 0.5 * torch.stack(chans)[None]


def overlap_mask(size: int, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """True where two or more tiles cover an output row/column."""
    cover = torch.zeros(size * scale)
    for s, e in vt.tile_spans(size, tile, overlap):
        cover[s * scale : e * scale] += 1
    return cover > 1


def test_tiled_decode_close_and_seamless(ref, vaes):
    vae = vaes["bfl"]
    z = periodic(16, 32, 24, 8, seed=0)  # 256 x 192 pixels, 128-pixel tiles
    full, tiled = vae.decode(z), vae.decode(z, tile=128)
    assert tiled.shape == full.shape == (1, 3, 256, 192)
    err = (tiled - full).abs()
    # Tiles see their own GroupNorm statistics (as in diffusers/ComfyUI): close, not equal, with random weights.
    assert err.mean() < 0.15 * full.std() and err.max() < 0.5 * full.abs().max()
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = 128, 16, 0.25
    try:
        with torch.no_grad():
            theirs = ref.decode(to_raw_space(z)).sample
    finally:
        ref.disable_tiling()
    assert err.mean() <= (theirs - full).abs().mean()
    # No seam: the error where tiles meet is of the same order as inside the tiles.
    rows, cols = overlap_mask(32, 16, 4, 8), overlap_mask(24, 16, 4, 8)
    border = rows[:, None] | cols[None, :]
    assert err[..., border].mean() < 3 * err[..., ~border].mean()
    step = (err[..., 1:, :] - err[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    assert step.max() < 4 * step.median()


def test_tiled_encode_close(vaes):
    vae = vaes["bfl"]
    x = periodic(3, 256, 192, 32, seed=1).clamp(-1, 1)
    full, tiled = vae.encode(x), vae.encode(x, tile=128)
    err = (tiled - full).abs()
    assert err.mean() < 0.15 * full.std() and err.max() < 0.5 * full.abs().max()
    # Sampling draws one noise tensor for the whole latent: the same generator gives the same noise.
    small = x[..., :96, :64]
    mean, logvar = vae.latent_dist(small, tile=32)
    noisy = vae.encode(small, sample=True, generator=torch.Generator().manual_seed(3), tile=32)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(noisy, to_model_space(mean + torch.exp(0.5 * logvar) * noise), atol=1e-6)


def test_tile_choice(vaes):
    vae = vaes["bfl"]
    z = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae.decode(z, tile=512), vae.decode(z))  # tile larger than the image: untiled
    assert torch.equal(vae.decode(z, tile="auto"), vae.decode(z))
    assert vt.resolve_tile("auto", 4096, 4096) == vt.AUTO_TILE
    assert vt.resolve_tile("auto", 1024, 1024) is None
    for bad in ("big", 100, 16):
        with pytest.raises(ZImageError):
            vt.resolve_tile(bad, 4096, 4096)


# ---------------------------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------------------------
def test_tensor_to_pil_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 24, generator=g) * 2.4 - 1.2
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 1 / 255 - 1, 2 * (127.5 / 255) - 1])  # rounding edge cases
    ours = tensor_to_pil(x)
    theirs = VaeImageProcessor(vae_scale_factor=8).postprocess(x, output_type="pil")
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert a.mode == "RGB" and a.size == (24, 16)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_pil_round_trip():
    arr = np.random.default_rng(0).integers(0, 256, size=(2, 16, 24, 3), dtype=np.uint8)
    images = [Image.fromarray(a) for a in arr]
    t = pil_to_tensor(images)
    assert t.shape == (2, 3, 16, 24) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    expected = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2) * 2 - 1
    assert torch.equal(t, expected)
    back = tensor_to_pil(t)
    assert all(np.array_equal(np.asarray(b), a) for b, a in zip(back, arr))
    assert pil_to_tensor(images[0].convert("L")).shape == (1, 3, 16, 24)
    with pytest.raises(ZImageError, match="different sizes"):
        pil_to_tensor([images[0], images[0].resize((8, 8))])


def test_non_finite_is_reported():
    x = torch.zeros(1, 3, 4, 4)
    assert check_finite(x, "image") is x
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ZImageError, match="NaN/Inf"):
        check_finite(x, "decoded image")
    with pytest.raises(ZImageError, match="NaN/Inf"):
        tensor_to_pil(x)
    check_finite(x, "image", warn_only=True)
