"""The frozen encoders a run needs for its cache and samples: load them from files, or build random tiny ones.

``random-tiny`` (for ``model.text_encoder`` / ``model.vae``) builds, from ``model.encoder_seed``, a 3-layer
Qwen3 of width 32 with a word-hash tokenizer and a tiny Flux VAE (widths 32/32/64/64). They turn the
synthetic data into distinct latents and caption features without any download, which is all the tiny
demos and tests need; their outputs mean nothing for real images.
"""

from __future__ import annotations

import logging
import re
import zlib

import torch

from zimage_core.config import TextEncoderConfig, VAEConfig
from zimage_core.dtypes import resolve_dtype
from zimage_core.errors import ZImageError
from zimage_core.text_encoder import TextEncoder, build_qwen3, layers_used
from zimage_core.vae import FluxVAE, load_vae
from zimage_core.weights import materialize

from .config import RANDOM_TINY, ModelSection

log = logging.getLogger(__name__)

WORD_VOCAB = 4096


class WordTokenizer:
    """Chat-template markers (``<|im_start|>`` ...), words and single symbols mapped to ids by a stable hash.

    Just enough for :class:`TextEncoder` with the random tiny model: a short caption stays a short sequence
    (about 12 tokens with the template), which keeps the tiny demos fast.
    """

    pad_token_id = 0
    bos_token_id = 1
    _pieces = re.compile(r"<\|[a-z_]+\|>|\w+|[^\w\s]|\n")

    def __call__(self, text: str, truncation: bool = False, max_length: int | None = None) -> dict:
        ids = [self.bos_token_id] + [
            2 + zlib.crc32(p.encode("utf-8")) % (WORD_VOCAB - 2) for p in self._pieces.findall(text)
        ]
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": ids}


def random_tiny_text_encoder(seed: int = 0, device: str | torch.device = "cpu") -> TextEncoder:
    cfg = TextEncoderConfig.tiny(vocab_size=WORD_VOCAB, max_position_embeddings=4096)
    model, buffers = build_qwen3(cfg, layers_used(cfg))
    gen = torch.Generator().manual_seed(seed)
    getters = {}
    for name, p in model.named_parameters():
        if "norm" in name:
            value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        else:
            value = torch.randn(p.shape, generator=gen) * (0.5 if "embed" in name else 0.15)
        getters[name] = lambda v=value: v
    getters.update({n: (lambda b=b: b) for n, b in buffers.items()})
    materialize(
        model,
        getters,
        torch.float32,
        device,
        keep_dtype=lambda n: n.startswith("rotary_emb."),
        what="random tiny text encoder",
    )
    model.eval().requires_grad_(False)
    return TextEncoder(model, WordTokenizer(), cfg)


@torch.no_grad()
def random_tiny_vae(seed: int = 0, device: str | torch.device = "cpu") -> FluxVAE:
    """A random tiny Flux VAE whose latents have the statistics of the real one in model space (zero mean, unit
    variance per channel, measured on smooth random images), so that the flow-matching loss weighs the image
    content as it does with the real VAE."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = FluxVAE(VAEConfig.tiny()).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    probe = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g) * 2 - 1, size=(64, 64), mode="bilinear")
    raw = vae.encode_raw(probe)
    mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3)).clamp_min(1e-6)
    cfg, conv = vae.config, vae.encoder.conv_out
    gain = (1.0 / cfg.scaling_factor) / std  # model space (raw - shift) * scale: unit std, zero mean
    n = cfg.latent_channels  # conv_out gives [mean, logvar]; only the mean half is rescaled
    conv.weight[:n] *= gain.view(-1, 1, 1, 1)
    conv.bias[:n] = (conv.bias[:n] - mean) * gain + cfg.shift_factor
    return vae.to(device)


def load_text_encoder(m: ModelSection, device: torch.device) -> TextEncoder:
    if m.text_encoder == RANDOM_TINY:
        log.info("text encoder: random tiny Qwen3 (seed %d) with a word-hash tokenizer", m.encoder_seed)
        return random_tiny_text_encoder(m.encoder_seed, device)
    if not m.text_encoder:
        raise ZImageError(
            "model.text_encoder is not set: give the Qwen3 text encoder (qwen_3_4b.safetensors or a text_encoder/ "
            f"folder), or '{RANDOM_TINY}' for the tiny CPU demo."
        )
    dtype = resolve_dtype(m.encoder_dtype, device)
    return TextEncoder.load(m.text_encoder, tokenizer=m.tokenizer or None, dtype=dtype, device=device)


def load_vae_for(m: ModelSection, device: torch.device) -> FluxVAE:
    if m.vae == RANDOM_TINY:
        log.info("VAE: random tiny Flux VAE (seed %d)", m.encoder_seed)
        return random_tiny_vae(m.encoder_seed + 1, device)
    if not m.vae:
        raise ZImageError(
            f"model.vae is not set: give the Flux VAE (ae.safetensors or a vae/ folder), or '{RANDOM_TINY}'."
        )
    vae = load_vae(m.vae, dtype=torch.float32, device=device)
    return vae.requires_grad_(False)


class VisionForCache:
    """A :class:`zimage_core.vision.VisionEncoder` as the cache builder calls it: ``vision(images) -> [[h, w, C]]``."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.model = encoder.model  # what the cache fingerprints

    def __call__(self, images) -> list[torch.Tensor]:
        return [f.cpu() for f in self.encoder.encode(images)]


def load_vision(m: ModelSection, device: torch.device):
    """The SigLIP2 vision encoder for edit data on Omni models (None when not configured)."""
    if not m.vision:
        return None
    from zimage_core.vision import VisionEncoder

    return VisionForCache(VisionEncoder.load(m.vision, dtype=resolve_dtype(m.encoder_dtype, device), device=device))
