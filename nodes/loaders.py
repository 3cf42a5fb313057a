"""Loader nodes: the diffusion model, the text encoder and LoRAs."""

from __future__ import annotations

import logging

import torch

from ..zimage_core.attention import set_attention
from ..zimage_core.checkpoints import load_dit, probe_dit
from ..zimage_core.compile import compile_blocks
from ..zimage_core.dtypes import DTYPES
from ..zimage_core.errors import ZImageError
from ..zimage_core.memory import MemoryMode, Residency, Workload, dit_stage_size
from ..zimage_core.text_encoder import TextEncoder
from . import checks, host, paths
from .checks import node_errors
from .handles import DiTSlot, LoraSpec, ZImageModel, ZImageTextEncoderHandle, load_lora_for

log = logging.getLogger(__name__)

CATEGORY = "Z-Image/loaders"
WEIGHT_DTYPES = ["auto", "bf16", "fp16", "fp32"]
# Choice lists only grow (saved workflows store the chosen string); new widgets are optional, at the end.
ATTENTION_BACKENDS = ["sdpa", "auto", "flash_attn", "flash_attn_3", "sage"]
MEMORY_MODES = ["full", "auto", "text-encoder-offload", "block-swap", "sequential"]
QUANT_MODES = ["none", "int8", "nf4", "fp8"]
DEFAULT_SWAP_BLOCKS = 16
# Widget ranges, checked again in the node (an API prompt or a linked value skips the widget's own limits).
SWAP_BLOCKS = {"min": 1, "max": 64}
LORA_STRENGTH = {"min": -10.0, "max": 10.0}


def _choices(kind: str) -> list[str]:
    return paths.list_models(kind)


def _check_quant(quant: str) -> str:
    if quant not in QUANT_MODES:
        raise ZImageError(f"quant '{quant}' is not one of {', '.join(QUANT_MODES)}.")
    return quant


