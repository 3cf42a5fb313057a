"""ControlNets in a generation request: what the caller asks for (:class:`ControlSpec`), its checks before anything
loads, and the control latents a ControlNet reads, encoded through the VAE as diffusers' pipelines do.

- Plain control (``ZImageControlNetPipeline``): the control image is resized to the output size (Lanczos), encoded
  (posterior mean, model space) and, for a 33-channel (2.x) file, padded with zeros (mask and inpaint channels).
- Inpaint control (``ZImageControlNetInpaintPipeline``, 2.x files only): the mask is made grey-scale, resized and
  binarized at 0.5 (white = generate); the inpaint image is blanked (0 in [-1, 1]) where the mask is white and
  encoded; the keep-mask is ``1 - mask`` at latent size (nearest). The 33 channels are control latent, keep-mask,
  inpaint latent (:meth:`zimage_core.controlnet.ControlNet.context`). Nothing is blended into the sampled latents
  (that is ``--init-image``/``--mask``).

The sampling itself is :func:`zimage_core.pipeline.denoise_latents` with the resulting
:class:`~zimage_core.controlnet.ControlInput` list (``controls=``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import VAE_DOWNSCALE, DiTConfig
from .controlnet import LATENT_CHANNELS, ControlInput, ControlNet, load_controlnet
from .controlnet_layouts import ControlNetCheckpoint
from .errors import ZImageError

__all__ = [
    "ControlSpec",
    "build_control_inputs",
    "check_controls",
    "control_pixels",
    "inpaint_pixels",
    "load_controlnets",
    "probe_controls",
]

#: An image: a file path, a PIL image, or a float tensor ``[1, 3, H, W]`` in [-1, 1].
ImageLike = object


@dataclass
class ControlSpec:
    """One ControlNet of a generation (``GenerateOptions.controls``; several sum their hints).

    ``controlnet``: a ControlNet file or folder (loaded by the pipeline with its dtype and quantization), or a
    loaded :class:`~zimage_core.controlnet.ControlNet`. ``image``: the control image (a preprocessed Canny, depth,
    pose, HED/lineart or tile image), resized to the output size. ``strength``: the hints' scale (diffusers'
    ``controlnet_conditioning_scale``, 0.75 by default). ``start``/``end``: the fraction of the steps during which
    it applies. ``inpaint_image`` + ``mask`` (white = generate): a 2.x file's inpaint channels.
    """

    controlnet: str | os.PathLike | ControlNet
    image: ImageLike
    strength: float = 0.75
    start: float = 0.0
    end: float = 1.0
    inpaint_image: ImageLike | None = None
    mask: ImageLike | None = None

    def name(self) -> str:
        c = self.controlnet
        return Path(c).name if isinstance(c, (str, os.PathLike)) else "ControlNet"

    def check(self, where: str = "ControlNet") -> None:
        """Raise one :class:`ZImageError` for a bad value or a missing file (reads no weights)."""
        for key in ("strength", "start", "end"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ZImageError(f"{where}: control {key} {v!r} is not a finite number.")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ZImageError(
                f"{where}: control start {self.start} / end {self.end} must satisfy 0 <= start <= end <= 1 "
                "(fractions of the sampling steps)."
            )
        if (self.inpaint_image is None) != (self.mask is None):
            raise ZImageError(
                f"{where}: give the control inpaint image and the control mask together (white = generate)."
            )
        c = self.controlnet
        if isinstance(c, (str, os.PathLike)):
            if not Path(c).exists():
                raise ZImageError(f"{where}: ControlNet file '{c}' does not exist.")
        elif not isinstance(c, ControlNet):
            raise ZImageError(
                f"{where}: controlnet must be a file path or a loaded ControlNet, got {type(c).__name__}."
            )
        for key in ("image", "inpaint_image", "mask"):
            v = getattr(self, key)
            if isinstance(v, (str, os.PathLike)) and not Path(v).is_file():
                raise ZImageError(f"{where}: control {key.replace('_', ' ')} '{v}' does not exist.")
        if self.image is None:
            raise ZImageError(f"{where}: no control image given.")

    def check_channels(self, in_channels: int, where: str = "ControlNet") -> None:
        """An inpaint image and mask need a 33-channel (2.x) ControlNet."""
        if self.inpaint_image is not None and in_channels == LATENT_CHANNELS:
            raise ZImageError(
                f"{where}: '{self.name()}' is a 1.0 (16-channel) ControlNet, which has no inpaint input; the control "
                "inpaint image and mask need a 2.x file (e.g. Z-Image-Turbo-Fun-Controlnet-Union-2.1)."
            )


def check_controls(specs: Sequence[ControlSpec]) -> None:
    """Check every spec (values and files), naming which one is wrong."""
    for i, spec in enumerate(specs):
        if not isinstance(spec, ControlSpec):
            raise ZImageError(f"controls[{i}] is a {type(spec).__name__}, not a ControlSpec.")
        spec.check(_where(i, spec, len(specs)))


def _where(i: int, spec: ControlSpec, n: int) -> str:
    return f"ControlNet {i + 1} of {n} ({spec.name()})" if n > 1 else f"ControlNet ({spec.name()})"


def probe_controls(specs: Sequence[ControlSpec], base: DiTConfig | None) -> None:
    """:func:`check_controls`, then each file's layout from its header against the DiT's config ``base`` and
    inpaint inputs only for 2.x files; reads no weights but the few a 2.0 file is told apart by."""
    check_controls(specs)
    for i, spec in enumerate(specs):
        where = _where(i, spec, len(specs))
        c = spec.controlnet
        if isinstance(c, ControlNet):
            if base is not None:
                c.check_base(base)
            spec.check_channels(c.cfg.in_channels, where)
        else:
            spec.check_channels(ControlNetCheckpoint(c, base).config.in_channels, where)


def load_controlnets(
    specs: Sequence[ControlSpec], base: DiTConfig | None, dtype: torch.dtype, device, quant: str = "none"
) -> list[ControlNet]:
    """The ControlNet of each spec: loaded from its file (``dtype``, ``device``, ``quant``), or the given module.
    A file named twice is loaded once (each spec keeps its own image and strength)."""
    loaded: dict[str, ControlNet] = {}
    out = []
    for spec in specs:
        c = spec.controlnet
        if isinstance(c, ControlNet):
            out.append(c)
            continue
        key = str(Path(c).resolve())
        if key not in loaded:
            loaded[key] = load_controlnet(c, base=base, dtype=dtype, device=device, quant=quant)
        out.append(loaded[key])
    return out


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------
def _pil(image, mode: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(image)
        except FileNotFoundError:
            raise ZImageError(f"image '{image}' does not exist.") from None
        except UnidentifiedImageError:
            raise ZImageError(f"'{image}' is not an image PIL can read.") from None
    return image.convert(mode)


def control_pixels(image: ImageLike, width: int, height: int) -> torch.Tensor:
    """A control (or inpaint) image as ``[1 or B, 3, height, width]`` in [-1, 1]: files and PIL images are
    resized with Lanczos (diffusers' image processor); tensors ``[B, 3, H, W]`` in [-1, 1] are used as they are
    at the right size, else resized bicubically (antialiased)."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ZImageError(f"a control image tensor must be [B, 3, H, W] in [-1, 1], got {tuple(x.shape)}.")
        if tuple(x.shape[-2:]) != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        return x.clamp(-1.0, 1.0)
    img = _pil(image, "RGB").resize((width, height), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous() * 2.0 - 1.0


def _mask(mask: ImageLike, width: int, height: int) -> torch.Tensor:
    """``[1 or B, 1, height, width]``, 1 = generate, binarized at 0.5 (diffusers' mask processor)."""
    from PIL import Image

    if isinstance(mask, torch.Tensor):
        m = mask.float()
        m = m.reshape(1, 1, *m.shape) if m.ndim == 2 else (m.unsqueeze(1) if m.ndim == 3 else m)
        if m.ndim != 4 or m.shape[1] != 1:
            raise ZImageError(
                f"a control mask tensor must be [H, W], [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}."
            )
        if tuple(m.shape[-2:]) != (height, width):
            m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
    else:
        img = _pil(mask, "L").resize((width, height), Image.LANCZOS)
        m = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
    return (m >= 0.5).float()


def inpaint_pixels(image: ImageLike, mask: ImageLike, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked image [B, 3, H, W] in [-1, 1], mask [B, 1, H, W])``: the inpaint image blanked where the mask
    (1 = generate) is set, as diffusers' ``ZImageControlNetInpaintPipeline`` encodes it."""
    m = _mask(mask, width, height)
    x = control_pixels(image, width, height)
    return x * (m < 0.5), m


def build_control_inputs(
    specs: Sequence[ControlSpec],
    nets: Sequence[ControlNet],
    encode: Callable[[torch.Tensor], torch.Tensor],
    width: int,
    height: int,
) -> list[ControlInput]:
    """The :class:`ControlInput` of each spec with its loaded net; ``encode(pixels) -> model-space latents``
    (the pipeline's VAE: ``ZImagePipeline.encode_image``)."""
    out = []
    h, w = height // VAE_DOWNSCALE, width // VAE_DOWNSCALE
    for i, (spec, net) in enumerate(zip(specs, nets)):
        spec.check_channels(net.cfg.in_channels, _where(i, spec, len(specs)))
        control = encode(control_pixels(spec.image, width, height)).float()
        if spec.inpaint_image is not None:
            pixels, mask = inpaint_pixels(spec.inpaint_image, spec.mask, width, height)
            inpaint = encode(pixels).float()
            keep = F.interpolate(1.0 - mask, size=(h, w), mode="nearest").to(inpaint)
            b = max(control.shape[0], inpaint.shape[0], keep.shape[0])
            context = net.context(*(t.expand(b, -1, -1, -1) for t in (control, inpaint, keep)))
        else:
            context = net.context(control)
        out.append(ControlInput(net, context, float(spec.strength), float(spec.start), float(spec.end)))
    return out
