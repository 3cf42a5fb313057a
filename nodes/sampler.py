"""The Z-Image sampler node: core LATENT in, core LATENT out, the engine's sampling path in between.

Latents cross the node boundary in raw Flux-VAE space (what core ``VAEEncode``/``VAEDecode`` and
``EmptySD3LatentImage`` use); inside they are in the DiT's space ``(raw - 0.1159) * 0.3611`` (ComfyUI's Flux
latent format ``process_in``). The noise is native ComfyUI's: ``torch.randn(latent.size())`` from a CPU
generator seeded with ``seed`` (``batch_index`` honoured), so a seed gives the same image here, in native
ComfyUI's noise and in ``zimage generate``. Sampling is :func:`zimage_core.pipeline.denoise_latents`, the CLI's own path.
"""

from __future__ import annotations

import logging

import torch

from ..zimage_core import sampling, validate
from ..zimage_core.errors import ZImageError
from ..zimage_core.pipeline import GenerateOptions, denoise_latents
from ..zimage_core.vae import to_model_space, to_raw_space
from . import host
from .checks import node_errors
from .conditioning import caption_features, host_intermediate_device
from .controlnet import control_inputs
from .edit import edit_conditions, has_references
from .handles import ZImageModel

log = logging.getLogger(__name__)

CATEGORY = "Z-Image/sampling"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def sampler_names() -> list[str]:
    return list(sampling.SAMPLERS)


def prepare_noise(samples: torch.Tensor, seed: int, batch_index=None) -> torch.Tensor:
    """Native ComfyUI's noise for a LATENT: :func:`zimage_core.sampling.initial_noise` of its shape and dtype
    (``batch_index`` from Latent From Batch honoured, so a sub-batch matches the full one)."""
    return sampling.initial_noise(samples.shape, seed, batch_index, dtype=samples.dtype)


def _check_latent(latent_image, channels: int) -> torch.Tensor:
    if not isinstance(latent_image, dict) or not torch.is_tensor(latent_image.get("samples")):
        raise ZImageError(
            "latent_image is not a LATENT; connect EmptySD3LatentImage (text to image) or VAEEncode (image to image)."
        )
    x = latent_image["samples"]
    if x.ndim != 4 or x.shape[1] != channels:
        raise ZImageError(
            f"latent_image has shape {tuple(x.shape)}, but Z-Image works on [batch, {channels}, height/8, width/8] "
            "Flux-VAE latents. Use EmptySD3LatentImage (not EmptyLatentImage), or VAEEncode with ae.safetensors."
        )
    if x.shape[-2] % 2 or x.shape[-1] % 2 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ZImageError(
            f"latent_image is {x.shape[-1] * 8}x{x.shape[-2] * 8} pixels; Z-Image needs width and height that are "
            "multiples of 16. Resize or crop the image first (e.g. Upscale Image to a multiple of 16)."
        )
    return x


