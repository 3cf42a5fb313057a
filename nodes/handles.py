"""What travels on the pack's own sockets: ``ZIMAGE_MODEL`` and ``ZIMAGE_TEXT_ENCODER``.

A :class:`ZImageModel` is an immutable view: one loaded DiT (a :class:`DiTSlot`, shared) plus the LoRAs
to apply on top. ``ZImageLoraLoader`` returns a new view over the same slot, so stacking LoRAs or
branching a graph never copies or mutates the base weights seen by other views. The slot brings its
weights into the state a view asks for just before sampling, the way ComfyUI's ModelPatcher applies
LoRA patches at load: merged in place, with the original tensors kept on the offload device and put
back when a view with other LoRAs (or none) samples next.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import host
from ._engine import ZImageError, core

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

    With ``swap`` > 0 that many transformer blocks stream from pinned host memory (block-swap / sequential):
    only the resident part is registered with ComfyUI, so ComfyUI counts and moves just that, and asks for
    room for the two staged blocks on top when it loads the model.
    """

    def __init__(
        self,
        dit,
        name: str,
        load_device: torch.device,
        offload_device: torch.device,
        swap: int = 0,
        activation: int = 0,
    ):
        self.dit = dit
        self.name = name
        self.load_device = load_device
        self.offload_device = offload_device
        self.streamer = None
        self.memory_required = 0
        if swap > 0:
            mem = core("memory")
            blocks = mem.dit_stream_blocks(dit, swap)
            # Streamed blocks live in (pinned) host memory whatever ComfyUI's offload device is.
            self.streamer = mem.BlockStreamer(blocks, load_device, "cpu", name=f"Z-Image {name}", owner=dit)
            self.memory_required = self.streamer.staging_bytes() + int(activation)
            self.patcher = host.register(
                dit, load_device, offload_device, parts=mem.resident_parts(dit, blocks), on_move=self.streamer.flush
            )
            log.info(
                "Z-Image: %s streams %d of %d blocks (%.0f MB in host memory)",
                name,
                len(blocks),
                mem.streaming.dit_block_count(dit),
                self.streamer.streamed_bytes() / 2**20,
            )
        else:
            self.patcher = host.register(dit, load_device, offload_device)
        self._applied: tuple[LoraSpec, ...] = ()
        self._restore: list[Callable[[], None]] = []

    @property
    def config(self):
        return self.dit.cfg

    def _move(self, device: torch.device) -> None:
        if self.streamer is None:
            self.dit.to(device)
        else:
            self.streamer.flush()
            core("memory").streaming.move_resident(self.dit, self.streamer.blocks, device)

    def prepare(self, loras: tuple[LoraSpec, ...]):
        """Place the DiT on its compute device with exactly ``loras`` merged; returns the DiT."""
        if self.streamer is not None:
            self.streamer.flush()  # a prefetch left from an earlier run (e.g. an Omni sample) is dropped
        host.load(self.patcher, self.dit, self.load_device, mover=self._move, memory_required=self.memory_required)
        if len(loras) != len(self._applied) or any(a is not b for a, b in zip(loras, self._applied)):
            self.unpatch()
            if loras:
                self._patch(loras)
        return self.dit

    def unpatch(self) -> None:
        """Put the original weights back (no-op when no LoRA is merged)."""
        for fn in reversed(self._restore):
            fn()
        self._restore = []
        self._applied = ()

    def _patch(self, loras: tuple[LoraSpec, ...]) -> None:
        lora_mod = require_lora_module()
        pairs = [(s.lora, s.strength) for s in loras]
        if "backup_device" in inspect.signature(lora_mod.apply_loras).parameters:
            # The engine backs up what it touches (on the offload device) and undoes it with handle.remove().
            with torch.no_grad():
                handle = lora_mod.apply_loras(self.dit, pairs, mode="merge", backup_device=self.offload_device)
            self._restore = [handle.remove]
        else:
            self._patch_generic(lora_mod, pairs)
        self._applied = tuple(loras)
        log.info("Z-Image: merged %d LoRA(s) into %s", len(loras), self.name)

    def _patch_generic(self, lora_mod, pairs) -> None:
        """For an engine whose ``apply_loras`` returns nothing to undo with: every parameter is copied to the
        offload device first (weights may be edited through ``.data``, which leaves no trace to detect); copies
        of the ones the merge left equal are dropped right after, so only changed weights stay backed up."""
        dit = self.dit
        params = dict(dit.named_parameters())
        modules = dict(dit.named_modules())
        hooks = {n: (set(m._forward_hooks), set(m._forward_pre_hooks)) for n, m in modules.items()}
        backup = {n: p.detach().to(self.offload_device, copy=True) for n, p in params.items()}
        self._restore = [lambda: _restore(dit, params, modules, hooks, backup)]
        try:
            with torch.no_grad():
                lora_mod.apply_loras(dit, pairs, mode="merge")
        except BaseException:
            self.unpatch()
            raise
        now = dict(dit.named_parameters())
        for n in list(backup):
            cur = now.get(n)
            if cur is params[n] and torch.equal(cur.detach().to(backup[n].device), backup[n]):
                del backup[n]


