"""Training toolkit for the Z-Image DiT: the pre-training curriculum, SFT, full and LoRA fine-tuning.

Entry points: ``python -m train.run CONFIG.toml [--resume] [key=value ...]`` (or through ``accelerate launch``)
and ``python -m train.export CKPT --out FILE``. Configurations live in ``train/configs/``; the data pipeline
in :mod:`train.data`. Nothing here is imported by ``zimage_core`` or the ComfyUI nodes.
"""
