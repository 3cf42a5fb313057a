"""What travels on the pack's own sockets: ``ZIMAGE_MODEL`` and ``ZIMAGE_TEXT_ENCODER``.

A :class:`ZImageModel` is an immutable view: one loaded DiT (a :class:`DiTSlot`, shared) plus the LoRAs
to apply on top. ``ZImageLoraLoader`` returns a new view over the same slot, so stacking LoRAs or
branching a graph never copies or mutates the base weights seen by other views. The slot brings its
weights into the state a view asks for just before sampling, the way ComfyUI's ModelPatcher applies
LoRA patches at load: merged in place, with the original tensors kept on the offload device and put
back when a view with other LoRAs (or none) samples next. A view turned into a core ``MODEL``
(``nodes/bridge.py``) hands its LoRAs to ComfyUI as weight patches instead; the slot's own merges come off
before ComfyUI loads such a clone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..zimage_core.lora import apply_loras, load_lora
from ..zimage_core.lora_formats import check_lora, target_table
from ..zimage_core.memory import MemoryMode, Residency
from . import bridge, host

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoraSpec:
    """One loaded LoRA file at one strength (``lora`` is what the engine's ``load_lora`` returned)."""

    name: str
    path: Path
    strength: float
    lora: object


class DiTSlot:
    """One loaded DiT and the LoRA state its weights are in now.

    ``residency`` is the engine's placement for the DiT, planned by the loader. When its plan streams blocks
    (block-swap / sequential) they live in pinned host memory and only the resident part is registered with
    ComfyUI, so ComfyUI counts and moves just that, and asks for room for the two staged blocks on top when it
    loads the model. Inside a ComfyUI with native Z-Image that registration is ``bridge`` (a ``Lumina2`` model,
    shared by the Z-Image sampler and every bridged core ``MODEL``); elsewhere a plain holder (or none).
    """

    def __init__(
        self,
        dit,
        name: str,
        load_device: torch.device,
        offload_device: torch.device,
        residency: Residency,
        activation: int = 0,
    ):
        self.dit = dit
        self.name = name
        self.load_device = load_device
        self.offload_device = offload_device
        self.residency = residency
        self.memory_required = 0
        parts = residency.stream("dit", dit, label=f"Z-Image {name}")
        if parts is not None:
            self.memory_required = residency.staging_bytes("dit") + int(activation)
        self._applied: tuple[LoraSpec, ...] = ()
        self._restore: list[Callable[[], None]] = []
        # Inside a ComfyUI with native Z-Image the DiT is registered once, as native Z-Image (a Lumina2 model):
        # the Z-Image sampler and every bridged core MODEL (nodes/bridge.py) share that registration.
        self.bridge = bridge.register(self, load_device, offload_device)
        if self.bridge is not None:
            self.patcher = self.bridge.patcher
        elif parts is not None:
            self.patcher = host.register(
                dit, load_device, offload_device, parts=parts, on_move=lambda: residency.finish("dit")
            )
        else:
            self.patcher = host.register(dit, load_device, offload_device)

    @property
    def config(self):
        return self.dit.cfg

    @property
    def streamer(self):
        """The DiT's block streamer (None when nothing streams)."""
        return self.residency.streamers.get("dit")

    def _move(self, device: torch.device) -> None:
        self.residency.move("dit", self.dit, device)

    def prepare(self, loras: tuple[LoraSpec, ...]):
        """Place the DiT on its compute device with exactly ``loras`` merged; returns the DiT."""
        self.residency.finish("dit")  # a prefetch left from an earlier run is dropped
        host.load(self.patcher, self.dit, self.load_device, mover=self._move, memory_required=self.memory_required)
        self.apply(loras)
        return self.dit

    def has_loras(self, loras: tuple[LoraSpec, ...]) -> bool:
        """Whether exactly ``loras`` (the same objects, in order) are applied by the engine now."""
        return len(loras) == len(self._applied) and all(a is b for a, b in zip(loras, self._applied))

    def apply(self, loras: tuple[LoraSpec, ...]) -> None:
        """Bring the weights to exactly ``loras`` applied by the engine (merged; runtime side paths on quantized
        layers), wherever the DiT is now."""
        if not self.has_loras(loras):
            self.unpatch()
            if loras:
                self._patch(loras)

    def unpatch(self) -> None:
        """Put the original weights back (no-op when no LoRA is merged)."""
        for fn in reversed(self._restore):
            fn()
        self._restore = []
        self._applied = ()

    def _patch(self, loras: tuple[LoraSpec, ...]) -> None:
        pairs = [(s.lora, s.strength) for s in loras]
        # The engine backs up what it touches (on the offload device) and undoes it with handle.remove().
        with torch.no_grad():
            handle = apply_loras(self.dit, pairs, mode="merge", backup_device=self.offload_device)
        self._restore = [handle.remove]
        self._applied = tuple(loras)
        log.info("Z-Image: merged %d LoRA(s) into %s", len(loras), self.name)


def load_lora_for(config, path: Path):
    """Read a LoRA file and check it against a DiT of ``config`` before anything is merged, so an unmatched key
    or a wrong shape is reported at the LoRA loader (the engine's message lists the keys), not at sampling."""
    lora = load_lora(path, config)
    check_lora(lora, target_table(config))
    return lora


@dataclass(frozen=True, eq=False)
class ZImageModel:
    """``ZIMAGE_MODEL``: a DiT slot, the LoRAs on top, and how it was loaded."""

    slot: DiTSlot
    dtype: torch.dtype
    attention: str = "sdpa"
    memory_mode: MemoryMode = MemoryMode("full")
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    controls: tuple = ()  # nodes.controlnet.ControlApplication, in the order they were applied

    @property
    def config(self):
        return self.slot.config

    @property
    def name(self) -> str:
        return self.slot.name

    def with_lora(self, spec: LoraSpec) -> ZImageModel:
        return dataclasses.replace(self, loras=self.loras + (spec,))

    def prepare(self):
        """The DiT, on its compute device, with this view's LoRAs merged."""
        return self.slot.prepare(self.loras)

    def __repr__(self) -> str:
        extra = "".join(f" + {s.name}@{s.strength:g}" for s in self.loras)
        extra += "".join(f" + control {c.file.name}@{c.strength:g}" for c in self.controls)
        return f"<ZImageModel {self.name} {str(self.dtype).removeprefix('torch.')}{extra}>"


class EncoderHandle:
    """An engine encoder (its ``.model`` a torch module) registered with ComfyUI's memory management."""

    KIND = "Encoder"

    def __init__(self, encoder, name: str, load_device: torch.device, offload_device: torch.device):
        self.encoder = encoder
        self.name = name
        self.load_device = load_device
        self.patcher = host.register(encoder.model, load_device, offload_device)

    def _load(self) -> torch.device:
        """Have ComfyUI place the weights for use (it may evict other models); the device they landed on."""
        return host.load(self.patcher, self.encoder.model, self.load_device)

    def __repr__(self) -> str:
        return f"<{self.KIND} {self.name}>"


class ZImageTextEncoderHandle(EncoderHandle):
    """``ZIMAGE_TEXT_ENCODER``: the engine's TextEncoder, registered with ComfyUI's memory management."""

    KIND = "ZImageTextEncoder"

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def encode(self, texts: list[str], max_length: int | None):
        """``EncodeResult`` for ``texts`` (engine semantics: chat template, hidden_states[-2]).

        Prompts encoded before come from the encoder's cache without loading it onto the GPU."""
        if self.encoder.cached(texts, max_length):
            return self.encoder.encode_detailed(texts, max_length=max_length)
        return self.ready().encode_detailed(texts, max_length=max_length)

    def ready(self):
        """The TextEncoder on its compute device (through ComfyUI when registered), bookkeeping in step."""
        device = self._load()
        if device != self.encoder.device:
            self.encoder.to(device)  # ComfyUI moved the weights: keep the engine's bookkeeping in step
        return self.encoder
