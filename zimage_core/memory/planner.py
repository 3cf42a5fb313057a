"""Memory modes: parsing, size and activation estimates, and the ``auto`` planner.

A :class:`MemoryPlan` says where the weights of each component live while its stage runs:

- ``full``: everything on the compute device;
- ``text-encoder-offload``: one component at a time (text encoder -> DiT -> VAE); the text encoder
  leaves the device after encoding, the DiT before decoding when the VAE would not fit beside it;
- ``block-swap:N``: N transformer blocks of the DiT are streamed from (pinned) host memory, the
  rest stays on the device; the text encoder streams as many layers as it needs to fit;
- ``sequential``: every block is streamed.

Modes change where weights live, never the arithmetic: every mode gives the same image.
The planner is a pure function of byte counts, so its decisions are tested with made-up numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..errors import ZImageError

log = logging.getLogger(__name__)

MEMORY_MODES = ("auto", "full", "text-encoder-offload", "block-swap", "sequential")
MiB = 1 << 20
GiB = 1 << 30
#: Kept free beyond the estimates: CUDA workspaces, allocator fragmentation, other small tensors.
DEFAULT_RESERVE = 768 * MiB
#: Prefetch depth 1: the block running and the next one are on the device at the same time.
STAGING_BLOCKS = 2
#: Bytes per weight for a quantization (nf4: 4 bits plus one fp32 absmax per 64 weights).
QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 4 / 64}
MODE_HELP = "use auto, full, text-encoder-offload, block-swap:N (N blocks streamed, e.g. block-swap:8) or sequential"


@dataclass(frozen=True)
class MemoryMode:
    """A requested mode; ``blocks`` is the N of ``block-swap:N``."""

    kind: str = "auto"
    blocks: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.blocks}" if self.kind == "block-swap" else self.kind

    @classmethod
    def of(cls, kind: str, blocks: int | None = None) -> MemoryMode:
        """A validated mode from its parts (``blocks`` only for block-swap); bad ones raise :class:`ZImageError`."""
        if kind not in MEMORY_MODES:
            raise ZImageError(f"unknown memory mode '{kind}'; {MODE_HELP}.")
        if kind != "block-swap":
            return cls(kind)
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ZImageError(
                "block-swap needs a whole number of blocks to stream, at least 1 (block-swap:0 is the same as "
                f"full); got {blocks!r}."
            )
        return cls("block-swap", blocks)


def parse_memory_mode(text: str | MemoryMode | None) -> MemoryMode:
    """``'block-swap:8'`` -> ``MemoryMode('block-swap', 8)``; a bad string raises :class:`ZImageError`."""
    if isinstance(text, MemoryMode):
        return text
    if text is None:
        return MemoryMode("auto")
    s = str(text).strip().lower().replace("_", "-")
    kind, sep, arg = s.partition(":")
    if kind not in MEMORY_MODES:
        raise ZImageError(f"unknown memory mode '{text}'; {MODE_HELP}.")
    if kind != "block-swap":
        if sep:
            raise ZImageError(f"memory mode '{text}' takes no ':' argument; {MODE_HELP}.")
        return MemoryMode(kind)
    if not sep:
        raise ZImageError(f"memory mode '{text}' needs the number of blocks to stream, e.g. block-swap:8.")
    try:
        n = int(arg)
    except ValueError:
        raise ZImageError(
            f"memory mode '{text}': '{arg}' is not a whole number of blocks; e.g. block-swap:8."
        ) from None
    if n < 1:
        raise ZImageError(f"memory mode '{text}': stream at least 1 block (block-swap:0 is the same as full).")
    return MemoryMode("block-swap", n)


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentSize:
    """Weight bytes of one component, of each block it can stream, and its stage's working memory."""

    total: int
    blocks: tuple[int, ...] = ()
    activation: int = 0

    def resident(self, n_streamed: int) -> int:
        """Device bytes while ``n_streamed`` blocks stream: the rest, plus the staging buffers."""
        if n_streamed <= 0 or not self.blocks:
            return self.total
        n = min(n_streamed, len(self.blocks))
        biggest = max(self.blocks)
        streamed = sum(sorted(self.blocks)[:n])  # equal-sized blocks in practice; smallest first is safe
        return self.total - streamed + min(STAGING_BLOCKS, n) * biggest

    def stage(self, n_streamed: int = 0) -> int:
        return self.resident(n_streamed) + self.activation


