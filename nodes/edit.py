"""Edit nodes: the SigLIP2 vision loader and the edit conditioning; reading edit CONDITIONING back for the sampler.

The CONDITIONING is native ComfyUI's for Z-Image Omni (``TextEncodeZImageOmni``), so core conditioning nodes work
on it and native Omni conditioning works in the Z-Image sampler: ``[[cond, opts]]`` where ``cond`` ``[1, L, 2560]``
is the prompt segment ``<|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>`` and ``opts``
holds ``reference_latents`` (raw Flux-VAE latents ``[1, 16, h, w]``, one per reference),
``reference_latents_text_embeds`` (the other N + 1 caption segments ``[1, L_j, 2560]``, in order: the N segments in
front of each reference, then the closing one) and, with a vision encoder, ``clip_vision_outputs`` (one per
reference: ``last_hidden_state`` ``[1, h*w, 1152]`` and ``image_sizes`` ``[(3, 16h, 16w)]``, ComfyUI's shape).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..zimage_core import edit, vae, vision
from ..zimage_core.errors import ZImageError
from . import checks, host, paths
from .checks import node_errors
from .conditioning import caption_features, host_intermediate_device
from .handles import EncoderHandle, ZImageTextEncoderHandle
from .loaders import WEIGHT_DTYPES, pick_dtype

log = logging.getLogger(__name__)

VISION_KIND = "clip_vision"
DEFAULT_VISION = "siglip2-so400m-patch16-naflex"
GRID_UNIT = 16  # ComfyUI reads a SigLIP grid as image_sizes // 16
MAX_LENGTH = 512
MAX_LENGTH_RANGE = {"min": 0, "max": 32768}  # the widget's range, checked again in the node


# ---------------------------------------------------------------------------------------------
# Vision model files
# ---------------------------------------------------------------------------------------------
def hf_folders(kind: str) -> dict[str, Path]:
    """``{name: folder}`` of Hugging Face-layout folders (config.json + safetensors) in ComfyUI's ``kind`` folders."""
    found: dict[str, Path] = {}
    for root in paths.roots(kind):
        if not root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            d = Path(dirpath)
            if len(d.relative_to(root).parts) >= 3:
                dirnames[:] = []
            if d != root and (d / "config.json").is_file() and any(d.glob("*.safetensors")):
                found.setdefault(d.relative_to(root).as_posix(), d)
                dirnames[:] = []
    return found


def vision_folders() -> dict[str, Path]:
    return hf_folders(VISION_KIND)


def vision_choices() -> list[str]:
    folders = vision_folders()
    files = [
        f for f in paths.list_models(VISION_KIND) if not any(f.replace("\\", "/").startswith(d + "/") for d in folders)
    ]
    return sorted(folders) + sorted(dict.fromkeys(files))


def resolve_vision(name: str) -> Path:
    folders = vision_folders()
    if name in folders:
        return folders[name]
    try:
        return paths.resolve(VISION_KIND, name)
    except ZImageError:
        raise ZImageError(
            f"vision model '{name}' was not found. {vision.SIGLIP_HELP} Then refresh (press 'r')."
        ) from None


class ZImageVisionHandle(EncoderHandle):
    """``ZIMAGE_VISION``: the engine's SigLIP2 VisionEncoder, registered with ComfyUI's memory management."""

    KIND = "ZImageVision"

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    def encode(self, images) -> list[torch.Tensor]:
        self._load()
        return self.encoder.encode(images)


