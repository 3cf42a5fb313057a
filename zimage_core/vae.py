"""The 16-channel Flux VAE: model, BFL/diffusers key table, loader and image helpers.

Module names follow the BFL ``ae.safetensors`` layout, so that file loads with no renaming; the
diffusers ``AutoencoderKL`` layout is mapped onto it by :data:`VAE_KEY_TABLE`. Latents come in
two spaces: *raw* (what the VAE produces, what a ComfyUI LATENT holds) and *model* space
``(raw - shift) * scale`` (what the DiT sees). Tiled encode/decode lives in :mod:`.vae_tiling`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import winograd
from .config import VAE_SCALE, VAE_SHIFT, VAEConfig
from .errors import CheckpointError, ZImageError
from .vae_tiling import resolve_tile, tiled_map
from .weights import FileProbe, TensorInfo, WeightSource, materialize, resolve_weight_files

log = logging.getLogger(__name__)

Generators = torch.Generator | Sequence[torch.Generator] | None
Tile = int | str | None

EXPECTED_FILE_HINT = (
    "Z-Image needs the 16-channel Flux VAE file 'ae.safetensors' (or a diffusers 'vae/' folder): "
    "put it in ComfyUI/models/vae or give it with --vae."
)


# ---------------------------------------------------------------------------------------------
# Latent spaces
# ---------------------------------------------------------------------------------------------
def to_model_space(raw: torch.Tensor, scale: float = VAE_SCALE, shift: float = VAE_SHIFT) -> torch.Tensor:
    """Raw VAE latents -> DiT latents: ``(raw - shift) * scale``."""
    return (raw - shift) * scale


def to_raw_space(z: torch.Tensor, scale: float = VAE_SCALE, shift: float = VAE_SHIFT) -> torch.Tensor:
    """DiT latents -> raw VAE latents: ``z / scale + shift``."""
    return z / scale + shift


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh tensor (a norm's output), in place when no gradient needs the input kept."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def _cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on the CPU: oneDNN's convolutions run ~15% faster on NHWC activations (the same values up
    to rounding); other devices keep their layout. Used for decoding only: encoding stays NCHW, where oneDNN
    gives the same latents for an image alone or in a batch (NHWC's last-bit differences are amplified by the
    GroupNorms on flat-colour images, and a training cache encodes in batches what a test encodes alone)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.ndim == 4 else x


def _norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = winograd.conv3x3(self.conv1, _silu(self.norm1(x)))
        h = winograd.conv3x3(self.conv2, _silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x) if not torch.is_grad_enabled() else x + h  # h is this block's own fresh tensor


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, HW, C]
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        out = F.scaled_dot_product_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (the reference's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return winograd.upsample_conv3x3(self.conv, x)


class Level(nn.Module):
    """One resolution level: ``block.{j}`` resnets and an optional ``downsample``/``upsample``."""

    def __init__(self, cin: int, cout: int, n_blocks: int, groups: int, resample: type[nn.Module] | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n_blocks))
        if resample is not None:
            self.add_module(name, resample(cout))
        self.resample = name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        if self.resample is not None:
            x = getattr(self, self.resample)(x)
        return x


class MidBlock(nn.Module):
    """``block_1`` -> ``attn_1`` -> ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels ``[B, 3, H, W]`` -> moments ``[B, 2*latent, H/8, W/8]`` (mean then logvar)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, Downsample if i < n - 1 else None, "downsample")
            for i in range(n)
        )
        self.mid = MidBlock(ch[-1], g)
        self.norm_out = _norm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution part (conv_in and the down levels), which tiling splits up."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The low-resolution part (mid block with global attention, conv_out): never tiled."""
        return self.conv_out(_silu(self.norm_out(self.mid(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Decoder(nn.Module):
    """Raw latents ``[B, latent, h, w]`` -> pixels ``[B, 3, 8h, 8w]``; ``up.{k}`` runs from k = n-1 to 0."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], g)
        self.up = nn.ModuleList(
            Level(ch[min(k + 1, n - 1)], ch[k], cfg.layers_per_block + 1, g, Upsample if k > 0 else None, "upsample")
            for k in range(n)
        )
        self.norm_out = _norm(g, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def stem(self, z: torch.Tensor) -> torch.Tensor:
        """The low-resolution part (conv_in, mid block with global attention): never tiled."""
        return self.mid(self.conv_in(z))

    def upsample_path(self, h: torch.Tensor) -> torch.Tensor:
        """The up levels and conv_out, which tiling splits up."""
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_silu(self.norm_out(h)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsample_path(self.stem(z))


def _randn(shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn like diffusers' ``randn_tensor`` (CPU generators draw on the CPU)."""
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    gens = list(generator) if isinstance(generator, Sequence) else [generator]
    gen_dev = gens[0].device if gens[0] is not None else device
    draw_dev = torch.device("cpu") if (gen_dev.type == "cpu" and device.type != "cpu") else device
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=draw_dev, dtype=dtype).to(device)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, device=draw_dev, dtype=dtype) for g in gens]).to(device)


