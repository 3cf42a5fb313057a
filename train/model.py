"""Building the DiT to train: from a preset (plus explicit sizes) with a fresh initialisation, or from a file.

From scratch, linear layers get Xavier-uniform weights and zero biases, the time embedder N(0, 0.02), and
every adaLN modulation plus the final projection start at zero ("adaLN-Zero", as DiT): with Z-Image's
``tanh`` gates each block starts as the identity and the model's first output is zero. Initialisation
draws from a seeded generator, so a run starts from the same weights on any device.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from zimage_core.checkpoints import load_dit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.dit_layout import DiTCheckpoint
from zimage_core.dtypes import dtype_from_name
from zimage_core.errors import ZImageError

from .config import ModelSection

log = logging.getLogger(__name__)


def preset_config(m: ModelSection) -> DiTConfig:
    base = {
        "tiny": DiTConfig.tiny,
        "mid": DiTConfig.mid,
        "turbo": DiTConfig.turbo,
        "base": DiTConfig.turbo,
        "omni": DiTConfig.omni,
    }[m.preset]()
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(m.dims) - fields)
    if unknown:
        raise ZImageError(f"model.dims: unknown field(s) {unknown}; valid: {sorted(fields)}.")
    dims = {k: tuple(v) if isinstance(v, list) else v for k, v in m.dims.items()}
    if "dim" in dims or "n_heads" in dims:
        from zimage_core.config import default_axes_dims

        cfg_dim, heads = dims.get("dim", base.dim), dims.get("n_heads", base.n_heads)
        dims.setdefault("axes_dims", default_axes_dims(cfg_dim // heads))
    try:
        return base.replace(**dims)
    except ValueError as e:
        raise ZImageError(f"model.dims {m.dims} do not make a valid DiT: {e}") from e


@torch.no_grad()
def init_weights(dit: ZImageDiT, seed: int) -> ZImageDiT:
    g = torch.Generator().manual_seed(seed)
    for mod in dit.modules():
        if isinstance(mod, nn.Linear):
            bound = (6.0 / (mod.in_features + mod.out_features)) ** 0.5
            mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) * 2 * bound - bound)
            if mod.bias is not None:
                mod.bias.zero_()
    for mod in dit.t_embedder.mlp:
        if isinstance(mod, nn.Linear):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.02)
    for name, mod in dit.named_modules():
        if name.endswith("adaLN_modulation"):
            for sub in mod.modules():
                if isinstance(sub, nn.Linear):
                    sub.weight.zero_()
                    sub.bias.zero_()
    dit.final_layer.linear.weight.zero_()
    dit.final_layer.linear.bias.zero_()
    for name, p in dit.named_parameters():
        if name.endswith("pad_token"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return dit


def _grow_omni(dit: ZImageDiT, siglip_dim: int, seed: int) -> ZImageDiT:
    """A copy of ``dit`` with a freshly initialised SigLIP branch (refiners, embedder, pad token)."""
    cfg = dit.cfg.replace(siglip_feat_dim=siglip_dim)
    grown = init_weights(ZImageDiT(cfg), seed).to(dit.dtype)
    missing, unexpected = grown.load_state_dict(dit.state_dict(), strict=False)
    if unexpected or any(not k.startswith("siglip_") for k in missing):
        raise ZImageError(
            f"cannot add a SigLIP branch to this DiT (missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    log.info("added a fresh SigLIP branch (input width %d) to the DiT", siglip_dim)
    return grown


def build_dit(m: ModelSection, seed: int, trainable: bool = True) -> ZImageDiT:
    """The DiT for a run, on the CPU in ``m.dtype``; parameters require grad when ``trainable``."""
    dtype = dtype_from_name(m.dtype)
    if m.checkpoint:
        cfg = DiTCheckpoint(m.checkpoint).config
        if m.dims:
            log.warning("model.dims is ignored when starting from a checkpoint (its sizes come from the file)")
        dit = load_dit(m.checkpoint, dtype=dtype if not m.omni or cfg.is_omni else torch.float32, device="cpu")
        if m.omni and not cfg.is_omni:
            dit = _grow_omni(dit, m.siglip_dim, seed).to(dtype)
        log.info("DiT from %s (%d layers, dim %d)", m.checkpoint, dit.cfg.n_layers, dit.cfg.dim)
    else:
        cfg = preset_config(m)
        if m.omni and not cfg.is_omni:
            cfg = cfg.replace(siglip_feat_dim=m.siglip_dim)
        with torch.random.fork_rng(devices=[]):
            dit = init_weights(ZImageDiT(cfg), seed).to(dtype)
        log.info(
            "DiT from scratch: preset %s, %d layers, dim %d, %.1fM parameters",
            m.preset,
            cfg.n_layers,
            cfg.dim,
            sum(p.numel() for p in dit.parameters()) / 1e6,
        )
    dit.requires_grad_(trainable)
    dit.gradient_checkpointing = bool(m.gradient_checkpointing)
    return dit.train(trainable)


def dit_config_for(m: ModelSection) -> DiTConfig:
    """The architecture :func:`build_dit` will produce, without building it (reads only the file header)."""
    cfg = DiTCheckpoint(m.checkpoint).config if m.checkpoint else preset_config(m)
    if m.omni and not cfg.is_omni:
        cfg = cfg.replace(siglip_feat_dim=m.siglip_dim)
    return cfg
