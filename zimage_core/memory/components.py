"""Where each component of a pipeline lives, stage by stage, under a memory mode.

:class:`Residency` turns a :class:`~zimage_core.memory.planner.MemoryPlan` into moves: before a stage it parks
what the plan wants off the device and places (or streams) the stage's component; after it, it drops
pending prefetches. Sizes come from the loaded modules, or from the file headers when a component is not
loaded yet (the one-shot command line loads each component just before its stage).
"""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path

import torch

from ..errors import ZImageError
from .planner import (
    DEFAULT_RESERVE,
    ComponentSize,
    MemoryMode,
    MemoryPlan,
    Workload,
    dit_activation,
    parse_memory_mode,
    plan_memory,
    text_encoder_activation,
    vae_activation,
    weight_bytes,
)
from .streaming import (
    BlockStreamer,
    dit_block_count,
    dit_stream_blocks,
    module_bytes,
    stream_dit,
    stream_text_encoder,
)

log = logging.getLogger(__name__)

_DIT_BLOCK = re.compile(r"(?:^|\.)(noise_refiner|context_refiner|siglip_refiner|layers)\.(\d+)\.")
_8BIT = ("F8_E4M3", "F8_E5M2", "I8", "U8")
_TE_LAYER = re.compile(r"^layers\.(\d+)\.")


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Sizes of loaded components
# ---------------------------------------------------------------------------------------------
def dit_size(dit, work: Workload) -> ComponentSize:
    blocks = dit_stream_blocks(dit, dit_block_count(dit))
    return ComponentSize(
        module_bytes(dit), tuple(module_bytes(b) for b in blocks), dit_activation(dit.cfg, work, _elt(dit.dtype))
    )


def text_encoder_size(te, work: Workload) -> ComponentSize:
    return ComponentSize(
        module_bytes(te.model),
        tuple(module_bytes(b) for b in te.model.layers),
        text_encoder_activation(te.config, work, _elt(te.dtype)),
    )


def vae_size(vae, work: Workload) -> ComponentSize:
    return ComponentSize(module_bytes(vae), (), vae_activation(vae.config, work, _elt(vae.dtype)))


# ---------------------------------------------------------------------------------------------
# Sizes from file headers (nothing loaded); also checks that each file is what it should be
# ---------------------------------------------------------------------------------------------
def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _quant_bytes(shape, elt: int, quant: str) -> int:
    # Weight-only quantization touches the big matrices; norms, biases and small tables keep their dtype.
    return weight_bytes(_numel(shape), elt, quant if len(shape) == 2 and _numel(shape) >= 1 << 16 else "none")


def probe_dit(path, dtype: torch.dtype, quant: str = "none"):
    """``(ComponentSize without activation, DiTConfig)`` from the header; raises for a wrong file.

    Tensors stored in 8 bits (ComfyUI fp8/int8 files) stay so when loaded and count one byte each."""
    from ..checkpoints import DiTCheckpoint

    blocks: dict[tuple[str, int], int] = {}
    total = 0
    if _is_gguf(path):  # packed blocks stay packed: count what the loader will hold
        from ..quant.load import gguf_dit_sizes

        cfg, sizes = gguf_dit_sizes(path, dtype)
        for key, b in sizes.items():
            total += b
            m = _DIT_BLOCK.search(key)
            if m:
                blocks[(m.group(1), int(m.group(2)))] = blocks.get((m.group(1), int(m.group(2))), 0) + b
        return ComponentSize(total, tuple(blocks.values())), cfg
    ckpt = DiTCheckpoint(path)
    src = ckpt.source
    elt = _elt(dtype)
    for key in src:
        shape = src.shape(key)
        b = _numel(shape) if src.dtype_name(key) in _8BIT else _quant_bytes(shape, elt, quant)
        total += b
        m = _DIT_BLOCK.search(key)
        if m:
            blocks[(m.group(1), int(m.group(2)))] = blocks.get((m.group(1), int(m.group(2))), 0) + b
    return ComponentSize(total, tuple(blocks.values())), ckpt.config