class FluxVAE(nn.Module):
    """The Flux autoencoder. ``encode``/``decode`` work in model space, ``*_raw`` in raw VAE space.

    Inputs are cast to the module's dtype and device; outputs are float32. ``tile`` is a tile side
    in pixels, ``"auto"`` (tile only large images) or None (never tile).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        if any(c % config.norm_num_groups for c in config.block_out_channels):
            raise ValueError(
                f"block_out_channels {config.block_out_channels} not divisible by {config.norm_num_groups}"
            )
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _no_autocast(self):
        dev = self.device.type
        return torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu", "mps", "xpu") else nullcontext()

    def _check_pixels(self, x: torch.Tensor) -> None:
        f = self.config.downscale
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ZImageError(f"VAE encode expects images [B, {self.config.in_channels}, H, W]; got {tuple(x.shape)}.")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ZImageError(
                f"VAE encode: image size {x.shape[-1]}x{x.shape[-2]} is not a multiple of {f}; crop or resize it first."
            )

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ZImageError(
                f"VAE decode expects latents [B, {self.config.latent_channels}, h, w]; got {tuple(z.shape)}. "
                "Is this latent from another model family?"
            )

    @torch.no_grad()
    def latent_dist(self, x: torch.Tensor, tile: Tile = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clamped logvar of the posterior, in raw space and the module dtype."""
        self._check_pixels(x)
        x = x.to(device=self.device, dtype=self.dtype)
        tile_px = resolve_tile(tile, x.shape[-2], x.shape[-1], self.config.downscale)
        with self._no_autocast():
            if tile_px is None:
                moments = self.encoder(x)
            else:
                feats = tiled_map(self.encoder.features, x, tile_px, self.config.downscale, upscale=False)
                moments = self.encoder.head(feats.to(self.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_raw(
        self, x: torch.Tensor, sample: bool = False, generator: Generators = None, tile: Tile = None
    ) -> torch.Tensor:
        """Pixels in [-1, 1] -> raw latents (posterior mean, or a sample when ``sample``), float32."""
        mean, logvar = self.latent_dist(x, tile)
        if not sample:
            return mean.float()
        noise = _randn(tuple(mean.shape), generator, mean.device, mean.dtype)
        return (mean + torch.exp(0.5 * logvar) * noise).float()

    def encode(
        self, x: torch.Tensor, sample: bool = False, generator: Generators = None, tile: Tile = None
    ) -> torch.Tensor:
        """Pixels in [-1, 1] -> model-space latents ``(raw - shift) * scale``, float32."""
        raw = self.encode_raw(x, sample=sample, generator=generator, tile=tile)
        return to_model_space(raw, self.config.scaling_factor, self.config.shift_factor)

    @torch.no_grad()
    def decode_raw(self, raw: torch.Tensor, tile: Tile = None) -> torch.Tensor:
        """Raw latents -> pixels in about [-1, 1] (not clamped), float32."""
        self._check_latents(raw)
        f = self.config.downscale
        raw = _cpu_layout(raw.to(device=self.device, dtype=self.dtype))
        tile_px = resolve_tile(tile, raw.shape[-2] * f, raw.shape[-1] * f, f)
        with self._no_autocast():
            if tile_px is None:
                return self.decoder(raw).float()
            return tiled_map(self.decoder.upsample_path, self.decoder.stem(raw), tile_px, f, upscale=True)

    def decode(self, z: torch.Tensor, tile: Tile = None) -> torch.Tensor:
        """Model-space latents -> pixels in about [-1, 1] (not clamped), float32."""
        raw = to_raw_space(z.float(), self.config.scaling_factor, self.config.shift_factor)
        return self.decode_raw(raw, tile=tile)


# ---------------------------------------------------------------------------------------------
# Key table: diffusers AutoencoderKL <-> BFL ae.safetensors
# ---------------------------------------------------------------------------------------------
# (diffusers template, BFL template). Placeholders: {m} encoder|decoder, {i} {j} indices, {r} a resnet
# layer, {p} weight|bias, {u} a diffusers up_blocks index <-> {k} the BFL up index, k = levels - 1 - u.
VAE_KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("{m}.conv_in.{p}", "{m}.conv_in.{p}"),
    ("{m}.conv_out.{p}", "{m}.conv_out.{p}"),
    ("{m}.conv_norm_out.{p}", "{m}.norm_out.{p}"),
    ("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}", "encoder.down.{i}.block.{j}.nin_shortcut.{p}"),
    ("encoder.down_blocks.{i}.resnets.{j}.{r}.{p}", "encoder.down.{i}.block.{j}.{r}.{p}"),
    ("encoder.down_blocks.{i}.downsamplers.0.conv.{p}", "encoder.down.{i}.downsample.conv.{p}"),
    ("decoder.up_blocks.{u}.resnets.{j}.conv_shortcut.{p}", "decoder.up.{k}.block.{j}.nin_shortcut.{p}"),
    ("decoder.up_blocks.{u}.resnets.{j}.{r}.{p}", "decoder.up.{k}.block.{j}.{r}.{p}"),
    ("decoder.up_blocks.{u}.upsamplers.0.conv.{p}", "decoder.up.{k}.upsample.conv.{p}"),
    ("{m}.mid_block.resnets.0.{r}.{p}", "{m}.mid.block_1.{r}.{p}"),
    ("{m}.mid_block.resnets.1.{r}.{p}", "{m}.mid.block_2.{r}.{p}"),
    ("{m}.mid_block.attentions.0.group_norm.{p}", "{m}.mid.attn_1.norm.{p}"),
    ("{m}.mid_block.attentions.0.to_q.{p}", "{m}.mid.attn_1.q.{p}"),
    ("{m}.mid_block.attentions.0.to_k.{p}", "{m}.mid.attn_1.k.{p}"),
    ("{m}.mid_block.attentions.0.to_v.{p}", "{m}.mid.attn_1.v.{p}"),
    ("{m}.mid_block.attentions.0.to_out.0.{p}", "{m}.mid.attn_1.proj_out.{p}"),
)
_PLACEHOLDERS = {
    "m": "encoder|decoder",
    "i": r"\d+",
    "j": r"\d+",
    "u": r"\d+",
    "k": r"\d+",
    "r": "norm1|conv1|norm2|conv2",
    "p": "weight|bias",
}
# BFL attention projections: 1x1 conv weights [C, C, 1, 1]; diffusers stores them as linear [C, C].
ATTN_PROJ_WEIGHT = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _template_regex(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, alt in _PLACEHOLDERS.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alt})")
    return re.compile(f"^{out}$")


