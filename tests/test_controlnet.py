"""Z-Image Fun ControlNet: exactness against diffusers 0.42.1 on random weights, and every published file layout.

For 2.x files the reference is diffusers with its one known departure from VideoX-Fun undone in the test: the
refiner hints (times the strength), which diffusers adds only inside the ControlNet's own pass over the base
noise refiner, are also added inside the base transformer's noise-refiner layers (forward hooks).
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.factories.controlnet import EXPECTED_REFINER, VARIANTS, base_config, make_controlnet, save_controlnet
from tests.factories.dit import diffusers_to_native_state, make_diffusers_dit
from zimage_core.config import ControlNetConfig, spread_places
from zimage_core.controlnet import ControlInput, active_controls, denoise_with_hints, load_controlnet
from zimage_core.controlnet_layouts import ControlNetCheckpoint
from zimage_core.dit import ZImageDiT
from zimage_core.errors import CheckpointError, ZImageError

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def base():
    cfg = base_config()
    ref = make_diffusers_dit(cfg, seed=0)
    dit = ZImageDiT(cfg)
    dit.load_state_dict(diffusers_to_native_state(ref))
    return cfg, ref, dit.eval()


@pytest.fixture(scope="module")
def nets(base, tmp_path_factory):
    """variant -> (diffusers reference, our loaded ControlNet), from files in the published (split) layout."""
    cfg = base[0]
    folder = tmp_path_factory.mktemp("controlnets")
    out = {}
    for i, variant in enumerate(("1.0", "2.0", "2.1", "lite")):
        tiny = make_controlnet(variant, cfg, seed=10 + i)
        out[variant] = (tiny.reference, load_controlnet(save_controlnet(tiny, folder / f"{variant}.safetensors"), cfg))
    tiny = make_controlnet("1.0", cfg, seed=20)
    out["1.0b"] = (tiny.reference, load_controlnet(save_controlnet(tiny, folder / "1.0b.safetensors"), cfg))
    return out


def reference_step(ref, nets, x, t, caps):
    """diffusers ZImageControlNetModel(s) + ZImageTransformer2DModel with the refiner hints applied in the base.

    ``nets``: ``[(ZImageControlNetModel, control latents, strength)]``, at most one of them 2.x. A 1.0 net's own
    pass also sees the 2.x refiner hints, as the base model's hidden states do (they compose that way here).
    Returns the output, each net's main hints and each net's refiner hints.
    """
    from diffusers import ZImageControlNetModel

    assert sum(cn.add_control_noise_refiner is not None for cn, _, _ in nets) <= 1
    b = x.shape[0]
    xs = list(x.unsqueeze(2).unbind(0))
    refiner_total: dict[int, torch.Tensor] = {}
    on = {"add": False}

    def add_refiner(i):
        def hook(module, inputs, output):
            if on["add"] and i in refiner_total:
                return output + refiner_total[i]
            return None

        return hook

    handles = [blk.register_forward_hook(add_refiner(i)) for i, blk in enumerate(ref.noise_refiner)]
    samples, refiners = [None] * len(nets), [{} for _ in nets]
    try:
        order = sorted(range(len(nets)), key=lambda j: nets[j][0].add_control_noise_refiner is None)
        for j in order:
            cn, ctx, strength = nets[j]
            cn = ZImageControlNetModel.from_transformer(cn, ref)
            mode = cn.add_control_noise_refiner
            got = {}

            def grab(module, inputs, output, got=got):
                got.setdefault("stack", output)  # the first call is the refiner stage

            hook = None
            if mode is not None:
                src = cn.control_noise_refiner[-1] if mode == "control_noise_refiner" else cn.control_layers[-1]
                hook = src.register_forward_hook(grab)
            ctxs = list(ctx.expand(b, -1, -1, -1).unsqueeze(2).unbind(0))
            on["add"] = mode is None
            with torch.no_grad():
                samples[j] = cn(xs, t, caps, ctxs, conditioning_scale=strength)
            on["add"] = False
            if hook is not None:
                hook.remove()
                stack = torch.unbind(got["stack"])[:-1]
                refiners[j] = {i: stack[i] * strength for i in range(len(ref.noise_refiner))}
                for i, v in refiners[j].items():
                    refiner_total[i] = refiner_total.get(i, 0) + v
        total: dict[int, torch.Tensor] = {}
        for s in samples:
            for k, v in s.items():
                total[k] = total[k] + v if k in total else v
        on["add"] = True
        with torch.no_grad():
            out = ref(xs, t, caps, controlnet_block_samples=total, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return torch.stack(out).squeeze(2), samples, refiners


def inputs(cfg, in_channels: int, seed: int = 1, batch: int = 2, size=(10, 6), lens=(5, 40)):
    """Latents whose 15 image tokens need padding, captions of different padded lengths (a masked batch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    t = torch.rand(batch, generator=g)
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in lens]
    ctx = torch.randn(1, in_channels, *size, generator=g)
    return x, t, caps, ctx