class ZImageVisionLoader:
    DESCRIPTION = (
        "Loads the SigLIP2 vision encoder that Z-Image Omni/Edit reads reference images with "
        "(google/siglip2-so400m-patch16-naflex) from ComfyUI/models/clip_vision: the Hugging Face folder "
        "(config.json, model.safetensors, preprocessor_config.json) or a single safetensors of the vision tower."
    )
    CATEGORY = "Z-Image/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("ZIMAGE_VISION",)
    RETURN_NAMES = ("vision",)
    OUTPUT_TOOLTIPS = ("The SigLIP2 vision encoder, for Z-Image Edit Conditioning.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vision_name": (
                    vision_choices(),
                    {
                        "tooltip": "SigLIP2 so400m NaFlex in ComfyUI/models/clip_vision: the folder "
                        "siglip2-so400m-patch16-naflex (as downloaded from Hugging Face) or a safetensors file."
                    },
                ),
                "weight_dtype": (
                    WEIGHT_DTYPES,
                    {
                        "default": "auto",
                        "tooltip": "Precision of the vision encoder. auto: bf16 on a GPU that supports it, fp32 otherwise.",
                    },
                ),
            }
        }

    @node_errors("Z-Image Vision Loader (SigLIP2)")
    def load(self, vision_name, weight_dtype="auto"):
        path = resolve_vision(vision_name)
        load_device, offload_device = host.text_encoder_devices()
        dtype = pick_dtype(weight_dtype, load_device)
        inside = host.comfy_module("comfy.model_patcher") is not None
        encoder = vision.VisionEncoder.load(path, dtype=dtype, device=offload_device if inside else load_device)
        return (ZImageVisionHandle(encoder, vision_name, load_device, offload_device),)


# ---------------------------------------------------------------------------------------------
# Edit conditioning
# ---------------------------------------------------------------------------------------------
class VisionOutput:
    """Stand-in for ``comfy.clip_vision.Output`` outside ComfyUI (attribute and item access)."""

    def __getitem__(self, key):
        return getattr(self, key)

    def __setitem__(self, key, value):
        setattr(self, key, value)


def clip_vision_output(feat: torch.Tensor):
    """A ComfyUI CLIP-vision output for a SigLIP2 grid ``[h, w, C]`` (ComfyUI's own class inside ComfyUI)."""
    mod = host.comfy_module("comfy.clip_vision")
    out = getattr(mod, "Output", VisionOutput)() if mod is not None else VisionOutput()
    h, w, c = feat.shape
    out["last_hidden_state"] = feat.reshape(1, h * w, c)
    out["image_sizes"] = [torch.Size((3, h * GRID_UNIT, w * GRID_UNIT))]
    out["image_embeds"] = None
    out["penultimate_hidden_states"] = None
    return out


def _images(*inputs) -> list[torch.Tensor]:
    out = []
    for i, img in enumerate(inputs, 1):
        if img is None:
            continue
        checks.image(f"image{i}", img)
        out.extend(img[j] for j in range(img.shape[0]))
    return out


def _encode_segments(handle: ZImageTextEncoderHandle, text: str, n: int, max_length: int | None):
    return edit.encode_omni_prompt(handle.ready(), text, n, max_length)