@lru_cache(maxsize=2)
def _compiled(to_bfl: bool) -> tuple[tuple[re.Pattern, str], ...]:
    return tuple((_template_regex(d if to_bfl else b), b if to_bfl else d) for d, b in VAE_KEY_TABLE)


def _convert_key(key: str, to_bfl: bool, num_levels: int) -> str | None:
    for pattern, target in _compiled(to_bfl):
        m = pattern.match(key)
        if m is None:
            continue
        fields = m.groupdict()
        if "u" in fields:
            fields["k"] = str(num_levels - 1 - int(fields["u"]))
        elif "k" in fields:
            fields["u"] = str(num_levels - 1 - int(fields["k"]))
        return target.format(**fields)
    return None


def diffusers_to_bfl_key(key: str, num_levels: int = 4) -> str | None:
    """The BFL name of a diffusers ``AutoencoderKL`` key, or None if the table has no rule for it."""
    return _convert_key(key, True, num_levels)


def bfl_to_diffusers_key(key: str, num_levels: int = 4) -> str | None:
    """The diffusers name of a BFL ``ae.safetensors`` key, or None if the table has no rule for it."""
    return _convert_key(key, False, num_levels)


def attn_weight_to_conv(t: torch.Tensor) -> torch.Tensor:
    """Linear ``[C, C]`` -> 1x1 conv ``[C, C, 1, 1]`` (no-op if already 4D)."""
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t


