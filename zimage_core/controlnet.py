"""Z-Image Fun ControlNet (alibaba-pai VideoX-Fun "Controlnet-Union" 1.0 / 2.0 / 2.1 / lite / Tile / Base 2.1).

Semantics are VideoX-Fun's ``ZImageControlTransformer2DModel`` (the code the weights were trained with):

1. The control latents ``[B, C, H, W]`` (C = 16, or 33 = control latent 16 + keep-mask 1 + inpaint latent 16,
   see :meth:`ControlNet.context`) are patchified like the image and embedded by ``control_x_embedder``; pad
   rows get the *base DiT's* ``x_pad_token``. Control tokens take the image tokens' positions, per sample
   (VideoX-Fun's 1.0 code numbers a batch's control tokens from the first sample's caption length, which is the
   same thing for one sample or equal caption lengths; diffusers does it per sample, as here).
2. Refiner stage (positions/rope of the image tokens, no caption):
   - ``plain`` (1.0): plain blocks refine the control tokens; no refiner hints.
   - ``control`` (2.1, lite, Tile, Base 2.1): control block ``k`` of ``control_noise_refiner`` gives hint ``k``
     (block 0 first adds ``before_proj(c)`` to the embedded image tokens *before* the base noise refiner);
     ``hint_k * strength`` is added after base noise-refiner layer ``refiner_places[k]``.
   - ``control_layers`` (2.0): the same, but with *all* the control layers (as 2.0 was trained); only the first
     ``len(refiner_places)`` hints are used.
3. Main stage: the refined control tokens are joined with the refined captions exactly as the image tokens
   are; control layer 0 adds ``before_proj(c)`` to the joint sequence as the main layers receive it, and each
   control layer ``k`` gives ``hint_k = after_proj(c_k)`` (for every token, captions included), added times
   ``strength`` after main layer ``control_places[k]``.

Several ControlNets at once: each adds its own hints (they sum). Control block ``k`` depends only on block
``k - 1``, so hints are computed lazily, right before they are added: one control state is alive at a time and
no noise-refiner or caption work is repeated (diffusers runs the base noise refiner a second time for it).

**The one difference from diffusers 0.42.1** (``ZImageControlNetModel`` + ``ZImageTransformer2DModel``): for 2.x
files diffusers adds the refiner hints (times the strength) inside the ControlNet's *own* pass over the base
noise refiner only; that pass feeds the control layers, so its main-layer hints equal VideoX-Fun's, but the base
transformer's noise refiner then runs *without* the refiner hints. VideoX-Fun and native ComfyUI add them inside
the base model's noise-refiner layers, and so does this module. For 1.0 files (no refiner hints) both agree.
(Native ComfyUI departs elsewhere: its control layers attend over the image tokens only, without the caption.)

API for a sampler (one model call per step)::

    net = load_controlnet("Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors", base=dit.cfg)
    ctl = ControlInput(net, net.context(control_latents), strength=0.75, start=0.0, end=1.0)
    plan = dit.prepare(cap_feats, h, w)                    # captions refined once per generation
    for i, t in enumerate(ts):
        active = active_controls([ctl], i, len(ts))       # the caller decides per step (start/end)
        raw = dit.denoise(x, t, plan, control=active or None)

``dit.denoise(..., control=None)`` is the plain text-to-image step, unchanged. :func:`denoise_with_hints`
returns the hints too (tests, debugging).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ControlNetConfig, DiTConfig
from .controlnet_layouts import ControlNetCheckpoint, to_native_key
from .dit import patchify
from .dtypes import resolve_dtype
from .errors import ZImageError
from .layers import Modulation, Rope, TransformerBlock, stream_dtype, stream_linear
from .quant import comfy
from .quant import load as qload
from .quant.linear import share_workspace
from .quant.modes import check_mode
from .weights import materialize

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # a 33-channel input is control 16 + keep-mask 1 + inpaint 16

__all__ = [
    "ControlBlock",
    "ControlHints",
    "ControlInput",
    "ControlNet",
    "active_controls",
    "controls_at_index",
    "denoise_with_hints",
    "load_controlnet",
]


class ControlBlock(TransformerBlock):
    """An S3-DiT block that runs on the control tokens and returns ``(after_proj(c), c)``.

    The first block of a group first adds ``before_proj(c)`` to the base model's hidden states ``x``.
    """

    def __init__(self, cfg: DiTConfig, first: bool):
        super().__init__(cfg, modulated=True)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim, bias=True)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def forward(self, c, x, rope: Rope, mask, mod: Modulation, hint: bool = True):  # type: ignore[override]
        """``hint=False``: skip ``after_proj`` where the hint is not used (returns ``(None, c)``)."""
        if x is not None:
            c = stream_linear(self.before_proj, c) + x.to(c.dtype)
        c = super().forward(c, rope, mask, mod)
        return (stream_linear(self.after_proj, c) if hint else None), c


class ControlNet(nn.Module):
    """The control branch; parameter names are the file's (fused qkv, Lumina attention names)."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        bc = cfg.block_config()
        self.control_x_embedder = nn.Linear(cfg.patch_dim, cfg.dim, bias=True)
        self.control_layers = nn.ModuleList(ControlBlock(bc, i == 0) for i in range(cfg.n_control_layers))
        if cfg.refiner == "plain":
            self.control_noise_refiner = nn.ModuleList(TransformerBlock(bc, True) for _ in range(cfg.n_refiner_layers))
        elif cfg.refiner == "control":
            self.control_noise_refiner = nn.ModuleList(ControlBlock(bc, i == 0) for i in range(cfg.n_refiner_layers))

    @property
    def dtype(self) -> torch.dtype:
        return self.control_x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.control_x_embedder.weight.device

    def blocks(self) -> list[nn.Module]:
        """Every block in execution order (refiner stage, then main stage), e.g. for block streaming."""
        refiner = list(getattr(self, "control_noise_refiner", None) or [])
        return refiner + list(self.control_layers)

    def check_base(self, base: DiTConfig) -> None:
        """Raise a ZImageError when this ControlNet cannot drive a DiT of config ``base``."""
        c = self.cfg
        found = dict(dim=c.dim, n_heads=c.n_heads, ffn_dim=c.ffn_dim, adaln_dim=c.adaln_dim, patch_size=c.patch_size)
        want = {k: getattr(base, k) for k in found}
        bad = [f"{k} {found[k]} (DiT: {want[k]})" for k in found if found[k] != want[k]]
        if c.control_places[-1] >= base.n_layers:
            bad.append(f"control places up to layer {c.control_places[-1]} (DiT: {base.n_layers} layers)")
        if c.refiner_places and c.refiner_places[-1] >= base.n_refiner_layers:
            bad.append(f"refiner places {c.refiner_places} (DiT: {base.n_refiner_layers} noise-refiner layers)")
        if bad:
            raise ZImageError(f"this ControlNet does not fit the diffusion model: {'; '.join(bad)}.")

    def context(
        self,
        control: torch.Tensor,
        inpaint: torch.Tensor | None = None,
        keep_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The control input for this ControlNet from model-space latents ``[B, 16, H, W]``.

        33-channel (2.x) files also take ``keep_mask`` ``[B, 1, H, W]`` (1 = keep the inpaint image there,
        0 = generate; default 0) and ``inpaint``, the latents of the image to keep (the masked image, as
        diffusers' ``ZImageControlNetInpaintPipeline``). Without ``inpaint`` the channels are zero, as in
        diffusers' ``ZImageControlNetPipeline``; VideoX-Fun and ComfyUI instead feed the latents of a mid-grey
        image there, which a caller with a VAE can pass as ``inpaint``.
        """
        lat = LATENT_CHANNELS
        if control.ndim != 4 or control.shape[1] != lat:
            raise ZImageError(f"control latents must be [B, {lat}, H, W], got {tuple(control.shape)}")
        if self.cfg.in_channels == lat:
            if inpaint is not None or keep_mask is not None:
                raise ZImageError("this ControlNet (16-channel input) takes no inpaint image or mask; use a 2.x file")
            return control
        b, _, h, w = control.shape
        if inpaint is None:
            inpaint = torch.zeros_like(control)
        if keep_mask is None:
            keep_mask = torch.zeros(b, 1, h, w, dtype=control.dtype, device=control.device)
        if inpaint.shape != control.shape or tuple(keep_mask.shape) != (b, 1, h, w):
            raise ZImageError(
                f"inpaint latents {tuple(inpaint.shape)} and mask {tuple(keep_mask.shape)} must match the control "
                f"latents {tuple(control.shape)} (mask: one channel)"
            )
        return torch.cat([control, keep_mask.to(control), inpaint.to(control)], dim=1)


@dataclass(eq=False)
class ControlInput:
    """A ControlNet bound to its control latents (``[1 or B, in_channels, H, W]``, model space) and strength.

    ``start``/``end``: the fraction of the sampling steps during which it applies (see :meth:`active`).
    Pass it (or several) as ``ZImageDiT.denoise(..., control=[...])``; the DiT calls it once per step
    (:data:`zimage_core.dit.StepControl`) and adds the hints of the run it returns.
    """

    net: ControlNet
    context: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    _cache: dict = field(default_factory=dict, init=False, repr=False)
    _batched: dict = field(default_factory=dict, init=False, repr=False)
    _checked: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        c = self.net.cfg.in_channels
        if self.context.ndim != 4 or self.context.shape[1] != c:
            raise ZImageError(
                f"this ControlNet takes {c}-channel control latents [B, {c}, H, W], got {tuple(self.context.shape)}"
                + ("; build them with ControlNet.context(control, inpaint, keep_mask)" if c == 33 else "")
            )
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ZImageError(f"control start {self.start} / end {self.end}: need 0 <= start <= end <= 1")

    def active(self, step: int, n_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``n_steps`` lies in ``[start, end)`` as a fraction of the steps
        (``end = 1`` includes the last step); a strength of 0 is never active."""
        if self.strength == 0 or n_steps <= 0:
            return False
        at = step / n_steps
        return self.start <= at and (at < self.end or self.end >= 1.0)

    def for_batch(self, batch: int) -> ControlInput:
        """This control for ``batch`` latents: itself when its latents are one or ``batch`` rows, else its rows
        repeated (a host's batched CFG call holds every conditioning's copy of the latents, one after the other)."""
        b = self.context.shape[0]
        if b in (1, batch) or batch % b:
            return self
        if batch not in self._batched:
            self._batched[batch] = dataclasses.replace(self, context=self.context.repeat(batch // b, 1, 1, 1))
        return self._batched[batch]

    def tokens(self, dit, n_img_pad: int) -> torch.Tensor:
        """Embedded control tokens ``[1 or B, n_img_pad, dim]`` (constant over the steps, so cached)."""
        net = self.net
        key = (n_img_pad, net.dtype, net.device, id(dit))
        if key in self._cache:
            return self._cache[key]
        ctx = self.context.to(device=net.device, dtype=net.dtype)
        # the control stream is float32 for float16 weights, as the DiT's: the blocks then run with the DiT's
        # float16 overflow guards (zimage_core.layers)
        c = net.control_x_embedder(patchify(ctx, net.cfg.patch_size)).to(stream_dtype(net.dtype))
        n = c.shape[1]
        if n_img_pad > n:
            pad = dit.x_pad_token.to(device=c.device, dtype=c.dtype)
            c = torch.cat([c, pad.expand(c.shape[0], n_img_pad - n, -1)], dim=1)
        if not torch.is_grad_enabled():  # a graph must not outlive its step
            self._cache = {key: c}
        return c

    def __call__(self, dit, x_tokens: torch.Tensor, adaln: torch.Tensor, plan) -> _ControlRun:
        """Start this control for one DiT step (called by ``ZImageDiT.denoise``)."""
        return _ControlRun(self, dit, x_tokens, adaln, plan)


class _ControlRun:
    """One ControlNet during one DiT step: hands out the (already scaled) hints as the DiT asks for them."""

    def __init__(self, inp: ControlInput, dit, x_tokens: torch.Tensor, adaln: torch.Tensor, plan):
        net, cfg = inp.net, inp.net.cfg
        if inp._checked is not dit:
            net.check_base(dit.cfg)
            inp._checked = dit
        b = x_tokens.shape[0]
        ctx = inp.context
        if tuple(ctx.shape[-2:]) != (plan.height, plan.width) or ctx.shape[0] not in (1, b):
            raise ZImageError(
                f"control latents {tuple(ctx.shape)} do not match the latents [{b}, ..., {plan.height}, "
                f"{plan.width}]; resize the control image to the output size (batch 1 or {b})"
            )
        self.net, self.plan, self.scale = net, plan, inp.strength
        self.adaln = adaln.to(net.dtype)
        c = inp.tokens(dit, plan.n_img_pad).expand(b, -1, -1)
        if cfg.refiner == "plain":
            for block in net.control_noise_refiner:
                c = block(c, plan.img_rope, None, block.modulation(self.adaln))
        self.c = c
        if cfg.refiner == "control":
            self.refiner_blocks = list(net.control_noise_refiner)
        elif cfg.refiner == "control_layers":  # 2.0, as trained
            self.refiner_blocks = list(net.control_layers)
        else:
            self.refiner_blocks = []
        self.refiner_at = {place: k for k, place in enumerate(cfg.refiner_places)}
        self.layer_at = {place: k for k, place in enumerate(cfg.control_places)}
        self.done = 0  # blocks of the current stage already run
        self.x = x_tokens  # what control block 0 of the current stage adds to (dropped once it ran)

    def _advance(self, blocks, upto: int, rope, mask, keep: bool = True) -> torch.Tensor | None:
        """Run the stage's blocks up to ``upto``; the hint of block ``upto`` (times the strength) if ``keep``."""
        hint = None
        while self.done <= upto:
            block, want = blocks[self.done], keep and self.done == upto
            hint, self.c = block(
                self.c, self.x if self.done == 0 else None, rope, mask, block.modulation(self.adaln), want
            )
            self.done += 1
            self.x = None
        return hint * self.scale if hint is not None else None

    def refiner_hint(self, index: int) -> torch.Tensor | None:
        """After base noise-refiner layer ``index``: the hint to add, or None."""
        k = self.refiner_at.get(index)
        return None if k is None else self._advance(self.refiner_blocks, k, self.plan.img_rope, None)

    def enter_layers(self, joint: torch.Tensor) -> None:
        """The joint sequence as the main layers receive it: finish the refiner stage and start the main one."""
        plan = self.plan
        self._advance(self.refiner_blocks, len(self.refiner_blocks) - 1, plan.img_rope, None, keep=False)
        c, caps = self.c, plan.captions.tokens
        if plan.joint_mask is None:
            c = torch.cat([c, torch.stack(caps).to(c.dtype)], dim=1)
        else:
            c = nn.utils.rnn.pad_sequence([torch.cat([c[i], t.to(c.dtype)]) for i, t in enumerate(caps)], True)
        self.c, self.x, self.done = c, joint, 0

    def layer_hint(self, index: int) -> torch.Tensor | None:
        """After main layer ``index``: the hint to add, or None."""
        k = self.layer_at.get(index)
        if k is None:
            return None
        return self._advance(self.net.control_layers, k, self.plan.joint_rope, self.plan.joint_mask)


def active_controls(controls: Sequence[ControlInput], step: int, n_steps: int) -> list[ControlInput]:
    """The controls that apply at step ``step`` of ``n_steps`` (pass the list, or None when empty, to denoise)."""
    return [c for c in controls if c.active(step, n_steps)]


def controls_at_index(controls: Sequence[ControlInput], index: int, n_sigmas: int) -> list[ControlInput] | None:
    """The controls that apply when the model is called at entry ``index`` of the sampler's schedule of
    ``n_sigmas`` sigmas (``n_sigmas - 1`` steps; the final sigma counts as the last step); None when none does.
    The one rule for every sampler that calls the model: ours (:class:`~zimage_core.denoiser.GuidedDenoiser`) and a
    host's (:func:`~zimage_core.native.native_forward`'s caller, from ComfyUI's ``sample_sigmas``)."""
    n = n_sigmas - 1
    return active_controls(controls, min(index, max(n - 1, 0)), n) or None


# ---------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------
@dataclass
class ControlHints:
    """What one ControlNet added during a step (already times the strength), keyed by the DiT layer index."""

    refiner: dict[int, torch.Tensor] = field(default_factory=dict)
    layers: dict[int, torch.Tensor] = field(default_factory=dict)


class _RecordingRun:
    def __init__(self, run: _ControlRun, out: ControlHints):
        self.run, self.out = run, out

    def refiner_hint(self, i: int):
        h = self.out.refiner[i] = self.run.refiner_hint(i)
        return h

    def enter_layers(self, joint: torch.Tensor) -> None:
        self.run.enter_layers(joint)

    def layer_hint(self, i: int):
        h = self.out.layers[i] = self.run.layer_hint(i)
        return h


def _recording(control: ControlInput, out: ControlHints):
    return lambda dit, x_tokens, adaln, plan: _RecordingRun(control(dit, x_tokens, adaln, plan), out)


def denoise_with_hints(dit, x, t, plan, controls: Sequence[ControlInput]) -> tuple[torch.Tensor, list[ControlHints]]:
    """``dit.denoise(x, t, plan, control=controls)`` that also returns each control's hints."""
    hints = [ControlHints() for _ in controls]
    out = dit.denoise(x, t, plan, control=[_recording(c, h) for c, h in zip(controls, hints)])
    for h in hints:  # keep only the layers that got a hint
        h.refiner = {k: v for k, v in h.refiner.items() if v is not None}
        h.layers = {k: v for k, v in h.layers.items() if v is not None}
    return out, hints


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
CONTROL_POLICY_GROUPS = r"(control_layers|control_noise_refiner)\.\d+\."


def load_controlnet(
    path: str | os.PathLike,
    base: DiTConfig | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    quant: str = "none",
) -> ControlNet:
    """Load any Z-Image Fun ControlNet file (layout and variant detected from the tensors) for a DiT of config
    ``base`` (default: Z-Image's), one tensor at a time, memory-mapped, into ``dtype`` on ``device``.

    ``quant`` (``none``, ``int8``, ``nf4``, ``fp8``) quantizes the control blocks' big matrices while loading;
    ComfyUI fp8/int8 files are recognised and stay quantized, as for the DiT.
    """
    mode = check_mode(quant)
    target = resolve_dtype(dtype, device)
    ckpt = ControlNetCheckpoint(path, base)
    with torch.device("meta"):
        model = ControlNet(ckpt.config)
    getters = dict(ckpt.getters)
    src = ckpt.source
    found = comfy.scan(src, f"ControlNet '{path}'")
    if found:
        keep = re.compile(CONTROL_POLICY_GROUPS + r"(attention\.(qkv|out)|feed_forward\.w[123]|adaLN_modulation\.0)")
        fuse = {k[: -len(".weight")]: parts for k, parts in ckpt.fused_from.items()}
        plan = comfy.plan_linears(src, found, to_native_key, fuse)
        plan = {k: v for k, v in plan.items() if k + ".weight" in getters}  # 2.0: dropped refiner
        qload.install_prequantized(model, plan, src, getters, target, device, keep)
    policy = re.compile(CONTROL_POLICY_GROUPS + r"(attention\.(qkv|out)|feed_forward\.w[123])")
    qload.quantize_linears(model, getters, mode, policy, target, device, "ControlNet")
    share_workspace(model)
    materialize(model, getters, target, device, what=f"ControlNet '{path}'")
    model.eval().requires_grad_(False)
    log.info(
        "loaded ControlNet %s (%s, %s layout, %d control layers, %d-channel input) as %s on %s%s",
        Path(path).name,
        ckpt.variant,
        ckpt.layout,
        ckpt.config.n_control_layers,
        ckpt.config.in_channels,
        target,
        device,
        "" if mode == "none" else f", {mode} blocks",
    )
    return model
