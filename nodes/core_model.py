"""``Z-Image Model -> MODEL``: a Z-Image model (LoRAs, quantization, memory mode included) as a core ``MODEL``."""

from __future__ import annotations

from ..zimage_core.errors import ZImageError
from . import bridge
from .checks import node_errors
from .handles import ZImageModel


class ZImageToCoreModel:
    DESCRIPTION = (
        "Turns a Z-Image model (with its LoRAs, quantization and memory mode) into a core MODEL of the kind native "
        "ComfyUI makes for Z-Image, so core KSampler, SamplerCustomAdvanced, BasicScheduler, ModelSamplingAuraFlow, "
        "core LoRA loaders and other packs' model-level patches work on it. It samples exactly what Z-Image Sampler "
        "computes (the same forward), without a copy of the weights. Condition it with Z-Image Text Encode or "
        "Z-Image Edit Conditioning."
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
        if model.controls:
            raise ZImageError(
                f"this Z-Image model has {len(model.controls)} ControlNet(s) applied (Z-Image ControlNet Apply); they "
                "run in Z-Image Sampler only, a core MODEL cannot carry them. Connect this model to Z-Image Sampler, "
                "or take the model for Z-Image Model -> MODEL from before the ControlNet Apply node."
            )
        return (bridge.core_model(model),)
