"""Random-weight DiTs made with the reference (diffusers) class, saved in every layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zimage_core.checkpoints import save_dit
from zimage_core.config import DiTConfig
from zimage_core.dit_layout import config_to_diffusers


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter (norm weights, pad tokens and biases included) seeded non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                std = p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight") and "norm" in name or name.endswith("0.weight") and p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def make_diffusers_dit(cfg: DiTConfig, seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    kwargs = config_to_diffusers(cfg)
    kwargs.pop("_class_name")
    if kwargs["siglip_feat_dim"] is None:
        kwargs.pop("siglip_feat_dim")
    model = ZImageTransformer2DModel(**kwargs)
    return randomize_(model, seed).eval()


def diffusers_to_native_state(model) -> dict[str, torch.Tensor]:
    from zimage_core.dit_layout import DIFFUSERS_TO_NATIVE, QKV_FUSED, QKV_SPLIT

    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        nk = k
        for a, b in DIFFUSERS_TO_NATIVE:
            nk = nk.replace(a, b)
        if nk.endswith(QKV_SPLIT[0]):
            base = k[: -len(QKV_SPLIT[0])]
            out[nk[: -len(QKV_SPLIT[0])] + QKV_FUSED] = torch.cat([sd[base + s] for s in QKV_SPLIT])
        elif nk.endswith(QKV_SPLIT[1]) or nk.endswith(QKV_SPLIT[2]):
            continue
        else:
            out[nk] = v.clone()
    return out


def save_diffusers_dit(model, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """The Tongyi-MAI ``transformer/`` layout, via diffusers' own save_pretrained."""
    folder = Path(folder)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == "ZImageTransformer2DModel"
    return folder


def save_comfy_dit(model, file: Path, prefix: str = "", cfg: DiTConfig | None = None) -> Path:
    """The ComfyUI single file (fused qkv, Lumina2 names), optionally with ``model.diffusion_model.``."""
    state = diffusers_to_native_state(model)
    if prefix:
        from zimage_core.weights import save_safetensors

        save_safetensors({prefix + k: v for k, v in state.items()}, file)
        return Path(file)
    return save_dit(state, cfg or DiTConfig.tiny(), file, "comfyui")
