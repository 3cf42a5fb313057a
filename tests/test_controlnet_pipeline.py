"""ControlNet through the library, the CLI and the memory modes: seed parity with diffusers' ZImageControlNetPipeline
(1.0 file, a few steps, CFG included), the inpaint control input as diffusers' ZImageControlNetInpaintPipeline builds
it, block-swap/sequential equal to full with the ControlNet's blocks streaming, the plan counting its bytes,
several ControlNets and start/end windows, and the CLI flags (pairing rule, errors before any model loads).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.factories.controlnet import make_controlnet, save_controlnet
from tests.factories.pipeline import build_tiny_model
from tests.test_generate import assert_same_image, rel_err
from zimage_core.cli import main
from zimage_core.config import DiTConfig
from zimage_core.controlnet import ControlInput, ControlNet
from zimage_core.controls import ControlSpec
from zimage_core.denoiser import Denoiser
from zimage_core.errors import ZImageError
from zimage_core.memory import ComponentSize, plan_memory
from zimage_core.memory.components import with_controls
from zimage_core.pipeline import GenerateOptions, ZImagePipeline

W, H = 64, 48


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = DiTConfig.tiny(n_layers=4, n_refiner_layers=2, t_mid_dim=1024, cap_feat_dim=32)
    return build_tiny_model(tmp_path_factory.mktemp("tinycn"), seed=5, dit_cfg=cfg)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    """Control files (published split layout), images and diffusers references."""
    d = tmp_path_factory.mktemp("cn")
    v1 = make_controlnet("tiny-1.0", model.dit_config, seed=41)
    v2 = make_controlnet("tiny-2.1", model.dit_config, seed=42)
    rng = np.random.default_rng(0)
    out = {
        "v1": save_controlnet(v1, d / "union-1.0.safetensors"),
        "v2": save_controlnet(v2, d / "union-2.1.safetensors"),
        "v1_ref": v1.reference,
        "v2_ref": v2.reference,
    }
    for name in ("canny", "depth", "photo"):
        arr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        out[name] = d / f"{name}.png"
        Image.fromarray(arr).save(out[name])
    mask = np.zeros((H, W), np.uint8)
    mask[10:40, 8:40] = 255
    out["mask"] = d / "mask.png"
    Image.fromarray(mask).save(out["mask"])
    return out


@pytest.fixture(scope="module")
def pipe(model):
    return ZImagePipeline.load(model.root, device="cpu", dtype="fp32", memory="full")


def opts(*controls, **kw):
    base = dict(prompt="a house by a lake", width=W, height=H, steps=3, seed=11, controls=list(controls))
    base.update(kw)
    return GenerateOptions(**base)


def diffusers_pipeline(model, cn_ref, inpaint=False):
    from diffusers import (
        ZImageControlNetInpaintPipeline,
        ZImageControlNetModel,
        ZImageControlNetPipeline,
    )
    from diffusers import (
        ZImagePipeline as RefPipeline,
    )

    base = RefPipeline.from_pretrained(model.root, dtype=torch.float32, local_files_only=True)
    cn = ZImageControlNetModel.from_transformer(cn_ref, base.transformer)
    cls = ZImageControlNetInpaintPipeline if inpaint else ZImageControlNetPipeline
    return cls(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        transformer=base.transformer,
        controlnet=cn,
    )


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_library_image_equals_diffusers_controlnet_pipeline(model, files, pipe, cfg):
    """Full short runs (3 steps), a 1.0 file, control in both CFG branches as diffusers does."""
    ref = diffusers_pipeline(model, files["v1_ref"])
    want = ref(
        prompt="a house by a lake",
        negative_prompt="blurry" if cfg > 1 else None,
        control_image=Image.open(files["canny"]),
        controlnet_conditioning_scale=0.6,
        height=H,
        width=W,
        num_inference_steps=3,
        guidance_scale=cfg - 1.0,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    o = opts(ControlSpec(files["v1"], files["canny"], strength=0.6), cfg=cfg, negative="blurry")
    got = pipe.generate(o, progress=False)[0]
    assert_same_image(got, want)
    plain = pipe.generate(opts(cfg=cfg, negative="blurry"), progress=False)[0]
    assert np.abs(np.asarray(plain, np.int16) - np.asarray(got, np.int16)).max() > 8  # the control did something


def test_inpaint_control_input_equals_diffusers_inpaint_pipeline(model, files, pipe):
    """The 33 channels (control latent, keep-mask, masked-image latent) are what diffusers feeds its ControlNet."""
    ref = diffusers_pipeline(model, files["v2_ref"], inpaint=True)
    seen = []
    hook = ref.controlnet.register_forward_pre_hook(lambda m, args: seen.append(args[3][0].squeeze(1).clone()))
    try:
        ref(
            prompt="x",
            image=Image.open(files["photo"]),
            mask_image=Image.open(files["mask"]),
            control_image=Image.open(files["canny"]),
            height=H,
            width=W,
            num_inference_steps=1,
            guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(0),
        )
    finally:
        hook.remove()
    spec = ControlSpec(files["v2"], files["canny"], inpaint_image=files["photo"], mask=files["mask"])
    (ctl,) = pipe.control_inputs([spec], W, H)
    assert ctl.context.shape == (1, 33, H // 8, W // 8)
    assert rel_err(ctl.context[0], seen[0]) <= 1e-5
    keep = ctl.context[0, 16]
    assert keep.min() == 0 and keep.max() == 1  # a real hole and a real kept region


def test_inpaint_control_needs_a_2x_file(files, pipe):
    spec = ControlSpec(files["v1"], files["canny"], inpaint_image=files["photo"], mask=files["mask"])
    with pytest.raises(ZImageError, match="1.0 .16-channel. ControlNet.*2.x"):
        pipe.generate(opts(spec), progress=False)


@pytest.mark.parametrize("memory", ["block-swap:4", "sequential"])
def test_streamed_memory_modes_equal_full_with_controlnet_blocks_streaming(model, files, pipe, memory):
    specs = [
        ControlSpec(files["v1"], files["canny"], strength=0.8),
        ControlSpec(files["v2"], files["depth"], strength=0.5, inpaint_image=files["photo"], mask=files["mask"]),
    ]
    want = pipe.generate(opts(*specs), progress=False)[0]
    streamed = ZImagePipeline.load(model.root, device="cpu", dtype="fp32", memory=memory)
    seen = {}
    real_place = streamed.residency.place

    def place(name, component, extras=()):
        real_place(name, component, extras)
        if extras:
            seen["blocks"] = list(streamed.residency.streamers["dit"].blocks)
            seen["plan"] = streamed.residency.plan

    streamed.residency.place = place
    got = streamed.generate(opts(*specs), progress=False)[0]
    assert_same_image(got, want)
    assert np.array_equal(np.asarray(got), np.asarray(want))  # same arithmetic, placement only
    control_blocks = [b for s in streamed.residency.extras.get("dit", ()) for b in s.blocks()]
    assert not control_blocks  # the run's ControlNets are not kept placed afterwards
    dit_blocks = 4 + 2 + 2  # main layers + noise refiner + context refiner
    n_control = (2 + 2) + (2 + 2)  # each tiny file: 2 control layers + 2 refiner blocks
    plan = seen["plan"]
    ids = {id(b) for b in seen["blocks"]}
    if memory == "sequential":
        assert plan.dit_swap == dit_blocks + n_control and len(ids) == dit_blocks + n_control
    else:
        assert plan.dit_swap == 4 and len(ids) == 4
    streamed_control = ids & {id(b) for b in _control_blocks(seen["blocks"])}
    assert streamed_control or memory != "sequential"


def _control_blocks(blocks):
    from zimage_core.controlnet import ControlBlock
    from zimage_core.layers import TransformerBlock

    return [b for b in blocks if isinstance(b, ControlBlock) or type(b) is TransformerBlock and b.modulated]


def test_memory_plan_counts_controlnet_bytes():
    net = ControlNet(_tiny_net_config())
    b = max(sum(p.numel() * p.element_size() for p in blk.parameters()) for blk in net.blocks())
    dit = ComponentSize(8 * b + 1000, (b,) * 8, 500)  # a DiT of 8 blocks as big as the control blocks
    sized = with_controls(dit, [net])
    nbytes = sum(p.numel() * p.element_size() for p in net.parameters())
    assert sized.total == dit.total + nbytes and len(sized.blocks) == 8 + len(net.blocks())
    budget = dit.stage() + nbytes // 2  # the DiT alone fits, the DiT and the ControlNet do not
    alone = plan_memory("auto", budget, dit, reserve=0)
    both = plan_memory("auto", budget, sized, reserve=0)
    assert alone.mode in ("full", "text-encoder-offload") and both.mode == "block-swap" and both.dit_swap > 0


def _tiny_net_config():
    from zimage_core.config import ControlNetConfig

    return ControlNetConfig.for_base(DiTConfig.tiny(n_layers=4, n_refiner_layers=2), 2, 33, "control")


def test_start_end_window_and_several_controlnets(model, files, pipe):
    """Steps outside a control's window are plain; inside, several ControlNets sum their hints."""
    dit = pipe.dit
    a, b = pipe.control_inputs(
        [ControlSpec(files["v1"], files["canny"], 0.7, 0.5, 1.0), ControlSpec(files["v2"], files["depth"], 0.4)],
        W,
        H,
    )
    cond = pipe.encode_prompts(["a house"])
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    x = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    both = Denoiser(dit, cond, None, (H // 8, W // 8), sigmas=sig, controls=[a, b])
    only_b = Denoiser(dit, cond, None, (H // 8, W // 8), sigmas=sig, controls=[b])
    plain = Denoiser(dit, cond, None, (H // 8, W // 8), sigmas=sig)
    with torch.no_grad():
        v0 = [fn(x, sig[0].expand(1)) for fn in (both, only_b, plain)]
        v3 = [fn(x, sig[3].expand(1)) for fn in (both, only_b, plain)]
        manual = -dit.denoise(x, 1 - sig[3].expand(1), dit.prepare(cond, H // 8, W // 8), control=[a, b]).float()
    assert torch.equal(v0[0], v0[1]) and not torch.equal(v0[1], v0[2])  # step 0: a (starts at 0.5) is off
    assert not torch.equal(v3[0], v3[1]) and rel_err(v3[0], manual) <= 1e-6  # step 3: both, summed


def test_quantized_lora_sequential_equals_full(model, files, tmp_path):
    """int8 weights (DiT and ControlNet), a LoRA and the ControlNet: sequential streaming changes nothing."""
    from tests.factories.lora import WRITERS, make_spec
    from zimage_core.dit import ZImageDiT
    from zimage_core.weights import save_safetensors

    lora = tmp_path / "lora.safetensors"
    save_safetensors(WRITERS["diffusers"](make_spec(ZImageDiT(model.dit_config), rank=2, seed=6))[0], lora)
    spec = ControlSpec(files["v2"], files["canny"], strength=0.9)
    images = []
    for memory in ("full", "sequential"):
        p = ZImagePipeline.load(
            model.root, device="cpu", dtype="fp32", memory=memory, quant="int8", loras=[(lora, 0.8)]
        )
        images.append(np.asarray(p.generate(opts(spec), progress=False)[0]))
        nets = p.load_controlnets([spec])
        assert type(nets[0].control_layers[0].attention.qkv) is not torch.nn.Linear  # int8 control blocks
    assert np.array_equal(images[0], images[1])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def cli(model, out, *extra):
    """``zimage generate``'s exit code (flag errors exit through argparse with code 2)."""
    try:
        return main(
            ["generate", "--model", str(model.root), "--prompt", "a house by a lake", "--width", str(W), "--height",
             str(H), "--steps", "3", "--seed", "11", "--device", "cpu", "--dtype", "fp32", "--out", str(out), *extra]
        )  # fmt: skip
    except SystemExit as e:
        return e.code


def test_cli_image_equals_library_image(model, files, pipe, tmp_path):
    out = tmp_path / "c.png"
    rc = cli(
        model,
        out,
        *("--controlnet", str(files["v1"]), "--controlnet", str(files["v2"])),
        *("--control-image", str(files["canny"]), "--control-image", str(files["depth"])),
        *("--control-strength", "0.8", "--control-end", "0.7"),
        *("--control-inpaint-image", str(files["photo"]), "--control-mask", str(files["mask"])),
    )
    assert rc == 2  # one inpaint image for both: the 1.0 file has no inpaint input
    rc = cli(
        model,
        out,
        *("--controlnet", str(files["v1"]), "--controlnet", str(files["v2"])),
        *("--control-image", str(files["canny"]), "--control-image", str(files["depth"])),
        *("--control-strength", "0.8", "--control-strength", "0.5", "--control-end", "0.7"),
    )
    assert rc == 0
    want = pipe.generate(
        opts(
            ControlSpec(files["v1"], files["canny"], 0.8, 0.0, 0.7),
            ControlSpec(files["v2"], files["depth"], 0.5, 0.0, 0.7),
        ),
        progress=False,
    )[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--control-strength", "nan"], "--control-strength: 'nan' is not a finite number"),
        (["--control-start", "0.8", "--control-end", "0.2"], "start 0.8 / end 0.2"),
        (["--control-image", "CANNY", "--control-image", "CANNY"], "2 --control-image values for 1 --controlnet"),
        (["--control-mask", "MASK"], "inpaint image and the control mask together"),
        (["--control-inpaint-image", "PHOTO", "--control-mask", "MASK"], "has no inpaint input"),
        (["--controlnet", "/nope/cn.safetensors"], "'/nope/cn.safetensors' does not exist"),
    ],
)
def test_cli_bad_control_values_fail_before_models_load(model, files, tmp_path, capsys, monkeypatch, extra, expect):
    import zimage_core.pipeline as pl

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the ControlNet flags were checked")

    monkeypatch.setattr(pl, "load_dit", boom)
    monkeypatch.setattr(ZImagePipeline, "_load_vae", boom)
    monkeypatch.setattr(ZImagePipeline, "_load_text_encoder", boom)
    names = {"CANNY": str(files["canny"]), "MASK": str(files["mask"]), "PHOTO": str(files["photo"])}
    extra = [names.get(a, a) for a in extra]
    base = ["--controlnet", str(files["v1"])] if "--controlnet" not in extra else []
    if "--control-image" not in extra:
        base += ["--control-image", str(files["canny"])]
    rc = cli(model, tmp_path / "x.png", *base, *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and expect in err, err


def test_cli_control_flags_without_controlnet(model, files, tmp_path, capsys):
    rc = cli(model, tmp_path / "x.png", "--control-image", str(files["canny"]))
    assert rc == 2 and "--control-image given without --controlnet" in capsys.readouterr().err


def test_control_input_strength_zero_is_inactive():
    net = ControlNet(_tiny_net_config())
    c = ControlInput(net, torch.zeros(1, 33, 4, 4), strength=0.0)
    assert not c.active(0, 4)
