"""Z-Image Omni / Edit: reference images, their SigLIP2 features and the Omni DiT branch, sampled like text-to-image.

What the Omni model reads for one sample with N reference images (``docs/model.md``, Omni / Edit;
diffusers ``ZImageOmniPipeline``, ComfyUI ``TextEncodeZImageOmni``):

- N + 2 caption segments, each encoded separately (Qwen3 ``hidden_states[-2]``, no chat template of its own):
  ``<|im_start|>user\\n<|vision_start|>``, then N - 1 times ``<|vision_end|><|vision_start|>``, then
  ``<|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>``, then ``<|vision_end|><|im_end|>``;
- N clean reference latents (VAE posterior mean, in the DiT's latent space), seen at t = 1;
- optionally one SigLIP2 feature grid ``[h, w, 1152]`` per reference (see :mod:`zimage_core.vision`).

:class:`OmniDenoiser` is a :class:`~zimage_core.denoiser.GuidedDenoiser` for that input (the same ``t = 1 -
sigma``, sign flip and CFG) calling :meth:`ZImageDiT.forward_omni`; it is sampled by the same loop as text to
image (:func:`zimage_core.pipeline.denoise_latents`). A branch may also be plain caption features (a text-only negative prompt): it then runs the
text-to-image forward, as native ComfyUI does for a conditioning without reference latents.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import PIXEL_MULTIPLE
from .denoiser import GuidedDenoiser
from .dit import ZImageDiT
from .errors import ZImageError

__all__ = [
    "OMNI_PROMPT_TEMPLATE",
    "REFERENCE_MAX_AREA",
    "OmniCondition",
    "OmniDenoiser",
    "encode_omni_prompt",
    "omni_segment_texts",
    "prepare_reference",
    "reference_size",
]

log = logging.getLogger(__name__)

OMNI_FIRST = "<|im_start|>user\n<|vision_start|>"
OMNI_BETWEEN = "<|vision_end|><|vision_start|>"
OMNI_PROMPT_TEMPLATE = "<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"
OMNI_LAST = "<|vision_end|><|im_end|>"
# The reference pipeline scales a reference whose area exceeds 1024x1024 down to that area.
REFERENCE_MAX_AREA = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Prompt segments
# ---------------------------------------------------------------------------------------------
def omni_segment_texts(prompt: str, n_refs: int) -> list[str]:
    """The ``n_refs + 2`` caption segment strings for ``prompt`` with ``n_refs >= 1`` reference images."""
    if n_refs < 1:
        raise ValueError("an Omni prompt needs at least one reference image")
    return [OMNI_FIRST] + [OMNI_BETWEEN] * (n_refs - 1) + [OMNI_PROMPT_TEMPLATE.format(prompt=prompt), OMNI_LAST]


def encode_omni_prompt(text_encoder, prompt: str, n_refs: int, max_length: int | None = 512) -> list[torch.Tensor]:
    """Encode the segments of :func:`omni_segment_texts` with a :class:`~zimage_core.text_encoder.TextEncoder`.

    Each segment is cut at ``max_length`` tokens on its own, as the reference pipeline does.
    """
    fixed = list(dict.fromkeys(omni_segment_texts("", n_refs)[:-2] + [OMNI_LAST]))
    pieces = dict(zip(fixed, text_encoder.encode(fixed, max_length=max_length, template=None)))
    main = text_encoder.encode([prompt], max_length=max_length, template=OMNI_PROMPT_TEMPLATE)[0]
    between = [pieces[OMNI_BETWEEN]] * (n_refs - 1) if n_refs > 1 else []
    return [pieces[OMNI_FIRST]] + between + [main, pieces[OMNI_LAST]]


# ---------------------------------------------------------------------------------------------
# Reference images
# ---------------------------------------------------------------------------------------------
def reference_size(height: int, width: int, max_area: int = REFERENCE_MAX_AREA) -> tuple[int, int]:
    """Size a reference is scaled to first: unchanged up to ``max_area`` pixels, else the same aspect ratio at
    about ``max_area`` (sides truncated, as the reference pipeline does)."""
    if height * width <= max_area:
        return height, width
    scale = math.sqrt(max_area / (height * width))
    return max(1, int(height * scale)), max(1, int(width * scale))


def prepare_reference(image: torch.Tensor, max_area: int = REFERENCE_MAX_AREA) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy for one reference image ``[H, W, C]`` (float 0..1): returns ``(scaled, cropped)``.

    ``scaled`` is the image brought to at most ``max_area`` pixels (aspect ratio kept, bicubic with
    antialiasing; never enlarged): what the SigLIP2 encoder sees. ``cropped`` is ``scaled`` center-cropped to
    width and height multiples of 16 (VAE x8 times patch 2): what the VAE encodes.
    """
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ZImageError(f"a reference image must be [height, width, 3], got shape {tuple(image.shape)}.")
    h, w = image.shape[:2]
    th, tw = reference_size(h, w, max_area)
    scaled = image[..., :3]
    if (th, tw) != (h, w):
        x = scaled.permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
        scaled = x[0].permute(1, 2, 0).clamp(0.0, 1.0).to(image.dtype)
    ch, cw = th // PIXEL_MULTIPLE * PIXEL_MULTIPLE, tw // PIXEL_MULTIPLE * PIXEL_MULTIPLE
    if ch == 0 or cw == 0:
        raise ZImageError(
            f"a reference image of {w}x{h} pixels is too small; it needs at least "
            f"{PIXEL_MULTIPLE}x{PIXEL_MULTIPLE} pixels."
        )
    top, left = (th - ch) // 2, (tw - cw) // 2
    return scaled, scaled[top : top + ch, left : left + cw]