def _set(root: torch.nn.Module, name: str, value) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, value)


def _restore(dit, params: dict, modules: dict, hooks: dict, backup: dict) -> None:
    """Undo whatever ``apply_loras`` did: swapped modules, swapped parameters, in-place edits, hooks."""
    now_modules = dict(dit.named_modules())
    for name, mod in modules.items():
        cur = now_modules.get(name)
        if name and cur is not None and cur is not mod:
            dev = next(cur.parameters(), torch.empty(0)).device
            _set(dit, name, mod.to(dev))
    now = dict(dit.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            cur = now.get(name)
            if cur is None:
                continue
            if cur is not p:
                if p.device != cur.device:
                    p.data = p.data.to(cur.device)
                _set(dit, name, p)
            if name in backup:
                p.data.copy_(backup[name].to(p.device))
    for name, mod in dit.named_modules():
        fwd, pre = hooks.get(name, (set(), set()))
        for k in [k for k in mod._forward_hooks if k not in fwd]:
            del mod._forward_hooks[k]
        for k in [k for k in mod._forward_pre_hooks if k not in pre]:
            del mod._forward_pre_hooks[k]


def require_lora_module():
    try:
        return core("lora")
    except ModuleNotFoundError as e:
        raise ZImageError(
            "LoRA support needs the engine module zimage_core.lora, which this installation lacks "
            f"({e}). Update the Z-Image node pack."
        ) from None


def load_lora_for(config, dtype: torch.dtype, path: Path, strength: float):
    """Read a LoRA file and check it against a DiT of ``config`` before anything is merged, so an unmatched key
    or a wrong shape is reported at the LoRA loader (the engine's message lists the keys), not at sampling."""
    lora_mod = require_lora_module()
    params = inspect.signature(lora_mod.load_lora).parameters
    lora = lora_mod.load_lora(path, config) if len(params) > 1 else lora_mod.load_lora(path)
    if hasattr(lora_mod, "check_lora") and hasattr(lora_mod, "target_table"):
        lora_mod.check_lora(lora, lora_mod.target_table(config))
        return lora
    dit_mod = core("dit")  # an engine without a checker: merge into a weightless (meta-device) model
    with torch.device("meta"):
        meta = dit_mod.ZImageDiT(config).to(dtype)
    try:
        with torch.no_grad():
            lora_mod.apply_loras(meta, [(lora, strength)], mode="merge")
    except ZImageError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. an op with no meta kernel: the real merge will tell
        log.debug("Z-Image: LoRA dry run inconclusive (%s: %s)", type(e).__name__, e)
    return lora


@dataclass(frozen=True, eq=False)
class ZImageModel:
    """``ZIMAGE_MODEL``: a DiT slot, the LoRAs on top, and how it was loaded."""

    slot: DiTSlot
    dtype: torch.dtype
    attention: str = "sdpa"
    memory_mode: str = "full"
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)

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
        cached = getattr(self.encoder, "cached", None)
        if callable(cached) and cached(texts, max_length):
            return self.encoder.encode_detailed(texts, max_length=max_length)
        return self.ready().encode_detailed(texts, max_length=max_length)

    def ready(self):
        """The TextEncoder on its compute device (through ComfyUI when registered), bookkeeping in step."""
        device = self._load()
        if device != self.encoder.device:
            self.encoder.to(device)  # ComfyUI moved the weights: keep the engine's bookkeeping in step
        return self.encoder
