"""What a model file is, for ``zimage info``: a DiT, a text encoder, a VAE or a LoRA, from its header.

Each kind is recognised by the same public probe its loader uses (:func:`~zimage_core.quant.load.dit_file_info`,
:func:`~zimage_core.text_encoder.probe_text_encoder`, :func:`~zimage_core.vae.probe_vae`, LoRA key detection in
:mod:`~zimage_core.lora_formats`), so ``info`` accepts exactly the files ``generate`` accepts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from .errors import CheckpointError, ZImageError

_WEIGHTS_ONLY = object()


def _probe_summary(probe, kind: str) -> dict:
    total = 0
    for t in probe.tensors.values():
        numel = 1
        for s in t.shape:
            numel *= int(s)
        total += numel
    return {
        "kind": kind,
        "layout": probe.layout or "single file",
        "parameters": total,
        "config": dataclasses.asdict(probe.config) if dataclasses.is_dataclass(probe.config) else str(probe.config),
    }


def _lora_info(path: Path) -> dict | None:
    from .lora_formats import LowRank, detect_format
    from .weights import WeightSource

    src = WeightSource.open(path, "LoRA")
    keys = list(src)
    fmt = detect_format(keys, src.metadata)
    if fmt == "unknown":
        return None
    from .lora import load_lora

    lora = load_lora(path)
    ranks = sorted({int(t.down.shape[0]) for terms in lora.values() for t in terms if isinstance(t, LowRank)})
    return {"kind": "LoRA", "format": lora.format or fmt, "modules": len(lora), "ranks": ranks, "tensors": len(keys)}


def describe_file(path: str | os.PathLike) -> dict:
    """A JSON-able description of a DiT, text encoder, VAE or LoRA file (or diffusers folder); one
    :class:`ZImageError` when it is none of them."""
    from .quant.load import dit_file_info
    from .text_encoder import probe_text_encoder
    from .vae import probe_vae

    p = Path(path).expanduser()
    if not p.exists():
        raise ZImageError(f"'{p}' does not exist.")
    reasons = []
    try:
        return {"kind": "diffusion model (DiT)", **dit_file_info(p)}
    except CheckpointError as e:
        reasons.append(f"DiT: {e}")
    # info describes the weights: the text encoder's tokenizer is looked for by generate, not here (any value that
    # is not a path makes the probe skip that search)
    probe_te = functools.partial(probe_text_encoder, tokenizer=_WEIGHTS_ONLY)
    for kind, probe in (("VAE", probe_vae), ("text encoder", probe_te)):
        try:
            return _probe_summary(probe(p), kind)
        except ZImageError as e:
            reasons.append(f"{kind}: {e}")
    if p.is_file():
        try:
            info = _lora_info(p)
        except ZImageError as e:
            info, reasons = None, [*reasons, f"LoRA: {e}"]
        if info is not None:
            return info
    first = reasons[0] if reasons else "unreadable"
    raise CheckpointError(f"'{p}' is not a Z-Image DiT, text encoder, VAE or LoRA file ({first[:300]}).")
