"""ControlNet nodes with the pack's ComfyUI test doubles: the loader lists models/controlnet and models/model_patches,
Apply composes with the LoRA loader, and the sampler's image equals the library's ControlNet image; the bridged core
MODEL's forward applies the ControlNets as our sampler does (step from ComfyUI's sample_sigmas, both CFG branches)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from zimage_pack.nodes import controlnet as cn_nodes
from zimage_pack.nodes import core_model, loaders, sampler
from zimage_pack.zimage_core.errors import ZImageError

from tests.factories import comfy as C
from tests.factories.controlnet import make_controlnet, save_controlnet
from tests.factories.pipeline import build_tiny_model
from tests.test_generate import assert_same_image
from tests.test_nodes import empty_latent, encode
from zimage_core.config import DiTConfig
from zimage_core.controls import ControlSpec
from zimage_core.pipeline import GenerateOptions, ZImagePipeline
from zimage_core.vae import tensor_to_pil

W, H = 64, 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnnodes")
    cfg = DiTConfig.tiny(n_layers=4, n_refiner_layers=2, t_mid_dim=1024, cap_feat_dim=32)
    model = build_tiny_model(tmp, seed=33, dit_cfg=cfg)
    root = C.install_models(model, tmp / "models", dit_names=("z_image_turbo_bf16.safetensors",))
    for kind in ("controlnet", "model_patches"):
        (root / kind).mkdir()
    save_controlnet(make_controlnet("tiny-1.0", cfg, seed=51), root / "controlnet" / "union-1.0.safetensors")
    save_controlnet(make_controlnet("tiny-2.1", cfg, seed=52), root / "model_patches" / "union-2.1.safetensors")
    rng = np.random.default_rng(1)
    inputs = tmp / "input"
    inputs.mkdir()
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(inputs / "canny.png")
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(inputs / "photo.png")
    mask = np.zeros((H, W), np.uint8)
    mask[8:30, 16:48] = 255
    Image.fromarray(mask).save(inputs / "mask.png")
    model.models, model.inputs = root, inputs
    return model


@pytest.fixture()
def env(tiny, monkeypatch):
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", str(tiny.models))
    monkeypatch.setattr(C.LoadImage, "input_dir", tiny.inputs)
    return tiny


def image(env, name):
    return C.LoadImage().load_image(name)[0]


def test_loader_lists_controlnet_and_model_patches(env):
    names = cn_nodes.ZImageControlNetLoader.INPUT_TYPES()["required"]["controlnet_name"][0]
    assert names == ["union-1.0.safetensors", "union-2.1.safetensors"]
    with pytest.raises(ZImageError, match="models/controlnet or ComfyUI/models/model_patches"):
        cn_nodes.ZImageControlNetLoader().load("missing.safetensors")


def test_sampler_with_controlnets_equals_library_image(env):
    model = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", weight_dtype="fp32")[0]
    te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors", weight_dtype="fp32")[0]
    vae = C.VAELoader().load_vae("ae.safetensors")[0]
    v1 = cn_nodes.ZImageControlNetLoader().load("union-1.0.safetensors")[0]
    v2 = cn_nodes.ZImageControlNetLoader().load("union-2.1.safetensors")[0]
    mask = torch.from_numpy(np.asarray(Image.open(env.inputs / "mask.png"), np.float32) / 255.0)[None]
    apply = cn_nodes.ZImageControlNetApply()
    m = apply.apply(model, v1, vae, image(env, "canny.png"), 0.8, 0.0, 0.7)[0]
    m = apply.apply(m, v2, vae, image(env, "canny.png"), 0.5, 0.0, 1.0, image(env, "photo.png"), mask)[0]
    assert model.controls == () and len(m.controls) == 2  # a new view; the input model is unchanged
    cond = encode(te, "a house")
    out = sampler.ZImageTurboSampler().sample(m, cond, empty_latent(W, H), 9, 3, 1.0, 3.0, "euler", 1.0)[0]
    got = tensor_to_pil(C.CoreVAE(env.models / "vae" / "ae.safetensors").model.decode_raw(out["samples"]))[0]

    pipe = ZImagePipeline.load(env.root, device="cpu", dtype="fp32", memory="full")
    specs = [
        ControlSpec(env.models / "controlnet" / "union-1.0.safetensors", env.inputs / "canny.png", 0.8, 0.0, 0.7),
        ControlSpec(
            env.models / "model_patches" / "union-2.1.safetensors",
            env.inputs / "canny.png",
            0.5,
            inpaint_image=env.inputs / "photo.png",
            mask=env.inputs / "mask.png",
        ),
    ]
    opts = GenerateOptions(prompt="a house", width=W, height=H, steps=3, seed=9, controls=specs)
    want = pipe.generate(opts, progress=False)[0]
    assert_same_image(got, want)
    plain = sampler.ZImageTurboSampler().sample(model, cond, empty_latent(W, H), 9, 3, 1.0, 3.0, "euler", 1.0)[0]
    assert not torch.equal(plain["samples"], out["samples"])


def test_apply_composes_with_lora_loader_and_checks_inputs(env, tmp_path):
    model = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", weight_dtype="fp32")[0]
    vae = C.VAELoader().load_vae("ae.safetensors")[0]
    v1 = cn_nodes.ZImageControlNetLoader().load("union-1.0.safetensors")[0]
    apply = cn_nodes.ZImageControlNetApply()
    img = image(env, "canny.png")
    m = apply.apply(model, v1, vae, img, 0.8, 0.0, 1.0)[0]
    lora_dir = env.models / "loras"
    shutil.copy(_lora(env, tmp_path), lora_dir / "cn-test-lora.safetensors")
    both = loaders.ZImageLoraLoader().load(m, "cn-test-lora.safetensors", 0.7)[0]
    assert both.controls == m.controls and len(both.loras) == 1  # LoRA after Apply keeps the ControlNet
    again = apply.apply(
        loaders.ZImageLoraLoader().load(model, "cn-test-lora.safetensors", 0.7)[0], v1, vae, img, 0.8, 0, 1
    )[0]
    assert len(again.loras) == 1 and len(again.controls) == 1  # and Apply after a LoRA keeps the LoRA
    with pytest.raises(ZImageError, match="1.0 .16-channel.*has no inpaint input"):
        apply.apply(model, v1, vae, img, 0.8, 0.0, 1.0, img, torch.zeros(1, H, W))
    with pytest.raises(ZImageError, match="start_percent 0.9 / end_percent 0.1"):
        apply.apply(model, v1, vae, img, 0.8, 0.9, 0.1)
    with pytest.raises(ZImageError, match="both inpaint_image and mask"):
        apply.apply(model, v1, vae, img, 0.8, 0.0, 1.0, img)
    assert apply.apply(model, v1, vae, img, 0.0, 0.0, 1.0)[0] is model  # strength 0: nothing to add
    with pytest.raises(ZImageError, match="needs ComfyUI with native Z-Image"):  # no ComfyUI here; with it: bridged
        core_model.ZImageToCoreModel().convert(m)


def _lora(env, tmp_path):
    from tests.factories.comfy import peft_lora
    from zimage_core.dit import ZImageDiT
    from zimage_core.weights import save_safetensors

    path = tmp_path / "lora.safetensors"
    save_safetensors(peft_lora(ZImageDiT(env.dit_config), ["layers.0.attention.to_q"]), path)
    return path


@pytest.mark.parametrize("mode, kw", [("block-swap", {"swap_blocks": 2}), ("sequential", {})])
def test_streamed_model_streams_the_controlnet_blocks_and_samples_the_same(env, mode, kw):
    vae = C.VAELoader().load_vae("ae.safetensors")[0]
    te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors", weight_dtype="fp32")[0]
    cond = encode(te, "a house")
    latents = []
    for memory_mode, extra in (("full", {}), (mode, kw)):
        model = loaders.ZImageModelLoader().load(
            "z_image_turbo_bf16.safetensors", weight_dtype="fp32", memory_mode=memory_mode, **extra
        )[0]
        v2 = cn_nodes.ZImageControlNetLoader().load("union-2.1.safetensors")[0]
        m = cn_nodes.ZImageControlNetApply().apply(model, v2, vae, image(env, "canny.png"), 0.9, 0.0, 1.0)[0]
        out = sampler.ZImageTurboSampler().sample(m, cond, empty_latent(W, H), 4, 3, 1.0, 3.0, "euler", 1.0)[0]
        latents.append(out["samples"])
        net, _, slot = v2.load(m)
        streamers = slot.residency.extra_streamers
        if memory_mode == "full":
            assert not streamers
        else:  # every control block streamed, its visits served while sampling
            (s,) = streamers.values()
            assert [id(b) for b in s.blocks] == [id(b) for b in net.blocks()]
            assert s.stats.loads + s.stats.hits >= 3 * len(net.blocks()) and s.at_home()
        v2.release()
        assert not slot.residency.extra_streamers
    # Not bit for bit: the loaded ControlNet's weights are memory-mapped views at 8-byte-aligned file offsets, the
    # streamed blocks run on aligned staged copies, and the CPU matmul takes another kernel path for them (a clone of
    # the weights gives the streamed result exactly); the images are the same (tests/test_controlnet_pipeline.py).
    err = (latents[1] - latents[0]).abs().max() / latents[0].abs().max()
    assert err < 1e-5, err


# ---------------------------------------------------------------------------------------------- core MODEL bridge
def _bridged(env, start=0.25, end=0.75):
    from zimage_pack.nodes import bridge

    model = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", weight_dtype="fp32")[0]
    vae = C.VAELoader().load_vae("ae.safetensors")[0]
    v2 = cn_nodes.ZImageControlNetLoader().load("union-2.1.safetensors")[0]
    m = cn_nodes.ZImageControlNetApply().apply(model, v2, vae, image(env, "canny.png"), 0.8, start, end)[0]
    dit = m.prepare()
    return m, dit, bridge.NativeDiT(dit), bridge.CONTROLS


def test_bridged_forward_applies_controls_as_our_model_function(env):
    """At every step of a 4-step schedule, the bridged forward (step from ComfyUI's sample_sigmas and the call's
    sigmas, a fresh tensor as k-diffusion passes it) equals our sampler's model function; both CFG branches of a
    batched call get the hints (our Denoiser's branches)."""
    from zimage_core.denoiser import Denoiser
    from zimage_core.schedules import flow_sigmas

    m, dit, adapter, key = _bridged(env)
    te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors", weight_dtype="fp32")[0]
    pos, neg = encode(te, "a house")[0][0], encode(te, "blurry")[0][0]
    cap, ncap = pos[0], neg[0]
    carrier = cn_nodes.BridgedControls(m)
    sig = flow_sigmas(4, 3.0)
    hw = (H // 8, W // 8)
    ours = Denoiser(dit, [cap], None, hw, sigmas=sig, controls=cn_nodes.control_inputs(m, dit, W, H))
    pair = Denoiser(dit, [cap], [ncap], hw, cfg=3.0, sigmas=sig, controls=cn_nodes.control_inputs(m, dit, W, H))
    plain = Denoiser(dit, [cap], None, hw, sigmas=sig)
    g = torch.Generator().manual_seed(2)
    n = max(cap.shape[0], ncap.shape[0])
    ctx = torch.zeros(2, n, cap.shape[1])
    ctx[0, : cap.shape[0]], ctx[1, : ncap.shape[0]] = cap, ncap
    amask = torch.zeros(2, n, dtype=torch.long)
    amask[0, : cap.shape[0]], amask[1, : ncap.shape[0]] = 1, 1
    active = []
    with torch.inference_mode():
        for i in range(4):
            x = torch.randn(1, 16, *hw, generator=g)
            sigma = sig[i] * torch.ones(1)
            opts = {"sample_sigmas": sig, "sigmas": sigma, key: carrier}
            got = adapter(x, sigma, context=pos, num_tokens=cap.shape[0], transformer_options=opts)
            want = ours(x, sig[i].expand(1))
            assert same(got.float(), want)
            active.append(not torch.equal(want, plain(x, sig[i].expand(1))))
            both = adapter(
                torch.cat([x, x]),
                sigma.expand(2),
                context=ctx,
                attention_mask=amask,
                transformer_options={**opts, "sigmas": sigma.expand(2)},
            )
            p, q = pair.branches(x, sig[i].expand(1))
            assert same(both[:1].float(), p) and same(both[1:].float(), q)
    assert active == [False, True, True, False]  # start 0.25 / end 0.75 of 4 steps: steps 1 and 2


def test_bridged_forward_without_sample_sigmas(env):
    m, dit, adapter, key = _bridged(env)
    x, ctx = torch.zeros(1, 16, H // 8, W // 8), torch.randn(1, 5, 32)
    with pytest.raises(ZImageError, match="start/end window needs the sampler's sigmas"):
        adapter(x, torch.ones(1), context=ctx, transformer_options={key: cn_nodes.BridgedControls(m)})
    m, dit, adapter, key = _bridged(env, 0.0, 1.0)  # no window: applies at every call
    out = adapter(x, torch.ones(1), context=ctx, transformer_options={key: cn_nodes.BridgedControls(m)})
    assert not torch.equal(out, adapter(x, torch.ones(1), context=ctx, transformer_options={}))


def test_bridged_sampling_draws_our_samplers_image(env):
    """Euler through the bridged forward from ComfyUI's noise (as tests/test_bridge.py) = Z-Image Sampler's image
    with the same ControlNet view."""
    from zimage_core.sampling import initial_noise, sample
    from zimage_core.schedules import flow_sigmas
    from zimage_core.vae import to_raw_space

    m, dit, adapter, key = _bridged(env)
    te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors", weight_dtype="fp32")[0]
    cond = encode(te, "a house")
    ctx = cond[0][0]
    carrier = cn_nodes.BridgedControls(m)
    sig = flow_sigmas(4, 3.0)

    def model_fn(x, sigma):
        opts = {"sample_sigmas": sig, "sigmas": sigma.clone(), key: carrier}
        return adapter(x, sigma, context=ctx, num_tokens=ctx.shape[1], transformer_options=opts).float()

    with torch.inference_mode():
        got = to_raw_space(sample(model_fn, initial_noise((1, 16, H // 8, W // 8), 9), sig, "euler"))
    want = sampler.ZImageTurboSampler().sample(m, cond, empty_latent(W, H), 9, 4, 1.0, 3.0, "euler", 1.0)[0]
    assert same(got, want["samples"])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding (oneDNN's CPU kernels may sum in another order from call to call)."""
    return bool((a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())))
