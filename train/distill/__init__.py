"""Few-step distillation (issue 14): Decoupled DMD and DMD2 turn a Base DiT (or any fine-tune) into an N-step,
CFG-free student, exported as a DiT file and as a LoRA over the teacher. Entry point: ``python -m train.run CONFIG``
with a ``[distill]`` section (``train/configs/distill_*.toml``); see :mod:`train.distill.trainer`."""

from .trainer import Distiller

__all__ = ["Distiller"]
