"""Tests for zimage_core.schedules and zimage_core.sampling (CPU only)."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from zimage_core.errors import Cancelled, ZImageError
from zimage_core.sampling import (
    SAMPLERS,
    cfg_active,
    cfg_combine,
    get_sampler,
    inpaint_blend,
    inpaint_model_fn,
    noise_latent,
    perturb_initial,
    prepare_mask,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_res_multistep,
)
from zimage_core.schedules import comfy_simple_sigmas, flow_sigmas, img2img_sigmas, model_t


def fake_v(x, sigma):
    """A deterministic nonlinear stand-in for the DiT velocity."""
    s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(1.3 * x) * (0.5 + s) - 0.7 * x + 0.1 * torch.sin(3.0 * x) * s


def diffusers_scheduler(steps, shift):
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    sch.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
    return sch


def latents(seed=0, shape=(2, 16, 6, 5), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("shift", [3.0, 6.0])
@pytest.mark.parametrize("steps", [1, 4, 8, 9, 28, 50])
def test_flow_sigmas_bit_identical_to_diffusers(steps, shift):
    sch = diffusers_scheduler(steps, shift)
    sig = flow_sigmas(steps, shift)
    assert sig.dtype == torch.float32 and sig.shape == (steps + 1,) and sig[-1] == 0
    assert torch.equal(sig, sch.sigmas)
    assert torch.equal(model_t(sig[:-1]), (1000 - sch.timesteps) / 1000)


def test_turbo_schedule_values():
    expected = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
    assert torch.allclose(flow_sigmas(8, 3.0), torch.tensor(expected), atol=5e-5, rtol=0)
    assert torch.allclose(model_t(flow_sigmas(8, 3.0)), 1 - torch.tensor(expected), atol=5e-5, rtol=0)
    assert model_t(1.0).item() == 0.0


def comfy_simple_reference(steps, shift):
    # ModelSamplingAuraFlow: sigma(t) = time_snr_shift(shift, t) for t = k/1000; "simple" picks every
    # 1000/steps-th sigma from the top, then appends 0.
    out = []
    for i in range(steps):
        k = 1000 - int(i * (1000 / steps))
        t = k / 1000
        out.append(shift * t / (1 + (shift - 1) * t))
    return torch.tensor(out + [0.0], dtype=torch.float64)


@pytest.mark.parametrize("steps,shift", [(8, 3.0), (9, 3.0), (28, 6.0), (50, 3.0), (7, 1.0)])
def test_comfy_simple_sigmas(steps, shift):
    sig = comfy_simple_sigmas(steps, shift)
    assert sig.dtype == torch.float32 and sig.shape == (steps + 1,)
    assert torch.allclose(sig.double(), comfy_simple_reference(steps, shift), atol=1e-6, rtol=0)


def test_comfy_simple_equals_flow_for_turbo():
    assert torch.allclose(comfy_simple_sigmas(8, 3.0), flow_sigmas(8, 3.0), atol=1e-6, rtol=0)


def test_denoise_semantics_match_comfy_ksampler():
    # KSampler.set_steps: int(steps / denoise) total steps, keep the last steps + 1.
    assert torch.equal(comfy_simple_sigmas(4, 3.0, denoise=0.5), comfy_simple_sigmas(8, 3.0)[-5:])
    assert torch.equal(comfy_simple_sigmas(10, 3.0, denoise=0.3), comfy_simple_sigmas(33, 3.0)[-11:])
    assert torch.equal(comfy_simple_sigmas(8, 3.0, denoise=0.99995), comfy_simple_sigmas(8, 3.0))
    assert comfy_simple_sigmas(8, 3.0, denoise=0.0).numel() == 0
    assert torch.equal(img2img_sigmas(4, 3.0, 0.5), flow_sigmas(8, 3.0)[-5:])
    assert torch.equal(img2img_sigmas(4, 3.0, 0.5, schedule="simple"), comfy_simple_sigmas(4, 3.0, 0.5))
    assert torch.equal(img2img_sigmas(6, 3.0, 1.0), flow_sigmas(6, 3.0))
    assert img2img_sigmas(4, 3.0, 0.5)[0].item() == pytest.approx(0.75)
    assert img2img_sigmas(6, 3.0, 0.7).shape == (7,)
    with pytest.raises(ZImageError, match="flow"):
        img2img_sigmas(4, 3.0, 0.5, schedule="karras")
    with pytest.raises(ZImageError):
        flow_sigmas(0)


# --------------------------------------------------------------------------------------------- euler


@pytest.mark.parametrize("steps,shift", [(8, 3.0), (9, 3.0), (28, 6.0)])
def test_euler_bit_identical_to_diffusers_step(steps, shift):
    sch = diffusers_scheduler(steps, shift)
    sch.set_begin_index(0)
    x = latents(steps)
    ref = x.clone()
    for i, t in enumerate(sch.timesteps):
        v = fake_v(ref, sch.sigmas[i].expand(ref.shape[0]))
        ref = sch.step(v.to(torch.float32), t, ref, return_dict=False)[0]
    out = sample_euler(fake_v, x.clone(), flow_sigmas(steps, shift))
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------------------------- 2nd-order samplers
# float64 reference loops written from the ComfyUI / k-diffusion formulas in sigma-ratio form.


def ref_res_multistep(model, x, sig):
    old = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = x - s * model(x, torch.full((x.shape[0],), s))
        if old is None or sn == 0:
            x = x + (x - den) / s * (sn - s)
        else:
            h = math.log(s / sn)  # t_next - t with t = -log(sigma)
            c2 = -math.log(sig[i - 1] / s) / h  # (t_prev - t) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            x = (sn / s) * x + h * ((phi1 - phi2 / c2) * den + (phi2 / c2) * old)
        old = den
    return x


def ref_heun(model, x, sig):
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        d = model(x, torch.full((x.shape[0],), s))
        if sn == 0:
            x = x + (sn - s) * d
        else:
            x2 = x + (sn - s) * d
            d2 = model(x2, torch.full((x.shape[0],), sn))
            x = x + (sn - s) * (d + d2) / 2
    return x


def ref_dpmpp_2m(model, x, sig):
    old = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        den = x - s * model(x, torch.full((x.shape[0],), s))
        if old is None or sn == 0:
            x = (sn / s) * x + (1 - sn / s) * den
        else:
            r = math.log(sig[i - 1] / s) / math.log(s / sn)
            x = (sn / s) * x + (1 - sn / s) * ((1 + 1 / (2 * r)) * den - old / (2 * r))
        old = den
    return x


REFS = {"res_multistep": ref_res_multistep, "heun": ref_heun, "dpmpp_2m": ref_dpmpp_2m}


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("steps,shift", [(8, 3.0), (9, 6.0), (20, 3.0), (2, 3.0)])
def test_second_order_samplers_match_reference(name, steps, shift):
    sig = flow_sigmas(steps, shift)
    x = latents(1, dtype=torch.float64)
    ref = REFS[name](fake_v, x.clone(), [float(s) for s in sig])
    out64 = SAMPLERS[name](fake_v, x.clone(), sig)
    assert out64.dtype == torch.float64
    assert (out64 - ref).abs().max().item() < 1e-6
    out32 = SAMPLERS[name](fake_v, x.float(), sig)
    assert out32.dtype == torch.float32
    assert (out32.double() - ref).abs().max().item() < 1e-5


def test_last_step_of_dpmpp_2m_is_denoised_exactly():
    sig = flow_sigmas(4, 3.0)
    seen = []
    out = sample_dpmpp_2m(fake_v, latents(2), sig, callback=lambda i, n, x, d: seen.append(d))
    assert torch.equal(out, seen[-1])


def test_first_step_is_euler():
    sig = flow_sigmas(8, 3.0)[:2]
    x = latents(3)
    ref = x + (x - (x - fake_v(x, sig[:1].expand(2)) * sig[0])) / sig[0] * (sig[1] - sig[0])
    assert torch.equal(sample_res_multistep(fake_v, x.clone(), sig), ref)


def gaussian_problem(seed=0):
    """x0 ~ N(mu, sd^2) per element: exact velocity field and exact ODE end point mu + sd * z."""
    g = torch.Generator("cpu").manual_seed(seed)
    mu = torch.randn((1, 4, 6, 6), generator=g, dtype=torch.float64) * 0.5
    sd = torch.rand((1, 4, 6, 6), generator=g, dtype=torch.float64) * 0.7 + 0.3
    z = torch.randn((2, 4, 6, 6), generator=g, dtype=torch.float64)

    def v_exact(x, sigma):
        s = sigma.to(torch.float64).reshape(-1, 1, 1, 1)
        var = (1 - s) ** 2 * sd**2 + s**2
        return (s - (1 - s) * sd**2) / var * (x - (1 - s) * mu) - mu

    return v_exact, z, mu + sd * z


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_second_order_beats_euler_on_gaussian_flow(shift):
    v_exact, z, target = gaussian_problem()
    errors = {}
    for steps in (8, 16):
        sig = flow_sigmas(steps, shift)
        errors[steps] = {n: (fn(v_exact, z.clone(), sig) - target).abs().mean().item() for n, fn in SAMPLERS.items()}
    for steps, err in errors.items():
        for name in ("res_multistep", "heun", "dpmpp_2m"):
            assert err[name] < err["euler"], (steps, name, err)
    for name in SAMPLERS:
        assert errors[16][name] < errors[8][name]


# --------------------------------------------------------------------------------------------- registry, callback, cancel


def test_get_sampler():
    assert get_sampler("res_multistep") is sample_res_multistep
    assert get_sampler("heun") is sample_heun
    with pytest.raises(ZImageError) as exc:
        get_sampler("dpmpp_3m_sde")
    msg = str(exc.value)
    assert "dpmpp_3m_sde" in msg
    for name in ("euler", "res_multistep", "heun", "dpmpp_2m"):
        assert name in msg


@pytest.mark.parametrize("name", ["euler", "res_multistep", "heun", "dpmpp_2m"])
def test_callback_once_per_step(name):
    sig = flow_sigmas(6, 3.0)
    calls = []

    def cb(i, total, x, denoised):
        calls.append((i, total, x.shape, denoised.shape))

    out = SAMPLERS[name](fake_v, latents(4), sig, callback=cb)
    assert [c[0] for c in calls] == list(range(6))
    assert all(c[1] == 6 and c[2] == out.shape and c[3] == out.shape for c in calls)


@pytest.mark.parametrize("name", ["euler", "res_multistep", "heun", "dpmpp_2m"])
def test_cancel_within_one_step(name):
    sig = flow_sigmas(8, 3.0)
    model_calls = []
    stop = []

    def model(x, sigma):
        model_calls.append(float(sigma[0]))
        return fake_v(x, sigma)

    def cb(i, total, x, denoised):
        if i == 2:
            stop.append(True)

    with pytest.raises(Cancelled) as exc:
        SAMPLERS[name](model, latents(5), sig, callback=cb, cancel=lambda: bool(stop))
    assert isinstance(exc.value, ZImageError)
    per_step = 2 if name == "heun" else 1
    assert len(model_calls) == 3 * per_step


def test_sampler_accepts_list_sigmas_and_empty_schedule():
    x = latents(6)
    sig = flow_sigmas(4, 3.0)
    assert torch.equal(sample_euler(fake_v, x, sig.tolist()), sample_euler(fake_v, x, sig))
    assert sample_heun(fake_v, x, torch.zeros(0)) is x


# --------------------------------------------------------------------------------------------- CFG


def diffusers_cfg(pos_out, neg_out, guidance_scale, cfg_normalization):
    # The per-sample loop of diffusers ZImagePipeline, on [16, 1, h, w] outputs.
    preds = []
    for j in range(len(pos_out)):
        pos, neg = pos_out[j].float(), neg_out[j].float()
        pred = pos + guidance_scale * (pos - neg)
        if cfg_normalization and float(cfg_normalization) > 0.0:
            ori_pos_norm = torch.linalg.vector_norm(pos)
            new_pos_norm = torch.linalg.vector_norm(pred)
            max_new_norm = ori_pos_norm * float(cfg_normalization)
            if new_pos_norm > max_new_norm:
                pred = pred * (max_new_norm / new_pos_norm)
        preds.append(pred)
    return torch.stack(preds, dim=0).squeeze(2)


@pytest.mark.parametrize("cfg", [4.0, 2.5, 7.0])
@pytest.mark.parametrize("normalization", [0.0, 1.0, 1.5])
def test_cfg_combine_matches_diffusers(cfg, normalization):
    pos = latents(7, (3, 16, 1, 6, 5))
    neg = pos * 0.5 + 0.3 * latents(8, (3, 16, 1, 6, 5))
    neg[1] = pos[1] * 0.99  # a sample whose guided norm stays under the cap
    ref = diffusers_cfg(pos, neg, cfg - 1.0, normalization)
    out = cfg_combine(pos.squeeze(2), neg.squeeze(2), cfg, normalization)
    assert torch.equal(out, ref)


def test_cfg_one_is_off_and_normalization_caps_norm():
    pos, neg = latents(9), latents(10)
    assert cfg_combine(pos, neg, 1.0) is pos
    raw = cfg_combine(pos, neg, 5.0)
    capped = cfg_combine(pos, neg, 5.0, normalization=1.0)
    for j in range(pos.shape[0]):
        assert torch.linalg.vector_norm(raw[j]) > torch.linalg.vector_norm(pos[j])
        assert torch.linalg.vector_norm(capped[j]).item() == pytest.approx(torch.linalg.vector_norm(pos[j]).item())
        assert torch.allclose(capped[j] / capped[j].norm(), raw[j] / raw[j].norm(), atol=1e-6)
    assert torch.equal(cfg_combine(pos, neg, 5.0, normalization=True), capped)


def test_cfg_active_and_truncation():
    sig = flow_sigmas(8, 3.0).tolist()[:-1]
    assert not any(cfg_active(1.0, s) for s in sig)
    assert all(cfg_active(4.0, s) for s in sig)
    assert all(cfg_active(4.0, s, truncation=None) for s in sig)
    active = [cfg_active(4.0, s, truncation=0.5) for s in sig]
    t_norm = ((1000 - torch.tensor(sig) * 1000) / 1000).tolist()  # diffusers' _precomputed_t_norms
    assert active == [t <= 0.5 for t in t_norm]
    assert active == [True] * 7 + [False]  # only sigma = 0.3 (t = 0.7) is truncated
    assert all(cfg_active(4.0, s, truncation=1.5) for s in sig)  # > 1 disables truncation, like diffusers


# --------------------------------------------------------------------------------------------- img2img / inpainting


def test_noise_latent_matches_diffusers_scale_noise():
    sch = diffusers_scheduler(8, 3.0)
    x0, noise = latents(11), latents(12)
    for i in (0, 3, 7):
        ref = sch.scale_noise(x0, sch.timesteps[i].repeat(2), noise)
        assert torch.equal(noise_latent(x0, noise, float(sch.sigmas[i])), ref)
        assert torch.equal(noise_latent(x0, noise, sch.sigmas[i].repeat(2)), ref)
    assert torch.equal(noise_latent(x0, noise, 1.0), noise)
    assert torch.equal(noise_latent(x0, noise, 0.0), x0)


def test_prepare_mask_like_comfy():
    pix = torch.zeros(2, 64, 48)
    pix[:, 12:37, 4:30] = 1.0  # edges between the bilinear sample points (8i + 3.5)
    m = prepare_mask(pix, 8, 6)
    assert m.shape == (2, 1, 8, 6) and m.dtype == torch.float32
    assert torch.equal(m, F.interpolate(pix[:, None], size=(8, 6), mode="bilinear", align_corners=False))
    assert ((m > 0) & (m < 1)).any()  # no thresholding
    assert prepare_mask(pix[0], 8, 6).shape == (1, 1, 8, 6)
    assert torch.equal(prepare_mask(pix[:1], 8, 6, batch_size=3), prepare_mask(pix[0], 8, 6).repeat(3, 1, 1, 1))
    assert prepare_mask(pix, 8, 6, batch_size=1).shape == (1, 1, 8, 6)
    with pytest.raises(ZImageError):
        prepare_mask(torch.zeros(2, 3, 8, 8), 4, 4)


def inpaint_reference(model, x0, noise, mask, sig):
    # Euler on denoised with ComfyUI KSamplerX0Inpaint semantics, in float64.
    x = noise_latent(x0, noise, sig[0])
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        x_in = x * mask + (s * noise + (1 - s) * x0) * (1 - mask)
        den = x_in - s * model(x_in, torch.full((x.shape[0],), s))
        den = den * mask + x0 * (1 - mask)
        x = x + (x - den) / s * (sn - s)
    return x


@pytest.mark.parametrize("name", ["euler", "res_multistep", "heun", "dpmpp_2m"])
def test_inpainting_keeps_unmasked_region(name):
    x0, noise = latents(13, dtype=torch.float64), latents(14, dtype=torch.float64)
    pix = torch.zeros(1, 48, 40)
    pix[:, :24, :] = 1.0
    mask = prepare_mask(pix, 6, 5).double()
    sig = img2img_sigmas(6, 3.0, 0.7)
    x = noise_latent(x0, noise, sig[0])
    out = SAMPLERS[name](inpaint_model_fn(fake_v, x0, noise, mask), x, sig)
    keep = (mask == 0).expand_as(out)
    assert (out[keep] - x0[keep]).abs().max() < 1e-6  # already ~x0 before the blend (ComfyUI semantics)
    final = inpaint_blend(out, x0, mask)
    assert torch.equal(final[keep], x0[keep])
    repaint = (mask == 1).expand_as(out)
    assert (final[repaint] - x0[repaint]).abs().mean() > 1e-2
    if name == "euler":
        ref = inpaint_reference(fake_v, x0, noise, mask, [float(s) for s in sig])
        assert (out - ref).abs().max() < 1e-6
    plain = SAMPLERS[name](fake_v, x, sig)  # with an all-ones mask the wrapper is a no-op
    full = SAMPLERS[name](inpaint_model_fn(fake_v, x0, noise, torch.ones_like(mask)), x, sig)
    assert (plain - full).abs().max() < 1e-6


# --------------------------------------------------------------------------------------------- seed variance


def test_perturb_initial():
    noise = torch.randn((2, 16, 64, 48), generator=torch.Generator("cpu").manual_seed(42))
    assert perturb_initial(noise, 42, 0.0) is noise
    a = perturb_initial(noise, 42, 0.5)
    b = perturb_initial(noise, 42, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, perturb_initial(noise, 43, 0.5))
    assert a.shape == noise.shape and a.dtype == noise.dtype
    assert abs(a.std().item() - 1.0) < 0.05
    assert torch.corrcoef(torch.stack([a.flatten(), noise.flatten()]))[0, 1] > 0.8
    # the added field is low-frequency: neighbouring pixels of the difference are strongly correlated
    diff = a * math.sqrt(1.25) - noise
    assert torch.corrcoef(torch.stack([diff[..., 1:].flatten(), diff[..., :-1].flatten()]))[0, 1] > 0.8