def attn_weight_to_linear(t: torch.Tensor) -> torch.Tensor:
    """1x1 conv ``[C, C, 1, 1]`` -> linear ``[C, C]`` (no-op if already 2D)."""
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


def count_levels(keys: Sequence[str] | Mapping[str, object]) -> int:
    """Number of resolution levels, from ``encoder.down.{i}`` or ``encoder.down_blocks.{i}`` keys."""
    found = {int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down(?:_blocks)?\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def convert_diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict in BFL names and shapes; raises KeyError on a key with no rule."""
    n = count_levels(sd)
    out = {}
    for key, t in sd.items():
        new = diffusers_to_bfl_key(key, n)
        if new is None:
            raise KeyError(f"no BFL name for diffusers VAE key '{key}'")
        out[new] = attn_weight_to_conv(t) if ATTN_PROJ_WEIGHT.match(new) else t
    return out


def convert_bfl_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL VAE state dict in diffusers names and shapes; raises KeyError on a key with no rule."""
    n = count_levels(sd)
    out = {}
    for key, t in sd.items():
        new = bfl_to_diffusers_key(key, n)
        if new is None:
            raise KeyError(f"no diffusers name for BFL VAE key '{key}'")
        out[new] = attn_weight_to_linear(t) if ATTN_PROJ_WEIGHT.match(key) else t
    return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def vae_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], **overrides) -> VAEConfig:
    """Infer a :class:`VAEConfig` from BFL-named tensor shapes; ``overrides`` fill the rest (scale, groups...)."""
    n = count_levels(shapes)
    try:
        channels = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(n))
        lpb = len(
            {m.group(1) for k in shapes if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.conv1\.weight$", k))}
        )
        latent = shapes["decoder.conv_in.weight"][1]
        enc_out = shapes["encoder.conv_out.weight"][0]
        cfg = VAEConfig(
            in_channels=shapes["encoder.conv_in.weight"][1],
            out_channels=shapes["decoder.conv_out.weight"][0],
            latent_channels=latent,
            block_out_channels=channels,
            layers_per_block=lpb,
            **overrides,
        )
    except (KeyError, IndexError) as e:
        raise CheckpointError(
            f"VAE: the weights lack {e}; the file is incomplete or not a Flux VAE. {EXPECTED_FILE_HINT}"
        ) from e
    if n < 1 or enc_out != 2 * latent:
        raise CheckpointError(
            f"VAE: encoder outputs {enc_out} channels for {latent} latent channels. {EXPECTED_FILE_HINT}"
        )
    if any(c % cfg.norm_num_groups for c in channels):
        raise CheckpointError(f"VAE: widths {channels} are not divisible by {cfg.norm_num_groups} norm groups.")
    return cfg


def _describe(keys: list[str]) -> str:
    """A short guess at what a checkpoint that is not a Flux VAE holds."""
    joined = "\n".join(keys)
    if any(
        s in joined
        for s in (
            "attention.qkv",
            "x_embedder",
            "cap_embedder",
            "noise_refiner",
            "context_refiner",
            "model.diffusion_model.",
            "double_blocks.",
            "single_blocks.",
            "adaLN_modulation",
        )
    ):
        return "a diffusion transformer (DiT / UNet) checkpoint"
    if any(s in joined for s in ("embed_tokens", "self_attn.", "text_encoders.", "text_model.", "encoder.block.")):
        return "a text encoder checkpoint"
    if any(s in joined for s in ("lora_A", "lora_B", "lora_down", "lora_up")):
        return "a LoRA"
    return f"an unrecognised checkpoint (first keys: {', '.join(keys[:3]) or 'none'})"


def _vae_files(path: Path) -> tuple[list[Path], dict]:
    """Weight files and diffusers config for a file, a ``vae/`` folder or a model root with ``vae/``."""
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    config: dict = {}
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"VAE: cannot read '{cfg_file}' ({e}).") from e
        main = path / "diffusion_pytorch_model.safetensors"
        if main.is_file():
            return [main], config
    return resolve_weight_files(path, "VAE"), config