def plan_residency(mode: MemoryMode, probe, dtype: torch.dtype, quant: str, device: torch.device):
    """``(Residency, activation bytes)`` for a DiT loaded under ``mode``: how many of its blocks stream.

    ``auto`` is planned once, here, for a 1024x1024 image (the loader does not know the size yet) against the
    whole card less ComfyUI's reserve (ComfyUI evicts other models to make room); the text encoder and VAE are
    ComfyUI's to place. ``text-encoder-offload`` keeps the DiT whole: ComfyUI already moves the text encoder
    out when the DiT needs the room. Streamed blocks live in (pinned) host memory whatever ComfyUI's offload
    device is.
    """
    work = Workload()
    size = dit_stage_size(probe, dtype, quant, work)
    residency = Residency(mode, device, "cpu")
    plan = residency.make_plan(size, work=work, free=host.vram_budget(device) if mode.kind == "auto" else None)
    if mode.kind == "auto":
        log.info("Z-Image memory auto: %s", plan.describe())
    return residency, size.activation


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp32 (never fp16 by itself)."""
    if choice not in WEIGHT_DTYPES:
        raise ZImageError(f"weight_dtype '{choice}' is not one of {', '.join(WEIGHT_DTYPES)}.")
    if choice == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if host.bf16_supported(device) else torch.float32
    return DTYPES[choice]


def memory_mode_of(memory_mode: str, swap_blocks: int) -> MemoryMode:
    """The loader's two widgets as the engine's typed memory mode (``swap_blocks`` counts for block-swap only)."""
    if memory_mode not in MEMORY_MODES:
        raise ZImageError(f"memory_mode '{memory_mode}' is not available; choose one of {', '.join(MEMORY_MODES)}.")
    swap_blocks = checks.whole("swap_blocks (blocks streamed by block-swap)", swap_blocks, SWAP_BLOCKS)
    return MemoryMode.of(memory_mode, swap_blocks if memory_mode == "block-swap" else None)


class ZImageModelLoader:
    DESCRIPTION = (
        "Loads a Z-Image diffusion model (Turbo, Base) from ComfyUI/models/diffusion_models: the ComfyUI single "
        "file (z_image_turbo_bf16.safetensors), its fp8 and GGUF (Q8_0 ... Q4_K) variants, this project's own saves, or a diffusers folder (with "
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
                "model_name": (
                    _choices("diffusion_models"),
                    {
                        "tooltip": "Diffusion model file or diffusers folder in ComfyUI/models/diffusion_models, "
                        "e.g. z_image_turbo_bf16.safetensors."
                    },
                ),
                "weight_dtype": (
                    WEIGHT_DTYPES,
                    {
                        "default": "auto",
                        "tooltip": "Precision of the weights. auto: bf16 on a GPU that supports it, fp32 otherwise. "
                        "fp16 suits GPUs without bf16 (RTX 20xx and older): activations that would overflow are "
                        "kept in range, on Turbo and Base.",
                    },
                ),
                "attention": (
                    ATTENTION_BACKENDS,
                    {"default": "sdpa", "tooltip": "Attention implementation: PyTorch scaled_dot_product_attention."},
                ),
                "memory_mode": (
                    MEMORY_MODES,
                    {
                        "default": "full",
                        "tooltip": "How the model uses GPU memory. full: all on the GPU while sampling (ComfyUI moves "
                        "it out when other models need the room). auto: the fastest mode that fits this GPU "
                        "at 1024x1024. text-encoder-offload: as full; ComfyUI moves the text encoder out. "
                        "block-swap: swap_blocks blocks stream from host memory while sampling (less VRAM, "
                        "a little slower). sequential: every block streams (least VRAM). The image is the "
                        "same in every mode.",
                    },
                ),
            },
            "optional": {
                "quant": (
                    QUANT_MODES,
                    {
                        "default": "none",
                        "tooltip": "Quantize the weights while loading: int8 and fp8 about halve the memory of bf16, "
                        "nf4 quarters it (slightly different images). GGUF and fp8 files are read as they "
                        "are, whatever this says.",
                    },
                ),
                "swap_blocks": (
                    "INT",
                    {
                        "default": DEFAULT_SWAP_BLOCKS,
                        **SWAP_BLOCKS,
                        "step": 1,
                        "tooltip": "block-swap only: how many of the transformer blocks (34 in Z-Image) stream from "
                        "host memory. More saves VRAM (about 360 MB per bf16 block).",
                    },
                ),
                "compile": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "torch.compile the transformer blocks: faster sampling after a slow first run. "
                        "Needs a working Triton/compiler setup.",
                    },
                ),
            },
        }

    @node_errors("Z-Image Model Loader")
    def load(
        self,
        model_name,
        weight_dtype="auto",
        attention="sdpa",
        memory_mode="full",
        quant="none",
        swap_blocks=DEFAULT_SWAP_BLOCKS,
        compile=False,
    ):
        if attention not in ATTENTION_BACKENDS:
            raise ZImageError(
                f"attention '{attention}' is not available; choose one of {', '.join(ATTENTION_BACKENDS)}."
            )
        mode = memory_mode_of(memory_mode, swap_blocks)
        compile = checks.boolean("compile", compile)
        path = paths.resolve("diffusion_models", model_name)
        load_device, offload_device = host.dit_devices()
        dtype = pick_dtype(weight_dtype, load_device)
        _check_quant(quant)
        probe = probe_dit(path)  # a wrong file fails here, before loading
        residency, activation = plan_residency(mode, probe, dtype, quant, load_device)
        swap = residency.streamed_blocks("dit")
        if host.comfy_module("comfy.model_patcher") is not None or swap:
            # Inside ComfyUI: load where ComfyUI keeps idle models; it moves the model to the GPU when sampling.
            # Streaming: the streamed blocks stay in host memory, the rest goes to the GPU when sampling.
            dit = load_dit(path, dtype=dtype, device=offload_device if not swap else "cpu", quant=quant)
        else:
            dit = load_dit(path, dtype=dtype, device=load_device, quant=quant)
        chosen = set_attention(dit, attention, device=load_device)
        if compile:
            compile_blocks(dit)
        slot = DiTSlot(dit, model_name, load_device, offload_device, residency, activation=activation)
        return (ZImageModel(slot=slot, dtype=dtype, attention=chosen, memory_mode=mode),)


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
                "text_encoder_name": (
                    _choices("text_encoders"),
                    {
                        "tooltip": "Qwen3-4B weights in ComfyUI/models/text_encoders: qwen_3_4b.safetensors or a "
                        "diffusers folder (with text_encoder/ and tokenizer/)."
                    },
                ),
                "weight_dtype": (
                    WEIGHT_DTYPES,
                    {
                        "default": "auto",
                        "tooltip": "Precision of the text encoder. auto: bf16 on a GPU that supports it, fp32 otherwise.",
                    },
                ),
            },
            "optional": {
                "quant": (
                    QUANT_MODES,
                    {
                        "default": "none",
                        "tooltip": "Quantize the text encoder while loading: int8/fp8 about halve its 8 GB (bf16), nf4 "
                        "quarters it (slightly different embeddings).",
                    },
                ),
            },
        }

    @node_errors("Z-Image Text Encoder Loader")
    def load(self, text_encoder_name, weight_dtype="auto", quant="none"):
        path = paths.resolve("text_encoders", text_encoder_name)
        load_device, offload_device = host.text_encoder_devices()
        dtype = pick_dtype(weight_dtype, load_device)
        encoder = TextEncoder.load(
            path,
            dtype=dtype,
            device=offload_device,
            comfy_tokenizer_dir=host.comfy_tokenizer_dir(),
            quant=_check_quant(quant),
        )
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
                "model": (
                    "ZIMAGE_MODEL",
                    {"tooltip": "The Z-Image model (from Z-Image Model Loader or another LoRA loader)."},
                ),
                "lora_name": (
                    _choices("loras"),
                    {
                        "tooltip": "LoRA file in ComfyUI/models/loras (diffusers/PEFT, "
                        "kohya/musubi, ai-toolkit or ComfyUI key names)."
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        **LORA_STRENGTH,
                        "step": 0.01,
                        "tooltip": "How strongly the LoRA applies; 0 leaves the model as it is, "
                        "negative values invert it.",
                    },
                ),
            }
        }

    @node_errors("Z-Image LoRA Loader")
    def load(self, model, lora_name, strength=1.0):
        if not isinstance(model, ZImageModel):
            raise ZImageError(
                f"the model input is {type(model).__name__}, not a Z-Image model; connect Z-Image Model "
                "Loader (or another Z-Image LoRA Loader) to it."
            )
        strength = checks.number("strength", strength, LORA_STRENGTH)
        path = paths.resolve("loras", lora_name)
        if strength == 0:
            return (model,)
        lora = load_lora_for(model.config, path)
        return (model.with_lora(LoraSpec(name=lora_name, path=path, strength=float(strength), lora=lora)),)
