"""ComfyUI's quantized safetensors, recognised from the file itself.

- *Mixed precision* (current ComfyUI, ``comfy/quant_ops.py``): a quantized layer stores ``<layer>.weight`` in
  the storage type, ``<layer>.weight_scale`` (float32, one per tensor, or one per row for ``per_row`` int8),
  optionally ``<layer>.input_scale``, and its recipe as JSON, either in a uint8 tensor ``<layer>.comfy_quant``
  or in the safetensors metadata ``_quantization_metadata = {"layers": {layer: {...}}}``. Formats read here:
  ``float8_e4m3fn``, ``float8_e5m2`` and ``int8_tensorwise`` (with or without ``convrot``, a regular Hadamard
  rotation of each group of inputs). ``full_precision_matrix_mult`` turns the fp8 matmul off for that layer.
- *Legacy scaled fp8*: a marker tensor ``scaled_fp8``, per layer ``<layer>.scale_weight`` (+ ``scale_input``).
- Plain fp8 weights without a scale (a bare dtype cast) are read with scale 1.

Unsupported recipes (nvfp4, mxfp8, int8 block-wise, ...) are refused with a message naming the layer and format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .linear import FP8Linear, Int8Linear, QuantLinear

log = logging.getLogger(__name__)

SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
INPUT_SCALE_SUFFIXES = (".input_scale", ".scale_input")
CONF_SUFFIX = ".comfy_quant"
AUX_SUFFIXES = SCALE_SUFFIXES + INPUT_SCALE_SUFFIXES + (CONF_SUFFIX, ".weight_scale_2", ".pre_quant_scale")
MARKERS = ("scaled_fp8",)
META_KEY = "_quantization_metadata"
FP8_NAMES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SUPPORTED = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise")


def is_aux_key(key: str) -> bool:
    """Scale, recipe and marker tensors that belong to a quantized weight, not to the model."""
    return key.endswith(AUX_SUFFIXES) or key.rsplit(".", 1)[-1] in MARKERS or key in MARKERS


@dataclass
class QuantizedWeight:
    """How one stored ``<layer>.weight`` is quantized, and where its parts are in the file."""

    layer: str  # stored layer name (file keys, prefix included)
    format: str  # float8_e4m3fn | float8_e5m2 | int8_tensorwise
    scale_key: str | None
    input_scale_key: str | None
    full_precision: bool = False
    hadamard: int = 0


def _layer_confs(src) -> dict[str, dict]:
    """Per-layer recipes from the ``_quantization_metadata`` header (keys as written; prefixes stripped later)."""
    raw = (src.metadata or {}).get(META_KEY)
    if not raw:
        return {}
    try:
        layers = json.loads(raw).get("layers", {})
    except (ValueError, AttributeError):
        log.warning("ignoring unreadable %s metadata", META_KEY)
        return {}
    return {k: v for k, v in layers.items() if isinstance(v, dict)}


def _conf_from_tensor(src, key: str) -> dict:
    data = src[key]
    try:
        return json.loads(bytes(data.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{key}' does not hold a readable ComfyUI quantization recipe ({e}).") from e


def scan(src, what: str = "model") -> dict[str, QuantizedWeight]:
    """``{stored weight key: QuantizedWeight}`` for every quantized weight of a safetensors source."""
    keys = set(src)
    confs = _layer_confs(src)
    out: dict[str, QuantizedWeight] = {}
    for key in sorted(keys):
        if not key.endswith(".weight"):
            continue
        layer = key[: -len(".weight")]
        dtype = src.dtype_name(key)
        conf = None
        if layer + CONF_SUFFIX in keys:
            conf = _conf_from_tensor(src, layer + CONF_SUFFIX)
        elif layer in confs:
            conf = confs[layer]
        else:
            conf = next(
                (c for name, c in confs.items() if layer.endswith("." + name) or name.endswith("." + layer)), None
            )
        scale = next((layer + s for s in SCALE_SUFFIXES if layer + s in keys), None)
        inp = next((layer + s for s in INPUT_SCALE_SUFFIXES if layer + s in keys), None)
        if conf is None and dtype not in FP8_NAMES:
            if dtype == "I8" and scale is not None:
                conf = {"format": "int8_tensorwise"}
            else:
                continue
        fmt = (conf or {}).get("format") or ("float8_e4m3fn" if dtype == "F8_E4M3" else "float8_e5m2")
        if fmt not in SUPPORTED or layer + ".weight_scale_2" in keys:
            raise CheckpointError(
                f"{what}: layer '{layer}' is quantized as '{fmt}', which this loader cannot read (supported: "
                f"{', '.join(SUPPORTED)}, ComfyUI scaled fp8 and GGUF). Use the bf16 or fp8 file instead."
            )
        want = "I8" if fmt == "int8_tensorwise" else ("F8_E4M3" if fmt == "float8_e4m3fn" else "F8_E5M2")
        if dtype != want:
            raise CheckpointError(
                f"{what}: '{key}' is stored as {dtype} but its recipe says {fmt}; the file is damaged."
            )
        if fmt == "int8_tensorwise" and scale is None:
            raise CheckpointError(
                f"{what}: the int8 weight '{key}' has no '{layer}.weight_scale'; the file is incomplete."
            )
        had = int(conf.get("convrot_groupsize", 256)) if conf and conf.get("convrot") else 0
        out[key] = QuantizedWeight(layer, fmt, scale, inp, bool((conf or {}).get("full_precision_matrix_mult")), had)
    return out


def describe(src) -> str | None:
    """One phrase naming the quantization of a safetensors source, or None for a full-precision file."""
    found = scan(src)
    if not found:
        return None
    kinds: dict[str, int] = {}
    for q in found.values():
        name = q.format + (f"+convrot{q.hadamard}" if q.hadamard else "")
        kinds[name] = kinds.get(name, 0) + 1
    legacy = any(m in src for m in MARKERS) or any(k.endswith(".scale_weight") for k in src)
    style = "ComfyUI scaled fp8 (legacy)" if legacy else "ComfyUI mixed precision"
    return style + ": " + ", ".join(f"{n} x{c}" for n, c in sorted(kinds.items()))


def _scale_rows(src, q: QuantizedWeight, rows: int) -> torch.Tensor:
    if q.scale_key is None:
        return torch.ones(1)
    s = src[q.scale_key].float().reshape(-1)
    if s.numel() not in (1, rows):
        raise CheckpointError(
            f"'{q.scale_key}' has {s.numel()} values for a weight of {rows} rows; block-wise scales are not supported."
        )
    return s


def build_linear(
    src, parts: list[tuple[str, QuantizedWeight]], fp8_matmul: bool = True, bias: torch.Tensor | None = None
) -> QuantLinear:
    """A quantized linear from one stored weight, or from several stacked along the rows (split q/k/v -> qkv)."""
    fmts = {(q.format, q.hadamard) for _, q in parts}
    if len(fmts) != 1:
        raise CheckpointError(
            f"the parts {[k for k, _ in parts]} of one fused layer are quantized differently; "
            "re-save the file with one format for q, k and v."
        )
    weights, scales, inputs = [], [], []
    for key, q in parts:
        w = src[key]
        weights.append(w)
        s = _scale_rows(src, q, w.shape[0])
        scales.append(s if len(parts) == 1 else s.expand(w.shape[0]))
        inputs.append(src[q.input_scale_key].float().reshape(-1) if q.input_scale_key else None)
    w = weights[0] if len(weights) == 1 else torch.cat(weights)
    s = scales[0] if len(scales) == 1 else torch.cat(scales)
    q0 = parts[0][1]
    if q0.format == "int8_tensorwise":
        return Int8Linear(w, s, bias, hadamard=q0.hadamard)
    inp = None
    if all(i is not None for i in inputs):
        inp = torch.stack([i.max() for i in inputs]).max().reshape(1)
    return FP8Linear(w, s, bias, input_scale=inp, fp8_matmul=fp8_matmul and not any(q.full_precision for _, q in parts))


def plan_linears(
    src,
    found: Mapping[str, QuantizedWeight],
    to_native: Callable[[str], str | None],
    fuse: Mapping[str, list[str]] | None = None,
) -> dict[str, list[tuple[str, QuantizedWeight]]]:
    """``{model module name: [(stored weight key, recipe), ...]}``; ``fuse`` maps a module to its stored parts."""
    plan: dict[str, list[tuple[str, QuantizedWeight]]] = {}
    fused_parts = {p for parts in (fuse or {}).values() for p in parts}
    for module, parts in (fuse or {}).items():
        quantized = [p for p in parts if p in found]
        if quantized and len(quantized) != len(parts):
            raise CheckpointError(
                f"of {parts}, only {quantized} are quantized; the fused layer '{module}' "
                "needs all or none of them quantized."
            )
        if quantized:
            plan[module] = [(p, found[p]) for p in parts]
    for key, q in found.items():
        if key in fused_parts:
            continue
        name = to_native(key)
        if name is not None:
            plan[name[: -len(".weight")]] = [(key, q)]
    return plan
