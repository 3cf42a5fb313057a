"""Z-Image Omni / Edit: SigLIP2 loading, reference preparation, the edit CONDITIONING, and sampling it.

The whole node path (Z-Image Edit Conditioning -> Z-Image Sampler) is compared with diffusers'
``ZImageOmniPipeline`` on the same random weights. The pipeline's transformer is replaced by ours there: diffusers
numbers the positions of padded caption segments wrongly (diffusers#13574), and the real Omni segments are short
enough to need padding, so the two DiTs differ on purpose (ComfyUI's numbering is used; the DiT forward itself is
compared with diffusers in tests/test_dit.py where both numberings agree). Everything else (segment encoding,
reference crop, VAE, SigLIP2 features, noise, schedule, CFG) is the reference's own code.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from zimage_pack.nodes import edit as E
from zimage_pack.nodes import loaders, sampler
from zimage_pack.zimage_core.errors import ZImageError as NodeError  # raised inside the pack

from tests.factories import comfy as C
from tests.factories.dit import diffusers_to_native_state, make_diffusers_dit, save_comfy_dit
from tests.factories.pipeline import load_tokenizer
from tests.factories.text_encoder import make_qwen3, save_comfy_text_encoder, save_tokenizer
from tests.factories.vae import make_diffusers_vae, save_bfl_vae
from zimage_core import edit
from zimage_core.config import DiTConfig, TextEncoderConfig, VAEConfig
from zimage_core.dit import ZImageDiT
from zimage_core.errors import CheckpointError, ZImageError
from zimage_core.schedules import flow_sigmas, model_t
from zimage_core.vae import to_model_space
from zimage_core.vision import VisionEncoder, make_processor
from zimage_core.weights import save_safetensors


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def binary_image(h, w, seed) -> np.ndarray:
    # 0/255 pixels are exact in bfloat16, which diffusers casts the VAE input to.
    return ((np.random.RandomState(seed).rand(h, w, 3) > 0.5) * 255).astype(np.uint8)


def as_image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("omni")
    models = tmp / "models"
    te_cfg = TextEncoderConfig.tiny()
    cfg = DiTConfig.tiny(omni=True, t_mid_dim=1024, cap_feat_dim=te_cfg.hidden_size)
    ref_dit = make_diffusers_dit(cfg, 61)
    te = make_qwen3(te_cfg, 62)
    vae = make_diffusers_vae(VAEConfig.tiny(), 63)
    sig = C.make_siglip2(cfg.siglip_feat_dim, 64)
    for kind in ("diffusion_models", "text_encoders", "vae", "clip_vision"):
        (models / kind).mkdir(parents=True)
    save_comfy_dit(ref_dit, models / "diffusion_models" / C.OMNI_DIT_NAME, cfg=cfg)
    t2i = cfg.replace(siglip_feat_dim=None)
    save_comfy_dit(make_diffusers_dit(t2i, 65), models / "diffusion_models" / "z_image_turbo_bf16.safetensors", cfg=t2i)
    save_comfy_text_encoder(te, models / "text_encoders" / "qwen_3_4b.safetensors")
    save_tokenizer(models / "text_encoders" / "tokenizer")
    save_bfl_vae(vae, models / "vae" / "ae.safetensors")
    sig.save_pretrained(models / "clip_vision" / C.VISION_NAME)
    make_processor().save_pretrained(models / "clip_vision" / C.VISION_NAME)
    mp = pytest.MonkeyPatch()
    mp.setenv("ZIMAGE_MODELS_DIR", str(models))
    try:
        ns = SimpleNamespace(
            tmp=tmp,
            models=models,
            cfg=cfg,
            ref_dit=ref_dit,
            te=te,
            vae=vae,
            sig=sig,
            model=loaders.ZImageModelLoader().load(C.OMNI_DIT_NAME)[0],
            turbo=loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors")[0],
            text_encoder=loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0],
            vision=E.ZImageVisionLoader().load(C.VISION_NAME)[0],
            core_vae=C.VAELoader().load_vae("ae.safetensors")[0],
            arrays=[binary_image(64, 80, 1), binary_image(96, 64, 2)],
        )
        yield ns
    finally:
        mp.undo()


def conditioning(o, text="make it blue", negative="", vision=True, images=None):
    arrays = images if images is not None else o.arrays
    imgs = [as_image(a) for a in arrays]
    return E.ZImageEditConditioning().encode(
        o.text_encoder,
        o.core_vae,
        imgs[0],
        text,
        negative,
        512,
        vision=o.vision if vision else None,
        image2=imgs[1] if len(imgs) > 1 else None,
    )


def sample(model, pos, latent, neg=None, cfg=1.0, steps=3, seed=5, **kw):
    return sampler.ZImageTurboSampler().sample(
        model,
        pos,
        latent,
        seed=seed,
        steps=steps,
        cfg=cfg,
        shift=3.0,
        sampler_name="euler",
        denoise=1.0,
        negative=neg,
        **kw,
    )[0]["samples"]


# ---------------------------------------------------------------------------------------------- core pieces
def test_segment_texts():
    assert edit.omni_segment_texts("a cat", 2) == [
        "<|im_start|>user\n<|vision_start|>",
        "<|vision_end|><|vision_start|>",
        "<|vision_end|>a cat<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
        "<|vision_end|><|im_end|>",
    ]
    assert len(edit.omni_segment_texts("x", 1)) == 3
    with pytest.raises(ValueError):
        edit.omni_segment_texts("x", 0)


def test_reference_policy_crop_and_downscale():
    img = torch.rand(50, 70, 3)
    scaled, cropped = edit.prepare_reference(img)
    assert scaled is not cropped and torch.equal(scaled, img)
    assert tuple(cropped.shape) == (48, 64, 3) and torch.equal(cropped, img[1:49, 3:67])  # centered
    big = torch.rand(1100, 2000, 3)
    scaled, cropped = edit.prepare_reference(big)
    h, w = scaled.shape[:2]
    assert h * w <= edit.REFERENCE_MAX_AREA and abs(w / h - 2000 / 1100) < 0.01
    assert cropped.shape[0] % 16 == 0 and cropped.shape[1] % 16 == 0 and h - cropped.shape[0] < 16
    assert float(scaled.min()) >= 0 and float(scaled.max()) <= 1
    with pytest.raises(ZImageError, match="too small"):
        edit.prepare_reference(torch.rand(12, 40, 3))


def test_vision_encoder_folder_and_single_file(omni, tmp_path):
    arr = binary_image(70, 90, 3)
    inputs = make_processor()(images=[Image.fromarray(arr)], return_tensors="pt")
    h, w = inputs["spatial_shapes"][0].tolist()
    with torch.no_grad():
        want = omni.sig(**inputs).last_hidden_state[0, : h * w].reshape(h, w, -1)
    folder = VisionEncoder.load(omni.models / "clip_vision" / C.VISION_NAME)
    got = folder.encode([as_image(arr)[0]])[0]
    assert got.shape == (h, w, omni.cfg.siglip_feat_dim) and rel_err(got, want) <= 1e-6
    # a single file with prefixed keys (as in a full SigLIP2 checkpoint) and a pooling head to skip
    state = {"vision_model." + k: v for k, v in omni.sig.state_dict().items()}
    state["vision_model.head.probe"] = torch.zeros(1, 1, 24)
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 24)
    single = tmp_path / "siglip2_vision.safetensors"
    save_safetensors(state, single)
    with pytest.raises(CheckpointError, match="config.json"):  # 24 wide: the head count is not in the tensors
        VisionEncoder.load(single)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "siglip2", "vision_config": {"num_attention_heads": 2}})
    )
    assert torch.equal(VisionEncoder.load(single).encode([as_image(arr)[0]])[0], got)
    with pytest.raises(CheckpointError, match="clip_vision"):
        VisionEncoder.load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no SigLIP2 vision tower"):
        VisionEncoder.load(omni.models / "diffusion_models" / C.OMNI_DIT_NAME)


def test_vision_loader_lists_folders_and_explains_missing(omni, monkeypatch):
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", str(omni.models))
    assert E.vision_choices() == [C.VISION_NAME]
    assert E.ZImageVisionLoader.INPUT_TYPES()["required"]["vision_name"][0] == [C.VISION_NAME]
    with pytest.raises(NodeError, match="models/clip_vision"):
        E.ZImageVisionLoader().load("siglip-missing")


# ---------------------------------------------------------------------------------------------- conditioning
def test_conditioning_has_native_form(omni):
    pos, neg, latent = conditioning(omni, negative="blurry")
    ((main, opts),) = pos
    enc = omni.text_encoder.encoder
    segs = edit.encode_omni_prompt(enc, "make it blue", 2)
    assert torch.equal(main, segs[2][None]) and main.dtype == torch.float32
    assert torch.equal(opts["attention_mask"], torch.ones(1, main.shape[1], dtype=torch.long))
    assert [tuple(t.shape) for t in opts["reference_latents_text_embeds"]] == [
        (1, *segs[0].shape),
        (1, *segs[1].shape),
        (1, *segs[3].shape),
    ]
    assert torch.equal(opts["reference_latents_text_embeds"][2][0], segs[3])
    # raw Flux-VAE latents of the cropped references, as core VAEEncode gives them
    for arr, ref in zip(omni.arrays, opts["reference_latents"]):
        assert torch.equal(ref, omni.core_vae.encode(as_image(arr)))
    # ComfyUI reads a SigLIP grid as last_hidden_state.reshape(B, H // 16, W // 16, C) (model_base.Lumina2)
    feats = omni.vision.encode([as_image(a)[0] for a in omni.arrays])
    for out, f in zip(opts["clip_vision_outputs"], feats):
        size = out.image_sizes[0]
        hs = out["last_hidden_state"]
        assert torch.equal(hs.reshape(hs.shape[0], size[1] // 16, size[2] // 16, hs.shape[-1])[0], f)
    assert torch.equal(neg[0][0], edit.encode_omni_prompt(enc, "blurry", 2)[2][None])
    assert all(a is b for a, b in zip(neg[0][1]["reference_latents"], opts["reference_latents"], strict=True))
    assert tuple(latent["samples"].shape) == (1, 16, 96 // 8, 64 // 8)  # the last reference


class Adapter(torch.nn.Module):
    """Our DiT behind diffusers' transformer call (see the module docstring)."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.in_channels = dit, dit.cfg.in_channels

    @property
    def dtype(self):
        return self.dit.dtype

    @property
    def device(self):
        return self.dit.device

    def forward(
        self, x, t, cap_feats, siglip_feats=None, image_noise_mask=None, joint_attention_kwargs=None, return_dict=False
    ):
        out = self.dit.forward_omni([[i[:, 0] for i in xs] for xs in x], t, cap_feats, siglip_feats)
        return ([o[:, None] for o in out],)


