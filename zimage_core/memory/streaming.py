"""Block streaming: some blocks of a model live on the offload device and visit the compute device only
while they run, with the next block's copy overlapping the current block's compute.

Every streamed block keeps one *home* copy of its weights on the offload device (pinned host memory when
the compute device is a GPU). Between uses each parameter's ``.data`` is its home tensor, so anything that
edits weights in place (LoRA merging) edits the home copy. When a block is entered (a forward pre-hook on
the block, and on children the model calls outside the block's forward, like ``adaLN_modulation``) its
staged copy is swapped in, and the copy of the block expected next is issued; when its forward returns,
the home tensors are swapped back and the staged copy is dropped.

On CUDA the copies run on a side stream from pinned memory (``non_blocking``):

- the compute stream waits for a block's copy event before using it;
- before each copy the side stream waits for the event recorded after the last released block, so a
  staged buffer freed by the host is never overwritten while a kernel may still read it (freed memory is
  reused only by later allocations on the side stream, which are ordered after that wait);
- nothing waits on the host: no ``synchronize``, no ``.item()``. At most two staged copies exist at a
  time (the running block and the prefetched one).

On a single device (the CPU, in tests) the same bookkeeping runs and the staged copy is a clone, so the
order of loads, prefetches and releases is observable without a GPU. Streaming is for inference only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..errors import ZImageError

log = logging.getLogger(__name__)

#: Children that a model calls outside its blocks' forward (the DiT computes modulation vectors first).
ENTRY_CHILDREN = ("adaLN_modulation",)
_OWNER_ATTR = "_zimage_block_streamers"


@dataclass
class _Staged:
    index: int
    tensors: list[torch.Tensor]
    event: object = None  # torch.cuda.Event on CUDA


@dataclass
class StreamStats:
    loads: int = 0  # copies made when the block was entered (not prefetched in time, or no prediction)
    prefetches: int = 0
    hits: int = 0  # entries served by a prefetch
    dropped: int = 0  # prefetches thrown away (prediction wrong, or flushed)
    trace: list[tuple[str, int]] | None = field(default=None, repr=False)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: nn.Module) -> int:
    return tensor_bytes(list(module.parameters()) + list(module.buffers()))


class BlockStreamer:
    """Streams ``blocks`` between ``offload_device`` (home) and ``device`` (compute); see the module doc.

    ``blocks`` are given in their expected execution order; the order actually seen is learned as the
    model runs (which block follows which), so the prefetch follows the real order from the second pass.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        *,
        pin: bool | None = None,
        prefetch: bool = True,
        entry_children: Sequence[str] = ENTRY_CHILDREN,
        trace: bool = False,
        name: str = "model",
        owner: nn.Module | None = None,
    ):
        if not blocks:
            raise ValueError("BlockStreamer needs at least one block")
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.name = name
        self._cuda = self.device.type == "cuda"
        self.pin = (self._cuda and self.offload_device.type == "cpu") if pin is None else pin
        self.prefetch = prefetch
        self.stats = StreamStats(trace=[] if trace else None)
        n = len(self.blocks)
        self._next: dict[int, int] = {i: (i + 1) % n for i in range(n)}  # one block: itself, prefetched on release
        self._last_entered: int | None = None
        self._homes: list[list[tuple[object, str, torch.Tensor]]] = []
        self._active: dict[int, list[torch.Tensor]] = {}
        self._pending: _Staged | None = None
        self._last_done = None
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._handles: list = []
        self._trains: list[bool] = []
        for i, block in enumerate(self.blocks):
            self._homes.append(self._send_home(block))
            self._trains.append(any(p.requires_grad for p in block.parameters()))
            self._handles.append(block.register_forward_pre_hook(partial(self._enter_hook, i)))
            self._handles.append(block.register_forward_hook(partial(self._exit_hook, i)))
            for child in entry_children:
                mod = getattr(block, child, None)
                if isinstance(mod, nn.Module):
                    self._handles.append(mod.register_forward_pre_hook(partial(self._enter_hook, i)))
        self.block_bytes = [tensor_bytes(h for _, _, h in homes) for homes in self._homes]
        self.owner = owner
        if owner is not None:  # so code that only has the model can end a stage (flush_streamers)
            owner.__dict__.setdefault(_OWNER_ATTR, []).append(self)
        log.info(
            "%s: streaming %d blocks (%.0f MB) from %s%s to %s",
            name,
            n,
            sum(self.block_bytes) / 2**20,
            self.offload_device,
            " (pinned)" if self.pin else "",
            self.device,
        )

    # ---- setup ---------------------------------------------------------------------------------
    def _home_copy(self, t: torch.Tensor) -> torch.Tensor:
        home = t.to(self.offload_device)
        if self.pin and home.device.type == "cpu" and not home.is_pinned():
            try:
                home = home.pin_memory()
            except RuntimeError as e:  # out of pinnable memory: still correct, copies just do not overlap
                log.warning(
                    "%s: could not pin host memory (%s); streaming from pageable memory (slower).", self.name, e
                )
                self.pin = False
        return home

    def _send_home(self, block: nn.Module) -> list[tuple[object, str, torch.Tensor]]:
        homes = []
        for mod in block.modules():
            for p in mod._parameters.values():
                if p is not None:
                    p.data = self._home_copy(p.data)
                    homes.append((p, "", p.data))
            for key, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[key] = self._home_copy(b)
                    homes.append((mod, key, mod._buffers[key]))
        return homes

    @staticmethod
    def _point(slot: tuple[object, str, torch.Tensor], t: torch.Tensor) -> None:
        owner, key, _ = slot
        if key:
            owner._buffers[key] = t
        else:
            owner.data = t

    # ---- the hooks -----------------------------------------------------------------------------
    def _record(self, what: str, i: int) -> None:
        if self.stats.trace is not None:
            self.stats.trace.append((what, i))

    def _stage(self, i: int) -> _Staged:
        homes = [h for _, _, h in self._homes[i]]
        if not self._cuda:
            return _Staged(i, [h.to(self.device, copy=True) for h in homes])
        with torch.cuda.stream(self._copy_stream):
            if self._last_done is not None:
                self._copy_stream.wait_event(self._last_done)
            staged = [h.to(self.device, non_blocking=True) for h in homes]
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return _Staged(i, staged, event)

    def _enter_hook(self, i: int, module, args):
        self.enter(i)

    def _exit_hook(self, i: int, module, args, output):
        self.release(i)

    def enter(self, i: int) -> None:
        """Make block ``i``'s weights usable on the device (idempotent while it runs)."""
        if i in self._active:
            return
        if self._trains[i] and torch.is_grad_enabled():
            raise ZImageError(
                f"{self.name}: memory streaming is for inference; it cannot train weights that "
                "need gradients. Use the full memory mode for training."
            )
        if self._last_entered is not None and self._last_entered != i:
            self._next[self._last_entered] = i  # learn the real order
        self._last_entered = i
        staged = self._pending
        self._pending = None
        if staged is not None and staged.index != i:
            self.stats.dropped += 1
            self._record("drop", staged.index)
            staged = None
        if staged is None:
            staged = self._stage(i)
            self.stats.loads += 1
            self._record("load", i)
        else:
            self.stats.hits += 1
            self._record("hit", i)
        if staged.event is not None:
            torch.cuda.current_stream(self.device).wait_event(staged.event)
        for slot, t in zip(self._homes[i], staged.tensors):
            self._point(slot, t)
        self._active[i] = staged.tensors
        if self.prefetch:
            j = self._next.get(i)
            if j is not None and j != i and j not in self._active:
                self._pending = self._stage(j)
                self.stats.prefetches += 1
                self._record("prefetch", j)

    def release(self, i: int) -> None:
        """Point block ``i`` back at its home copy and drop the staged one."""
        if self._active.pop(i, None) is None:
            return
        for slot in self._homes[i]:
            self._point(slot, slot[2])
        if self._cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._last_done = done
        self._record("release", i)
        if self.prefetch and self._pending is None and self._next.get(i) == i:
            self._pending = self._stage(i)  # a lone streamed block: fetch it again while the rest computes
            self.stats.prefetches += 1
            self._record("prefetch", i)

    def flush(self) -> None:
        """Drop a pending prefetch and release any block still entered (end of a stage)."""
        for i in list(self._active):
            self.release(i)
        if self._pending is not None:
            self.stats.dropped += 1
            self._record("drop", self._pending.index)
            self._pending = None
        self._last_entered = None

    # ---- state ---------------------------------------------------------------------------------
    @property
    def staged_count(self) -> int:
        return len(self._active) + (self._pending is not None)

    def at_home(self) -> bool:
        """True when every streamed tensor is its home copy (nothing staged is referenced)."""
        for homes in self._homes:
            for owner, key, home in homes:
                cur = owner._buffers[key] if key else owner.data  # ``.data`` is a new alias each time: compare storage
                if cur.device != home.device or cur.data_ptr() != home.data_ptr():
                    return False
        return True

    def staging_bytes(self) -> int:
        """Device bytes the staged copies need at most (the running block and the prefetched one)."""
        return sum(sorted(self.block_bytes, reverse=True)[:2])

    def streamed_bytes(self) -> int:
        return sum(self.block_bytes)

    def remove(self) -> None:
        """Remove the hooks; the streamed blocks stay on the offload device."""
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.owner is not None:
            mine = self.owner.__dict__.get(_OWNER_ATTR, [])
            if self in mine:
                mine.remove(self)
            self.owner = None


