"""The SigLIP2 vision encoder of Z-Image Omni / Edit (``transformers.Siglip2VisionModel``), loaded offline.

Z-Image Omni reads SigLIP2-so400m-patch16-NaFlex features (hidden 1152, 27 layers, 16 heads, patch 16) the
way diffusers' ``ZImageOmniPipeline.prepare_siglip_embeds`` does: the image goes through the SigLIP2 NaFlex
processor (aspect-preserving resize to at most ``max_num_patches`` = 256 patches of 16 px, bilinear,
``(x/255 - 0.5) / 0.5``), the vision tower runs without its pooling head, and ``last_hidden_state`` (after the
post-layernorm) is cut to the real patches and reshaped to the patch grid ``[h, w, 1152]``
(``docs/model.md``, Omni / Edit).

Accepted weights (nothing is ever downloaded):

- a folder with ``config.json`` (a full ``siglip2`` model or a ``siglip2_vision_model``), ``*.safetensors``
  and optionally ``preprocessor_config.json``: the Hugging Face layout of ``google/siglip2-so400m-patch16-naflex``;
- a single ``.safetensors`` of the vision tower (keys with or without ``vision_model.``); sizes are read
  from the tensors, a ``config.json`` next to the file is used when present.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from .errors import CheckpointError, ZImageError
from .weights import FileProbe, TensorInfo, WeightSource, materialize

__all__ = ["SIGLIP_HELP", "VisionEncoder", "infer_vision_config", "make_processor", "to_pil"]

log = logging.getLogger(__name__)

SIGLIP_HELP = (
    "Z-Image Omni/Edit reads SigLIP2 features: download google/siglip2-so400m-patch16-naflex (config.json, "
    "model.safetensors, preprocessor_config.json) into ComfyUI/models/clip_vision/siglip2-so400m-patch16-naflex/ "
    "(or give that folder), or put a single safetensors of the SigLIP2 vision tower in ComfyUI/models/clip_vision."
)
# Container prefixes seen in the wild before the vision tower's own names.
_PREFIXES = ("model.", "siglip.", "siglip_model.", "vision_tower.", "visual.", "vision_model.")
_ROOTS = ("embeddings.", "encoder.", "post_layernorm.")
# Heads of the published SigLIP2 towers by hidden size (the checkpoint does not store it).
_KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 16}
_PROCESSOR_KEYS = (
    "patch_size",
    "max_num_patches",
    "image_mean",
    "image_std",
    "resample",
    "rescale_factor",
    "do_resize",
    "do_rescale",
    "do_normalize",
)


def _canonical(key: str) -> str | None:
    """Vision-tower key without container prefixes (``encoder.layers.0...``), or None for anything else."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key if key.startswith(_ROOTS) else None  # text tower, logit scale, pooling head: not used


def infer_vision_config(shapes: dict[str, tuple[int, ...]], hf: dict | None = None):
    """A ``Siglip2VisionConfig`` (no pooling head) from canonical tensor shapes and an optional config.json."""
    from transformers import Siglip2VisionConfig

    hf = dict(hf or {})
    if hf.get("model_type") == "siglip2" or "vision_config" in hf:
        hf = dict(hf.get("vision_config") or {})
    try:
        hidden, patch_in = shapes["embeddings.patch_embedding.weight"][:2]
        n_pos = shapes["embeddings.position_embedding.weight"][0]
        inter = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(
            f"vision encoder: the weights lack {e}; this is not a SigLIP2 vision tower. " + SIGLIP_HELP
        ) from e
    if len(shapes["embeddings.patch_embedding.weight"]) != 2:
        raise CheckpointError(
            "vision encoder: this is a fixed-resolution SigLIP/CLIP tower (convolutional patch embedding); Z-Image "
            "Omni needs the SigLIP2 NaFlex tower (linear patch embedding). " + SIGLIP_HELP
        )
    channels = int(hf.get("num_channels", 3))
    patch = round((patch_in / channels) ** 0.5)
    if channels * patch * patch != patch_in:
        raise CheckpointError(f"vision encoder: patch embedding input {patch_in} does not fit {channels} channels.")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    heads = hf.get("num_attention_heads") or _KNOWN_HEADS.get(hidden) or (hidden // 64 if hidden % 64 == 0 else None)
    if not heads or hidden % int(heads):
        raise CheckpointError(
            f"vision encoder: cannot tell the number of attention heads of a {hidden}-wide tower from its tensors; "
            "put the model's config.json next to the file."
        )
    if int(n_pos**0.5) ** 2 != n_pos:
        raise CheckpointError(f"vision encoder: {n_pos} position embeddings do not form a square grid.")
    return Siglip2VisionConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=int(heads),
        num_channels=channels,
        patch_size=patch,
        num_patches=n_pos,
        hidden_act=hf.get("hidden_act", "gelu_pytorch_tanh"),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        vision_use_head=False,
    )


