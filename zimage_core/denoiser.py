"""The model functions the sampling loop integrates: the DiT call, ``t = 1 - sigma``, the sign flip and CFG.

:class:`GuidedDenoiser` holds what every Z-Image model function shares: the DiT sees ``t = model_t(sigma)`` and
its input in its own dtype, its raw output (``x0 - noise``) is negated into the velocity, and classifier-free
guidance (ComfyUI's convention, with diffusers' normalization and truncation) combines a conditional and an
unconditional branch. A subclass says only how one branch runs (:meth:`GuidedDenoiser.forward_cond`) and how
both run together (:meth:`GuidedDenoiser.forward_pair`): :class:`Denoiser` for text to image here,
:class:`~zimage_core.edit.OmniDenoiser` for reference images. Anything else that changes what the model predicts
(control hints, a student network, a reward tilt) is another subclass or a wrapper of the callable; the
sampling loop (:func:`zimage_core.sampling.run_solver`) never changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .controlnet import ControlInput, controls_at_index
from .dit import PreparedCaptions, ZImageDiT
from .sampling import cfg_active, cfg_combine
from .schedules import model_t

__all__ = ["Denoiser", "GuidedDenoiser", "SigmaLookup"]


class SigmaLookup:
    """Host values of a sampler's sigma schedule, so a model function can branch on sigma without a device read.

    The samplers pass ``sigmas[i].expand(B)``, a view of the schedule tensor they were given; its storage
    offset is ``i``. Any other tensor falls back to reading it (a host-device sync on a GPU).
    """

    def __init__(self, sigmas: torch.Tensor):
        self.tensor = sigmas
        self.values = sigmas.detach().cpu().tolist()
        self._ptr = sigmas.untyped_storage().data_ptr()
        self.misses = 0

    def __call__(self, sigma: torch.Tensor) -> float:
        i = self._offset(sigma)
        if i is not None:
            return self.values[i]
        self.misses += 1
        return float(sigma.reshape(-1)[0])

    def _offset(self, sigma: torch.Tensor) -> int | None:
        if sigma.device == self.tensor.device and sigma.untyped_storage().data_ptr() == self._ptr:
            i = sigma.storage_offset()
            if 0 <= i < len(self.values):
                return i
        return None

    def index(self, sigma: torch.Tensor) -> int:
        """The schedule entry ``sigma`` is (a view of it, else the nearest value: one device read)."""
        i = self._offset(sigma)
        if i is not None:
            return i
        self.misses += 1
        s = float(sigma.reshape(-1)[0])
        return min(range(len(self.values)), key=lambda k: abs(self.values[k] - s))


def _read_sigma(sigma: torch.Tensor) -> float:
    return float(sigma.reshape(-1)[0])


class GuidedDenoiser:
    """``model_fn(x, sigma) -> v`` for a DiT with optional CFG; subclasses run the branches.

    ``sigmas`` (the schedule tensor given to the sampler) lets CFG truncation read sigma on the host. With
    ``cfg_truncation >= 1`` guidance is never switched off and sigma is not even looked at.

    ``controls`` (:class:`~zimage_core.controlnet.ControlInput`, several allowed): ControlNets whose hints a
    subclass passes to the DiT as ``control=self.active`` in both CFG branches (as diffusers'
    ``ZImageControlNetPipeline`` does); :meth:`__call__` sets :attr:`active` to those whose start/end window
    holds the step (the schedule entry of ``sigma`` among the ``len(sigmas) - 1`` steps; needs ``sigmas``).
    """

    controls: tuple[ControlInput, ...] = ()
    active: list[ControlInput] | None = None

    def __init__(
        self,
        dit: ZImageDiT,
        use_cfg: bool,
        cfg: float = 1.0,
        normalization: float = 0.0,
        truncation: float = 1.0,
        sigmas: torch.Tensor | None = None,
    ):
        self.dit, self.cfg, self.normalization, self.truncation = dit, cfg, normalization, truncation
        self.use_cfg = use_cfg
        self.sigma_value = SigmaLookup(sigmas) if sigmas is not None else _read_sigma

    def forward_cond(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw DiT output ``[B, C, h, w]`` of the conditional branch (``x`` already in the DiT's dtype)."""
        raise NotImplementedError

    def forward_pair(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs of the conditional and unconditional branches, float32."""
        raise NotImplementedError

    def guided(self, sigma: torch.Tensor) -> bool:
        """Whether this call runs both branches (CFG on and not truncated at ``sigma``)."""
        return self.use_cfg and (
            self.truncation >= 1.0 or cfg_active(self.cfg, self.sigma_value(sigma), self.truncation)
        )

    def branches(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The velocities of the conditional and the unconditional branch (one paired batch), not combined: for a
        loss that weighs the guidance term on its own (Decoupled DMD's CFG augmentation). ``cfg_combine`` of the
        two at ``self.cfg`` is what :meth:`__call__` returns with guidance on (without normalization)."""
        if not self.use_cfg:
            raise ValueError("branches() needs a model function built with an unconditional branch and cfg > 1")
        self.active = self.controls_at(sigma)
        pos, neg = self.forward_pair(x.to(self.dit.dtype), model_t(sigma))
        return -pos, -neg

    def controls_at(self, sigma: torch.Tensor) -> list[ControlInput] | None:
        """The controls that apply at ``sigma``'s step (None when none does)."""
        if not self.controls:
            return None
        if not isinstance(self.sigma_value, SigmaLookup):
            raise ValueError("a model function with controls needs the sampler's sigmas (to know the step)")
        return controls_at_index(self.controls, self.sigma_value.index(sigma), len(self.sigma_value.values))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.active = self.controls_at(sigma)
        t = model_t(sigma)
        xin = x.to(self.dit.dtype)
        if self.guided(sigma):
            pos, neg = self.forward_pair(xin, t)
            v = cfg_combine(pos, neg, self.cfg, self.normalization)
        else:
            v = self.forward_cond(xin, t).float()
        return -v


class Denoiser(GuidedDenoiser):
    """Text to image: captions embedded and refined once; the plans for the CFG batch (``[cond..., uncond...]``)
    and for the conditional batch alone are both built up front, so no step repeats that work. ``controls``:
    ControlNets (see :class:`GuidedDenoiser`), applied to both CFG branches; per-sample control latents are
    repeated for the paired batch."""

    def __init__(
        self,
        dit: ZImageDiT,
        cond: list[torch.Tensor],
        uncond: list[torch.Tensor] | None,
        latent_hw: tuple[int, int],
        cfg: float = 1.0,
        normalization: float = 0.0,
        truncation: float = 1.0,
        sigmas: torch.Tensor | None = None,
        controls: Sequence[ControlInput] = (),
    ):
        super().__init__(dit, uncond is not None and cfg > 1.0, cfg, normalization, truncation, sigmas)
        self.controls = tuple(controls)
        h, w = latent_hw
        caps = dit.prepare_captions(list(cond) + (list(uncond) if self.use_cfg else []))
        n = len(cond)
        self.plan_cond = dit.plan(PreparedCaptions(caps.tokens[:n], caps.padded_lens[:n]), h, w)
        self.plan_cfg = dit.plan(caps, h, w) if self.use_cfg else None

    def forward_cond(self, x, t):
        if self.active:
            return self.dit.denoise(x, t, self.plan_cond, control=self.active)
        return self.dit.denoise(x, t, self.plan_cond)

    def forward_pair(self, x, t):
        xx, tt = torch.cat([x, x]), torch.cat([t, t])
        if self.active:
            # the CFG batch is [cond..., uncond...]: per-sample control latents are repeated for it
            control = [c.for_batch(xx.shape[0]) for c in self.active]
            out = self.dit.denoise(xx, tt, self.plan_cfg, control=control).float()
        else:
            out = self.dit.denoise(xx, tt, self.plan_cfg).float()
        pos, neg = out.chunk(2)
        return pos, neg
