"""The DiT called the way ComfyUI calls its diffusion models (its Lumina2 ``NextDiT``, which models Z-Image), computed
by the engine's own forward.

A host that samples with ComfyUI's flow conventions (``model_sampling.timestep(sigma) = sigma`` and
``denoised = x - sigma * output``) calls :func:`native_forward`:

- ``timesteps`` is sigma ``[B]``. The DiT sees ``t = model_t(sigma)`` (1 - sigma, the same float32 value the engine's
  samplers give it) and the raw output (``x0 - noise``) comes back negated: the velocity ``noise - x0`` that
  :class:`~zimage_core.denoiser.GuidedDenoiser` integrates. So for every sigma
  ``Denoiser(dit, [cap], None, hw)(x, sigma) == native_forward(dit, x, sigma, cap[None]).float()``, and a host's
  Euler step on ``denoised = x - sigma * output`` is the engine's Euler step up to rounding.
- ``context`` ``[B, L, cap_feat_dim]`` (or one row for the whole batch); ``attention_mask`` ``[B, L]`` (1 = token)
  drops padding per sample, as the Z-Image sampler node does; without a mask ``num_tokens`` keeps the first tokens.
- Latents of any size: padded circularly to the patch size and cropped back, as ``NextDiT`` does.
- Omni / edit: ``ref_latents`` (N clean latents ``[B or 1, C, h, w]`` in the DiT's space), ``ref_contexts`` (the
  N + 1 other caption segments in ComfyUI's order: the one in front of each reference, then the closing one) and
  ``siglip_feats`` (up to N SigLIP2 grids ``[B or 1, h, w, C]``, used by Omni models only) run
  :meth:`~zimage_core.dit.ZImageDiT.forward_omni`, as :class:`~zimage_core.edit.OmniDenoiser` does.

- ControlNets: ``controls`` (:class:`~zimage_core.controlnet.ControlInput`, those active at this call; pick them
  with :func:`controls_for_call` from the host's schedule) add their hints to every latent of the call (a batched
  CFG call gets them in both branches, as the engine's sampler gives them).

Everything is computed by :class:`~zimage_core.dit.ZImageDiT` (diffusers-exact), not by ComfyUI's ``NextDiT``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .controlnet import ControlInput, controls_at_index
from .denoiser import SigmaLookup
from .dit import ZImageDiT
from .edit import OmniCondition
from .errors import ZImageError
from .schedules import model_t

__all__ = ["controls_for_call", "native_captions", "native_forward"]


def _row(t: torch.Tensor, i: int, batch: int, what: str) -> torch.Tensor:
    if not torch.is_tensor(t):
        raise ZImageError(f"the {what} is {type(t).__name__}, not a tensor; the conditioning is damaged.")
    n = t.shape[0]
    if n not in (1, batch):
        raise ZImageError(f"the {what} holds {n} items for a batch of {batch} latents.")
    return t[0 if n == 1 else i]


def native_captions(
    context: torch.Tensor,
    batch: int,
    feat_dim: int,
    num_tokens: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per-sample caption features ``[L_i, feat_dim]`` from ComfyUI's ``context`` / ``num_tokens`` /
    ``attention_mask``."""
    if not torch.is_tensor(context):
        raise ZImageError("the model got no text conditioning; connect a Z-Image Text Encode to the sampler.")
    if context.ndim == 2:
        context = context[None]
    if context.ndim != 3 or context.shape[-1] != feat_dim:
        raise ZImageError(
            f"the conditioning has shape {tuple(context.shape)}, but this Z-Image model expects [batch, tokens, "
            f"{feat_dim}]: it was encoded by another text encoder. Use Z-Image Text Encode (or a lumina2-type "
            "Qwen3-4B CLIP)."
        )
    mask = None
    if torch.is_tensor(attention_mask) and attention_mask.ndim >= 1:
        mask = attention_mask.reshape(-1, attention_mask.shape[-1])
    caps = []
    for i in range(batch):
        row = _row(context, i, batch, "text conditioning")
        if mask is not None and mask.shape[-1] == row.shape[0]:
            row = row[mask[0 if mask.shape[0] == 1 else min(i, mask.shape[0] - 1)].to(torch.bool)]
        elif num_tokens is not None and 0 < int(num_tokens) < row.shape[0]:
            row = row[: int(num_tokens)]
        if row.shape[0] == 0:
            raise ZImageError("the text conditioning has no tokens; encode a prompt (it may be empty text).")
        caps.append(row)
    return caps