def real_rows(plan, i: int) -> int:
    return plan.n_img_pad + plan.captions.padded_lens[i]


@pytest.mark.parametrize("variant", ["1.0", "2.0", "2.1", "lite"])
def test_hints_and_output_match_diffusers(base, nets, variant):
    cfg, ref, dit = base
    ref_cn, net = nets[variant]
    x, t, caps, ctx = inputs(cfg, net.cfg.in_channels)
    with torch.no_grad():
        plan = dit.prepare(caps, *x.shape[-2:])
        got, (hints,) = denoise_with_hints(dit, x, t, plan, [ControlInput(net, ctx, strength=0.75)])
    want, (samples,), (refiner,) = reference_step(ref, [(ref_cn, ctx, 0.75)], x, t, caps)
    assert sorted(hints.layers) == sorted(samples) == list(net.cfg.control_places)
    for k, v in samples.items():  # rows past a sample's length are padding (never attended to, dropped)
        for i in range(x.shape[0]):
            n = real_rows(plan, i)
            assert rel_err(hints.layers[k][i, :n], v[i, :n]) <= TOL, (k, i)
    assert sorted(hints.refiner) == sorted(refiner) == list(net.cfg.refiner_places)
    for k, v in refiner.items():
        assert rel_err(hints.refiner[k], v) <= TOL
    assert rel_err(got, want) <= TOL
    with torch.no_grad():
        plain = dit.denoise(x, t, plan)
    assert rel_err(got, plain) > 1e-2  # the control really acts


def test_diffusers_difference_is_real(base, nets):
    """Undoing the documented difference matters: plain diffusers gives another output for a 2.1 file."""
    cfg, ref, dit = base
    ref_cn, net = nets["2.1"]
    x, t, caps, ctx = inputs(cfg, 33, seed=3)
    from diffusers import ZImageControlNetModel

    cn = ZImageControlNetModel.from_transformer(ref_cn, ref)
    xs = list(x.unsqueeze(2).unbind(0))
    with torch.no_grad():
        samples = cn(xs, t, caps, list(ctx.expand(2, -1, -1, -1).unsqueeze(2).unbind(0)), conditioning_scale=0.75)
        plain_diffusers = torch.stack(ref(xs, t, caps, controlnet_block_samples=samples, return_dict=False)[0])
        ours = dit.denoise(x, t, dit.prepare(caps, *x.shape[-2:]), control=[ControlInput(net, ctx, 0.75)])
    assert rel_err(ours, plain_diffusers.squeeze(2)) > 1e-3


def test_several_controlnets_sum(base, nets):
    cfg, ref, dit = base
    (r1, n1), (r2, n2), (r3, n3) = nets["1.0"], nets["1.0b"], nets["2.1"]
    x, t, caps, c1 = inputs(cfg, 16, seed=4)
    g = torch.Generator().manual_seed(5)
    c2, c3 = torch.randn(c1.shape, generator=g), torch.randn(1, 33, *c1.shape[-2:], generator=g)
    controls = [ControlInput(n1, c1, 0.6), ControlInput(n2, c2, 0.9), ControlInput(n3, c3, 0.5)]
    with torch.no_grad():
        got = dit.denoise(x, t, dit.prepare(caps, *x.shape[-2:]), control=controls)
    want, _, _ = reference_step(ref, [(r1, c1, 0.6), (r2, c2, 0.9), (r3, c3, 0.5)], x, t, caps)
    assert rel_err(got, want) <= TOL


def test_plain_path_unchanged(base, nets):
    """No control, an empty list and a strength-0 control all give the plain step, bit for bit."""
    cfg, _, dit = base
    x, t, caps, ctx = inputs(cfg, 33, seed=6)
    with torch.no_grad():
        plan = dit.prepare(caps, *x.shape[-2:])
        plain = dit.denoise(x, t, plan)
        assert torch.equal(dit.denoise(x, t, plan, control=None), plain)
        assert torch.equal(dit.denoise(x, t, plan, control=[]), plain)
        assert torch.equal(dit.denoise(x, t, plan, control=[ControlInput(nets["2.1"][1], ctx, 0.0)]), plain)
        assert torch.equal(dit(x, t, caps), plain)