def streamers_of(model: nn.Module) -> list[BlockStreamer]:
    """The streamers installed on ``model``'s blocks (with ``owner=model``)."""
    return list(model.__dict__.get(_OWNER_ATTR, ()))


def flush_streamers(model: nn.Module) -> None:
    """End a stage: drop pending prefetches of every streamer on ``model`` (no-op without any)."""
    for s in streamers_of(model):
        s.flush()


# ---------------------------------------------------------------------------------------------
# Placement helpers
# ---------------------------------------------------------------------------------------------
def resident_parts(model: nn.Module, streamed: Iterable[nn.Module]):
    """The largest submodules of ``model`` holding no streamed block, and the parameters/buffers that sit
    directly on modules that do (e.g. the DiT's pad tokens). Returns ``(modules, [(owner, name, tensor)])``."""
    skip = {id(b) for b in streamed}
    holders: set[int] = set()

    def mark(mod: nn.Module) -> bool:
        found = id(mod) in skip
        for child in mod.children():
            found = mark(child) or found
        if found:
            holders.add(id(mod))
        return found

    mark(model)
    modules, loose = [], []

    def walk(mod: nn.Module) -> None:
        for key, p in mod._parameters.items():
            if p is not None:
                loose.append((mod, key, p))
        for key, b in mod._buffers.items():
            if b is not None:
                loose.append((mod, key, b))
        for child in mod.children():
            if id(child) in skip:
                continue
            if id(child) in holders:
                walk(child)
            else:
                modules.append(child)

    if id(model) in holders:
        walk(model)
    else:
        modules.append(model)
    return modules, loose