def probe_text_encoder(
    path, tokenizer=None, dtype: torch.dtype = torch.float32, quant: str = "none", comfy_tokenizer_dir=None
):
    """``(ComponentSize without activation, TextEncoderConfig)``; checks the weights and finds the tokenizer."""
    from .. import text_encoder as tem
    from ..weights import WeightSource

    p = Path(path).expanduser()
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tem.find_tokenizer(tokenizer, p, comfy_tokenizer_dir)
    weights, cfg_json = tem._locate(p)
    view = tem.qwen3_weight_view(WeightSource.open(weights, what="text encoder"), p)
    shapes = {k: view.shape(k) for k in view}
    hf = None
    if cfg_json is not None:
        import json

        try:
            hf = json.loads(cfg_json.read_text())
        except (OSError, ValueError):
            hf = None
    cfg = tem.infer_text_encoder_config(shapes, hf)
    n_run = tem.layers_used(cfg)
    elt = _elt(dtype)
    layers = [0] * n_run
    total = 0
    for key, shape in shapes.items():
        m = _TE_LAYER.match(key)
        if m and int(m.group(1)) >= n_run:
            continue
        if not m and key != "embed_tokens.weight":
            continue
        b = _quant_bytes(shape, elt, quant) if m else _numel(shape) * elt
        total += b
        if m:
            layers[int(m.group(1))] += b
    return ComponentSize(total, tuple(layers)), cfg


def probe_vae(path):
    """``(ComponentSize without activation, VAEConfig)`` of a Flux VAE file or folder (float32)."""
    from .. import vae as vm
    from ..weights import WeightSource

    p = Path(path).expanduser()
    files, dconfig = vm._vae_files(p)
    src, _ = vm._bfl_view(WeightSource(files, "VAE"), p)
    shapes = {k: src.shape(k) for k in src}
    cfg = vm.vae_config_from_shapes(shapes)
    return ComponentSize(sum(_numel(s) for s in shapes.values()) * 4), cfg


def _is_gguf(path) -> bool:
    try:
        from ..quant.gguf import is_gguf
    except ImportError:
        return False
    return is_gguf(path)


def probe_sources(src) -> dict[str, tuple]:
    """``{component: (size without activation, config)}`` for a pipeline's ``ModelSources``, checking each file
    in loading order (DiT, text encoder, VAE) so a wrong file is reported before anything heavy is read.
    A GGUF DiT is sized from its header with its blocks still packed."""
    out = {"dit": probe_dit(src.transformer, src.dtype, src.quant)}
    out["text_encoder"] = probe_text_encoder(src.text_encoder, src.tokenizer, src.dtype, src.text_encoder_quant)
    out["vae"] = probe_vae(src.vae)
    return out


def with_activation(size: ComponentSize, activation: int) -> ComponentSize:
    return ComponentSize(size.total, size.blocks, activation)


def component_sizes(dit, te, vae, estimates: dict, work: Workload, dtype: torch.dtype) -> tuple[dict, object]:
    """``({component: ComponentSize}, VAEConfig)``: from the loaded modules, else from ``estimates``
    (``{component: (size without activation, config)}`` from the ``probe_*`` functions)."""
    elt = _elt(dtype)
    measure = {"dit": dit_size, "text_encoder": text_encoder_size, "vae": vae_size}
    activation = {
        "dit": lambda c: dit_activation(c, work, elt),
        "text_encoder": lambda c: text_encoder_activation(c, work, elt),
        "vae": lambda c: vae_activation(c, work, 4),
    }
    sizes, vae_cfg = {}, None
    for name, comp in (("dit", dit), ("text_encoder", te), ("vae", vae)):
        if comp is not None:
            sizes[name] = measure[name](comp, work)
            cfg = getattr(comp, "config", None)
        elif name in estimates:
            size, cfg = estimates[name]
            sizes[name] = with_activation(size, activation[name](cfg))
        else:
            continue
        if name == "vae":
            vae_cfg = cfg
    return sizes, vae_cfg


