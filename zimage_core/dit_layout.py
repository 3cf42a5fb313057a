"""DiT checkpoint layouts: the key tables, layout detection and config inference, read from file headers.

Layouts
- ``diffusers``: ``transformer/config.json`` + shards, split ``to_q/to_k/to_v`` (fp32 or bf16).
- ``comfyui``: one file with Lumina2 names and fused ``attention.qkv``, optionally prefixed
  ``model.diffusion_model.``. This is the layout of :class:`~zimage_core.dit.ZImageDiT` itself.
- ``zimage``: the project's own saves: the ComfyUI layout plus the config in the file metadata.

The renames are a declarative table (:data:`DIFFUSERS_TO_NATIVE`); the only structural rule is the
qkv fusion, ``qkv = cat([to_q, to_k, to_v], dim=0)``, which round-trips exactly. Loading and writing
(:mod:`zimage_core.checkpoints`) and the quantized loaders (:mod:`zimage_core.quant.load`) both read the
layout from here, so neither imports the other.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .config import DiTConfig, default_axes_dims
from .errors import CheckpointError
from .quant.comfy import is_aux_key
from .weights import WeightSource, resolve_weight_files

# (diffusers fragment, native fragment), applied with str.replace in this order.
DIFFUSERS_TO_NATIVE: tuple[tuple[str, str], ...] = (
    ("all_final_layer.2-1.", "final_layer."),
    ("all_x_embedder.2-1.", "x_embedder."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
QKV_SPLIT = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")
QKV_FUSED = ".attention.qkv.weight"
NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DROPPED_KEYS = ("norm_final.weight",)  # Lumina2 leftover in some ComfyUI files, unused
META_FORMAT = "zimage_format"
META_CONFIG = "zimage_config"
LAYOUTS = ("comfyui", "diffusers", "zimage")


def diffusers_to_native_key(key: str) -> str:
    for a, b in DIFFUSERS_TO_NATIVE:
        key = key.replace(a, b)
    return key


def native_to_diffusers_key(key: str) -> str:
    for a, b in reversed(DIFFUSERS_TO_NATIVE):
        key = key.replace(b, a)
    return key


def strip_prefix(key: str) -> str:
    for p in NATIVE_PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def detect_layout(keys: list[str], metadata: Mapping[str, str] | None = None) -> str:
    """``diffusers``, ``comfyui`` or ``zimage`` for a DiT; raise a CheckpointError for anything else."""
    if metadata and metadata.get(META_FORMAT) == "zimage":
        return "zimage"
    stripped = {strip_prefix(k) for k in keys}
    if "cap_embedder.1.weight" in stripped and any(k.endswith(QKV_SPLIT[0]) for k in stripped):
        return "diffusers"
    if "cap_embedder.1.weight" in stripped and any(k.endswith(QKV_FUSED) for k in stripped):
        return "comfyui"
    raise CheckpointError(describe_wrong_file(keys, "a Z-Image diffusion model (DiT)"))


def describe_wrong_file(keys: list[str], expected: str) -> str:
    """A message naming what a file looks like, for 'wrong kind of checkpoint' errors."""
    ks = set(keys)
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.")) for k in ks):
        found = "a VAE (autoencoder)"
    elif any(".self_attn.q_proj." in k for k in ks):
        found = "a language/text-encoder model"
    elif any(k.startswith(("double_blocks.", "single_blocks.")) for k in ks):
        found = "a Flux diffusion model"
    elif any(k.startswith(("model.diffusion_model.input_blocks", "input_blocks.")) for k in ks):
        found = "a Stable Diffusion UNet"
    elif any(".lora_" in k or "lora_down" in k or ".lora." in k for k in ks):
        found = "a LoRA"
    else:
        found = f"an unknown model ({len(ks)} tensors, e.g. {', '.join(sorted(ks)[:3])})"
    return f"expected {expected}, but the file holds {found}."


# ---------------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------------
def infer_config(shapes: Mapping[str, tuple[int, ...]], overrides: Mapping | None = None) -> DiTConfig:
    """Build the DiTConfig from native-layout tensor shapes (plus optional config.json values)."""

    def count(prefix: str) -> int:
        idx = {int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
        return max(idx) + 1 if idx else 0

    try:
        dim, patch_dim = shapes["x_embedder.weight"]
        head_dim = shapes["layers.0.attention.q_norm.weight"][0]
        f = dict(
            dim=dim,
            n_layers=count("layers"),
            n_refiner_layers=count("noise_refiner"),
            n_heads=dim // head_dim,
            ffn_dim=shapes["layers.0.feed_forward.w1.weight"][0],
            in_channels=patch_dim // 4,
            cap_feat_dim=shapes["cap_embedder.1.weight"][1],
            adaln_dim=shapes["t_embedder.mlp.2.weight"][0],
            t_mid_dim=shapes["t_embedder.mlp.0.weight"][0],
            siglip_feat_dim=shapes["siglip_embedder.1.weight"][1] if "siglip_embedder.1.weight" in shapes else None,
            axes_dims=default_axes_dims(head_dim),
        )
    except KeyError as e:
        raise CheckpointError(
            f"the DiT checkpoint lacks tensor {e}; the file is truncated or not a Z-Image model."
        ) from e
    for k in ("axes_dims", "axes_lens", "rope_theta", "norm_eps", "t_scale"):
        if overrides and overrides.get(k) is not None:
            v = overrides[k]
            f[k] = tuple(v) if isinstance(v, list) else v
    return DiTConfig(**f)


def config_to_diffusers(cfg: DiTConfig) -> dict:
    return {
        "_class_name": "ZImageTransformer2DModel",
        "all_patch_size": [cfg.patch_size],
        "all_f_patch_size": [cfg.f_patch_size],
        "in_channels": cfg.in_channels,
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_refiner_layers": cfg.n_refiner_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_heads,
        "norm_eps": cfg.norm_eps,
        "qk_norm": True,
        "cap_feat_dim": cfg.cap_feat_dim,
        "siglip_feat_dim": cfg.siglip_feat_dim,
        "rope_theta": cfg.rope_theta,
        "t_scale": cfg.t_scale,
        "axes_dims": list(cfg.axes_dims),
        "axes_lens": list(cfg.axes_lens),
    }


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def native_view(src, to_native: Callable[[str], str | None], what: str) -> dict[str, tuple]:
    """``{native key: (getter, shape, stored keys)}`` of a safetensors source seen through the native layout.

    ``to_native`` renames a stored key (None drops it). Split ``to_q/to_k/to_v`` weights become one fused
    ``attention.qkv`` (``cat([q, k, v])``, read lazily); scales and recipes of quantized weights are left to
    :mod:`zimage_core.quant`. A split layout with a missing part raises :class:`CheckpointError` naming ``what``.
    """
    out: dict[str, tuple] = {}
    for key in src:
        k = to_native(key)
        if k is None or is_aux_key(k) or k.endswith((QKV_SPLIT[1], QKV_SPLIT[2])):
            continue
        if not k.endswith(QKV_SPLIT[0]):
            out[k] = (lambda key=key: src[key], tuple(src.shape(key)), [key])
            continue
        base = key[: -len(QKV_SPLIT[0])]
        parts = [base + sfx for sfx in QKV_SPLIT]
        missing = [p for p in parts if p not in src]
        if missing:
            raise CheckpointError(f"{what}: {missing} missing next to '{key}'; the file is incomplete.")
        q = src.shape(parts[0])
        out[k[: -len(QKV_SPLIT[0])] + QKV_FUSED] = (
            lambda parts=parts: torch.cat([src[p] for p in parts], dim=0),
            (3 * q[0], q[1]),
            parts,
        )
    return out


class DiTCheckpoint:
    """A DiT checkpoint seen through the native layout: ``getters`` yields each native tensor lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        folder = self.path
        if folder.is_dir() and (folder / "transformer").is_dir():
            folder = folder / "transformer"
        self.source = WeightSource(resolve_weight_files(folder, "diffusion model"), "diffusion model")
        self.layout = detect_layout(list(self.source), self.source.metadata)
        overrides = None
        if folder.is_dir() and (folder / "config.json").exists():
            overrides = json.loads((folder / "config.json").read_text())
        elif self.layout == "zimage" and META_CONFIG in self.source.metadata:
            overrides = json.loads(self.source.metadata[META_CONFIG])
        self.getters: dict[str, Callable[[], torch.Tensor]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._index()
        self.config = infer_config(self.shapes, overrides)

    def _index(self) -> None:
        def to_native(key: str) -> str | None:
            k = diffusers_to_native_key(strip_prefix(key))
            return None if k in DROPPED_KEYS else k

        for k, (get, shape, _) in native_view(self.source, to_native, "diffusion model").items():
            self.getters[k] = get
            self.shapes[k] = shape

    def nbytes(self) -> int:
        return self.source.nbytes()