@pytest.fixture(scope="module")
def reference(omni):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline

    dit = ZImageDiT(omni.cfg)
    dit.load_state_dict(diffusers_to_native_state(omni.ref_dit))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImageOmniPipeline(
        scheduler=sched,
        vae=omni.vae,
        text_encoder=omni.te,
        tokenizer=load_tokenizer(),
        transformer=Adapter(dit.eval()),
        siglip=omni.sig,
        siglip_processor=make_processor(),
    )
    encode = omni.vae.encode
    pipe.vae.encode = lambda x, *a, **k: encode(x.float(), *a, **k)  # its bf16 cast is exact on 0/255 pixels
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cfg,negative", [(1.0, ""), (4.0, "blurry, low quality")])
def test_edit_nodes_match_diffusers_omni_pipeline(omni, reference, cfg, negative):
    pos, neg, latent = conditioning(omni, negative=negative)
    got = to_model_space(sample(omni.model, pos, latent, neg=neg, cfg=cfg))
    want = reference(
        image=[Image.fromarray(a) for a in omni.arrays],
        prompt="make it blue",
        negative_prompt=negative if cfg > 1 else None,
        num_inference_steps=3,
        guidance_scale=cfg - 1.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="latent",
    ).images
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


def test_sampler_equals_a_direct_forward_omni_loop(omni):
    pos, _, latent = conditioning(omni)
    got = sample(omni.model, pos, latent, steps=4, seed=9)
    dit = omni.model.prepare()
    segs = edit.encode_omni_prompt(omni.text_encoder.encoder, "make it blue", 2)
    refs = [to_model_space(r[0]) for r in pos[0][1]["reference_latents"]]
    feats = omni.vision.encode([as_image(a)[0] for a in omni.arrays])
    x = torch.randn(latent["samples"].shape, generator=torch.Generator("cpu").manual_seed(9))
    sig = flow_sigmas(4, 3.0)
    with torch.no_grad():
        for i in range(4):
            raw = dit.forward_omni([refs + [x[0]]], model_t(sig[i : i + 1]), [segs], [feats + [None]])
            x = x + (sig[i + 1] - sig[i]) * -raw.float()
    assert rel_err(to_model_space(got), x) <= 1e-6
    # the references matter: another image gives another result
    other = sample(
        omni.model, conditioning(omni, images=[binary_image(64, 80, 7), omni.arrays[1]])[0], latent, steps=4, seed=9
    )
    assert rel_err(other, got) > 1e-3