# ---------------------------------------------------------------------------------------------
# Applying a plan
# ---------------------------------------------------------------------------------------------
def device_free_bytes(device: torch.device, resident: int = 0) -> int | None:
    """Bytes a plan may use on ``device``: free memory, PyTorch's unused cache, and ``resident`` (weights of
    ours already there, which the plan moves itself). None for devices without a limit (the CPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(cached, 0) + resident)


def on_device_bytes(module, device: torch.device) -> int:
    if module is None:
        return 0
    return sum(
        t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()) if t.device == device
    )


class Residency:
    """Applies one memory mode to a DiT, a :class:`~zimage_core.text_encoder.TextEncoder` and a VAE."""

    def __init__(
        self,
        mode: str | MemoryMode,
        device: torch.device,
        offload_device: torch.device | str = "cpu",
        reserve: int = DEFAULT_RESERVE,
        pin: bool | None = None,
        trace: bool = False,
    ):
        self.mode = parse_memory_mode(mode)
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.reserve = reserve
        self.pin = pin
        self.trace = trace
        self.plan: MemoryPlan | None = None
        self.dit_streamer: BlockStreamer | None = None
        self.te_streamer: BlockStreamer | None = None
        self._dit_key: tuple | None = None  # (id(dit), blocks streamed) of the installed DiT placement
        self._te_key: tuple | None = None

    # ---- planning ------------------------------------------------------------------------------
    def make_plan(
        self,
        dit: ComponentSize,
        te: ComponentSize | None,
        vae: ComponentSize | None,
        work: Workload,
        vae_cfg=None,
        resident: int = 0,
    ) -> MemoryPlan:
        free = device_free_bytes(self.device, resident)
        plan = plan_memory(self.mode, free, dit, te, vae, reserve=self.reserve, vae_cfg=vae_cfg, work=work)
        if self.plan is None or _decision(plan) != _decision(self.plan):
            (log.warning if not plan.fits else log.info)(
                "memory %s: %s", self.mode, plan.describe() + ("" if free is None else f" [free {free / 2**30:.2f} GB]")
            )
        self.plan = plan
        return plan

    def _require_plan(self) -> MemoryPlan:
        if self.plan is None:
            raise RuntimeError("Residency: no plan yet (make_plan first)")
        return self.plan

    def load_device(self, component: str) -> torch.device:
        """Where a component should be loaded: straight onto the device when the plan keeps it whole there."""
        plan = self._require_plan()
        streams = {"dit": plan.dit_swap, "text_encoder": plan.te_swap}.get(component, 0)
        return self.device if streams == 0 else self.offload_device

    # ---- DiT -----------------------------------------------------------------------------------
    def place_dit(self, dit) -> None:
        plan = self._require_plan()
        key = (id(dit), plan.dit_swap)
        if self._dit_key == key:
            return
        self._drop_dit_streamer()
        self.dit_streamer = stream_dit(
            dit, plan.dit_swap, self.device, self.offload_device, pin=self.pin, trace=self.trace
        )
        self._dit_key = key

    def park_dit(self, dit) -> None:
        self._drop_dit_streamer()
        if dit is not None:
            dit.to(self.offload_device)
        self._dit_key = None

    def _drop_dit_streamer(self) -> None:
        if self.dit_streamer is not None:
            self.dit_streamer.remove()
            self.dit_streamer = None

    # ---- text encoder --------------------------------------------------------------------------
    def place_text_encoder(self, te) -> None:
        plan = self._require_plan()
        key = (id(te), plan.te_swap)
        if self._te_key == key:
            return
        self._drop_te_streamer()
        if plan.te_swap:
            self.te_streamer = stream_text_encoder(
                te.model, plan.te_swap, self.device, self.offload_device, pin=self.pin, trace=self.trace
            )
            te.model.rotary_emb.to(torch.float32)
            _set_text_encoder_device(te, self.device)
        else:
            te.to(self.device)
        self._te_key = key

    def park_text_encoder(self, te) -> None:
        self._drop_te_streamer()
        if te is not None and te.loaded:
            te.to(self.offload_device)
        self._te_key = None

    def text_encoder_done(self) -> None:
        if self.te_streamer is not None:
            self.te_streamer.flush()

    def _drop_te_streamer(self) -> None:
        if self.te_streamer is not None:
            self.te_streamer.remove()
            self.te_streamer = None

    # ---- forgetting a released component ---------------------------------------------------------
    def forget(self, component: str) -> None:
        if component == "dit":
            self._drop_dit_streamer()
            self._dit_key = None
        elif component == "text_encoder":
            self._drop_te_streamer()
            self._te_key = None


def _decision(plan: MemoryPlan) -> tuple:
    return (
        plan.mode,
        plan.dit_swap,
        plan.te_swap,
        plan.offload_text_encoder,
        plan.offload_dit,
        plan.vae_tile,
        plan.fits,
    )


def _set_text_encoder_device(te, device: torch.device) -> None:
    """A streamed text encoder computes on ``device`` although some of its layers live elsewhere."""
    te._device = torch.device(device)
    for key, (emb, n, cut) in list(te._cache.items()):
        te._cache[key] = (emb.to(device), n, cut)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_quant(fn, quant: str | None, what: str) -> dict:
    """``{'quant': quant}`` for a loader that accepts it; a clear error when quantization is unavailable."""
    import inspect

    if quant in (None, "none"):
        return {}
    if "quant" not in inspect.signature(fn).parameters:
        raise ZImageError(
            f"quantization '{quant}' for the {what} needs zimage_core.quant, which this installation "
            "does not have; update the package or use --quant none."
        )
    return {"quant": quant}
