"""Bad input to the nodes other than the sampler (tests/test_bad_inputs.py has the sampler's), table-driven, called as
ComfyUI calls them: wrong or missing files, a file of the wrong kind, values an API prompt or a linked node sends
past the widget's limits, empty or wrong-shape IMAGE/MASK tensors, a mask of another size, a batch mismatch. Each
ends in one ZImageError that names the node and the input, and no file appears anywhere."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from zimage_pack import nodes
from zimage_pack.nodes import controlnet as cn_nodes
from zimage_pack.nodes import loaders
from zimage_pack.zimage_core.errors import ZImageError  # raised inside the pack

from tests.factories import comfy as C
from tests.factories.controlnet import make_controlnet, save_controlnet
from tests.factories.pipeline import build_tiny_model

NAN, INF = float("nan"), float("inf")
W, H = 64, 48


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("badnodes")
    tiny = build_tiny_model(tmp / "tiny", seed=41)
    root = C.install_models(tiny, tmp / "models", dit_names=("z_image_turbo_bf16.safetensors",))
    C.install_controlnet(tiny, root)  # model_patches/<2.1 file>
    (root / "controlnet").mkdir()
    (root / "clip_vision").mkdir()
    save_controlnet(
        make_controlnet("tiny-1.0", tiny.dit_config, seed=42), root / "controlnet" / "union-1.0.safetensors"
    )
    # files of the wrong kind under the right folder, and damaged ones
    shutil.copy(tiny.vae, root / "diffusion_models" / "vae_as_dit.safetensors")
    shutil.copy(tiny.vae, root / "text_encoders" / "vae_as_te.safetensors")
    shutil.copy(tiny.vae, root / "loras" / "vae_as_lora.safetensors")
    shutil.copy(tiny.vae, root / "controlnet" / "vae_as_cn.safetensors")
    shutil.copy(tiny.vae, root / "clip_vision" / "vae_as_vision.safetensors")
    shutil.copy(tiny.transformer, root / "controlnet" / "dit_as_cn.safetensors")
    shutil.copy(root / "controlnet" / "union-1.0.safetensors", root / "loras" / "cn_as_lora.safetensors")
    data = tiny.transformer.read_bytes()
    (root / "diffusion_models" / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    cn = (root / "controlnet" / "union-1.0.safetensors").read_bytes()
    (root / "controlnet" / "truncated.safetensors").write_bytes(cn[: len(cn) // 2])
    mp = pytest.MonkeyPatch()
    mp.setenv("ZIMAGE_MODELS_DIR", str(root))
    try:
        model = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors")[0]
        save_file(C.peft_lora(model.slot.dit, ["layers.0.attention.to_q"]), root / "loras" / "style.safetensors")
        ns = SimpleNamespace(
            root=root,
            model=model,
            te=loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0],
            vae=C.VAELoader().load_vae("ae.safetensors")[0],
            cn10=cn_nodes.ZImageControlNetLoader().load("union-1.0.safetensors")[0],
            cn21=cn_nodes.ZImageControlNetLoader().load(C.CONTROLNET_NAME)[0],
            img=torch.rand(1, H, W, 3),
            mask=torch.ones(1, H, W),
        )
        yield ns
    finally:
        mp.undo()


def _m(e):
    return e.model


def _te(e):
    return e.te


def _vae(e):
    return e.vae


def _img(e):
    return e.img


# The good arguments of each node (callables get the environment); a case replaces some of them.
BASE = {
    "ZImageModelLoader": {"model_name": "z_image_turbo_bf16.safetensors"},
    "ZImageTextEncoderLoader": {"text_encoder_name": "qwen_3_4b.safetensors"},
    "ZImageLoraLoader": {"model": _m, "lora_name": "style.safetensors", "strength": 1.0},
    "ZImageTextEncode": {"text_encoder": _te, "text": "a cat", "max_length": 512},
    "ZImageControlNetLoader": {"controlnet_name": "union-1.0.safetensors"},
    "ZImageControlNetApply": {
        "model": _m,
        "controlnet": lambda e: e.cn10,
        "vae": _vae,
        "image": _img,
        "strength": 0.8,
        "start_percent": 0.0,
        "end_percent": 1.0,
    },
    "ZImageEditConditioning": {
        "text_encoder": _te,
        "vae": _vae,
        "image1": lambda e: torch.rand(1, 64, 64, 3),
        "text": "x",
    },
    # no text encoder: every refusal below comes before one is needed (and a missed one cannot start generating)
    "ZImagePromptEnhancer": {"prompt": "a cat", "seed": 0, "max_new_tokens": 4, "temperature": 0.5, "top_p": 0.9},
    "ZImageVisionLoader": {"vision_name": C.VISION_NAME},
    "ZImageToCoreModel": {"model": _m},
}
INPAINT = {"controlnet": lambda e: e.cn21, "inpaint_image": _img, "mask": lambda e: e.mask}

# (id, node id, replaced arguments, words the message must hold besides the node's display name)
CASES = [
    # model loader
    ("model-missing", "ZImageModelLoader", {"model_name": "missing.safetensors"}, ["not found", "diffusion_models"]),
    ("model-vae-as-dit", "ZImageModelLoader", {"model_name": "vae_as_dit.safetensors"}, ["diffusion model", "VAE"]),
    ("model-truncated", "ZImageModelLoader", {"model_name": "truncated.safetensors"}, ["truncated"]),
    (
        "model-swap-blocks-1000",
        "ZImageModelLoader",
        {"memory_mode": "block-swap", "swap_blocks": 1000},
        ["swap_blocks", "64"],
    ),
    ("model-swap-blocks-frac", "ZImageModelLoader", {"memory_mode": "block-swap", "swap_blocks": 2.5}, ["swap_blocks"]),
    ("model-compile-string", "ZImageModelLoader", {"compile": "false"}, ["compile", "true or false"]),
    ("model-dtype-unknown", "ZImageModelLoader", {"weight_dtype": "fp4"}, ["weight_dtype"]),
    # text encoder loader
    (
        "te-missing",
        "ZImageTextEncoderLoader",
        {"text_encoder_name": "nope.safetensors"},
        ["not found", "text_encoders"],
    ),
    ("te-vae-file", "ZImageTextEncoderLoader", {"text_encoder_name": "vae_as_te.safetensors"}, ["Qwen3", "VAE"]),
    # LoRA loader
    ("lora-strength-text", "ZImageLoraLoader", {"strength": "abc"}, ["strength", "number"]),
    ("lora-strength-none", "ZImageLoraLoader", {"strength": None}, ["strength", "number"]),
    ("lora-strength-nan", "ZImageLoraLoader", {"strength": NAN}, ["strength", "finite"]),
    ("lora-strength-1e6", "ZImageLoraLoader", {"strength": 1e6}, ["strength", "10"]),
    ("lora-vae-file", "ZImageLoraLoader", {"lora_name": "vae_as_lora.safetensors"}, ["not a LoRA", "VAE"]),
    ("lora-controlnet-file", "ZImageLoraLoader", {"lora_name": "cn_as_lora.safetensors"}, ["not a LoRA"]),
    ("lora-missing", "ZImageLoraLoader", {"lora_name": "gone.safetensors"}, ["not found", "loras"]),
    ("lora-model-not-zimage", "ZImageLoraLoader", {"model": "MODEL"}, ["model input", "Model Loader"]),
    # text encode
    ("encode-text-none", "ZImageTextEncode", {"text": None}, ["text", "NoneType"]),
    ("encode-max-length-bool", "ZImageTextEncode", {"max_length": True}, ["max_length", "whole number"]),
    ("encode-max-length-huge", "ZImageTextEncode", {"max_length": 10**9}, ["max_length", "32768"]),
    ("encode-max-length-negative", "ZImageTextEncode", {"max_length": -1}, ["max_length"]),
    ("encode-no-encoder", "ZImageTextEncode", {"text_encoder": None}, ["text_encoder", "Text Encoder Loader"]),
    # ControlNet loader
    ("cn-missing", "ZImageControlNetLoader", {"controlnet_name": "gone.safetensors"}, ["not found", "model_patches"]),
    (
        "cn-dit-file",
        "ZImageControlNetLoader",
        {"controlnet_name": "dit_as_cn.safetensors"},
        ["ControlNet", "diffusion model"],
    ),
    ("cn-vae-file", "ZImageControlNetLoader", {"controlnet_name": "vae_as_cn.safetensors"}, ["ControlNet", "VAE"]),
    (
        "cn-truncated",
        "ZImageControlNetLoader",
        {"controlnet_name": "truncated.safetensors"},
        ["truncated.safetensors", "download"],
    ),
    # ControlNet apply
    ("apply-strength-text", "ZImageControlNetApply", {"strength": "x"}, ["strength", "number"]),
    ("apply-strength-negative", "ZImageControlNetApply", {"strength": -5.0}, ["strength", "[0, 2]"]),
    ("apply-end-nan", "ZImageControlNetApply", {"end_percent": NAN}, ["end_percent", "finite"]),
    ("apply-start-after-end", "ZImageControlNetApply", {"start_percent": 0.8, "end_percent": 0.2}, ["start_percent"]),
    ("apply-image-none", "ZImageControlNetApply", {"image": None}, ["image", "NoneType"]),
    ("apply-image-3d", "ZImageControlNetApply", {"image": torch.rand(H, W, 3)}, ["image", "shape"]),
    ("apply-image-empty", "ZImageControlNetApply", {"image": torch.rand(0, H, W, 3)}, ["image", "at least one"]),
    ("apply-image-1-channel", "ZImageControlNetApply", {"image": torch.rand(1, H, W, 1)}, ["image", "shape"]),
    ("apply-image-nan", "ZImageControlNetApply", {"image": torch.full((1, H, W, 3), NAN)}, ["image", "NaN"]),
    ("apply-vae-none", "ZImageControlNetApply", {"vae": None}, ["vae", "Load VAE"]),
    ("apply-vae-text", "ZImageControlNetApply", {"vae": "ae.safetensors"}, ["vae", "Load VAE"]),
    ("apply-not-a-controlnet", "ZImageControlNetApply", {"controlnet": "union"}, ["controlnet input"]),
    (
        "apply-mask-size",
        "ZImageControlNetApply",
        {**INPAINT, "mask": torch.ones(1, 20, 20)},
        ["mask", "20x20", "inpaint_image"],
    ),
    ("apply-mask-4d", "ZImageControlNetApply", {**INPAINT, "mask": torch.ones(1, 2, H, W)}, ["mask", "shape"]),
    (
        "apply-batch-mismatch",
        "ZImageControlNetApply",
        {
            **INPAINT,
            "image": torch.rand(2, H, W, 3),
            "inpaint_image": torch.rand(3, H, W, 3),
            "mask": torch.ones(2, H, W),
        },
        ["batch", "inpaint_image 3"],
    ),
    ("apply-mask-alone", "ZImageControlNetApply", {"mask": torch.ones(1, H, W)}, ["inpaint_image and mask"]),
    ("apply-inpaint-on-1.0", "ZImageControlNetApply", {**INPAINT, "controlnet": lambda e: e.cn10}, ["1.0", "2.x"]),
    # edit conditioning
    ("edit-image-nan", "ZImageEditConditioning", {"image1": torch.full((1, 64, 64, 3), NAN)}, ["image1", "NaN"]),
    ("edit-image-1-channel", "ZImageEditConditioning", {"image1": torch.rand(1, 64, 64, 1)}, ["image1"]),
    ("edit-image2-2d", "ZImageEditConditioning", {"image2": torch.rand(64, 64)}, ["image2"]),
    ("edit-vae-none", "ZImageEditConditioning", {"vae": None}, ["vae", "Load VAE"]),
    ("edit-max-length-bool", "ZImageEditConditioning", {"max_length": False}, ["max_length", "whole number"]),
    ("edit-text-none", "ZImageEditConditioning", {"text": None}, ["text"]),
    # prompt enhancer
    ("enh-seed-nan", "ZImagePromptEnhancer", {"seed": NAN}, ["seed", "whole number"]),
    ("enh-seed-fractional", "ZImagePromptEnhancer", {"seed": 1.5}, ["seed", "whole number"]),
    ("enh-seed-text", "ZImagePromptEnhancer", {"seed": "a"}, ["seed", "whole number"]),
    ("enh-temperature-inf", "ZImagePromptEnhancer", {"temperature": INF}, ["temperature", "finite"]),
    ("enh-temperature-nan", "ZImagePromptEnhancer", {"temperature": NAN}, ["temperature", "finite"]),
    ("enh-max-new-tokens-huge", "ZImagePromptEnhancer", {"max_new_tokens": 10**9}, ["max_new_tokens", "4096"]),
    ("enh-system-prompt-number", "ZImagePromptEnhancer", {"system_prompt": 5}, ["system_prompt", "text"]),
    ("enh-prompt-number", "ZImagePromptEnhancer", {"prompt": 5}, ["prompt", "text"]),
    ("enh-prompt-empty", "ZImagePromptEnhancer", {"prompt": "  "}, ["prompt", "empty"]),
    ("enh-llm-missing", "ZImagePromptEnhancer", {"llm": "no-such-llm"}, ["LLM", "models/LLM"]),
    # vision loader, core MODEL
    ("vision-missing", "ZImageVisionLoader", {"vision_name": "siglip-missing"}, ["siglip2", "clip_vision"]),
    ("vision-vae-file", "ZImageVisionLoader", {"vision_name": "vae_as_vision.safetensors"}, ["SigLIP2"]),
    ("core-model-none", "ZImageToCoreModel", {"model": None}, ["model input", "Model Loader"]),
]


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("case,node,bad,words", CASES, ids=[c[0] for c in CASES])
def test_node_refuses(env, tmp_path, monkeypatch, case, node, bad, words):
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", str(env.root))
    monkeypatch.chdir(tmp_path)  # anything a node wrote next to the working directory would show here
    before = tree(env.root)
    cls = nodes.NODE_CLASS_MAPPINGS[node]
    args = {k: (v(env) if callable(v) else v) for k, v in {**BASE[node], **bad}.items()}
    with pytest.raises(ZImageError) as info:
        getattr(cls(), cls.FUNCTION)(**args)
    msg = str(info.value)
    assert msg.startswith(nodes.NODE_DISPLAY_NAME_MAPPINGS[node] + ": "), msg
    assert "\n" not in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert tree(env.root) == before and not any(tmp_path.iterdir())


def test_every_node_names_itself_by_its_display_name():
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert getattr(cls, cls.FUNCTION).node_name == nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id], node_id


def test_checked_values_at_the_limits_are_accepted(env, monkeypatch):
    """The widget's own limits pass (the checks refuse only what the widget could not send)."""
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", str(env.root))
    apply = cn_nodes.ZImageControlNetApply()
    assert apply.apply(env.model, env.cn21, env.vae, env.img, 2.0, 0.0, 0.0, env.img, env.mask[0])[0].controls
    assert apply.apply(env.model, env.cn21, env.vae, env.img, 1, 1, 1, env.img, torch.ones(1, H, W))[0].controls
    lora = loaders.ZImageLoraLoader().load(env.model, "style.safetensors", -10)[0]
    assert lora.loras[0].strength == -10.0