class ZImageEditConditioning:
    DESCRIPTION = (
        "Encodes an edit instruction with 1 to 3 reference images for Z-Image Omni/Edit: the images are VAE-encoded "
        "(with ae.safetensors) and, when a vision encoder is connected, read by SigLIP2. The result is the same "
        "CONDITIONING native ComfyUI's TextEncodeZImageOmni makes, for Z-Image Sampler. Also returns a negative "
        "(the negative text with the same images, for cfg > 1) and an empty latent the size of the last reference."
    )
    CATEGORY = "Z-Image/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = (
        "The instruction with the reference images, for Z-Image Sampler's positive input.",
        "The negative text with the same reference images, for the negative input (used when cfg > 1).",
        "An empty latent the size of the last reference (after the multiple-of-16 crop), for latent_image.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        image_tip = (
            "A reference image. Larger than 1024x1024 pixels (area) it is scaled down to that area; then it "
            "is center-cropped to width and height multiples of 16 (at most 15 pixels cut per side) before "
            "VAE encoding. Every image of a batch becomes its own reference."
        )
        return {
            "required": {
                "text_encoder": (
                    "ZIMAGE_TEXT_ENCODER",
                    {"tooltip": "The text encoder from Z-Image Text Encoder Loader."},
                ),
                "vae": ("VAE", {"tooltip": "The Flux VAE (ae.safetensors from Load VAE) that encodes the references."}),
                "image1": ("IMAGE", {"tooltip": image_tip}),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The instruction, e.g. 'make it night, keep the person unchanged', or "
                        "a description of the picture to make from the references.",
                    },
                ),
                "negative_text": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to avoid, encoded with the same references for the "
                        "negative output (the reference pipeline uses empty text).",
                    },
                ),
                "max_length": (
                    "INT",
                    {
                        "default": MAX_LENGTH,
                        **MAX_LENGTH_RANGE,
                        "step": 1,
                        "tooltip": "Token limit per caption segment (512 as in the reference pipeline); 0 = no limit.",
                    },
                ),
            },
            "optional": {
                "vision": (
                    "ZIMAGE_VISION",
                    {
                        "tooltip": "SigLIP2 from Z-Image Vision Loader. Without it the model "
                        "sees the references through the VAE only, as native "
                        "ComfyUI does when no image encoder is connected."
                    },
                ),
                "image2": ("IMAGE", {"tooltip": image_tip}),
                "image3": ("IMAGE", {"tooltip": image_tip}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @node_errors("Z-Image Edit Conditioning")
    def encode(
        self,
        text_encoder,
        vae,
        image1,
        text,
        negative_text="",
        max_length=MAX_LENGTH,
        vision=None,
        image2=None,
        image3=None,
        unique_id=None,
    ):
        if not isinstance(text_encoder, ZImageTextEncoderHandle):
            raise ZImageError(
                f"the text_encoder input is {type(text_encoder).__name__}, not a Z-Image text encoder; "
                "connect Z-Image Text Encoder Loader to it."
            )
        checks.vae("the vae input", vae)
        if vision is not None and not isinstance(vision, ZImageVisionHandle):
            raise ZImageError(
                f"the vision input is {type(vision).__name__}, not a Z-Image vision encoder; connect "
                "Z-Image Vision Loader to it."
            )
        text, negative_text = checks.text("text", text), checks.text("negative_text", negative_text)
        max_length = checks.whole("max_length (0 = no limit)", max_length, MAX_LENGTH_RANGE)
        if image1 is None:
            raise ZImageError("no reference image: connect Load Image to image1.")
        images = _images(image1, image2, image3)
        prepared = [edit.prepare_reference(img) for img in images]
        inter = host_intermediate_device()
        refs = []
        for _, cropped in prepared:
            raw = vae.encode(cropped[None])
            if not torch.is_tensor(raw) or raw.ndim != 4 or raw.shape[1] != 16:
                raise ZImageError(
                    f"the VAE returned latents of shape {tuple(getattr(raw, 'shape', ()))}; Z-Image "
                    "needs the 16-channel Flux VAE (ae.safetensors)."
                )
            refs.append(raw.to(inter, torch.float32))
        outputs = None
        if vision is not None:
            feats = vision.encode([scaled for scaled, _ in prepared])
            outputs = [clip_vision_output(f.to(inter, torch.float32)) for f in feats]
        limit = max_length or None
        pos = self._conditioning(_encode_segments(text_encoder, text, len(refs), limit), refs, outputs, inter)
        neg = self._conditioning(_encode_segments(text_encoder, negative_text, len(refs), limit), refs, outputs, inter)
        last = refs[-1]
        latent = {"samples": torch.zeros((1, 16, last.shape[-2], last.shape[-1]), device=inter)}
        sizes = ", ".join(f"{c.shape[1]}x{c.shape[0]}" for _, c in prepared)
        host.send_text(unique_id, f"{len(refs)} reference(s) ({sizes} px); SigLIP2 {'on' if outputs else 'off'}")
        return (pos, neg, latent)

    @staticmethod
    def _conditioning(segments, refs, outputs, device):
        n = len(refs)
        rows = [s.to(device, torch.float32)[None] for s in segments]
        main = rows[n]
        opts = {
            "pooled_output": None,
            "attention_mask": torch.ones((1, main.shape[1]), dtype=torch.long, device=device),
            "reference_latents": list(refs),
            "reference_latents_text_embeds": rows[:n] + rows[n + 1 :],
        }
        if outputs:
            opts["clip_vision_outputs"] = list(outputs)
        return [[main, opts]]


# ---------------------------------------------------------------------------------------------
# CONDITIONING -> per-sample Omni input
# ---------------------------------------------------------------------------------------------
def _opts(conditioning) -> dict:
    if isinstance(conditioning, (list, tuple)) and len(conditioning) == 1:
        entry = conditioning[0]
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict):
            return entry[1]
    return {}


def has_references(conditioning) -> bool:
    """True when ``conditioning`` carries reference latents (edit conditioning, native or ours)."""
    refs = _opts(conditioning).get("reference_latents")
    return isinstance(refs, (list, tuple)) and len(refs) > 0


def _row(t, i: int, batch: int, what: str) -> torch.Tensor:
    if not torch.is_tensor(t):
        raise ZImageError(f"the {what} is {type(t).__name__}, not a tensor; the conditioning is damaged.")
    if t.ndim == 2:
        t = t[None]
    n = t.shape[0]
    if n not in (1, batch):
        raise ZImageError(f"the {what} holds {n} items for a batch of {batch} latents.")
    return t[0 if n == 1 else i]


def _grid(out, i: int, batch: int) -> torch.Tensor:
    def field(key):
        return out.get(key) if isinstance(out, dict) else getattr(out, key, None)

    hidden, sizes = field("last_hidden_state"), field("image_sizes")
    if not torch.is_tensor(hidden) or hidden.ndim != 3 or not sizes:
        raise ZImageError(
            "a clip_vision_outputs entry lacks last_hidden_state/image_sizes; use Z-Image Vision Loader "
            "with Z-Image Edit Conditioning (or a SigLIP2 NaFlex CLIP vision model)."
        )
    h, w = int(sizes[0][-2]) // GRID_UNIT, int(sizes[0][-1]) // GRID_UNIT
    row = _row(hidden, i, batch, "SigLIP feature")
    if h * w != row.shape[0]:
        raise ZImageError(
            f"SigLIP features hold {row.shape[0]} tokens, but their image size gives a {h}x{w} grid; "
            "the vision model is not SigLIP2 NaFlex."
        )
    return row.reshape(h, w, -1).float()


def edit_conditions(conditioning, which: str, batch: int, config) -> list:
    """Per-sample :class:`zimage_core.edit.OmniCondition` for an edit CONDITIONING, or caption tensors for a
    text-only one (that branch then samples as text-to-image, as native ComfyUI does)."""
    feats = caption_features(conditioning, which, batch, config.cap_feat_dim)
    if not has_references(conditioning):
        return feats
    opts = _opts(conditioning)
    refs = list(opts["reference_latents"])
    texts = list(opts.get("reference_latents_text_embeds") or [])
    n = len(refs)
    if len(texts) != n + 1:
        raise ZImageError(
            f"the {which} conditioning has {n} reference latents but {len(texts)} reference text segments (needs "
            f"{n + 1}); reference latents added by another node are not enough for Z-Image. Use Z-Image Edit "
            "Conditioning (or native TextEncodeZImageOmni)."
        )
    outputs = opts.get("clip_vision_outputs")
    if outputs is None:
        outputs = [u.get("clip_vision_output") for u in opts.get("unclip_conditioning") or [] if isinstance(u, dict)]
    outputs = [o for o in outputs if o is not None]
    if outputs and not config.is_omni:
        host.warn_once(
            "siglip-ignored",
            "Z-Image: this model has no SigLIP branch (not Omni/Edit); the reference "
            "images' SigLIP features are ignored.",
        )
        outputs = []
    if not config.is_omni:
        host.warn_once(
            "not-omni",
            "Z-Image: edit conditioning with a model that was not trained on reference "
            "images (no SigLIP branch); use Z-Image Omni/Edit for editing.",
        )
    out = []
    for i in range(batch):
        latents = []
        for r in refs:
            r = _row(r, i, batch, "reference latent") if torch.is_tensor(r) and r.ndim == 4 else r
            if not torch.is_tensor(r) or r.ndim != 3:
                raise ZImageError(
                    f"a reference latent of the {which} conditioning has shape "
                    f"{tuple(getattr(r, 'shape', ()))}; expected [1, 16, h, w] from VAE Encode."
                )
            latents.append(vae.to_model_space(r.float()))
        segs = [_row(t, i, batch, "reference text segment").float() for t in texts]
        segments = segs[:n] + [feats[i]] + segs[n:]
        siglip = [_grid(o, i, batch) for o in outputs[:n]] if outputs else None
        out.append(edit.OmniCondition(segments=segments, references=latents, siglip=siglip))
    return out
