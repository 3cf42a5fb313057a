"""Where each component of a pipeline lives, stage by stage, under a memory mode.

:class:`Residency` turns a :class:`~zimage_core.memory.planner.MemoryPlan` into moves: before a stage it parks
what the plan wants off the device and places (or streams) the stage's component; after it, it drops
pending prefetches. Sizes come from the loaded modules, or from the file headers when a component is not
loaded yet (the one-shot command line loads each component just before its stage): each component module's
``probe_*`` function reads its own file; this module only adds up the bytes.
"""

from __future__ import annotations

import gc
import logging
import re
from contextlib import contextmanager

import torch

from .planner import (
    DEFAULT_RESERVE,
    ComponentSize,
    MemoryMode,
    MemoryPlan,
    Workload,
    dit_activation,
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
    move_resident,
    resident_parts,
    stream_dit,
    stream_text_encoder,
)

_MEASURE = object()  # make_plan: read the device's free memory

log = logging.getLogger(__name__)

_DIT_BLOCK = re.compile(r"(?:^|\.)(noise_refiner|context_refiner|siglip_refiner|layers)\.(\d+)\.")
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
# Sizes from file headers (a component module's ``probe_*``: nothing loaded)
# ---------------------------------------------------------------------------------------------
def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def tensor_bytes_loaded(info, elt: int, quant: str) -> int:
    """Bytes one probed tensor takes once loaded: as stored when the loader keeps it (8-bit, GGUF blocks),
    else in the compute dtype, with weight-only quantization applied to the big matrices it may touch."""
    if info.kept_bytes is not None:
        return int(info.kept_bytes)
    n = _numel(info.shape)
    big = info.quantizable and len(info.shape) == 2 and n >= 1 << 16
    return weight_bytes(n, elt, quant if big else "none")


def probe_size(probe, dtype: torch.dtype, quant: str = "none", block=_DIT_BLOCK) -> ComponentSize:
    """Weight bytes of a probed file (a ``FileProbe``) once loaded, and of each block ``block`` groups (by the
    regex's groups, in order of appearance); no activation."""
    elt = _elt(dtype)
    blocks: dict[tuple, int] = {}
    total = 0
    for key, info in probe.tensors.items():
        b = tensor_bytes_loaded(info, elt, quant)
        total += b
        m = block.search(key) if block is not None else None
        if m:
            blocks[m.groups()] = blocks.get(m.groups(), 0) + b
    return ComponentSize(total, tuple(blocks.values()))


def text_encoder_probe_size(probe, dtype: torch.dtype, quant: str = "none") -> ComponentSize:
    """Weight bytes of a probed text encoder once loaded, its layers as the blocks (in layer order)."""
    elt = _elt(dtype)
    per: dict[int, int] = {}
    total = 0
    for key, info in probe.tensors.items():
        b = tensor_bytes_loaded(info, elt, quant)
        total += b
        m = _TE_LAYER.match(key)
        if m:
            per[int(m.group(1))] = per.get(int(m.group(1)), 0) + b
    return ComponentSize(total, tuple(per[i] for i in sorted(per)))


def dit_stage_size(probe, dtype: torch.dtype, quant: str, work: Workload) -> ComponentSize:
    """A probed DiT's weight bytes and blocks plus the working memory of one step of ``work``."""
    size = probe_size(probe, dtype, quant)
    return with_activation(size, dit_activation(probe.config, work, _elt(dtype)))


def with_activation(size: ComponentSize, activation: int) -> ComponentSize:
    return ComponentSize(size.total, size.blocks, activation)