def test_active_steps_follow_start_and_end(nets):
    net = nets["1.0"][1]
    ctx = torch.zeros(1, 16, 4, 4)
    full, part = ControlInput(net, ctx, 0.7), ControlInput(net, ctx, 0.7, start=0.25, end=0.5)
    assert [full.active(i, 8) for i in range(8)] == [True] * 8
    assert [part.active(i, 8) for i in range(8)] == [False, False, True, True, False, False, False, False]
    assert not ControlInput(net, ctx, 0.0).active(0, 8)
    assert active_controls([full, part], 0, 8) == [full]
    with pytest.raises(ZImageError, match="start"):
        ControlInput(net, ctx, 1.0, start=0.6, end=0.2)


def test_control_input_is_checked(base, nets):
    cfg, _, dit = base
    net2 = nets["2.1"][1]
    with pytest.raises(ZImageError, match="33-channel control latents.*ControlNet.context"):
        ControlInput(net2, torch.zeros(1, 16, 10, 6))
    ctx = net2.context(torch.ones(1, 16, 10, 6), keep_mask=torch.ones(1, 1, 10, 6))
    assert ctx.shape == (1, 33, 10, 6) and ctx[:, 16].eq(1).all() and ctx[:, 17:].eq(0).all()
    x, t, caps, _ = inputs(cfg, 33)
    bad = ControlInput(net2, torch.zeros(1, 33, 8, 8))
    with torch.no_grad(), pytest.raises(ZImageError, match="resize the control image"):
        dit.denoise(x, t, dit.prepare(caps, *x.shape[-2:]), control=[bad])


# ---------------------------------------------------------------------------------------------
# End to end: one step of diffusers' ZImageControlNetPipeline
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,guidance", [("1.0", 0.0), ("2.1", 2.0)])
def test_pipeline_step_matches_diffusers(base, nets, tmp_path, variant, guidance):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetPipeline

    from tests.factories.vae import make_diffusers_vae, save_bfl_vae
    from zimage_core.config import VAEConfig
    from zimage_core.vae import load_vae

    cfg, ref, dit = base
    ref_cn, net = nets[variant]
    dvae = make_diffusers_vae(VAEConfig.tiny(), seed=7)
    vae = load_vae(save_bfl_vae(dvae, tmp_path / "ae.safetensors"))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImageControlNetPipeline(
        scheduler=sched, vae=dvae, text_encoder=None, tokenizer=None, transformer=ref, controlnet=ref_cn
    )
    g = torch.Generator().manual_seed(8)
    image = torch.rand(1, 3, 64, 96, generator=g) * 2 - 1
    latents = torch.randn(1, cfg.in_channels, 8, 12, generator=g)
    pos, neg = torch.randn(9, cfg.cap_feat_dim, generator=g), torch.randn(37, cfg.cap_feat_dim, generator=g)
    hooks = []
    if net.cfg.refiner != "plain":  # the documented difference, applied to diffusers' base transformer
        got = {}
        hooks.append(ref_cn.control_noise_refiner[-1].register_forward_hook(lambda m, i, o: got.update(stack=o)))
        state = {"in_transformer": False}
        hooks.append(ref.register_forward_pre_hook(lambda m, a: state.update(in_transformer=True)))
        hooks.append(ref.register_forward_hook(lambda m, a, o: state.update(in_transformer=False)))

        def add(i):
            def hook(m, a, o):
                if state["in_transformer"]:
                    return o + torch.unbind(got["stack"])[i] * 0.7
                return None

            return hook

        hooks += [blk.register_forward_hook(add(i)) for i, blk in enumerate(ref.noise_refiner)]
    try:
        out = pipe(
            prompt_embeds=[pos],
            negative_prompt_embeds=[neg],
            height=64,
            width=96,
            sigmas=[0.6],
            guidance_scale=guidance,
            control_image=image,
            controlnet_conditioning_scale=0.7,
            latents=latents.clone(),
            output_type="latent",
        ).images
    finally:
        for h in hooks:
            h.remove()
    sigma0, sigma1 = pipe.scheduler.sigmas[0], pipe.scheduler.sigmas[1]
    t = ((1000 - pipe.scheduler.timesteps[0]) / 1000).expand(2 if guidance > 0 else 1)
    with torch.no_grad():
        ctx = net.context(vae.encode(image))  # 2.x: zero mask and inpaint channels, as this pipeline
        caps = [pos, neg] if guidance > 0 else [pos]
        x = latents.expand(len(caps), -1, -1, -1)
        raw = dit.denoise(x, t, dit.prepare(caps, 8, 12), control=[ControlInput(net, ctx, 0.7)])
    pred = raw[:1] + guidance * (raw[:1] - raw[1:]) if guidance > 0 else raw
    want = latents + (sigma1 - sigma0) * (-pred)
    assert rel_err(want, out) <= TOL


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [False, True])
def test_published_layouts_are_detected(base, tmp_path, variant, fused):
    cfg = base[0]
    n, in_ch, mode, _ = VARIANTS[variant]
    tiny = make_controlnet(variant, cfg, seed=30)
    path = save_controlnet(tiny, tmp_path / "cn.safetensors", fused=fused)
    ckpt = ControlNetCheckpoint(path, cfg)
    c = ckpt.config
    assert (c.n_control_layers, c.in_channels, c.refiner) == (n, in_ch, EXPECTED_REFINER[mode])
    assert c.control_places == spread_places(n, 30)
    assert c.refiner_places == (() if mode is None else (0, 1))
    assert ckpt.layout == ("comfyui" if fused else "diffusers")
    names = {"1.0": "Union 1.0", "2.0": "Union 2.0", "lite": "Union/Tile 2.1 lite"}
    assert ckpt.variant == names.get(variant, "Union/Tile 2.1")
    presets = {
        "1.0": ControlNetConfig.union_1_0,
        "2.0": ControlNetConfig.union_2_0,
        "lite": ControlNetConfig.union_2_1_lite,
    }
    assert c == presets.get(variant, ControlNetConfig.union_2_1)(cfg)