class ZImageTurboSampler:
    DESCRIPTION = (
        "Samples a Z-Image model: text to image from EmptySD3LatentImage, image to image from VAEEncode with "
        "denoise < 1, and inpainting through the latent's noise mask (Set Latent Noise Mask). Turbo: 8 steps, cfg 1. "
        "Base: 30-50 steps, cfg about 4, with a negative prompt. The result is a LATENT for VAEDecode with "
        "ae.safetensors. The same files, prompt, size and seed give the same image as the zimage command line."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent (raw Flux-VAE space), for VAEDecode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("ZIMAGE_MODEL", {"tooltip": "The Z-Image model (Z-Image Model Loader or LoRA Loader)."}),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "What to draw: Z-Image Text Encode (or native Z-Image conditioning)."},
                ),
                "latent_image": (
                    "LATENT",
                    {
                        "tooltip": "EmptySD3LatentImage for text to image, or VAEEncode of an "
                        "image (with a noise mask for inpainting)."
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "control_after_generate": True,
                        "tooltip": "Seed of the initial noise (drawn on the CPU: the same on every machine).",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 8,
                        "min": 1,
                        "max": 200,
                        "tooltip": "Number of denoising steps: 8 for Turbo, 30-50 for Base.",
                    },
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 1.0,
                        "max": 30.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Classifier-free guidance. 1 = off (Turbo); about 4 for Base, which then "
                        "needs the negative input.",
                    },
                ),
                "shift": (
                    "FLOAT",
                    {
                        "default": 3.0,
                        "min": 0.01,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "Time shift of the schedule (3 for Z-Image; higher spends more steps "
                        "on composition).",
                    },
                ),
                "sampler_name": (
                    sampler_names(),
                    {
                        "default": "euler",
                        "tooltip": "Solver. euler is the reference pipeline's; "
                        "res_multistep is native ComfyUI's Turbo default.",
                    },
                ),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "How much of the input latent is replaced: 1 for text to image, "
                        "about 0.5-0.8 for image to image.",
                    },
                ),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "What to avoid; used only when cfg > 1 (Base)."}),
                "seed_variance": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Mixes seeded low-frequency noise into the start so Turbo "
                        "varies its composition more between seeds. 0 = off (exact "
                        "reference noise); 0.1-0.5 suggested.",
                    },
                ),
            },
        }

    @node_errors("Z-Image Sampler")
    def sample(
        self,
        model,
        positive,
        latent_image,
        seed,
        steps,
        cfg,
        shift,
        sampler_name,
        denoise,
        negative=None,
        seed_variance=0.0,
    ):
        if not isinstance(model, ZImageModel):
            raise ZImageError(
                f"the model input is {type(model).__name__}, not a Z-Image model; connect Z-Image Model Loader to it."
            )
        if sampler_name not in sampler_names():
            raise ZImageError(f"sampler '{sampler_name}' is unknown; choose one of {', '.join(sampler_names())}.")
        if not 0.0 <= denoise <= 1.0:
            raise ZImageError(f"denoise must be between 0 and 1, got {denoise}.")
        seed = validate.seed(seed)  # a whole number in 0..2**64-1 (a fractional or NaN seed is refused)
        steps = validate.int_in_range("steps", steps, 1, 10_000)
        for name, value in (("cfg", cfg), ("shift", shift)):
            validate.finite_float(name, value)
        if seed_variance is None or not validate.finite_float("seed_variance", seed_variance) >= 0:
            raise ZImageError(f"seed_variance must be 0 or more, got {seed_variance}.")
        samples = _check_latent(latent_image, model.config.in_channels)
        if denoise == 0:
            return (dict(latent_image),)
        if cfg > 1.0 and negative is None:
            raise ZImageError(
                f"cfg is {cfg} (guidance on) but nothing is connected to negative. Connect a Z-Image "
                "Text Encode (an empty or 'blurry, low quality' prompt), or set cfg to 1 for Turbo."
            )
        b, _, h, w = samples.shape
        opts = GenerateOptions(
            prompt="",
            width=w * 8,
            height=h * 8,
            steps=int(steps),
            cfg=float(cfg),
            shift=float(shift),
            sampler=sampler_name,
            seed=int(seed),
            denoise=float(denoise),
        )
        opts.validate()
        feat_dim = model.config.cap_feat_dim
        # Reference latents (Z-Image Edit Conditioning, native TextEncodeZImageOmni): the Omni path.
        omni = has_references(positive) or (cfg > 1.0 and has_references(negative))
        if omni:
            cond = edit_conditions(positive, "positive", b, model.config)
            uncond = edit_conditions(negative, "negative", b, model.config) if cfg > 1.0 else None
        else:
            cond = caption_features(positive, "positive", b, feat_dim)
            uncond = caption_features(negative, "negative", b, feat_dim) if cfg > 1.0 else None

        noise = prepare_noise(samples, seed, latent_image.get("batch_index")).float()
        noise = sampling.perturb_initial(noise, int(seed), float(seed_variance))
        mask = latent_image.get("noise_mask")
        init = None
        if mask is not None or denoise < 1.0:
            init = to_model_space(samples.float())
            if mask is not None:
                mask = sampling.prepare_mask(mask, h, w, batch_size=b)
        else:
            opts.denoise = 1.0

        host.throw_if_interrupted()
        dit = model.prepare()
        callback = host.step_callback(int(steps), dit.device)
        controls = control_inputs(model, dit, w * 8, h * 8) if model.controls else ()
        x = denoise_latents(dit, cond, uncond, noise, opts, init, mask, callback, host.cancel_check, controls)
        out = dict(latent_image)
        out["samples"] = to_raw_space(x).to(host_intermediate_device(), torch.float32)
        return (out,)
