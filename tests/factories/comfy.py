"""Headless stand-ins for the few core ComfyUI nodes the Z-Image workflows use, and a tiny workflow runner.

The doubles keep core's node ids, input names and order (so UI workflows convert the same way) and core's
semantics: ``EmptySD3LatentImage`` gives zeros ``[B, 16, H/8, W/8]``; ``VAELoader`` loads ``ae.safetensors``
(with ``zimage_core.vae.load_vae``); ``VAEDecode``/``VAEEncode`` work on raw Flux-VAE latents and IMAGE
tensors ``[B, H, W, 3]`` in 0..1 (encode = posterior mean, decode clamped like core); ``LoadImage`` returns the
image and ``1 - alpha`` as MASK; ``SetLatentNoiseMask`` adds ``noise_mask``; ``SaveImage`` writes PNGs with
core's ``clip(255 * x).astype(uint8)`` quantisation.

:func:`ui_to_api` converts a UI-format workflow the way the ComfyUI front end does (widget values mapped by
position over the widget inputs of ``INPUT_TYPES``, skipping the extra ``control_after_generate`` value after
a seed and the ``upload`` value after an image combo; note nodes dropped). :class:`Executor` validates an API
prompt like ComfyUI (combo membership, min/max) and runs it with ComfyUI-like output caching.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zimage_core.vae import load_vae

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
MAX_RESOLUTION = 16384


def models_dir() -> Path:
    return Path(os.environ.get("ZIMAGE_MODELS_DIR", "models"))


def _dir(kind: str) -> Path:
    return models_dir() / kind


def install_models(tiny, root: Path, dit_names=("z_image_turbo_bf16.safetensors", "z_image_bf16.safetensors")) -> Path:
    """Lay out a ComfyUI-style ``models/`` folder holding the tiny model under the published file names."""
    from tests.factories.text_encoder import save_tokenizer

    for kind in ("diffusion_models", "text_encoders", "vae", "loras"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    for name in dit_names:
        shutil.copy(tiny.transformer, root / "diffusion_models" / name)
    shutil.copy(tiny.text_encoder, root / "text_encoders" / "qwen_3_4b.safetensors")
    save_tokenizer(root / "text_encoders" / "tokenizer")  # ComfyUI would use its bundled qwen25_tokenizer
    shutil.copy(tiny.vae, root / "vae" / "ae.safetensors")
    return root


CONTROLNET_NAME = "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors"


def install_controlnet(tiny, root: Path, seed: int = 0) -> Path:
    """Add a tiny 2.1-layout Fun ControlNet for the tiny DiT as ``model_patches/CONTROLNET_NAME`` (where native
    ComfyUI keeps it) to a ``models/`` folder made by :func:`install_models`."""
    from tests.factories.controlnet import make_controlnet, save_controlnet

    (root / "model_patches").mkdir(parents=True, exist_ok=True)
    save_controlnet(make_controlnet("tiny-2.1", tiny.dit_config, seed), root / "model_patches" / CONTROLNET_NAME)
    return root


OMNI_DIT_NAME = "z_image_omni_base_bf16.safetensors"
VISION_NAME = "siglip2-so400m-patch16-naflex"


def make_siglip2(hidden: int = 24, seed: int = 0):
    """A tiny random ``transformers.Siglip2VisionModel`` (NaFlex, patch 16, 4x4 position grid, no pooling head)."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    cfg = Siglip2VisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=16,
        num_patches=16,
        vision_use_head=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Siglip2VisionModel(cfg).eval()


def install_edit_models(tiny, root: Path, seed: int = 0) -> Path:
    """Add a tiny Omni DiT (``OMNI_DIT_NAME``, SigLIP branch of width 24) and a tiny SigLIP2 folder
    (``clip_vision/VISION_NAME``, Hugging Face layout) to a ``models/`` folder made by :func:`install_models`."""
    from tests.factories.dit import make_diffusers_dit, save_comfy_dit
    from zimage_core.vision import make_processor

    cfg = tiny.dit_config.replace(siglip_feat_dim=24)
    save_comfy_dit(make_diffusers_dit(cfg, seed), root / "diffusion_models" / OMNI_DIT_NAME, cfg=cfg)
    folder = root / "clip_vision" / VISION_NAME
    make_siglip2(24, seed + 1).save_pretrained(folder)
    make_processor().save_pretrained(folder)
    return root