def _bfl_view(src: WeightSource, where: Path) -> tuple[WeightSource, str]:
    """Strip an all-in-one prefix and map diffusers names; returns the BFL-named view and the layout name."""
    keys = list(src)
    for prefix in ("vae.", "first_stage_model."):
        if any(k.startswith((prefix + "encoder.", prefix + "decoder.")) for k in keys):
            src = src.renamed(lambda k, p=prefix: k[len(p) :] if k.startswith(p) else None)
            keys = list(src)
            break
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys):
        raise CheckpointError(
            f"VAE: '{where}' holds an SD-style VAE (it has quant_conv), not the Flux VAE. {EXPECTED_FILE_HINT}"
        )
    if "encoder.conv_in.weight" not in keys or "decoder.conv_in.weight" not in keys:
        raise CheckpointError(
            f"VAE: '{where}' is not a VAE; it looks like {_describe(sorted(keys))}. {EXPECTED_FILE_HINT}"
        )
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys):
        n = count_levels(keys)
        return src.renamed(lambda k: diffusers_to_bfl_key(k, n) or k), "diffusers"
    return src, "bfl"


def probe_vae(path: str | os.PathLike) -> FileProbe:
    """What a Flux VAE file or folder holds, from its header: the config and its tensors (loaded as float32)."""
    p = Path(path).expanduser()
    files, _ = _vae_files(p)
    src, layout = _bfl_view(WeightSource(files, "VAE"), p)
    shapes = {k: tuple(src.shape(k)) for k in src}
    tensors = {k: TensorInfo(shape, quantizable=False) for k, shape in shapes.items()}
    return FileProbe(p, vae_config_from_shapes(shapes), tensors, layout)


def load_vae(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> FluxVAE:
    """Load a Flux VAE from ``ae.safetensors`` (optionally ``vae.``/``first_stage_model.``-prefixed),
    a diffusers ``vae/`` folder, or a diffusers model root that has one. The config is read from shapes."""
    p = Path(path).expanduser()
    files, dconfig = _vae_files(p)
    src, layout = _bfl_view(WeightSource(files, "VAE"), p)
    casts = {"scaling_factor": float, "shift_factor": float, "norm_num_groups": int}  # from config.json, if any
    overrides = {name: cast(dconfig[name]) for name, cast in casts.items() if dconfig.get(name) is not None}
    cfg = vae_config_from_shapes({k: src.shape(k) for k in src}, **overrides)
    if cfg.latent_channels != 16:
        raise CheckpointError(
            f"VAE: '{p}' has {cfg.latent_channels} latent channels; Z-Image uses 16. {EXPECTED_FILE_HINT}"
        )
    if dtype == torch.float16:
        log.warning("The Flux VAE overflows in float16; use float32 (default) or bfloat16.")
    with torch.device("meta"):
        vae = FluxVAE(cfg)

    def getter(key: str) -> Callable[[], torch.Tensor]:
        if ATTN_PROJ_WEIGHT.match(key):
            return lambda: attn_weight_to_conv(src[key])
        return lambda: src[key]

    materialize(vae, {k: getter(k) for k in src}, dtype, device, what=f"VAE '{p}'")
    vae.eval()
    log.info(
        "Loaded Flux VAE from %s (%s layout, widths %s, %s on %s)", p, layout, cfg.block_out_channels, dtype, device
    )
    return vae


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def check_finite(x: torch.Tensor, what: str, warn_only: bool = False) -> torch.Tensor:
    """Raise :class:`ZImageError` (or log a warning) when ``x`` holds NaN or Inf; returns ``x``."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        msg = (
            f"{what} contains {int(bad.sum())} NaN/Inf values out of {x.numel()}. This usually means the VAE or "
            "the model ran in float16 (use float32 or bfloat16) or the latents are corrupt."
        )
        if not warn_only:
            raise ZImageError(msg)
        log.warning(msg)
    return x


def pil_to_tensor(images) -> torch.Tensor:
    """PIL image(s) -> float32 ``[B, 3, H, W]`` in [-1, 1] (converted to RGB; all must share one size)."""
    imgs = list(images) if isinstance(images, (list, tuple)) else [images]
    if not imgs:
        raise ZImageError("pil_to_tensor: no images given.")
    sizes = {im.size for im in imgs}
    if len(sizes) != 1:
        raise ZImageError(f"pil_to_tensor: images have different sizes {sorted(sizes)}; resize them to one size first.")
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in imgs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def tensor_to_pil(x: torch.Tensor) -> list:
    """``[B, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] -> RGB PIL images, rounded like diffusers' postprocess."""
    from PIL import Image

    if x.ndim == 3:
        x = x[None]
    check_finite(x, "decoded image")
    arr = (x.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    arr = (arr * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