@pytest.mark.parametrize("variant", ["1.0", "2.0", "2.1"])
def test_diffusers_folders_load_like_the_files(base, tmp_path, variant, caplog):
    from tests.factories.controlnet import save_diffusers_controlnet

    cfg = base[0]
    tiny = make_controlnet(variant, cfg, seed=32)
    folder = save_diffusers_controlnet(tiny, tmp_path / "folder")
    with caplog.at_level(logging.WARNING, logger="zimage_core"):
        a = load_controlnet(folder, cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    b = load_controlnet(save_controlnet(tiny, tmp_path / "file.safetensors"), cfg)
    assert a.cfg == b.cfg and a.cfg.refiner == EXPECTED_REFINER[VARIANTS[variant][2]]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ["no control noise refiner" in w for w in warned] == ([True] if variant == "2.0" else [])


def test_split_fused_and_prefixed_files_load_the_same(base, tmp_path):
    cfg = base[0]
    tiny = make_controlnet("2.1", cfg, seed=31)
    a = load_controlnet(save_controlnet(tiny, tmp_path / "a.safetensors"), cfg).state_dict()
    b = load_controlnet(save_controlnet(tiny, tmp_path / "b.safetensors", fused=True), cfg).state_dict()
    p = save_controlnet(tiny, tmp_path / "c.safetensors", prefix="model.diffusion_model.")
    c = load_controlnet(p, cfg).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_zero_refiner_2_0_is_named_in_a_warning(base, tmp_path, caplog):
    cfg = base[0]
    p20 = save_controlnet(make_controlnet("2.0", cfg), tmp_path / "Z-Image-Turbo-Fun-Controlnet-Union-2.0.safetensors")
    p21 = save_controlnet(make_controlnet("2.1", cfg), tmp_path / "union-2.1.safetensors")
    with caplog.at_level(logging.WARNING, logger="zimage_core"):
        net = load_controlnet(p21, cfg)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        net = load_controlnet(p20, cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "Z-Image-Turbo-Fun-Controlnet-Union-2.0.safetensors" in warned[0]
    assert "2.0" in warned[0] and "all zero" in warned[0]
    assert net.cfg.refiner == "control_layers" and not hasattr(net, "control_noise_refiner")


def test_wrong_files_are_refused(base, tmp_path):
    from tests.factories.dit import save_comfy_dit
    from tests.factories.vae import make_diffusers_vae, save_bfl_vae
    from zimage_core.config import VAEConfig
    from zimage_core.weights import save_safetensors

    cfg, ref, _ = base
    with pytest.raises(CheckpointError, match=r"diffusion model \(DiT\), not its ControlNet"):
        load_controlnet(save_comfy_dit(ref, tmp_path / "dit.safetensors", cfg=cfg), cfg)
    with pytest.raises(CheckpointError, match="holds a VAE"):
        load_controlnet(save_bfl_vae(make_diffusers_vae(VAEConfig.tiny(), 1), tmp_path / "ae.safetensors"), cfg)
    tiny = make_controlnet("lite", cfg)
    extra = dict(tiny.state, **{"control_layers.0.lora_A.weight": torch.zeros(2, 2)})
    save_safetensors(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="lora_A.*not part of"):
        load_controlnet(tmp_path / "extra.safetensors", cfg)
    holed = {k: v for k, v in tiny.state.items() if not k.startswith("control_layers.1.")}
    save_safetensors(holed, tmp_path / "holed.safetensors")
    with pytest.raises(CheckpointError, match=r"control_layers \[1\] are missing"):
        load_controlnet(tmp_path / "holed.safetensors", cfg)
    short = {k: v for k, v in tiny.state.items() if k != "control_layers.2.after_proj.bias"}
    save_safetensors(short, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match="Missing: control_layers.2.after_proj.bias"):
        load_controlnet(tmp_path / "short.safetensors", cfg)
    path = save_controlnet(tiny, tmp_path / "cn.safetensors")
    with pytest.raises(CheckpointError, match="does not fit this diffusion model: dim 64 \\(DiT: 3840\\)"):
        load_controlnet(path)  # made for a tiny DiT, loaded for Z-Image's
    net = load_controlnet(path, cfg)
    with pytest.raises(ZImageError, match="refiner places"):
        net.check_base(cfg.replace(n_refiner_layers=1))


def test_load_dtype_and_quantization(base, nets, tmp_path):
    cfg, _, dit = base
    path = save_controlnet(make_controlnet("lite", cfg, seed=12), tmp_path / "lite.safetensors", dtype=torch.bfloat16)
    low = load_controlnet(path, cfg, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in low.parameters())
    full = load_controlnet(path, cfg, dtype="fp32")
    q = load_controlnet(path, cfg, dtype="fp32", quant="int8")
    assert type(q.control_layers[0].attention.qkv).__name__ != "Linear"
    x, t, caps, ctx = inputs(cfg, 33, seed=9)
    with torch.no_grad():
        plan = dit.prepare(caps, *x.shape[-2:])
        plain = dit.denoise(x, t, plan)
        a = dit.denoise(x, t, plan, control=[ControlInput(full, ctx, 1.0)])
        b = dit.denoise(x, t, plan, control=[ControlInput(q, ctx, 1.0)])
    assert rel_err(b - plain, a - plain) < 0.05


def test_comfy_fp8_file_stays_fp8(base, tmp_path):
    """A ControlNet stored as ComfyUI fp8 (weights e4m3 + ``weight_scale``, split q/k/v) keeps fp8 block matrices
    and equals the same file dequantized."""
    from zimage_core.quant.linear import FP8Linear

    cfg, _, dit = base
    tiny = make_controlnet("2.1", cfg, seed=13)
    fp8, deq = {}, {}
    for k, v in tiny.state.items():
        if v.ndim == 2 and k.startswith("control_"):
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            fp8[k], fp8[k[: -len(".weight")] + ".weight_scale"] = q, scale.float()
            deq[k] = q.float() * scale
        else:
            fp8[k] = deq[k] = v
    from zimage_core.weights import save_safetensors

    save_safetensors(fp8, tmp_path / "fp8.safetensors")
    save_safetensors(deq, tmp_path / "deq.safetensors")
    q = load_controlnet(tmp_path / "fp8.safetensors", cfg)
    d = load_controlnet(tmp_path / "deq.safetensors", cfg)
    assert isinstance(q.control_layers[0].attention.qkv, FP8Linear)
    assert isinstance(q.control_noise_refiner[1].feed_forward.w2, FP8Linear)
    assert isinstance(q.control_layers[0].after_proj, torch.nn.Linear)  # small layers are dequantized
    x, t, caps, ctx = inputs(cfg, 33, seed=14)
    with torch.no_grad():
        plan = dit.prepare(caps, *x.shape[-2:])
        a = dit.denoise(x, t, plan, control=[ControlInput(q, ctx, 0.8)])
        b = dit.denoise(x, t, plan, control=[ControlInput(d, ctx, 0.8)])
    assert rel_err(a, b) < 1e-3
