"""Random-weight Flux-style VAEs in the diffusers and BFL layouts, for tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from zimage_core.config import VAEConfig
from zimage_core.vae import convert_diffusers_to_bfl
from zimage_core.weights import save_safetensors


def make_diffusers_vae(cfg: VAEConfig, seed: int) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` shaped like the Flux VAE, every parameter randomised from ``seed``."""
    n = len(cfg.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            act_fn="silu",
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            sample_size=64,
            scaling_factor=cfg.scaling_factor,
            shift_factor=cfg.shift_factor,
            force_upcast=True,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
        )
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in vae.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * noise)  # GroupNorm scales
                elif name.endswith("bias"):
                    p.copy_(0.1 * noise)
                else:
                    p.add_(0.1 * p.std() * noise)
    return vae.eval()


def save_diffusers_vae(vae: AutoencoderKL, folder: str | os.PathLike) -> Path:
    """``save_pretrained`` layout: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (float32)."""
    folder = Path(folder)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def save_bfl_vae(vae: AutoencoderKL, file: str | os.PathLike) -> Path:
    """The same weights in the BFL ``ae.safetensors`` layout (names via zimage_core's key table)."""
    sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    save_safetensors(convert_diffusers_to_bfl(sd), file)
    return Path(file)
