"""ControlNet combined with the rest of the engine: float16 on weights that overflow a plain float16 forward, a GGUF
DiT, nf4/fp8 control blocks, img2img and latent inpainting (the start/end window counts the steps actually run).

Quality bounds are those of tests/test_quant_quality.py (cosine of the final image/latent to full precision on the
same weights): >= 0.99 for float16, fp8 and GGUF Q8_0; >= 0.95 for nf4.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.factories.controlnet import make_controlnet, save_controlnet
from tests.factories.pipeline import build_tiny_model
from tests.test_fp16 import overflowing
from zimage_core.checkpoints import load_dit, save_dit
from zimage_core.config import DiTConfig
from zimage_core.controlnet import ControlInput, denoise_with_hints, load_controlnet
from zimage_core.controls import ControlSpec
from zimage_core.dit import ZImageDiT
from zimage_core.pipeline import GenerateOptions, ZImagePipeline

W, H = 64, 48


def cos(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(t, dtype=np.float64)) for t in (a, b))
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``overflowing`` for a state dict (the ControlNet file's published names hold the same substrings)."""
    out = {}
    for k, v in state.items():
        if any(s in k for s in ("feed_forward.w1", "feed_forward.w3")):
            v = v * 400
        elif any(s in k for s in ("attention.to_out", "attention.out")):
            v = v * 100000
        out[k] = v
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = DiTConfig.tiny(n_layers=4, n_refiner_layers=2, t_mid_dim=1024, cap_feat_dim=32)
    return build_tiny_model(tmp_path_factory.mktemp("combo"), seed=5, dit_cfg=cfg)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("combo_cn")
    out = {}
    for name, variant, seed in (("v1", "tiny-1.0", 41), ("v2", "tiny-2.1", 42)):
        tiny = make_controlnet(variant, model.dit_config, seed=seed)
        out[name] = save_controlnet(tiny, d / f"{name}.safetensors")
        big = copy.copy(tiny)
        big.state = scaled(tiny.state)
        out[name + "_big"] = save_controlnet(big, d / f"{name}_big.safetensors")
    state = load_dit(model.transformer, dtype="fp32").state_dict()
    dit = ZImageDiT(model.dit_config)
    dit.load_state_dict(state)
    out["dit_big"] = save_dit(overflowing(dit).state_dict(), model.dit_config, d / "big.safetensors", "comfyui")
    rng = np.random.default_rng(0)
    for name in ("canny", "photo"):
        out[name] = d / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(out[name])
    mask = np.zeros((H, W), np.uint8)
    mask[10:40, 8:40] = 255
    out["mask"] = d / "mask.png"
    Image.fromarray(mask).save(out["mask"])
    return out


def pipeline(model, transformer=None, dtype="fp32", quant="none", memory="full"):
    return ZImagePipeline.load(
        transformer=transformer or model.transformer,
        text_encoder=model.text_encoder,
        vae=model.vae,
        tokenizer=model.tokenizer,
        device="cpu",
        dtype=dtype,
        memory=memory,
        quant=quant,
        text_encoder_quant="none",
    )