def with_controls(size: ComponentSize, controls) -> ComponentSize:
    """The DiT stage's size with ControlNets (loaded modules) beside the DiT: their weights count, and their
    blocks are blocks the stage can stream (the order of :func:`dit_stream_blocks`: after the DiT's)."""
    if not controls:
        return size
    extra = sum(module_bytes(net) for net in controls)
    blocks = tuple(module_bytes(b) for net in controls for b in net.blocks())
    return ComponentSize(size.total + extra, size.blocks + blocks, size.activation)


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
    """The one placement API: where the DiT, the text encoder and the VAE live while each stage runs.

    A :class:`MemoryPlan` (from :meth:`make_plan`) says what streams and what leaves the device; :meth:`stage`
    applies it around one stage (``"text_encoder"``, ``"dit"`` or ``"vae"``): it parks the components the plan
    wants off the device, places the stage's component (whole, or streaming blocks from host memory), and
    afterwards drops pending prefetches and parks or releases it. A host that moves models itself (ComfyUI)
    uses :meth:`stream` and :meth:`move` instead: the streamed blocks stay ours, the resident part is the host's.
    """

    def __init__(
        self,
        mode: MemoryMode,
        device: torch.device,
        offload_device: torch.device | str = "cpu",
        reserve: int = DEFAULT_RESERVE,
        pin: bool | None = None,
        trace: bool = False,
    ):
        if not isinstance(mode, MemoryMode):
            raise TypeError(f"Residency takes a MemoryMode (parse_memory_mode at the edge), got {mode!r}")
        self.mode = mode
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.reserve = reserve
        self.pin = pin
        self.trace = trace
        self.plan: MemoryPlan | None = None
        self.streamers: dict[str, BlockStreamer] = {}
        self._placed: dict[str, tuple] = {}  # component -> (id(module), blocks streamed) of its installed placement
        self.extras: dict[str, tuple] = {}  # component -> modules placed with it (ControlNets beside the DiT)
        self.extra_streamers: dict[int, BlockStreamer] = {}  # id(module) -> streamer, host placement (stream_extra)

    # ---- planning ------------------------------------------------------------------------------
    def make_plan(
        self,
        dit: ComponentSize,
        te: ComponentSize | None = None,
        vae: ComponentSize | None = None,
        work: Workload | None = None,
        vae_cfg=None,
        resident: int = 0,
        free: int | None | object = _MEASURE,
    ) -> MemoryPlan:
        """Plan for these sizes against the device's free memory (or ``free`` bytes; None: no limit)."""
        if free is _MEASURE:
            free = device_free_bytes(self.device, resident)
        plan = plan_memory(
            self.mode, free, dit, te, vae, reserve=self.reserve, vae_cfg=vae_cfg, work=work or Workload()
        )
        if self.plan is None or _decision(plan) != _decision(self.plan):
            (log.warning if not plan.fits else log.info)(
                "memory %s: %s",
                self.mode,
                plan.describe() + ("" if free is None else f" [free {free / 2**30:.2f} GB]"),
            )
        self.plan = plan
        return plan

    def _require_plan(self) -> MemoryPlan:
        if self.plan is None:
            raise RuntimeError("Residency: no plan yet (make_plan first)")
        return self.plan

    def streamed_blocks(self, component: str) -> int:
        plan = self._require_plan()
        return {"dit": plan.dit_swap, "text_encoder": plan.te_swap}.get(component, 0)

    def load_device(self, component: str) -> torch.device:
        """Where a component should be loaded: straight onto the device when the plan keeps it whole there."""
        return self.device if self.streamed_blocks(component) == 0 else self.offload_device

    # ---- stages --------------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str, component, others: dict | None = None, place: bool = True, release=None, extras=()):
        """Run one stage with ``component`` placed for it.

        ``others``: the other loaded components by name (those the plan wants off the device are parked first).
        ``place=False``: the stage does not need the weights (e.g. every prompt is cached): nothing moves.
        ``release(name)``: called at the end instead of parking (a one-shot run frees each component after use).
        ``extras``: modules that run inside the component's stage and are placed with it (the DiT's ControlNets:
        their blocks stream with the DiT's in block-swap/sequential plans; plan with
        :func:`with_controls` sizes).
        """
        plan = self._require_plan()
        if place:
            for other in plan.evicts(name):
                if (others or {}).get(other) is not None:
                    self.park(other, others[other])
            self.place(name, component, extras)
        try:
            yield component
        finally:
            self.finish(name)
            if release is not None:
                release(name)
            elif place and plan.parks_after(name):
                self.park(name, component)

    def place(self, name: str, component, extras=()) -> None:
        """Put ``component`` on the device as the plan says: whole, or with its planned blocks streaming.
        ``extras`` (DiT only): ControlNets placed with it, their blocks counted among the streamed ones."""
        n = self.streamed_blocks(name)
        extras = tuple(extras)
        if extras and name != "dit":
            raise ValueError(f"only the DiT is placed with extra modules, not the {name}")
        key = (id(component), n, tuple(map(id, extras)))
        if name == "vae":
            component.to(self.device)
            return
        if self._placed.get(name) == key:
            return
        self._drop(name)
        self._park_extras(name, keep=extras)
        if name == "dit":
            streamer = stream_dit(
                component, n, self.device, self.offload_device, extras, pin=self.pin, trace=self.trace
            )
            self.extras[name] = extras
        elif name == "text_encoder":
            streamer = None
            if n:
                streamer = stream_text_encoder(
                    component.model, n, self.device, self.offload_device, pin=self.pin, trace=self.trace
                )
                component.set_compute_device(self.device)
            else:
                component.to(self.device)
        else:
            raise ValueError(f"unknown component '{name}'")
        if streamer is not None:
            self.streamers[name] = streamer
        self._placed[name] = key

    def park(self, name: str, component) -> None:
        """Move ``component`` off the device (its streaming, if any, is removed)."""
        self._drop(name)
        self._placed.pop(name, None)
        self._park_extras(name)
        if component is None or (name == "text_encoder" and not component.loaded):
            return
        component.to(self.offload_device)

    def _park_extras(self, name: str, keep=()) -> None:
        """Move the extras placed with ``name`` (but not those in ``keep``) off the device."""
        stay = set(map(id, keep))
        for m in self.extras.pop(name, ()):
            if id(m) not in stay:
                m.to(self.offload_device)

    def finish(self, name: str) -> None:
        """End of a stage: drop the component's pending prefetches (it stays placed)."""
        streamer = self.streamers.get(name)
        if streamer is not None:
            streamer.flush()

    def forget(self, name: str) -> None:
        """The component was released or replaced: drop what was installed on it."""
        self._drop(name)
        self._placed.pop(name, None)
        self.extras.pop(name, None)

    def _drop(self, name: str) -> None:
        streamer = self.streamers.pop(name, None)
        if streamer is not None:
            streamer.remove()

    # ---- a host that moves the resident part itself (ComfyUI) ------------------------------------
    def stream(self, name: str, component, label: str = "DiT"):
        """Install the plan's streaming on ``component`` without moving its resident part; returns
        :func:`~zimage_core.memory.streaming.resident_parts` (what the host moves), or None when nothing streams."""
        if name != "dit":
            raise ValueError(f"only the DiT streams under a host's placement, not the {name}")
        n = self.streamed_blocks(name)
        self._drop(name)
        if n <= 0:
            return None
        blocks = dit_stream_blocks(component, n)
        self.streamers[name] = BlockStreamer(
            blocks, self.device, self.offload_device, pin=self.pin, trace=self.trace, name=label, owner=component
        )
        self._placed[name] = (id(component), n)
        return resident_parts(component, blocks)

    def move(self, name: str, component, device: torch.device | str) -> None:
        """Move what is not streamed to ``device`` (everything, when nothing streams)."""
        streamer = self.streamers.get(name)
        if streamer is None:
            component.to(device)
            return
        streamer.flush()
        move_resident(component, streamer.blocks, device)

    # ---- modules a host places beside the DiT (ControlNets in ComfyUI) ----------------------------
    def stream_extra(self, module, owner, label: str = "ControlNet"):
        """Host placement of a module that runs inside the DiT's stage (a ControlNet, ``module.blocks()``): when the
        plan streams DiT blocks, every block of ``module`` streams too (``owner``, the DiT, ends them with its
        stage). Returns :func:`~zimage_core.memory.streaming.resident_parts` (what the host moves), or None when the
        plan streams nothing. Idempotent per module; :meth:`drop_extra` removes it."""
        if self.streamed_blocks("dit") <= 0:
            return None
        streamer = self.extra_streamers.get(id(module))
        if streamer is None:
            streamer = BlockStreamer(
                module.blocks(),
                self.device,
                self.offload_device,
                pin=self.pin,
                trace=self.trace,
                name=label,
                owner=owner,
            )
            self.extra_streamers[id(module)] = streamer
        return resident_parts(module, streamer.blocks)

    def move_extra(self, module, device: torch.device | str) -> None:
        """Move what of ``module`` is not streamed to ``device`` (everything, when nothing streams)."""
        streamer = self.extra_streamers.get(id(module))
        if streamer is None:
            module.to(device)
            return
        streamer.flush()
        move_resident(module, streamer.blocks, device)

    def finish_extra(self, module) -> None:
        streamer = self.extra_streamers.get(id(module))
        if streamer is not None:
            streamer.flush()

    def extra_staging_bytes(self, module) -> int:
        streamer = self.extra_streamers.get(id(module))
        return 0 if streamer is None else streamer.staging_bytes()

    def drop_extra(self, module) -> None:
        """Remove ``module``'s streaming (its streamed blocks stay on the offload device)."""
        streamer = self.extra_streamers.pop(id(module), None)
        if streamer is not None:
            streamer.remove()

    def staging_bytes(self, name: str) -> int:
        """Device bytes the component's streaming adds while it runs (the staged blocks)."""
        streamer = self.streamers.get(name)
        return 0 if streamer is None else streamer.staging_bytes()


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


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