def move_resident(model: nn.Module, streamed: Iterable[nn.Module], device: torch.device | str) -> None:
    """Move every weight of ``model`` outside the streamed blocks to ``device``."""
    modules, loose = resident_parts(model, streamed)
    for m in modules:
        m.to(device)
    for owner, key, t in loose:
        if key in owner._parameters:
            owner._parameters[key].data = t.data.to(device)
        else:
            owner._buffers[key] = t.to(device)


def pick_blocks(blocks: Sequence[nn.Module], n: int) -> list[nn.Module]:
    """``n`` of ``blocks`` spread evenly, so each streamed block's copy overlaps the most compute."""
    m = len(blocks)
    if n >= m:
        return list(blocks)
    if n <= 0:
        return []
    return [blocks[int((k + 0.5) * m / n)] for k in range(n)]


def dit_stream_blocks(dit, n: int, controls: Sequence[nn.Module] = ()) -> list[nn.Module]:
    """The DiT blocks to stream for ``block-swap:n``, in execution order.

    The per-step blocks (noise refiner, then the main layers, then the blocks of any ControlNets in
    ``controls``, which run every step beside them) come first; the caption refiners, which run once per
    generation, are streamed only when ``n`` exceeds the per-step blocks.
    """
    per_step = list(dit.noise_refiner) + list(dit.layers) + [b for net in controls for b in net.blocks()]
    once = list(dit.context_refiner) + list(getattr(dit, "siglip_refiner", None) or [])
    chosen = set(map(id, pick_blocks(per_step, n) + pick_blocks(once, n - len(per_step))))
    return [b for b in once + per_step if id(b) in chosen]


def dit_block_count(dit, controls: Sequence[nn.Module] = ()) -> int:
    return (
        len(dit.noise_refiner)
        + len(dit.layers)
        + len(dit.context_refiner)
        + len(getattr(dit, "siglip_refiner", None) or [])
        + sum(len(net.blocks()) for net in controls)
    )


def stream_dit(dit, n: int, device, offload_device="cpu", controls: Sequence[nn.Module] = (), **kw):
    """Stream ``n`` DiT blocks (ControlNet blocks of ``controls`` counted among them, see
    :func:`dit_stream_blocks`); everything else goes to ``device``. None (and fully resident) for n = 0."""
    if n <= 0:
        for m in (dit, *controls):
            m.to(device)
        return None
    blocks = dit_stream_blocks(dit, n, controls)
    streamer = BlockStreamer(blocks, device, offload_device, name=kw.pop("name", "DiT"), owner=dit, **kw)
    for m in (dit, *controls):
        move_resident(m, blocks, device)
    return streamer


def stream_text_encoder(model: nn.Module, n: int, device, offload_device="cpu", **kw) -> BlockStreamer | None:
    """Stream ``n`` decoder layers of a transformers text model (``model.layers``)."""
    if n <= 0:
        model.to(device)
        return None
    blocks = pick_blocks(list(model.layers), n)
    streamer = BlockStreamer(
        blocks, device, offload_device, entry_children=(), name=kw.pop("name", "text encoder"), owner=model, **kw
    )
    move_resident(model, blocks, device)
    return streamer