def test_native_conditioning_and_core_edits_work(omni):
    """Conditioning built as native TextEncodeZImageOmni builds it, and core node edits, sample like ours."""
    pos, _, latent = conditioning(omni)
    main, opts = pos[0]
    outputs = [
        SimpleNamespace(last_hidden_state=o.last_hidden_state, image_sizes=o.image_sizes, image_embeds=None)
        for o in opts["clip_vision_outputs"]
    ]
    native = [
        [
            main.clone(),
            {
                "attention_mask": opts["attention_mask"],
                "pooled_output": None,
                "reference_latents": [r.clone() for r in opts["reference_latents"]],
                "clip_vision_outputs": outputs,
                "reference_latents_text_embeds": list(opts["reference_latents_text_embeds"]),
            },
        ]
    ]
    ours = sample(omni.model, pos, latent)
    assert torch.equal(sample(omni.model, native, latent), ours)
    # ConditioningSetTimestepRange adds keys; ConditioningZeroOut zeroes the negative's prompt segment
    ranged = [[main, dict(opts, start_percent=0.0, end_percent=1.0)]]
    zeroed = [[torch.zeros_like(main), dict(opts, pooled_output=None)]]
    out = sample(omni.model, ranged, latent, neg=zeroed, cfg=2.0)
    assert torch.isfinite(out).all() and rel_err(out, ours) > 1e-4
    # a text-only negative runs as text to image next to the edit positive (as in native ComfyUI)
    text_neg = [[main, {"attention_mask": opts["attention_mask"], "pooled_output": None}]]
    assert torch.isfinite(sample(omni.model, pos, latent, neg=text_neg, cfg=2.0)).all()


