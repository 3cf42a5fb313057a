"""The one table of weight-dtype names, for the CLI, the library, the nodes and training.

Short names (``bf16``, ``fp16``, ``fp32``) are the project's; torch's names (``bfloat16``, ``float16``,
``float32``) are accepted as aliases everywhere a dtype is named. ``auto`` is bf16 on CUDA and fp32 elsewhere.
"""

from __future__ import annotations

import torch

from .errors import ZImageError

#: Short name -> dtype: the names the project writes (configs, metadata, widget choices).
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: torch's own names, accepted wherever a dtype is named.
ALIASES: dict[str, str] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
#: Every accepted name (for command-line choices).
DTYPE_NAMES: tuple[str, ...] = (*DTYPES, *ALIASES)


def canonical_name(name: str) -> str:
    """``bfloat16`` -> ``bf16``; a short name as is; anything else raises :class:`ZImageError`."""
    key = ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in DTYPES:
        raise ZImageError(f"unknown dtype '{name}'; use one of auto, {', '.join(DTYPE_NAMES)}.")
    return key


def dtype_from_name(name: str) -> torch.dtype:
    """The dtype for a short name or a torch alias."""
    return DTYPES[canonical_name(name)]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """A dtype, a name, or ``auto``/None (bf16 on CUDA, float32 elsewhere)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto", "default"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return dtype_from_name(dtype)