# ---------------------------------------------------------------------------------------------
# Conditioning and the velocity field
# ---------------------------------------------------------------------------------------------
@dataclass
class OmniCondition:
    """What the Omni branch reads for one sample."""

    segments: list[torch.Tensor]  # N + 2 caption segments [L_j, cap_feat_dim]
    references: list[torch.Tensor]  # N clean latents in the DiT's space [C, h, w]
    siglip: list[torch.Tensor | None] | None = None  # N SigLIP2 grids [h, w, siglip_dim] (None: pad tokens)

    def check(self, dit: ZImageDiT, where: str = "conditioning") -> None:
        cfg = dit.cfg
        n = len(self.references)
        if n < 1:
            raise ZImageError(f"the {where} carries no reference image.")
        if len(self.segments) != n + 2:
            raise ZImageError(
                f"the {where} has {n} reference images but {len(self.segments)} caption segments "
                f"(needs {n + 2}); encode it with Z-Image Edit Conditioning."
            )
        for s in self.segments:
            if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] != cfg.cap_feat_dim:
                raise ZImageError(
                    f"the {where} has a caption segment of shape {tuple(s.shape)}; this model expects "
                    f"[tokens, {cfg.cap_feat_dim}] from its Qwen3 text encoder."
                )
        for r in self.references:
            if r.ndim != 3 or r.shape[0] != cfg.in_channels:
                raise ZImageError(
                    f"the {where} has a reference latent of shape {tuple(r.shape)}; expected "
                    f"[{cfg.in_channels}, h, w] Flux-VAE latents (encode it with ae.safetensors)."
                )
            if r.shape[-2] % cfg.patch_size or r.shape[-1] % cfg.patch_size:
                raise ZImageError(
                    f"the {where} has a reference of {r.shape[-1] * 8}x{r.shape[-2] * 8} pixels; "
                    f"reference sizes must be multiples of {PIXEL_MULTIPLE}."
                )
        if self.siglip is not None:
            if len(self.siglip) > n:
                raise ZImageError(f"the {where} has {len(self.siglip)} SigLIP features for {n} reference images.")
            for f in self.siglip:
                if f is None:
                    continue
                if cfg.siglip_feat_dim is None:
                    raise ZImageError(
                        f"the {where} carries SigLIP features, but this model has no SigLIP branch "
                        "(it is not Z-Image Omni/Edit)."
                    )
                if f.ndim != 3 or f.shape[-1] != cfg.siglip_feat_dim:
                    raise ZImageError(
                        f"the {where} has SigLIP features of shape {tuple(f.shape)}; this model expects "
                        f"[h, w, {cfg.siglip_feat_dim}] (SigLIP2 so400m)."
                    )

    def siglip_list(self, dit: ZImageDiT) -> list[torch.Tensor | None] | None:
        """Per image (references + target) for ``forward_omni``; None for a model without SigLIP branch."""
        if not dit.cfg.is_omni:
            return None
        feats = list(self.siglip or [])
        return feats + [None] * (len(self.references) - len(feats)) + [None]