def opts(*controls, **kw):
    base = dict(prompt="a house by a lake", width=W, height=H, steps=3, seed=11, controls=list(controls))
    base.update(kw)
    return GenerateOptions(**base)


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- float16
@pytest.mark.parametrize("which", ["v1", "v2"])
def test_fp16_controlnet_forward_stays_finite_where_plain_fp16_overflows(model, files, which):
    """The control blocks and the hints of float16 weights that overflow a plain float16 block: finite and close
    to float32 (hints and the DiT output with them)."""
    cfg = model.dit_config
    dit32 = load_dit(files["dit_big"], dtype="fp32")
    dit16 = load_dit(files["dit_big"], dtype="fp16")
    net32 = load_controlnet(files[which + "_big"], base=cfg, dtype="fp32")
    net16 = load_controlnet(files[which + "_big"], base=cfg, dtype="fp16")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, H // 8, W // 8, generator=g)
    ctx = torch.randn(1, net32.cfg.in_channels, H // 8, W // 8, generator=g)
    cap = [torch.randn(9, cfg.cap_feat_dim, generator=g)]
    t = torch.tensor([0.4])
    with torch.no_grad():
        want, want_hints = denoise_with_hints(
            dit32, x, t, dit32.prepare(cap, H // 8, W // 8), [ControlInput(net32, ctx)]
        )
        got, got_hints = denoise_with_hints(dit16, x, t, dit16.prepare(cap, H // 8, W // 8), [ControlInput(net16, ctx)])
        # the same control block run plainly in float16 (stream and matmuls float16) overflows
        block = net16.control_layers[0]
        c = torch.randn(1, 32, cfg.dim, generator=g).half()  # 12 image tokens padded to 32
        rope = dit16.prepare(cap, H // 8, W // 8).img_rope
        plain = super(type(block), block).forward(c, rope, None, block.modulation(dit16.embed_time(t)))
    assert not torch.isfinite(plain).all()
    assert torch.isfinite(got).all()
    assert cos(got, want) > 0.999
    assert net16.control_layers[0].attention.qkv.weight.dtype == torch.float16  # the matmuls really ran in float16
    for k, h in want_hints[0].layers.items():
        assert torch.isfinite(got_hints[0].layers[k]).all() and cos(got_hints[0].layers[k], h) > 0.999
    for k, h in want_hints[0].refiner.items():
        assert torch.isfinite(got_hints[0].refiner[k]).all() and cos(got_hints[0].refiner[k], h) > 0.999
    assert bool(want_hints[0].refiner) == (which == "v2")


@pytest.fixture(scope="module")
def big_pipes(model, files):
    return {d: pipeline(model, files["dit_big"], d) for d in ("fp32", "fp16")}


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_fp16_controlnet_image_matches_fp32_on_weights_that_overflow(files, big_pipes, which):
    spec = ControlSpec(files[which + "_big"], files["canny"], strength=0.8)
    full = big_pipes["fp32"].generate(opts(spec), progress=False)[0]
    half = big_pipes["fp16"].generate(opts(spec), progress=False)[0]
    plain = big_pipes["fp32"].generate(opts(), progress=False)[0]
    assert cos(pixels(half), pixels(full)) > 0.99
    assert np.abs(pixels(full) - pixels(plain)).max() > 0.05  # the control changed the image


# ---------------------------------------------------------------------------------------------- quantization
@pytest.fixture(scope="module")
def full_image(model, files):
    spec = ControlSpec(files["v2"], files["canny"], strength=0.8)
    return pixels(pipeline(model).generate(opts(spec), progress=False)[0])


def test_gguf_dit_with_controlnet_is_close_to_full_precision(model, files, full_image, tmp_path):
    from zimage_core.quant import GGUFLinear
    from zimage_core.quant.gguf_write import save_gguf

    state = load_dit(model.transformer, dtype="fp32").state_dict()
    path = save_gguf(state, tmp_path / "z_image_turbo-Q8_0.gguf", "Q8_0")
    pipe = pipeline(model, path)
    spec = ControlSpec(files["v2"], files["canny"], strength=0.8)
    got = pixels(pipe.generate(opts(spec), progress=False)[0])
    assert isinstance(pipe.dit.layers[0].attention.qkv, GGUFLinear)
    assert cos(got, full_image) >= 0.99 and not np.array_equal(got, full_image)


@pytest.mark.parametrize("quant, bound", [("nf4", 0.95), ("fp8", 0.99)])
def test_quantized_dit_and_controlnet_are_close_to_full_precision(model, files, full_image, quant, bound):
    from zimage_core.quant import QuantLinear

    pipe = pipeline(model, quant=quant)
    spec = ControlSpec(files["v2"], files["canny"], strength=0.8)
    got = pixels(pipe.generate(opts(spec), progress=False)[0])
    (net,) = pipe.load_controlnets([spec])
    assert isinstance(net.control_layers[0].feed_forward.w1, QuantLinear)
    assert isinstance(net.control_noise_refiner[0].attention.qkv, QuantLinear)
    assert cos(got, full_image) >= bound and not np.array_equal(got, full_image)


@pytest.mark.parametrize("quant, bound", [("nf4", 0.95), ("fp8", 0.99), ("int8", 0.99)])
def test_quantized_controlnet_hints_close_to_full_precision(model, files, quant, bound):
    """``load_controlnet(quant=...)`` alone (full-precision DiT): the hints it adds stay close."""
    cfg = model.dit_config
    dit = load_dit(model.transformer, dtype="fp32")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, H // 8, W // 8, generator=g)
    ctx = torch.randn(1, 33, H // 8, W // 8, generator=g)
    plan = dit.prepare([torch.randn(9, cfg.cap_feat_dim, generator=g)], H // 8, W // 8)
    t = torch.tensor([0.6])
    with torch.no_grad():
        _, (want,) = denoise_with_hints(dit, x, t, plan, [ControlInput(load_controlnet(files["v2"], cfg), ctx)])
        _, (got,) = denoise_with_hints(
            dit, x, t, plan, [ControlInput(load_controlnet(files["v2"], cfg, quant=quant), ctx)]
        )
    for k in want.layers:
        assert cos(got.layers[k], want.layers[k]) >= bound
    for k in want.refiner:
        assert cos(got.refiner[k], want.refiner[k]) >= bound


# ---------------------------------------------------------------------------------------------- img2img / inpaint
@pytest.fixture(scope="module")
def pipe(model):
    return pipeline(model)


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_control_window_counts_the_steps_run_with_init_image(model, files, pipe, inpaint):
    """denoise 0.5 with 4 steps runs the last 4 steps of an 8-step schedule; a control with start 0.5 must apply
    at steps 2 and 3 of those 4 (hand-built: a plain model function for steps 0-1, the always-on control for 2-3).
    Counting the 8-step schedule instead would switch it on for all 4 steps."""
    from zimage_core.cli import _init_latents
    from zimage_core.denoiser import Denoiser
    from zimage_core.sampling import initial_noise, sample
    from zimage_core.schedules import img2img_sigmas

    o = opts(steps=4, denoise=0.5)
    init, mask = _init_latents(pipe, o, Image.open(files["photo"]), Image.open(files["mask"]) if inpaint else None)
    cond = pipe.encode_prompts([o.prompt])
    spec = ControlSpec(files["v2"], files["canny"], strength=0.9, start=0.5)
    (windowed,) = pipe.control_inputs([spec], W, H)
    always = ControlInput(windowed.net, windowed.context, windowed.strength)
    noise = initial_noise((1, 16, H // 8, W // 8), o.seed)
    with torch.inference_mode():
        got = pipe.sample(cond, None, noise, o, init, mask, controls=[windowed])
        sig = img2img_sigmas(4, o.shift, 0.5).contiguous()
        plain_fn = Denoiser(pipe.dit, cond, None, (H // 8, W // 8), sigmas=sig)
        ctl_fn = Denoiser(pipe.dit, cond, None, (H // 8, W // 8), sigmas=sig, controls=[always])
        steps = []

        def by_hand(x, sigma):
            i = min(range(4), key=lambda k: abs(float(sig[k]) - float(sigma.reshape(-1)[0])))
            steps.append(i)
            return (ctl_fn if i >= 2 else plain_fn)(x, sigma)

        want = sample(by_hand, noise, sig, "euler", init=init, mask=mask)
        every = sample(ctl_fn, noise, sig, "euler", init=init, mask=mask)
    assert steps == [0, 1, 2, 3]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got - every).abs().max() > 1e-3  # the window did switch the control off for the first two steps
    if inpaint:  # the kept region stays the init image's latents
        keep = mask < 0.5
        assert torch.allclose(got[keep.expand_as(got)], init.expand_as(got)[keep.expand_as(got)], atol=1e-5)


def test_cli_controlnet_with_init_image_and_mask_equals_library(model, files, pipe, tmp_path):
    """``--init-image --mask --denoise`` with ``--controlnet``: the CLI's image is the library's."""
    from zimage_core.cli import _init_latents, main

    out = tmp_path / "out.png"
    m = ["--transformer", str(model.transformer), "--text-encoder", str(model.text_encoder), "--vae", str(model.vae)]
    rc = main(
        ["generate", *m, "--tokenizer", str(model.tokenizer), "--prompt", "a house by a lake", "--width", str(W), "--height",
         str(H), "--steps", "4", "--seed", "11", "--device", "cpu", "--dtype", "fp32", "--out", str(out),
         "--init-image", str(files["photo"]), "--denoise", "0.5", "--mask", str(files["mask"]),
         "--controlnet", str(files["v2"]), "--control-image", str(files["canny"]), "--control-strength", "0.9",
         "--control-start", "0.5"]
    )  # fmt: skip
    assert rc == 0
    o = opts(ControlSpec(files["v2"], files["canny"], strength=0.9, start=0.5), steps=4, denoise=0.5)
    init, mask = _init_latents(pipe, o, Image.open(files["photo"]), Image.open(files["mask"]))
    want = pipe.generate(o, progress=False, init_latents=init, mask=mask)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