def make_processor(config: dict | None = None, patch_size: int = 16):
    """transformers' SigLIP2 NaFlex image processor, on its PIL backend (the same on every machine).

    ``config`` is the content of ``preprocessor_config.json`` (only the resize/normalise settings are read).
    """
    import transformers

    cls = getattr(transformers, "Siglip2ImageProcessorPil", None)
    if cls is None:  # transformers 4.x: the slow processor is the PIL/numpy one
        cls = transformers.Siglip2ImageProcessor
    kwargs = {"patch_size": patch_size}
    kwargs.update({k: v for k, v in (config or {}).items() if k in _PROCESSOR_KEYS})
    return cls(**kwargs)


def to_pil(image: torch.Tensor):
    """A ComfyUI IMAGE item ``[H, W, 3]`` (float 0..1) as an 8-bit RGB PIL image (what the reference pipeline gets)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[-1] < 3:
        raise ZImageError(f"expected an image [height, width, 3], got shape {tuple(image.shape)}.")
    arr = (image[..., :3].detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def _locate(path: Path) -> tuple[Path, dict | None, dict | None]:
    """(weights, config.json content, preprocessor_config.json content) for a folder or a single file."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and (path / "siglip").is_dir():  # an Omni model root ships the encoder as siglip/
        folder = path = path / "siglip"

    def read(name: str) -> dict | None:
        f = folder / name
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"vision encoder: cannot read '{f}' ({e}).") from e

    return path, read("config.json"), read("preprocessor_config.json")


def probe_vision(path: str | os.PathLike) -> FileProbe:
    """What a SigLIP2 vision-tower file or folder holds, from its header: the config and its tensors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"vision encoder: '{p}' does not exist. " + SIGLIP_HELP)
    weights, hf, _ = _locate(p)
    view = _tower_view(weights, p)
    shapes = {k: tuple(view.shape(k)) for k in view}
    return FileProbe(p, infer_vision_config(shapes, hf), {k: TensorInfo(v) for k, v in shapes.items()}, "siglip2")


def _tower_view(weights: Path, p: Path) -> WeightSource:
    """The SigLIP2 vision tower's tensors under their canonical names; anything else raises one clear error."""
    try:
        src = WeightSource.open(weights, what="vision encoder")
    except CheckpointError as e:
        raise CheckpointError(f"{e} {SIGLIP_HELP}") from None
    view = src.renamed(_canonical)
    if "embeddings.patch_embedding.weight" not in view:
        raise CheckpointError(f"vision encoder: '{p}' holds no SigLIP2 vision tower. " + SIGLIP_HELP)
    return view


class VisionEncoder:
    """SigLIP2 vision tower + NaFlex processor: images in, ``[h, w, hidden]`` patch-grid features out."""

    def __init__(self, model, processor, source: Path | None = None):
        self.model = model
        self.processor = processor
        self.source = source

    @classmethod
    def load(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> VisionEncoder:
        from transformers import Siglip2VisionModel

        p = Path(path).expanduser()
        if not p.exists():
            raise CheckpointError(f"vision encoder: '{p}' does not exist. " + SIGLIP_HELP)
        weights, hf, pre = _locate(p)
        view = _tower_view(weights, p)
        cfg = infer_vision_config({k: view.shape(k) for k in view}, hf)
        with torch.device("meta"):
            model = Siglip2VisionModel(cfg)
        names = {n: n for n, _ in model.named_parameters()}
        by_canonical = {_canonical(n) or n: n for n in names}  # transformers 4.x nests the tower in vision_model.
        getters = {}
        for k in view:
            if k not in by_canonical:
                continue  # e.g. the pooling head
            getters[by_canonical[k]] = lambda k=k: view[k]
        materialize(model, getters, dtype, device, what="vision encoder")
        model.eval().requires_grad_(False)
        log.info(
            "vision encoder: SigLIP2 hidden %d, %d layers, patch %d, from '%s' as %s on %s",
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.patch_size,
            p,
            dtype,
            device,
        )
        return cls(model, make_processor(pre, cfg.patch_size), source=weights)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> VisionEncoder:
        """Move the weights; the encoder computes where they are."""
        self.model.to(device)
        return self

    def encode(self, images) -> list[torch.Tensor]:
        """One float32 ``[h, w, hidden]`` feature grid per image (PIL images, or IMAGE items ``[H, W, 3]``)."""
        out = []
        for image in images:
            pil = image if not torch.is_tensor(image) else to_pil(image)
            inputs = self.processor(images=[pil], return_tensors="pt")
            h, w = (int(v) for v in inputs["spatial_shapes"][0])
            with torch.inference_mode():
                hidden = self.model(
                    pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                    pixel_attention_mask=inputs["pixel_attention_mask"].to(self.device),
                    spatial_shapes=inputs["spatial_shapes"].to(self.device),
                ).last_hidden_state
            out.append(hidden[0, : h * w].reshape(h, w, -1).float())
        return out