def peft_lora(dit, keys, rank=2, seed=0) -> dict[str, torch.Tensor]:
    """Tensors of a diffusers/PEFT-style LoRA for native module names ``keys`` of ``dit`` (``.to_q`` etc. for
    the slices of the fused qkv)."""
    from zimage_core.dit_layout import native_to_diffusers_key

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in keys:
        if k.endswith((".to_q", ".to_k", ".to_v")):
            w = dit.get_parameter(k.rsplit(".", 1)[0] + ".qkv.weight")
            rows, cols = w.shape[0] // 3, w.shape[1]
        else:
            w = dit.get_parameter(k + ".weight")
            rows, cols = w.shape
        name = "transformer." + native_to_diffusers_key(k)
        out[name + ".lora_A.weight"] = torch.randn(rank, cols, generator=g) * 0.1
        out[name + ".lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.1
    return out


# ---------------------------------------------------------------------------------------------
# Core node doubles
# ---------------------------------------------------------------------------------------------
class CoreVAE:
    """What core's ``VAE`` object does for the Flux VAE, on the engine's FluxVAE."""

    def __init__(self, path):
        self.model = load_vae(path, dtype=torch.float32, device="cpu")

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        x = self.model.decode_raw(raw.float(), tile=None)
        return torch.clamp((x + 1.0) / 2.0, 0.0, 1.0).permute(0, 2, 3, 1).contiguous()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8  # core crops to a multiple of 8
        x = pixels[:, :h, :w, :3].permute(0, 3, 1, 2).float() * 2.0 - 1.0
        return self.model.encode_raw(x)


class EmptySD3LatentImage:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        res = {"min": 16, "max": MAX_RESOLUTION, "step": 16}
        return {
            "required": {
                "width": ("INT", {"default": 1024, **res}),
                "height": ("INT", {"default": 1024, **res}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            }
        }

    def generate(self, width, height, batch_size=1):
        return ({"samples": torch.zeros([batch_size, 16, height // 8, width // 8])},)


class VAELoader:
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"

    @classmethod
    def INPUT_TYPES(cls):
        names = sorted(p.name for p in _dir("vae").glob("*.safetensors")) if _dir("vae").is_dir() else []
        return {"required": {"vae_name": (names,)}}

    def load_vae(self, vae_name):
        return (CoreVAE(_dir("vae") / vae_name),)


class VAEDecode:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    def decode(self, vae, samples):
        return (vae.decode(samples["samples"]),)


class VAEEncode:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    def encode(self, vae, pixels):
        return ({"samples": vae.encode(pixels[:, :, :, :3])},)


class SetLatentNoiseMask:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def set_mask(self, samples, mask):
        s = samples.copy()
        s["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (s,)


class LoadImage:
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    input_dir: Path = Path("input")

    @classmethod
    def INPUT_TYPES(cls):
        files = sorted(p.name for p in cls.input_dir.iterdir()) if cls.input_dir.is_dir() else []
        return {"required": {"image": (files, {"image_upload": True})}}

    def load_image(self, image):
        img = Image.open(self.input_dir / image)
        rgb = torch.from_numpy(np.array(img.convert("RGB")).astype(np.float32) / 255.0)[None]
        if "A" in img.getbands():
            mask = 1.0 - torch.from_numpy(np.array(img.getchannel("A")).astype(np.float32) / 255.0)
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
        return (rgb, mask.unsqueeze(0))


class SaveImage:
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    output_dir: Path = Path("output")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save_images(self, images, filename_prefix="ComfyUI"):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results = []
        for image in images:
            arr = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            n = len(list(self.output_dir.glob(f"{filename_prefix}_*.png"))) + 1
            path = self.output_dir / f"{filename_prefix}_{n:05}_.png"
            Image.fromarray(arr).save(path)
            results.append({"filename": path.name, "array": arr})
        return {"ui": {"images": results}}


class Canny:
    """Core ``Canny`` (comfy_extras/nodes_canny.py): kornia's Canny on the IMAGE, the edge map as a 3-channel IMAGE."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "detect_edge"

    @classmethod
    def INPUT_TYPES(cls):
        t = {"min": 0.01, "max": 0.99, "step": 0.01}
        return {
            "required": {
                "image": ("IMAGE",),
                "low_threshold": ("FLOAT", {"default": 0.4, **t}),
                "high_threshold": ("FLOAT", {"default": 0.8, **t}),
            }
        }

    def detect_edge(self, image, low_threshold, high_threshold):
        from kornia.filters import canny

        edges = canny(image.movedim(-1, 1), low_threshold, high_threshold)[1]
        return (edges.repeat(1, 3, 1, 1).movedim(1, -1),)


class KSampler:
    """Core KSampler's inputs (names, order, widgets), for converting UI workflows. Sampling a bridged MODEL needs
    ComfyUI's own model machinery (``Z-Image Model -> MODEL`` refuses to work without it), so workflows that use
    it are not run headless: they run in a real ComfyUI (tests/comfyui/test_server.py, test_core_model.py)."""

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (["euler", "euler_ancestral", "heun", "dpmpp_2m", "res_multistep"],),
                "scheduler": (["simple", "normal", "karras", "exponential", "sgm_uniform", "beta"],),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            }
        }

    def sample(self, **kwargs):
        raise PromptError("core KSampler needs a real ComfyUI; this workflow runs in tests/comfyui, not headless.")


CORE_NODES = {
    c.__name__: c
    for c in (
        EmptySD3LatentImage,
        VAELoader,
        VAEDecode,
        VAEEncode,
        SetLatentNoiseMask,
        LoadImage,
        SaveImage,
        Canny,
        KSampler,
    )
}


def all_nodes() -> dict:
    from zimage_pack.nodes import NODE_CLASS_MAPPINGS

    return {**CORE_NODES, **NODE_CLASS_MAPPINGS}


# ---------------------------------------------------------------------------------------------
# UI workflow -> API prompt, as the front end's graphToPrompt does
# ---------------------------------------------------------------------------------------------
def _spec_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


def widget_inputs(it: dict) -> list[tuple[str, tuple]]:
    """Widget inputs of a node's ``INPUT_TYPES()`` in front-end order: required then optional, sockets left out."""
    out = []
    for section in ("required", "optional"):
        for name, spec in it.get(section, {}).items():
            opts = spec[1] if len(spec) > 1 else {}
            if _spec_type(spec) in WIDGET_TYPES and not opts.get("forceInput"):
                out.append((name, spec))
    return out


def _extra_widget(name: str, spec) -> bool:
    """Front-end widgets that are saved in widgets_values but never sent: control_after_generate, upload."""
    opts = spec[1] if len(spec) > 1 else {}
    if _spec_type(spec) == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        return True
    return _spec_type(spec) == "COMBO" and bool(opts.get("image_upload"))


def _default(spec):
    opts = spec[1] if len(spec) > 1 else {}
    if "default" in opts:
        return opts["default"]
    return spec[0][0] if _spec_type(spec) == "COMBO" else None


def _fits(spec, value) -> bool:
    """A widget value of the widget's kind (catches values shifted onto the wrong widget)."""
    kind = _spec_type(spec)
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "STRING":
        return isinstance(value, str)
    return True


def ui_to_api(workflow: dict, classes: dict) -> dict:
    """API prompt for a UI workflow, with the node classes at hand giving each node's inputs."""
    return specs_to_api(workflow, lambda node_type: classes[node_type].INPUT_TYPES())


def specs_to_api(workflow: dict, input_types) -> dict:
    """API prompt for a UI workflow; ``input_types(node type)`` is that node's ``INPUT_TYPES()`` (from the classes,
    or from a server's ``/object_info``)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        it = input_types(node["type"])
        values = list(node.get("widgets_values") or [])
        inputs, i = {}, 0
        optional = set(it.get("optional", {}))
        for name, spec in widget_inputs(it):
            if i >= len(values):
                if name in optional:  # a widget added after the workflow was saved: the front end shows its default
                    inputs[name] = _default(spec)
                    continue
                raise ValueError(f"node {node['id']} ({node['type']}): widgets_values has no value for '{name}'")
            if not _fits(spec, values[i]):
                raise ValueError(
                    f"node {node['id']} ({node['type']}): widget values do not fit: '{name}' got {values[i]!r}"
                )
            inputs[name] = values[i]
            i += 1 + _extra_widget(name, spec)
        if i != len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for {i} widgets")
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                lk = links[inp["link"]]
                inputs[inp["name"]] = [str(lk[1]), lk[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# ---------------------------------------------------------------------------------------------
# Validation and execution with ComfyUI-like caching
# ---------------------------------------------------------------------------------------------
class PromptError(Exception):
    pass


def validate(prompt: dict, classes: dict) -> None:
    errors = []
    for nid, node in prompt.items():
        cls = classes[node["class_type"]]
        it = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in it.get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                if name not in node["inputs"]:
                    if section == "required":
                        errors.append(f"{nid} {node['class_type']}: required input '{name}' missing")
                    continue
                v = node["inputs"][name]
                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                    continue
                t = _spec_type(spec)
                if t == "COMBO" and v not in spec[0]:
                    errors.append(f"{nid} {node['class_type']}: Value not in list: {name}: '{v}' not in {spec[0]}")
                if t in ("INT", "FLOAT"):
                    if "min" in opts and v < opts["min"]:
                        errors.append(f"{nid}: Value {v} smaller than min of {opts['min']}: {name}")
                    if "max" in opts and v > opts["max"]:
                        errors.append(f"{nid}: Value {v} bigger than max of {opts['max']}: {name}")
    if errors:
        raise PromptError("; ".join(errors))


class Executor:
    """Runs API prompts; a node whose class, widget values and upstream graph are unchanged is not re-run."""

    def __init__(self, classes: dict):
        self.classes = classes
        self.cache: dict = {}
        self.objects: dict = {}
        self.executed: list[str] = []
        self.ui: dict = {}

    def _signature(self, prompt, nid, memo):
        if nid in memo:
            return memo[nid]
        node = prompt[nid]
        items = []
        for k, v in sorted(node["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                items.append((k, self._signature(prompt, v[0], memo), v[1]))
            else:
                items.append((k, repr(v)))
        memo[nid] = (node["class_type"], tuple(items))
        return memo[nid]

    def run(self, prompt: dict) -> dict:
        validate(prompt, self.classes)
        self.executed = []
        memo: dict = {}
        results: dict = {}
        outputs = [nid for nid, n in prompt.items() if getattr(self.classes[n["class_type"]], "OUTPUT_NODE", False)]
        with torch.inference_mode():
            for nid in outputs:
                self._run_node(prompt, nid, memo, results)
        return results

    def _run_node(self, prompt, nid, memo, results):
        if nid in results:
            return results[nid]
        node = prompt[nid]
        kwargs = {}
        for k, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                kwargs[k] = self._run_node(prompt, v[0], memo, results)[v[1]]
            else:
                kwargs[k] = v
        sig = self._signature(prompt, nid, memo)
        if sig in self.cache:
            results[nid] = self.cache[sig]
            return results[nid]
        cls = self.classes[node["class_type"]]
        obj = self.objects.setdefault((nid, node["class_type"]), cls())
        out = getattr(obj, cls.FUNCTION)(**kwargs)
        if isinstance(out, dict) and "result" in out:  # {"ui": ..., "result": (...)}: outputs plus node UI data
            self.ui[nid] = out.get("ui")
            out = tuple(out["result"])
        if isinstance(out, dict):
            results[nid] = out
        else:
            if not isinstance(out, tuple) or len(out) != len(cls.RETURN_TYPES):
                raise PromptError(
                    f"{node['class_type']} returned {type(out).__name__}, not a {len(cls.RETURN_TYPES)}-tuple"
                )
            results[nid] = out
        self.executed.append(nid)
        self.cache[sig] = results[nid]
        return results[nid]
