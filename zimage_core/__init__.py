"""zimage_core: the Z-Image family (S3-DiT, Qwen3 text encoder, Flux VAE, samplers) in plain PyTorch.

Importing this package does no work and never imports ComfyUI. Public entry points live in the
submodules (``zimage_core.pipeline``, ``zimage_core.dit``, ``zimage_core.cli``...).
"""

__version__ = "0.1.0"