@dataclass(frozen=True)
class Workload:
    """What one generation asks for: pixel size, images, whether CFG doubles the DiT batch."""

    width: int = 1024
    height: int = 1024
    batch: int = 1
    cfg: bool = False
    text_tokens: int = 512


def dit_activation(cfg, work: Workload, elt: int) -> int:
    """Working memory of one DiT step: hidden states, qkv, fp32 RoPE temporaries, the SwiGLU hidden."""
    b = work.batch * (2 if work.cfg else 1)
    tokens = (work.height // 16) * (work.width // 16) + 32 * math.ceil(work.text_tokens / 32)
    per_token = (8 * cfg.dim + 4 * cfg.ffn_dim) * elt + 4 * cfg.dim * 4
    return int(b * tokens * per_token) + 256 * MiB


def text_encoder_activation(cfg, work: Workload, elt: int) -> int:
    per_token = (8 * cfg.hidden_size + 4 * cfg.intermediate_size) * elt
    return int(work.batch * work.text_tokens * per_token) + 128 * MiB


def vae_activation(cfg, work: Workload, elt: int = 4, tile: int | None = None) -> int:
    """Decoder peak: a few full-resolution feature maps of the widest full-resolution level."""
    h, w = (tile, tile) if tile else (work.height, work.width)
    return int(6 * cfg.block_out_channels[0] * h * w * elt * work.batch) + 128 * MiB


def weight_bytes(numel: int, elt: int, quant: str = "none") -> int:
    return int(numel * QUANT_BYTES.get(quant, elt))


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """Where weights live for one generation (see the module docstring)."""

    mode: str
    dit_swap: int = 0  # DiT blocks streamed
    te_swap: int = 0  # text-encoder layers streamed
    offload_text_encoder: bool = False  # off the device once the prompts are encoded
    offload_dit: bool = False  # off the device before the VAE decodes
    vae_tile: int | str | None = "auto"
    reason: str = ""
    fits: bool = True

    def evicts(self, stage: str) -> tuple[str, ...]:
        """Components to move off the device before ``stage`` (a component name) runs.

        Outside ``full`` only one big component is on the device at a time: the text encoder leaves before the
        DiT runs (when the plan offloads it), the DiT before decoding (when the VAE does not fit beside it).
        """
        one_at_a_time = self.mode != "full"
        rules = {
            "text_encoder": (("dit", one_at_a_time), ("vae", one_at_a_time)),
            "dit": (("text_encoder", self.offload_text_encoder), ("vae", one_at_a_time)),
            "vae": (("dit", self.offload_dit), ("text_encoder", one_at_a_time)),
        }
        return tuple(name for name, leaves in rules[stage] if leaves)

    def parks_after(self, stage: str) -> bool:
        """Whether ``stage``'s component leaves the device once its stage is over."""
        return {"text_encoder": self.offload_text_encoder, "dit": False, "vae": self.mode != "full"}[stage]

    @property
    def label(self) -> str:
        return f"block-swap:{self.dit_swap}" if self.mode == "block-swap" else self.mode

    def describe(self) -> str:
        parts = [self.label]
        if self.te_swap:
            parts.append(f"text encoder streams {self.te_swap} layers")
        if self.vae_tile not in (None, "auto"):
            parts.append(f"VAE tiles of {self.vae_tile}px")
        return ", ".join(parts) + (f" ({self.reason})" if self.reason else "")


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GB"


def _fewest(size: ComponentSize, budget: int) -> int | None:
    """Fewest streamed blocks so the stage fits ``budget``; None when even all of them do not."""
    for n in range(0, len(size.blocks) + 1):
        if size.stage(n) <= budget:
            return n
    return None


def _vae_tile(vae: ComponentSize, vae_cfg, work: Workload, budget: int, elt: int) -> int | str:
    if vae.stage() <= budget or vae_cfg is None:
        return "auto"
    for tile in (1024, 768, 512, 384, 256):
        if tile < max(work.width, work.height) and vae.total + vae_activation(vae_cfg, work, elt, tile) <= budget:
            return tile
    return 256


def plan_memory(
    mode: str | MemoryMode,
    free: int | None,
    dit: ComponentSize,
    te: ComponentSize | None = None,
    vae: ComponentSize | None = None,
    *,
    reserve: int = DEFAULT_RESERVE,
    vae_cfg=None,
    work: Workload | None = None,
    vae_elt: int = 4,
) -> MemoryPlan:
    """Resolve ``mode`` for ``free`` device bytes (None: no limit, e.g. the CPU).

    ``auto`` picks the fastest mode that fits: full, then text-encoder-offload, then block-swap with
    the fewest streamed blocks, then sequential (with ``fits=False`` when even that is too big).
    Explicit modes are kept; only the parts they leave open (text-encoder layers to stream, VAE tiling,
    whether the DiT must leave before decoding) are fitted to the budget.
    """
    m = parse_memory_mode(mode)
    te = te or ComponentSize(0)
    vae = vae or ComponentSize(0)
    work = work or Workload()
    n_blocks = len(dit.blocks)
    if free is None:
        kind = "full" if m.kind == "auto" else m.kind
        swap = {"block-swap": min(m.blocks or 0, n_blocks), "sequential": n_blocks}.get(kind, 0)
        te_all = len(te.blocks) if kind == "sequential" else 0
        return MemoryPlan(
            kind,
            dit_swap=swap,
            te_swap=te_all,
            offload_text_encoder=kind != "full",
            offload_dit=kind == "sequential",
            reason="no device memory limit" if m.kind == "auto" else "",
        )
    budget = max(free - reserve, 0)
    te_fit = _fewest(te, budget)
    te_swap = te_fit if te_fit is not None else len(te.blocks)
    tile = _vae_tile(vae, vae_cfg, work, budget, vae_elt)
    vae_need = vae.total + (vae.activation if tile == "auto" else vae_activation(vae_cfg, work, vae_elt, tile))
    need_full = te.total + dit.total + vae.total + max(te.activation, dit.activation, vae.activation)

    def offload_plan(reason: str) -> MemoryPlan:
        keep_dit = dit.total + vae_need <= budget
        return MemoryPlan(
            "text-encoder-offload",
            offload_text_encoder=True,
            offload_dit=not keep_dit,
            te_swap=te_swap,
            vae_tile=tile,
            reason=reason,
        )

    def swap_plan(n: int, reason: str, fits: bool = True) -> MemoryPlan:
        kind = "sequential" if n >= n_blocks else "block-swap"
        return MemoryPlan(
            kind,
            dit_swap=min(n, n_blocks),
            te_swap=len(te.blocks) if kind == "sequential" else te_swap,
            offload_text_encoder=True,
            offload_dit=True,
            vae_tile=tile,
            reason=reason,
            fits=fits,
        )

    if m.kind == "full":
        return MemoryPlan(
            "full",
            reason="" if need_full <= budget else f"needs ~{_fmt(need_full)}, {_fmt(budget)} free",
            fits=need_full <= budget,
        )
    if m.kind == "text-encoder-offload":
        return offload_plan("")
    if m.kind == "block-swap":
        if m.blocks > n_blocks:
            log.warning(
                "block-swap:%d asks for more blocks than the model has (%d); streaming all of them.", m.blocks, n_blocks
            )
        return swap_plan(m.blocks, "")
    if m.kind == "sequential":
        return swap_plan(n_blocks, "")
    # auto
    if need_full <= budget:
        return MemoryPlan("full", reason=f"everything fits: ~{_fmt(need_full)} of {_fmt(budget)} usable")
    if dit.stage() <= budget:
        return offload_plan(
            f"all at once needs ~{_fmt(need_full)}, {_fmt(budget)} usable; the DiT alone needs ~{_fmt(dit.stage())}"
        )
    n = _fewest(dit, budget)
    if n is not None and n < n_blocks:
        return swap_plan(
            n,
            f"the DiT needs ~{_fmt(dit.stage())}, {_fmt(budget)} usable; streaming {n} of "
            f"{n_blocks} blocks needs ~{_fmt(dit.stage(n))}",
        )
    fits = n is not None
    return swap_plan(
        n_blocks,
        (
            f"streaming every block needs ~{_fmt(dit.stage(n_blocks))}, {_fmt(budget)} usable"
            + ("" if fits else "; it may run out of memory: try --quant nf4 or a smaller size")
        ),
        fits=fits,
    )