def _omni_conditions(dit: ZImageDiT, caps, batch, ref_latents, ref_contexts, siglip_feats) -> list[OmniCondition]:
    refs, texts = list(ref_latents), list(ref_contexts or [])
    n = len(refs)
    if len(texts) != n + 1:
        raise ZImageError(
            f"the conditioning has {n} reference latents but {len(texts)} reference text segments (needs {n + 1}); "
            "reference latents added by another node are not enough for Z-Image. Use Z-Image Edit Conditioning "
            "(or native TextEncodeZImageOmni)."
        )
    feats = list(siglip_feats or [])[:n] if dit.cfg.is_omni else []
    out = []
    for i in range(batch):
        segs = [_row(t, i, batch, "reference text segment") for t in texts]
        cond = OmniCondition(
            segments=segs[:n] + [caps[i]] + segs[n:],
            references=[_row(r, i, batch, "reference latent") for r in refs],
            siglip=[_row(f, i, batch, "SigLIP feature") for f in feats] or None,
        )
        cond.check(dit)
        out.append(cond)
    return out


def native_forward(
    dit: ZImageDiT,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor,
    num_tokens: int | None = None,
    attention_mask: torch.Tensor | None = None,
    ref_latents: list[torch.Tensor] | None = None,
    ref_contexts: list[torch.Tensor] | None = None,
    siglip_feats: list[torch.Tensor] | None = None,
    controls: list[ControlInput] | None = None,
) -> torch.Tensor:
    """``-raw`` (the velocity) for latents ``x`` ``[B, C, H, W]`` at sigma ``timesteps``; see the module doc."""
    b, _, h, w = x.shape
    p = dit.cfg.patch_size
    if h % p or w % p:
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p), mode="circular")
    t = model_t(timesteps).reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    caps = native_captions(context, b, dit.cfg.cap_feat_dim, num_tokens, attention_mask)
    if ref_latents and controls:
        raise ZImageError("ControlNets do not combine with reference images (edit conditioning); use one or the other.")
    if controls:
        plan = dit.prepare(caps, x.shape[-2], x.shape[-1])
        out = dit.denoise(x, t, plan, control=[c.for_batch(b) for c in controls])
    elif ref_latents:
        conds = _omni_conditions(dit, caps, b, ref_latents, ref_contexts, siglip_feats)
        images = [list(c.references) + [x[i]] for i, c in enumerate(conds)]
        sig = [c.siglip_list(dit) for c in conds] if dit.cfg.is_omni else None
        out = dit.forward_omni(images, t, [c.segments for c in conds], sig)
    else:
        out = dit.forward(x, t, caps)
    return -out[:, :, :h, :w]


def controls_for_call(
    controls: list[ControlInput], schedule: SigmaLookup | None, sigma: torch.Tensor | None
) -> list[ControlInput] | None:
    """The controls a host's model call at ``sigma`` runs, by the engine's rule (:func:`~zimage_core.controlnet.
    controls_at_index`): the step is ``sigma``'s entry in the schedule the host's sampler was given (``schedule``,
    a :class:`~zimage_core.denoiser.SigmaLookup` of ComfyUI's ``sample_sigmas``). Without a schedule only controls
    that span every step can apply; a window then needs one, and that is one error."""
    if schedule is None or sigma is None:
        if any(c.start > 0.0 or c.end < 1.0 for c in controls):
            raise ZImageError(
                "a ControlNet with a start/end window needs the sampler's sigmas to know the step, and this call "
                "came without them (ComfyUI's transformer_options['sample_sigmas']); set start 0 and end 1, or "
                "sample with a ComfyUI sampler node."
            )
        return [c for c in controls if c.strength != 0] or None
    return controls_at_index(controls, schedule.index(sigma), len(schedule.values))
