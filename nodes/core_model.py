"""``Z-Image Model -> MODEL``: a Z-Image model (LoRAs, quantization, memory mode included) as a core ``MODEL``."""

from __future__ import annotations

from ..zimage_core.errors import ZImageError
from . import bridge
from .checks import node_errors
from .controlnet import BridgedControls
from .handles import ZImageModel


class ZImageToCoreModel:
    DESCRIPTION = (
        "Turns a Z-Image model (with its LoRAs, quantization and memory mode) into a core MODEL of the kind native "
        "ComfyUI makes for Z-Image, so core KSampler, SamplerCustomAdvanced, BasicScheduler, ModelSamplingAuraFlow, "
        "core LoRA loaders and other packs' model-level patches work on it. It samples exactly what Z-Image Sampler "
        "computes (the same forward), without a copy of the weights. Condition it with Z-Image Text Encode or "
        "Z-Image Edit Conditioning. ControlNets added by Z-Image ControlNet Apply come along (start/end count the core "
        "sampler's steps, as in Z-Image Sampler)."
    )
    CATEGORY = "Z-Image/loaders"
    FUNCTION = "convert"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = (
        "A core MODEL (flow, shift 3) for KSampler (euler/simple, cfg 1 for Turbo), SamplerCustomAdvanced, "
        "ModelSamplingAuraFlow and LoraLoaderModelOnly.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "ZIMAGE_MODEL",
                    {
                        "tooltip": "The Z-Image model from Z-Image Model Loader or Z-Image LoRA Loader; its LoRAs come "
                        "along (the weights are shared, not copied)."
                    },
                ),
            }
        }

    @node_errors("Z-Image Model → MODEL")
    def convert(self, model):
        if not isinstance(model, ZImageModel):
            raise ZImageError(
                f"the model input is {type(model).__name__}, not a Z-Image model; connect Z-Image Model Loader "
                "(or Z-Image LoRA Loader) to it."
            )
        return (bridge.core_model(model, BridgedControls(model) if model.controls else None),)