def test_siglip_is_ignored_by_a_model_without_its_branch(omni):
    with_vision = conditioning(omni)
    without = conditioning(omni, vision=False)
    assert "clip_vision_outputs" not in without[0][0][1]
    a = sample(omni.turbo, with_vision[0], with_vision[2])  # as native ComfyUI: no SigLIP embedder, no SigLIP
    b = sample(omni.turbo, without[0], without[2])
    assert torch.equal(a, b)
    assert (
        rel_err(sample(omni.model, with_vision[0], with_vision[2]), sample(omni.model, without[0], without[2])) > 1e-4
    )


def test_bad_edit_inputs_are_explained(omni):
    pos, _, latent = conditioning(omni)
    main, opts = pos[0]
    broken = [[main, dict(opts, reference_latents_text_embeds=opts["reference_latents_text_embeds"][:1])]]
    with pytest.raises(NodeError, match="reference text segments"):
        sample(omni.model, broken, latent)
    node = E.ZImageEditConditioning()
    with pytest.raises(NodeError, match="too small"):
        node.encode(omni.text_encoder, omni.core_vae, torch.rand(1, 10, 10, 3), "x")
    with pytest.raises(NodeError, match="image1"):
        node.encode(omni.text_encoder, omni.core_vae, torch.rand(10, 10, 3), "x")
    with pytest.raises(NodeError, match="Vision Loader"):
        node.encode(omni.text_encoder, omni.core_vae, as_image(omni.arrays[0]), "x", vision="siglip")
    with pytest.raises(NodeError, match="Text Encoder Loader"):
        node.encode(None, omni.core_vae, as_image(omni.arrays[0]), "x")


def test_each_image_of_a_batch_is_a_reference(omni):
    a, b = as_image(omni.arrays[0]), as_image(binary_image(64, 80, 4))
    node = E.ZImageEditConditioning()
    batched = node.encode(omni.text_encoder, omni.core_vae, torch.cat([a, b]), "x", vision=omni.vision)
    separate = node.encode(omni.text_encoder, omni.core_vae, a, "x", vision=omni.vision, image2=b)
    assert len(batched[0][0][1]["reference_latents"]) == 2
    assert len(batched[0][0][1]["reference_latents_text_embeds"]) == 3
    assert torch.equal(
        sample(omni.model, batched[0], batched[2], steps=2), sample(omni.model, separate[0], separate[2], steps=2)
    )