Branch = list  # per sample: OmniCondition (edit) or a [L, cap_feat_dim] caption tensor (text only)


class OmniDenoiser(GuidedDenoiser):
    """The model function for Omni sampling: ``forward_omni`` at ``t = 1 - sigma``, sign flip, CFG.

    ``cond`` / ``uncond`` hold one entry per latent: all :class:`OmniCondition`, or all caption tensors (that
    branch then runs the text-to-image forward, with its captions prepared once).
    """

    def __init__(
        self,
        dit: ZImageDiT,
        cond: Branch,
        uncond: Branch | None,
        latent_hw: tuple[int, int],
        cfg: float = 1.0,
        normalization: float = 0.0,
        truncation: float = 1.0,
        sigmas: torch.Tensor | None = None,
    ):
        super().__init__(dit, uncond is not None and cfg > 1.0, cfg, normalization, truncation, sigmas)
        self.cond = self._branch(cond, "positive", latent_hw)
        self.uncond = self._branch(uncond, "negative", latent_hw) if self.use_cfg else None
        if self.uncond is not None and len(self.uncond[1]) != len(self.cond[1]):
            raise ZImageError(f"{len(self.uncond[1])} negative conditionings for {len(self.cond[1])} positive ones.")

    def _branch(self, entries: Branch, where: str, latent_hw):
        if not entries:
            raise ZImageError(f"the {where} conditioning is empty.")
        omni = [isinstance(e, OmniCondition) for e in entries]
        if all(omni):
            dev = self.dit.device
            on_device = []
            for e in entries:  # moved once, not at every step
                e.check(self.dit, f"{where} conditioning")
                on_device.append(
                    OmniCondition(
                        segments=[s.to(dev) for s in e.segments],
                        references=[r.to(dev) for r in e.references],
                        siglip=None if e.siglip is None else [None if f is None else f.to(dev) for f in e.siglip],
                    )
                )
            return ("omni", on_device)
        if any(omni):
            raise ZImageError(f"the {where} conditioning mixes edit and text-only samples in one batch.")
        caps = self.dit.prepare_captions([e.to(self.dit.device) for e in entries])
        return ("text", list(entries), self.dit.plan(caps, *latent_hw))

    def _omni(self, conds: list[OmniCondition], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        images = [list(c.references) + [x[i]] for i, c in enumerate(conds)]
        sig = [c.siglip_list(self.dit) for c in conds] if self.dit.cfg.is_omni else None
        return self.dit.forward_omni(images, t, [c.segments for c in conds], sig)

    def _forward(self, branch, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw DiT output ``[B, C, H, W]`` for ``x`` under one branch."""
        if branch[0] == "omni":
            return self._omni(branch[1], x, t)
        return self.dit.denoise(x, t, branch[2])

    def forward_cond(self, x, t):
        return self._forward(self.cond, x, t)

    def forward_pair(self, x, t):
        if self.cond[0] == self.uncond[0] == "omni":  # one batch [cond..., uncond...], like the reference
            out = self._omni(self.cond[1] + self.uncond[1], torch.cat([x, x]), torch.cat([t, t])).float()
            pos, neg = out.chunk(2)
            return pos, neg
        return self._forward(self.cond, x, t).float(), self._forward(self.uncond, x, t).float()
