"""Loading, probing, writing and converting DiT checkpoints (the layouts themselves: :mod:`.dit_layout`).

``probe_dit`` reads a file's header only; ``load_dit`` reads any layout (and GGUF / ComfyUI quantized files,
through :mod:`zimage_core.quant.load`) one tensor at a time; ``save_dit`` / ``convert_dit`` write the
``comfyui``, ``diffusers`` and ``zimage`` layouts losslessly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import DiTConfig
from .dit_layout import (
    LAYOUTS,
    META_CONFIG,
    META_FORMAT,
    QKV_FUSED,
    QKV_SPLIT,
    DiTCheckpoint,
    config_to_diffusers,
    native_to_diffusers_key,
)
from .dtypes import resolve_dtype
from .errors import CheckpointError
from .outputs import atomic_path
from .quant import comfy
from .quant import load as qload
from .quant.gguf import is_gguf
from .quant.load import probe_gguf_dit
from .quant.modes import check_mode
from .weights import FileProbe, materialize, save_safetensors, tensor_infos

log = logging.getLogger(__name__)


def probe_dit(path: str | os.PathLike) -> FileProbe:
    """What a DiT file holds, from its header (no weights read): config, layout, the stored tensors (8-bit ones
    kept as stored; GGUF blocks kept packed) and readers of single tensors by native name. A wrong file raises."""
    if is_gguf(path):
        return probe_gguf_dit(path)
    ckpt = DiTCheckpoint(path)
    return FileProbe(Path(path), ckpt.config, tensor_infos(ckpt.source), ckpt.layout, ckpt.getters)


def load_dit(
    path: str | os.PathLike, dtype: str | torch.dtype | None = "auto", device: str = "cpu", quant: str = "none"
):
    """Load any DiT layout, one tensor at a time, into ``dtype`` on ``device``.

    GGUF files and ComfyUI's quantized (fp8 / int8) files are recognised and stay quantized; ``quant``
    (``none``, ``int8``, ``nf4``, ``fp8``) quantizes the transformer blocks of a full-precision file while
    loading (see :mod:`zimage_core.quant`); ``dtype`` is then the compute dtype.
    """
    from .dit import ZImageDiT

    mode = check_mode(quant)
    target = resolve_dtype(dtype, device)
    if is_gguf(path):
        return qload.load_gguf_dit(path, target, device, mode)
    ckpt = DiTCheckpoint(path)
    with torch.device("meta"):
        model = ZImageDiT(ckpt.config)
    getters = dict(ckpt.getters)
    qload.prepare_dit(model, ckpt, getters, target, device, mode)
    materialize(model, getters, target, device, what=f"diffusion model '{path}'")
    model.eval().requires_grad_(False)
    log.info(
        "loaded %s DiT (%s layout, %d layers, dim %d) as %s on %s%s",
        Path(path).name,
        ckpt.layout,
        ckpt.config.n_layers,
        ckpt.config.dim,
        target,
        device,
        "" if mode == "none" else f", {mode} blocks",
    )
    return model


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def native_state_to_layout(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Native (ComfyUI) keys -> ``layout`` keys; splits qkv for diffusers."""
    if layout in ("comfyui", "zimage"):
        return dict(state)
    if layout != "diffusers":
        raise ValueError(f"unknown layout '{layout}'; use one of {', '.join(LAYOUTS)}")
    out = {}
    for k, v in state.items():
        if k.endswith(QKV_FUSED):
            base = native_to_diffusers_key(k[: -len(QKV_FUSED)])
            for suffix, part in zip(QKV_SPLIT, v.chunk(3, dim=0)):
                out[base + suffix] = part
        else:
            out[native_to_diffusers_key(k)] = v
    return out


def save_dit(
    state: Mapping[str, torch.Tensor], cfg: DiTConfig, out: str | os.PathLike, layout: str, shard_bytes: int = 5 * 2**30
) -> Path:
    """Write a native state dict as ``layout``; diffusers goes to a folder (``out/config.json`` + shards)."""
    out = Path(out)
    tensors = native_state_to_layout(state, layout)
    if layout == "diffusers":  # written under a temporary name next to it, then moved into place
        with atomic_path(out, folder=True) as tmp:
            (tmp / "config.json").write_text(json.dumps(config_to_diffusers(cfg), indent=2))
            _save_sharded(tensors, tmp, "diffusion_pytorch_model", shard_bytes)
        return out
    meta = {"format": "pt"}
    if layout == "zimage":
        meta.update({META_FORMAT: "zimage", META_CONFIG: json.dumps(dataclasses.asdict(cfg))})
    save_safetensors(tensors, out, metadata=meta)
    return out


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path, stem: str, shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += n
    if len(shards) == 1:
        save_safetensors(shards[0], folder / f"{stem}.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert_dit(src: str | os.PathLike, dst: str | os.PathLike, layout: str, dtype: str | None = None) -> Path:
    """Rewrite a DiT checkpoint in another layout, tensor for tensor (lossless unless ``dtype`` is given)."""
    ckpt = DiTCheckpoint(src)
    if comfy.scan(ckpt.source):
        raise CheckpointError(
            f"'{src}' is quantized ({comfy.describe(ckpt.source)}); convert works on "
            "full-precision (bf16/fp16/fp32) files. Convert the bf16 file instead."
        )
    target = None if dtype in (None, "keep") else resolve_dtype(dtype, "cpu")
    state = {}
    for k, get in ckpt.getters.items():
        t = get()
        state[k] = t.to(target) if (target is not None and t.is_floating_point()) else t
    return save_dit(state, ckpt.config, dst, layout)
