"""The Z-Image node pack (classic V1 node API). Importing this package never imports ComfyUI.

Node ids and the order of their widgets are public API: saved workflows store widget values by position.
Never rename, reorder or insert inputs; add a new node (``...V2``) instead.
"""

from .conditioning import ZImageTextEncode
from .controlnet import ZImageControlNetApply, ZImageControlNetLoader
from .core_model import ZImageToCoreModel
from .edit import ZImageEditConditioning, ZImageVisionLoader
from .enhancer import ZImagePromptEnhancer
from .loaders import ZImageLoraLoader, ZImageModelLoader, ZImageTextEncoderLoader
from .sampler import ZImageTurboSampler

NODE_CLASS_MAPPINGS = {
    "ZImageModelLoader": ZImageModelLoader,
    "ZImageTextEncoderLoader": ZImageTextEncoderLoader,
    "ZImageTextEncode": ZImageTextEncode,
    "ZImageTurboSampler": ZImageTurboSampler,
    "ZImageLoraLoader": ZImageLoraLoader,
    "ZImageVisionLoader": ZImageVisionLoader,
    "ZImageEditConditioning": ZImageEditConditioning,
    "ZImagePromptEnhancer": ZImagePromptEnhancer,
    "ZImageToCoreModel": ZImageToCoreModel,
    "ZImageControlNetLoader": ZImageControlNetLoader,
    "ZImageControlNetApply": ZImageControlNetApply,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ZImageModelLoader": "Z-Image Model Loader",
    "ZImageTextEncoderLoader": "Z-Image Text Encoder Loader",
    "ZImageTextEncode": "Z-Image Text Encode",
    "ZImageTurboSampler": "Z-Image Sampler",
    "ZImageLoraLoader": "Z-Image LoRA Loader",
    "ZImageVisionLoader": "Z-Image Vision Loader (SigLIP2)",
    "ZImageEditConditioning": "Z-Image Edit Conditioning",
    "ZImagePromptEnhancer": "Z-Image Prompt Enhancer",
    "ZImageToCoreModel": "Z-Image Model → MODEL",
    "ZImageControlNetLoader": "Z-Image ControlNet Loader",
    "ZImageControlNetApply": "Z-Image ControlNet Apply",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
