"""Loader nodes: the diffusion model, the text encoder and LoRAs."""

from __future__ import annotations

import math

import torch

from . import host, paths
from ._engine import ZImageError, core
from .handles import DiTSlot, LoraSpec, ZImageModel, ZImageTextEncoderHandle, load_lora_for

CATEGORY = "Z-Image/loaders"
WEIGHT_DTYPES = ["auto", "bf16", "fp16", "fp32"]
ATTENTION_BACKENDS = ["sdpa"]
MEMORY_MODES = ["full"]  # grows with the low-VRAM modes; saved workflows keep working with "full"
# Native ComfyUI's fp16 test for Z-Image checkpoints: fp16 is safe only when this norm's spread is small.
FP16_STD_LIMIT = 0.42

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _choices(kind: str) -> list[str]:
    return paths.list_models(kind)


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp32 (never fp16 by itself)."""
    if choice not in WEIGHT_DTYPES:
        raise ZImageError(f"weight_dtype '{choice}' is not one of {', '.join(WEIGHT_DTYPES)}.")
    if choice == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if host.bf16_supported(device) else torch.float32
    return _DTYPES[choice]


def check_fp16(ckpt, name: str) -> None:
    """Refuse fp16 for checkpoints that overflow in it (native ComfyUI's heuristic: the std of a late
    ``ffn_norm1`` weight). The sampler also checks its result for NaN/Inf."""
    n = ckpt.config.n_layers
    key = f"layers.{max(n - 2, 0)}.ffn_norm1.weight"
    if key not in ckpt.getters:
        raise ZImageError(f"fp16 was asked for '{name}', but it lacks '{key}' to check fp16 safety; use bf16 or fp32.")
    std = float(torch.std(ckpt.getters[key]().float(), unbiased=False))
    if not math.isfinite(std) or std >= FP16_STD_LIMIT:
        raise ZImageError(
            f"weight_dtype fp16 is refused for '{name}': this checkpoint overflows in float16 (black or noisy "
            f"images; {key} std {std:.3f} >= {FP16_STD_LIMIT}). Choose bf16 (NVIDIA RTX 30xx or newer) or fp32, "
            "or 'auto'."
        )


class ZImageModelLoader:
    DESCRIPTION = (
        "Loads a Z-Image diffusion model (Turbo, Base) from ComfyUI/models/diffusion_models: the ComfyUI single "
        "file (z_image_turbo_bf16.safetensors), this project's own saves, or a diffusers folder (with "
        "transformer/). The layout and sizes are read from the file."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("ZIMAGE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Z-Image diffusion model, for Z-Image Sampler and Z-Image LoRA Loader.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (_choices("diffusion_models"), {
                    "tooltip": "Diffusion model file or diffusers folder in ComfyUI/models/diffusion_models, "
                               "e.g. z_image_turbo_bf16.safetensors."}),
                "weight_dtype": (WEIGHT_DTYPES, {
                    "default": "auto",
                    "tooltip": "Precision of the weights. auto: bf16 on a GPU that supports it, fp32 otherwise. "
                               "fp16 is refused for checkpoints that overflow in it (black images)."}),
                "attention": (ATTENTION_BACKENDS, {
                    "default": "sdpa", "tooltip": "Attention implementation: PyTorch scaled_dot_product_attention."}),
                "memory_mode": (MEMORY_MODES, {
                    "default": "full",
                    "tooltip": "How the model uses GPU memory. full: the whole model stays on the GPU while "
                               "sampling (ComfyUI moves it out when other models need the room)."}),
            }
        }

    def load(self, model_name, weight_dtype="auto", attention="sdpa", memory_mode="full"):
        if attention not in ATTENTION_BACKENDS:
            raise ZImageError(f"attention '{attention}' is not available; choose one of {', '.join(ATTENTION_BACKENDS)}.")
        if memory_mode not in MEMORY_MODES:
            raise ZImageError(f"memory_mode '{memory_mode}' is not available; choose one of {', '.join(MEMORY_MODES)}.")
        path = paths.resolve("diffusion_models", model_name)
        checkpoints = core("checkpoints")
        load_device, offload_device = host.dit_devices()
        dtype = pick_dtype(weight_dtype, load_device)
        ckpt = checkpoints.DiTCheckpoint(path)
        if dtype == torch.float16:
            check_fp16(ckpt, model_name)
        if host.comfy_module("comfy.model_patcher") is not None:
            # Inside ComfyUI: load where ComfyUI keeps idle models; it moves the model to the GPU when sampling.
            dit = checkpoints.load_dit(path, dtype=dtype, device=offload_device)
        else:
            dit = checkpoints.load_dit(path, dtype=dtype, device=load_device)
        slot = DiTSlot(dit, model_name, load_device, offload_device)
        return (ZImageModel(slot=slot, dtype=dtype, attention=attention, memory_mode=memory_mode),)


class ZImageTextEncoderLoader:
    DESCRIPTION = (
        "Loads Z-Image's Qwen3-4B text encoder from ComfyUI/models/text_encoders (qwen_3_4b.safetensors, its fp8 "
        "variant, or a diffusers folder with text_encoder/). The tokenizer is found automatically: a tokenizer/ "
        "folder next to the weights, else ComfyUI's bundled Qwen tokenizer."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("ZIMAGE_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder, for Z-Image Text Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (_choices("text_encoders"), {
                    "tooltip": "Qwen3-4B weights in ComfyUI/models/text_encoders: qwen_3_4b.safetensors or a "
                               "diffusers folder (with text_encoder/ and tokenizer/)."}),
                "weight_dtype": (WEIGHT_DTYPES, {
                    "default": "auto",
                    "tooltip": "Precision of the text encoder. auto: bf16 on a GPU that supports it, fp32 otherwise."}),
            }
        }

    def load(self, text_encoder_name, weight_dtype="auto"):
        path = paths.resolve("text_encoders", text_encoder_name)
        load_device, offload_device = host.text_encoder_devices()
        dtype = pick_dtype(weight_dtype, load_device)
        te_mod = core("text_encoder")
        encoder = te_mod.TextEncoder.load(path, dtype=dtype, device=offload_device,
                                          comfy_tokenizer_dir=host.comfy_tokenizer_dir())
        return (ZImageTextEncoderHandle(encoder, text_encoder_name, load_device, offload_device),)


class ZImageLoraLoader:
    DESCRIPTION = (
        "Adds a LoRA from ComfyUI/models/loras to a Z-Image model. Returns a new model that shares the base "
        "weights: chain several loaders to stack LoRAs; the input model is left unchanged. A LoRA key that matches "
        "nothing in the model is an error (so a LoRA never silently does nothing)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("ZIMAGE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA added on top of any earlier ones.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("ZIMAGE_MODEL", {"tooltip": "The Z-Image model (from Z-Image Model Loader or another LoRA loader)."}),
                "lora_name": (_choices("loras"), {"tooltip": "LoRA file in ComfyUI/models/loras (diffusers/PEFT, "
                                                             "kohya/musubi, ai-toolkit or ComfyUI key names)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "How strongly the LoRA applies; 0 leaves the model as it is, "
                                                  "negative values invert it."}),
            }
        }

    def load(self, model, lora_name, strength=1.0):
        if not isinstance(model, ZImageModel):
            raise ZImageError(f"the model input is {type(model).__name__}, not a Z-Image model; connect Z-Image Model "
                              "Loader (or another Z-Image LoRA Loader) to it.")
        if not math.isfinite(strength):
            raise ZImageError(f"LoRA strength {strength} is not a number.")
        path = paths.resolve("loras", lora_name)
        if strength == 0:
            return (model,)
        lora = load_lora_for(model.config, model.dtype, path, float(strength))
        return (model.with_lora(LoraSpec(name=lora_name, path=path, strength=float(strength), lora=lora)),)
