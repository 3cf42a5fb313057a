"""Text-to-image (and img2img / inpainting) with the Z-Image family, matching diffusers' ZImagePipeline.

Conventions (``docs/model.md``, section 4):
- initial noise ``randn((B, 16, H/8, W/8))`` from a CPU generator seeded with ``seed``, in float32;
- latents stay float32, the DiT input is cast to the DiT dtype, the DiT sees ``t = 1 - sigma``;
- the raw DiT output is negated into the velocity the samplers step with;
- CFG in ComfyUI's convention: ``cfg = 1`` is off, diffusers' guidance scale is ``cfg - 1``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attention import set_attention
from .checkpoints import load_dit
from .config import VAE_DOWNSCALE
from .controlnet import ControlInput, ControlNet
from .controls import ControlSpec, build_control_inputs, load_controlnets, probe_controls
from .denoiser import Denoiser
from .dit import ZImageDiT
from .dtypes import resolve_dtype
from .errors import ZImageError
from .memory.planner import MemoryMode, parse_memory_mode
from .memory.streaming import flush_streamers
from .options import GenerateOptions
from .sampling import initial_noise, latent_shape, sample
from .schedules import img2img_sigmas
from .validate import start_latents, warn_untrained_positions

log = logging.getLogger(__name__)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZImageError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto.")
    return dev


def _tokens(c) -> int:
    """Caption tokens of one conditioning entry (caption features, or an Omni condition's segments)."""
    return int(c.shape[0]) if isinstance(c, torch.Tensor) else sum(int(s.shape[0]) for s in c.segments)


def denoise_latents(
    dit: ZImageDiT,
    cond: list,
    uncond: list | None,
    noise: torch.Tensor,
    opts: GenerateOptions,
    init_latents: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    callback: Callable | None = None,
    cancel: Callable[[], bool] | None = None,
    controls: Sequence[ControlInput] = (),
) -> torch.Tensor:
    """The sampling path of the CLI, the library, the nodes and training samples, wherever the DiT was placed.

    ``cond``/``uncond`` hold one entry per latent: caption features ``[L, cap_feat_dim]`` (text to image), or
    :class:`~zimage_core.edit.OmniCondition` (reference images; a text-only entry is then allowed on either
    side). Builds the model function (:class:`~zimage_core.denoiser.Denoiser` or
    :class:`~zimage_core.edit.OmniDenoiser`) and runs :func:`zimage_core.sampling.sample` in inference mode;
    img2img and inpainting with ``init_latents``/``mask``; ControlNets with ``controls`` (both CFG branches, each
    within its start/end window of the steps). Returns DiT-space latents ``[B, 16, h, w]`` (float32).
    """
    from .edit import OmniCondition, OmniDenoiser

    device = dit.device
    noise = noise.to(device)
    b, _, h, w = noise.shape
    if len(cond) != b:
        raise ZImageError(f"{len(cond)} conditionings for a batch of {b} latents.")
    warn_untrained_positions(dit.cfg, max(_tokens(c) for c in list(cond) + list(uncond or [])), h, w)
    denoise = opts.denoise if init_latents is not None else 1.0
    sig = img2img_sigmas(opts.steps, opts.shift, denoise).to(device, torch.float32).contiguous()
    omni = any(isinstance(c, OmniCondition) for c in list(cond) + list(uncond or []))
    if omni and controls:
        raise ZImageError("ControlNets do not combine with reference images (edit conditioning); use one or the other.")
    if omni:
        fn = OmniDenoiser(dit, cond, uncond, (h, w), opts.cfg, opts.cfg_normalization, opts.cfg_truncation, sig)
    else:
        fn = Denoiser(
            dit, cond, uncond, (h, w), opts.cfg, opts.cfg_normalization, opts.cfg_truncation, sig, controls=controls
        )
    try:
        with torch.inference_mode():
            x = sample(fn, noise, sig, opts.sampler, init=init_latents, mask=mask, callback=callback, cancel=cancel)
    finally:
        flush_streamers(dit)  # no prefetched block (block-swap memory modes) outlives the run, whoever placed it
    check_sampled(x, dit.dtype)
    return x


#: What to try when sampling in a dtype produced NaN/Inf.
_INSTEAD = {
    torch.float16: "bf16 (NVIDIA RTX 30xx or newer) or fp32",
    torch.bfloat16: "fp32",
    torch.float32: "another seed, or check the model file (it may hold NaN/Inf weights)",
}


def check_sampled(x: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise one clear error when sampled latents hold NaN/Inf (a black image would follow), naming what to use
    instead of the DiT's ``dtype``. One device read, after the loop."""
    if not bool(torch.isfinite(x).all()):
        name = str(dtype).removeprefix("torch.")
        raise ZImageError(
            f"sampling in {name} produced NaN/Inf values (a black image would follow); use "
            f"{_INSTEAD.get(dtype, 'fp32')} instead (--dtype, or the loader's weight_dtype)."
        )


@dataclass
class ModelSources:
    """The files a pipeline (re)loads its components from, and how."""

    transformer: Path | None = None
    text_encoder: Path | None = None
    vae: Path | None = None
    tokenizer: str | os.PathLike | None = None
    dtype: torch.dtype = torch.float32
    quant: str = "none"
    text_encoder_quant: str = "none"
    loras: list = field(default_factory=list)  # [(LoRA, strength)], applied whenever the DiT is loaded


_COMPONENTS = ("text_encoder", "dit", "vae")


class ZImagePipeline:
    """DiT + text encoder + VAE, and where their weights live while each stage runs.

    Built directly (``ZImagePipeline(dit, te, vae, device)``) the caller places the components and the
    pipeline never moves them. Built by :meth:`load`, a memory mode decides the placement per stage, and
    with ``lazy=True`` each component is loaded just before its stage and freed right after (the one-shot
    command line); :meth:`release` frees components of a long-lived pipeline, which reloads them on use.
    """

    def __init__(
        self,
        dit: ZImageDiT | None,
        text_encoder,
        vae,
        device: torch.device | str = "cpu",
        *,
        memory: MemoryMode | str | None = None,
        offload_device: torch.device | str = "cpu",
        sources: ModelSources | None = None,
        lazy: bool = False,
        attention: str = "sdpa",
        compile: bool = False,
    ):
        from .memory import Residency

        self._dit, self._te, self._vae = dit, text_encoder, vae
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.sources = sources
        self.lazy = lazy
        self.attention, self.compile = attention, compile
        self.attention_backend: str | None = None
        mode = parse_memory_mode(memory) if memory is not None else None  # strings are parsed here, once
        self.residency = Residency(mode, self.device, offload_device) if mode is not None else None
        self._estimates: dict[str, tuple] = {}
        self._work = None
        self._control_nets: tuple[ControlNet, ...] = ()  # beside the DiT during a controlled DiT stage

    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        transformer: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        device: str | None = "auto",
        dtype: str | None = "auto",
        *,
        memory: MemoryMode | str = "auto",
        quant: str = "none",
        text_encoder_quant: str | None = None,
        attention: str = "auto",
        compile: bool = False,
        loras: list[tuple[str | os.PathLike, float]] = (),
        lazy: bool = False,
        offload_device: str = "cpu",
    ) -> ZImagePipeline:
        """From a diffusers-layout folder (``model``) or the three single files (any may override ``model``).

        ``memory``: auto, full, text-encoder-offload, block-swap:N or sequential (see :mod:`zimage_core.memory`).
        ``quant``: weight quantization of the DiT and (unless ``text_encoder_quant``) the text encoder.
        ``lazy``: load nothing now; load each component before its stage and free it after.
        """
        from .lora import load_lora

        dev = pick_device(device)
        wdtype = resolve_dtype(dtype, dev)
        root = Path(model) if model is not None else None
        if root is not None and not root.is_dir():
            raise ZImageError(
                f"--model '{root}' is not a folder. Give the diffusers-layout folder (with transformer/, "
                "text_encoder/, tokenizer/, vae/), or use --transformer/--text-encoder/--vae for single files."
            )
        missing = [
            n
            for n, v in (("--transformer", transformer), ("--text-encoder", text_encoder), ("--vae", vae))
            if v is None and root is None
        ]
        if missing:
            raise ZImageError(f"no model given: pass --model DIR, or all of {', '.join(missing)}.")
        mode = parse_memory_mode(memory)
        sources = ModelSources(
            transformer=Path(transformer or root),
            text_encoder=Path(text_encoder or root),
            vae=Path(vae or root),
            tokenizer=tokenizer,
            dtype=wdtype,
            quant=quant or "none",
            text_encoder_quant=(text_encoder_quant if text_encoder_quant is not None else quant) or "none",
            loras=[(load_lora(p), float(s)) for p, s in loras],
        )
        pipe = cls(
            None,
            None,
            None,
            dev,
            memory=mode,
            offload_device=offload_device,
            sources=sources,
            lazy=lazy,
            attention=attention,
            compile=compile,
        )
        pipe._probe()  # every file checked (and sized) before anything heavy happens
        if not lazy:
            pipe._plan()
            for name in ("dit", "text_encoder", "vae"):
                getattr(pipe, name)
        return pipe

    # ---- components ------------------------------------------------------------------------------
    @property
    def dit(self) -> ZImageDiT:
        if self._dit is None:
            self._dit = self._load_dit()
        return self._dit

    @dit.setter
    def dit(self, value) -> None:
        self._replace("dit", value)

    @property
    def text_encoder(self):
        if self._te is None and self.sources is not None:
            self._te = self._load_text_encoder()
        return self._te

    @text_encoder.setter
    def text_encoder(self, value) -> None:
        self._replace("text_encoder", value)

    @property
    def vae(self):
        if self._vae is None and self.sources is not None:
            self._vae = self._load_vae()
        return self._vae

    @vae.setter
    def vae(self, value) -> None:
        self._replace("vae", value)

    def _replace(self, name: str, value) -> None:
        if self.residency is not None:
            self.residency.forget(name)
        setattr(self, {"dit": "_dit", "text_encoder": "_te", "vae": "_vae"}[name], value)

    def loaded(self) -> list[str]:
        return [n for n, v in (("text_encoder", self._te), ("dit", self._dit), ("vae", self._vae)) if v is not None]

    def release(self, *names: str) -> None:
        """Free components (all when none is named); a pipeline with files reloads them when used again."""
        for name in names or _COMPONENTS:
            if name not in _COMPONENTS:
                raise ValueError(f"unknown component '{name}'; use one of {', '.join(_COMPONENTS)}")
            attr = {"dit": "_dit", "text_encoder": "_te", "vae": "_vae"}[name]
            comp = getattr(self, attr)
            if comp is None:
                continue
            if self.residency is not None:
                self.residency.forget(name)
            if name == "text_encoder":
                comp.unload()
            setattr(self, attr, None)
            del comp
            log.debug("released the %s", name)
        from .memory.components import free_memory

        free_memory(self.device)

    def _need_sources(self, what: str) -> ModelSources:
        if self.sources is None:
            raise ZImageError(
                f"the pipeline has no {what} (it was released or never given) and no file to load "
                "it from; build it with ZImagePipeline.load(...)."
            )
        return self.sources

    def _target(self, component: str) -> torch.device:
        if self.residency is None:
            return self.device
        if component == "dit" and self._dit is None and "dit" not in self._estimates:
            return self.offload_device  # size unknown until loaded: load off the device, place it after
        if self.residency.plan is None:
            self._plan()
        return self.residency.load_device(component)

    def _load_dit(self) -> ZImageDiT:
        src = self._need_sources("diffusion model")
        dit = load_dit(src.transformer, dtype=src.dtype, device=self._target("dit"), quant=src.quant)
        self.attention_backend = set_attention(dit, self.attention, device=self.device)
        if src.loras:
            from .lora import apply_loras

            # the DiT is always (re)loaded from its files here, so the merged weights' originals are never needed
            apply_loras(dit, src.loras, mode="merge" if src.quant == "none" else "runtime", keep_original=False)
        if self.compile:
            from .compile import compile_blocks

            compile_blocks(dit)
        return dit

    def _load_text_encoder(self):
        from .text_encoder import TextEncoder

        src = self.sources
        return TextEncoder.load(
            src.text_encoder,
            tokenizer=src.tokenizer,
            dtype=src.dtype,
            device=self._target("text_encoder"),
            quant=src.text_encoder_quant,
        )

    def _load_vae(self):
        from .vae import load_vae

        target = self.device if self.residency is None or self.lazy else self._vae_home()
        return load_vae(self.sources.vae, dtype=torch.float32, device=target)

    # ---- memory planning ---------------------------------------------------------------------------
    def _probe(self) -> None:
        """Check every source file in loading order (DiT, text encoder, VAE) and size it from its header, so a
        wrong file is reported before anything heavy is read (a GGUF DiT is sized with its blocks packed)."""
        from .checkpoints import probe_dit
        from .memory import probe_size, text_encoder_probe_size
        from .text_encoder import probe_text_encoder
        from .vae import probe_vae

        src = self.sources
        dit = probe_dit(src.transformer)
        te = probe_text_encoder(src.text_encoder, src.tokenizer)
        vae = probe_vae(src.vae)
        self._estimates = {
            "dit": (probe_size(dit, src.dtype, src.quant), dit.config),
            "text_encoder": (text_encoder_probe_size(te, src.dtype, src.text_encoder_quant), te.config),
            "vae": (probe_size(vae, torch.float32, block=None), vae.config),
        }

    def _plan(self, work=None):
        """Plan the memory mode for ``work`` (a :class:`~zimage_core.memory.Workload`); None if unmanaged."""
        from .memory import Workload
        from .memory.components import component_sizes, with_controls

        if self.residency is None:
            return None
        work = work or self._work or Workload()
        te = self._loaded_te()
        sizes, vae_cfg = component_sizes(
            self._dit, te, self._vae, self._estimates, work, self.sources.dtype if self.sources else torch.float32
        )
        if "dit" not in sizes:  # not loaded and not sized (GGUF): plan the other stages without it
            from .memory import ComponentSize

            sizes["dit"] = ComponentSize(0)
        sizes["dit"] = with_controls(sizes["dit"], self._control_nets)
        resident = self._resident_bytes(*self._control_nets)
        return self.residency.make_plan(
            sizes["dit"], sizes.get("text_encoder"), sizes.get("vae"), work, vae_cfg=vae_cfg, resident=resident
        )

    def _loaded_te(self):
        return self._te if self._te is not None and self._te.loaded else None

    def _resident_bytes(self, *extra) -> int:
        """Bytes of the loaded components (and the ``extra`` modules) that already sit on the device."""
        from .memory.components import on_device_bytes

        te = self._loaded_te()
        return sum(on_device_bytes(m, self.device) for m in (self._dit, self._vae, te and te.model, *extra))

    def _dtype(self) -> torch.dtype:
        """The weights' dtype: the sources', else the given DiT's (float32 without either)."""
        if self.sources is not None:
            return self.sources.dtype
        return self._dit.dtype if self._dit is not None else torch.float32

    def _vae_home(self) -> torch.device:
        plan = self.residency.plan if self.residency is not None else None
        return self.device if plan is None or plan.mode == "full" else self.offload_device

    # ---- stages ------------------------------------------------------------------------------
    @contextmanager
    def _stage(self, name: str, component, work, place: bool = True, extras=()):
        """Run a stage under the memory plan (:meth:`Residency.stage`); a one-shot pipeline then frees it.
        ``extras``: ControlNets placed (and planned) with the DiT."""
        res = self.residency
        if res is None:
            for m in extras:
                m.to(self.device)
            yield component
            return
        self._control_nets = tuple(extras)
        try:
            if place:
                self._plan(work)
            te = self._loaded_te()
            others = {"dit": self._dit, "text_encoder": te, "vae": self._vae}
            release = self.release if self.lazy else None
            with res.stage(name, component, others, place=place, release=release, extras=extras):
                yield component
        finally:
            self._control_nets = ()
            if extras:
                res.forget(name)  # the ControlNets belong to this run: next time the DiT is placed without them

    def encode_prompts(self, prompts: list[str], max_length: int | None = 512) -> list[torch.Tensor]:
        from .memory import Workload

        te = self.text_encoder
        if te is None:
            raise ZImageError("this pipeline has no text encoder; encode the prompts elsewhere and call sample().")
        work = self._work or Workload(batch=len(prompts), text_tokens=max_length or 512)
        with self._stage("text_encoder", te, work, place=not te.cached(prompts, max_length)):
            return te.encode(prompts, max_length=max_length)

    def sample(
        self,
        cond: list,
        uncond: list | None,
        noise: torch.Tensor,
        opts: GenerateOptions,
        init_latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        callback: Callable | None = None,
        cancel: Callable[[], bool] | None = None,
        controls: Sequence[ControlInput] = (),
    ) -> torch.Tensor:
        """:func:`denoise_latents` with the DiT placed by this pipeline's memory mode; returns model-space latents
        ``[B, 16, h, w]`` (float32). ``cond``/``uncond``: caption features, or Omni conditions (edit).
        ``controls``: ControlNets, placed with the DiT (their blocks stream with its blocks when the plan says)."""
        from .memory import Workload

        b, _, h, w = noise.shape
        tokens = max(_tokens(c) for c in list(cond) + list(uncond or []))
        work = self._work or Workload(
            w * VAE_DOWNSCALE, h * VAE_DOWNSCALE, b, uncond is not None and opts.cfg > 1.0, tokens
        )
        nets = tuple(dict.fromkeys(c.net for c in controls))
        if nets and self._dit is None and self.residency is not None:
            self._control_nets = nets  # load the DiT where the plan that counts the ControlNets puts it
            try:
                self._plan(work)
            finally:
                self._control_nets = ()
        dit = self.dit
        with self._stage("dit", dit, work, extras=nets):
            return denoise_latents(dit, cond, uncond, noise, opts, init_latents, mask, callback, cancel, controls)

    def _vae_stage(self, fn, work_hw: tuple[int, int], batch: int):
        """Run ``fn(vae, planned tile)`` with the VAE on the device (the DiT parked first when the plan says so)."""
        from .memory import Workload

        vae = self.vae
        if vae is None:
            raise ZImageError("this pipeline has no VAE.")
        with self._stage("vae", vae, self._work or Workload(work_hw[1], work_hw[0], batch)):
            tile = self.residency.plan.vae_tile if self.residency is not None else None
            with torch.inference_mode():
                return fn(vae, tile)

    def decode(self, latents: torch.Tensor, tile: int | str | None = "auto") -> torch.Tensor:
        """Model-space latents -> pixels in [-1, 1] (float32), checked for NaN/Inf."""
        from .vae import check_finite

        hw = (latents.shape[-2] * VAE_DOWNSCALE, latents.shape[-1] * VAE_DOWNSCALE)

        def run(vae, planned):
            use = planned if tile == "auto" and planned not in (None, "auto") else tile
            return vae.decode(latents.to(self.device), tile=use)

        x = self._vae_stage(run, hw, latents.shape[0])
        check_finite(x, "decoded image")
        return x

    def encode_image(self, pixels: torch.Tensor, tile: int | str | None = "auto") -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> model-space latents (the posterior mean), float32."""

        def run(vae, planned):
            use = planned if tile == "auto" and planned not in (None, "auto") else tile
            return vae.encode(pixels.to(self.device), tile=use)

        return self._vae_stage(run, tuple(pixels.shape[-2:]), pixels.shape[0])

    # ---- ControlNets ------------------------------------------------------------------------------
    def _base_config(self):
        if self._dit is not None:
            return self._dit.cfg
        if "dit" in self._estimates:
            return self._estimates["dit"][1]
        return None

    def check_controls(self, specs: Sequence[ControlSpec]) -> None:
        """Check ControlNet requests before anything heavy loads (:func:`~zimage_core.controls.probe_controls`)."""
        probe_controls(specs, self._base_config())

    def load_controlnets(self, specs: Sequence[ControlSpec]) -> list[ControlNet]:
        """The ControlNet of each spec, in the pipeline's dtype and quantization, off the device when a memory mode
        places it (:func:`~zimage_core.controls.load_controlnets`)."""
        quant = self.sources.quant if self.sources is not None else "none"
        device = self.device if self.residency is None else self.offload_device
        return load_controlnets(specs, self._base_config(), self._dtype(), device, quant)

    def control_inputs(self, specs: Sequence[ControlSpec], width: int, height: int) -> list[ControlInput]:
        """Load the ControlNets and encode their images (VAE stage) for a ``width`` x ``height`` generation."""
        nets = self.load_controlnets(specs)
        return build_control_inputs(specs, nets, self.encode_image, width, height)

    def check_request(self, opts: GenerateOptions) -> None:
        """Refuse a size and batch whose working memory cannot fit the device (before anything is loaded when the
        pipeline was built by :meth:`load`: the DiT's architecture comes from its file header)."""
        from .validate import check_request_memory

        dit_cfg = self._base_config()
        if dit_cfg is None:
            return
        elt = torch.empty((), dtype=self._dtype()).element_size()
        resident = self._resident_bytes() if self.residency is not None else 0
        check_request_memory(
            dit_cfg,
            opts.width,
            opts.height,
            len(opts.prompts()),
            opts.cfg > 1.0,
            opts.max_length or 512,
            self.device,
            elt,
            extra=resident,
        )

    def generate(
        self,
        opts: GenerateOptions,
        progress: bool = True,
        callback: Callable | None = None,
        init_latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        tile: int | str | None = "auto",
    ):
        """Prompt in, PIL images out (``len = prompts * batch``); img2img/inpainting with ``init_latents``/``mask``."""
        from .memory import Workload
        from .vae import tensor_to_pil

        opts.validate()
        self.check_controls(opts.controls)
        prompts = opts.prompts()
        use_cfg = opts.cfg > 1.0
        start_latents(init_latents, mask, latent_shape(len(prompts), opts.height, opts.width))
        self.check_request(opts)
        self._work = Workload(opts.width, opts.height, len(prompts), use_cfg, opts.max_length or 512)
        try:
            texts = prompts + (opts.negatives() if use_cfg else [])
            unique = list(dict.fromkeys(texts))
            embeds = dict(zip(unique, self.encode_prompts(unique, opts.max_length)))
            cond = [embeds[p] for p in prompts]
            uncond = [embeds[n] for n in opts.negatives()] if use_cfg else None
            del embeds
            controls = self.control_inputs(opts.controls, opts.width, opts.height) if opts.controls else []
            noise = initial_noise(latent_shape(len(prompts), opts.height, opts.width), opts.seed)
            if init_latents is not None:
                init_latents = init_latents.expand(len(prompts), -1, -1, -1)
                mask = mask.expand(len(prompts), -1, -1, -1) if mask is not None else None
            bar = _progress(opts.steps, "sampling", progress)

            def on_step(i, n, x, denoised):
                bar.update(1)
                if callback is not None:
                    callback(i, n, x, denoised)

            try:
                latents = self.sample(
                    cond, uncond, noise, opts, init_latents, mask, callback=on_step, controls=controls
                )
            finally:
                bar.close()
            del cond, uncond, controls
            return tensor_to_pil(self.decode(latents, tile=tile))
        finally:
            self._work = None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False)
