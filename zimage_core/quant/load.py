"""Putting quantized linears into a model while it is being loaded, one tensor at a time.

The model is built on the meta device; before :func:`~zimage_core.weights.materialize` fills it, the linears
that are quantized in the file (ComfyUI fp8/int8, GGUF) or that ``quant`` asks for are replaced by quantized
modules built from their weight alone, so the full-precision model is never resident: peak memory is the
quantized model plus one full-precision matrix.

Quantize-on-load touches only the big matrices of the transformer blocks (:data:`DIT_POLICY`,
:data:`TEXT_ENCODER_POLICY`); embedders, the final layer, norms, the adaLN modulation and pad tokens stay
in the compute dtype.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..dit_layout import (
    DROPPED_KEYS,
    QKV_FUSED,
    QKV_SPLIT,
    DiTCheckpoint,
    describe_wrong_file,
    diffusers_to_native_key,
    infer_config,
    strip_prefix,
)
from ..errors import CheckpointError
from ..weights import FileProbe, TensorInfo
from . import comfy
from .linear import quantize_linear, share_workspace
from .modes import DIT_POLICY, DIT_STORED_POLICY, TEXT_ENCODER_POLICY

log = logging.getLogger(__name__)

Getters = dict[str, Callable[[], torch.Tensor]]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _pop_bias(getters: Getters, name: str, dtype: torch.dtype, device) -> torch.Tensor | None:
    get = getters.pop(name + ".bias", None)
    return get().to(device=device, dtype=dtype) if get is not None else None


def install_prequantized(
    model: nn.Module,
    plan: dict[str, list],
    src,
    getters: Getters,
    dtype: torch.dtype,
    device,
    keep: re.Pattern,
    fp8_matmul: bool = True,
) -> int:
    """Build the linears that the file stores quantized (``plan`` from :func:`comfy.plan_linears`).

    Layers outside ``keep`` (and quantized weights of modules that are not linears) are dequantized into
    ordinary parameters. Returns the number of quantized linears installed.
    """
    n = 0
    for name, parts in plan.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # not part of this model (e.g. the text encoder's unused last layer)
        if not isinstance(module, nn.Linear) or not keep.fullmatch(name):
            getters[name + ".weight"] = lambda parts=parts: comfy.build_linear(src, parts).dequantize()
            continue
        getters.pop(name + ".weight", None)
        bias = _pop_bias(getters, name, dtype, device)
        lin = comfy.build_linear(src, parts, fp8_matmul=fp8_matmul, bias=bias).to(device)
        if (lin.out_features, lin.in_features) != (module.out_features, module.in_features):
            raise CheckpointError(
                f"'{name}' is {lin.out_features}x{lin.in_features} in the file, expected "
                f"{module.out_features}x{module.in_features}."
            )
        _set_module(model, name, lin)
        n += 1
    return n


def quantize_linears(
    model: nn.Module, getters: Getters, mode: str, policy: re.Pattern, dtype: torch.dtype, device, what: str = "model"
) -> int:
    """Quantize-on-load: every meta-device ``nn.Linear`` whose name matches ``policy`` is read, quantized on
    ``device`` and replaced. Layers already quantized in the file are left as they are."""
    if mode == "none":
        return 0
    n = skipped = 0
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and module.weight.is_meta and policy.fullmatch(name)):
            continue
        get = getters.get(name + ".weight")
        if get is None:
            continue
        w = get()
        if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            continue  # a quantized tensor without a recipe: materialize handles it like any other
        if mode == "nf4" and w.numel() % 64:
            skipped += 1
            continue
        del getters[name + ".weight"]
        bias = _pop_bias(getters, name, dtype, device)
        _set_module(model, name, quantize_linear(w.to(device), mode, bias))
        del w
        n += 1
        if torch.device(device).type == "cpu":
            trim_host_memory()  # between layers: the freed temporaries must not pile up as heap fragments
    if skipped:
        log.info("%s: %d layers kept in %s (sizes not a multiple of the nf4 block of 64)", what, skipped, dtype)
    return n


# ---------------------------------------------------------------------------------------------
# The DiT
# ---------------------------------------------------------------------------------------------
def prepare_dit(model: nn.Module, ckpt, getters: Getters, dtype: torch.dtype, device, mode: str) -> None:
    """Install pre-quantized and quantize-on-load linears into a meta ``ZImageDiT`` (safetensors files)."""
    src = ckpt.source
    found = comfy.scan(src, f"diffusion model '{ckpt.path}'")
    if found:
        fuse = {}
        for key in src:
            if key.endswith(QKV_SPLIT[0]):
                base = key[: -len(QKV_SPLIT[0])]
                native = diffusers_to_native_key(strip_prefix(base + QKV_SPLIT[0]))
                fuse[native[: -len(QKV_SPLIT[0])] + QKV_FUSED[: -len(".weight")]] = [base + s for s in QKV_SPLIT]
        plan = comfy.plan_linears(src, found, lambda k: diffusers_to_native_key(strip_prefix(k)), fuse)
        n = install_prequantized(model, plan, src, getters, dtype, device, DIT_STORED_POLICY)
        log.info("diffusion model: %d linears stored quantized in the file (%s)", n, comfy.describe(src))
        if mode != "none":
            log.info("diffusion model: the file is already quantized; --quant %s applies to its other layers", mode)
    quantize_linears(model, getters, mode, DIT_POLICY, dtype, device, "diffusion model")
    share_workspace(model)


def trim_host_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``). Quantizing while loading frees many
    full-precision temporaries between the quantized tensors it keeps; without this the process keeps ~10-30%
    of the model size as free-but-resident heap. A no-op where glibc is absent."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's, when it is glibc
    except (OSError, AttributeError):
        return None


def _gguf_dit_parts(src, path) -> tuple[dict[str, list[str]], str]:
    """``{native key: stored keys}`` (3 stored keys for split q/k/v) and the key layout of a GGUF DiT."""
    parts: dict[str, list[str]] = {}
    layout = "comfyui"
    for key in src:
        k = diffusers_to_native_key(strip_prefix(key))
        if k in DROPPED_KEYS or k.endswith((QKV_SPLIT[1], QKV_SPLIT[2])):
            continue
        if k.endswith(QKV_SPLIT[0]):
            layout = "diffusers"
            base = key[: -len(QKV_SPLIT[0])]
            stored = [base + s for s in QKV_SPLIT]
            missing = [s for s in stored if s not in src]
            if missing:
                raise CheckpointError(f"diffusion model: {missing} missing next to '{key}'; the file is incomplete.")
            parts[k[: -len(QKV_SPLIT[0])] + QKV_FUSED] = stored
        else:
            parts[k] = [key]
    if "cap_embedder.1.weight" not in parts or not any(k.endswith(QKV_FUSED) for k in parts):
        raise CheckpointError(f"'{path}': " + describe_wrong_file(list(src), "a Z-Image diffusion model (DiT)"))
    return parts, layout


def _gguf_config(src, parts):
    shapes = {k: (sum(src.tensors[s].shape[0] for s in v), *src.tensors[v[0]].shape[1:]) for k, v in parts.items()}
    return infer_config(shapes)


def load_gguf_dit(path, dtype: torch.dtype, device, mode: str = "none"):
    """A ``ZImageDiT`` from a GGUF file (city96 / ComfyUI-GGUF keys, or diffusers keys), quantized blocks kept."""
    from ..dit import ZImageDiT
    from ..weights import materialize
    from .gguf import GGUFSource, has_kernel, summary
    from .linear import GGUFLinear

    src = GGUFSource(path, "diffusion model")
    parts, _ = _gguf_dit_parts(src, path)
    cfg = _gguf_config(src, parts)
    with torch.device("meta"):
        model = ZImageDiT(cfg)
    getters: Getters = {}
    for k, stored in parts.items():
        if len(stored) == 1:
            getters[k] = lambda s=stored[0]: src.read(s)
        else:
            getters[k] = lambda stored=stored: torch.cat([src.read(s) for s in stored])
    n = 0
    for name, module in list(model.named_modules()):
        stored = parts.get(name + ".weight")
        if not isinstance(module, nn.Linear) or stored is None or not DIT_STORED_POLICY.fullmatch(name):
            continue
        types = {src.tensors[s].qtype for s in stored}
        t0 = src.tensors[stored[0]]
        if len(types) != 1 or not t0.quantized or not has_kernel(t0.qtype):
            continue  # float, mixed or kernel-less types: dequantized by the getter into the compute dtype
        raws = [src.read_raw(s).view(src.tensors[s].shape[0], -1) for s in stored]
        raw = raws[0] if len(raws) == 1 else torch.cat(raws)
        del raws
        del getters[name + ".weight"]
        bias = _pop_bias(getters, name, dtype, device)
        _set_module(model, name, GGUFLinear(raw, t0.qtype, (module.out_features, module.in_features), bias).to(device))
        n += 1
    if mode != "none":
        log.info(
            "diffusion model: '%s' is a GGUF file, already quantized; --quant %s is ignored", Path(path).name, mode
        )
    materialize(model, getters, dtype, device, what=f"diffusion model '{path}'")
    model.eval().requires_grad_(False)
    share_workspace(model)
    trim_host_memory()
    log.info(
        "loaded %s DiT (GGUF %s, %d quantized linears, %d layers, dim %d) computing in %s on %s",
        Path(path).name,
        summary(src),
        n,
        cfg.n_layers,
        cfg.dim,
        dtype,
        device,
    )
    return model


def probe_gguf_dit(path) -> FileProbe:
    """A GGUF DiT's header as :func:`zimage_core.checkpoints.probe_dit` gives it: block matrices the loader keeps
    packed count their stored bytes; everything else is converted to the compute dtype (``--quant`` does not
    apply to GGUF files). Getters read single (unfused) tensors as float32."""
    from .gguf import GGUFSource, has_kernel

    src = GGUFSource(path, "diffusion model")
    parts, layout = _gguf_dit_parts(src, path)
    tensors = {}
    for k, stored in parts.items():
        ts = [src.tensors[s] for s in stored]
        kept = (
            k.endswith(".weight")
            and DIT_STORED_POLICY.fullmatch(k[: -len(".weight")]) is not None
            and len({t.qtype for t in ts}) == 1
            and ts[0].quantized
            and has_kernel(ts[0].qtype)
        )
        shape = (sum(int(t.shape[0]) for t in ts), *(int(d) for d in ts[0].shape[1:]))
        tensors[k] = TensorInfo(shape, sum(t.nbytes for t in ts) if kept else None, quantizable=False)
    getters = {k: partial(src.read, v[0], torch.float32) for k, v in parts.items() if len(v) == 1}
    return FileProbe(Path(path), _gguf_config(src, parts), tensors, f"gguf ({layout} keys)", getters)


def dit_file_info(path) -> dict:
    """What ``zimage info`` prints for a DiT file: layout, inferred config and quantization."""
    import dataclasses

    from .gguf import GGUFSource, is_gguf, summary

    if is_gguf(path):
        src = GGUFSource(path, "diffusion model")
        parts, layout = _gguf_dit_parts(src, path)
        kinds = ", ".join(f"{k} x{v}" for k, v in summary(src).items())
        return {
            "layout": layout,
            "format": "gguf",
            "quantization": f"GGUF: {kinds}",
            "config": dataclasses.asdict(_gguf_config(src, parts)),
        }
    ckpt = DiTCheckpoint(path)
    return {
        "layout": ckpt.layout,
        "format": "safetensors",
        "quantization": comfy.describe(ckpt.source) or "none",
        "config": dataclasses.asdict(ckpt.config),
    }


# ---------------------------------------------------------------------------------------------
# The text encoder
# ---------------------------------------------------------------------------------------------
def prepare_text_encoder(
    model: nn.Module, view, n_run: int, getters: Getters, dtype: torch.dtype, device, mode: str
) -> None:
    """Same as :func:`prepare_dit` for the Qwen3 text encoder. ``view`` has the normalised keys; ``getters`` the
    plain ones, without the weights listed by :func:`text_encoder_quantized_keys` (built here instead)."""
    found = _te_found(view, n_run)
    if found:
        plan = comfy.plan_linears(view, found, lambda k: k)
        n = install_prequantized(model, plan, view, getters, dtype, device, TEXT_ENCODER_POLICY)
        log.info("text encoder: %d linears stored quantized in the file (%s)", n, comfy.describe(view))
    quantize_linears(model, getters, mode, TEXT_ENCODER_POLICY, dtype, device, "text encoder")
    share_workspace(model)


def _te_found(view, n_run: int) -> dict:
    """Quantized linear weights of the layers that run (quantized embeddings are left to the plain getters)."""
    keep = {}
    for k, q in comfy.scan(view, "text encoder").items():
        m = re.match(r"layers\.(\d+)\.", k)
        if m and int(m.group(1)) < n_run and TEXT_ENCODER_POLICY.fullmatch(q.layer):
            keep[k] = q
    return keep


def text_encoder_quantized_keys(view, n_run: int) -> set[str]:
    """Normalised keys of the quantized linear weights that :func:`prepare_text_encoder` builds itself."""
    return set(_te_found(view, n_run))
