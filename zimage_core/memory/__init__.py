"""Memory modes: where weights live while each stage runs (planning, block streaming, placement).

- :mod:`.planner`: ``full`` / ``text-encoder-offload`` / ``block-swap:N`` / ``sequential`` / ``auto``, as a
  pure function of byte counts;
- :mod:`.streaming`: :class:`BlockStreamer`, blocks visiting the GPU from pinned host memory with prefetch;
- :mod:`.components`: :class:`Residency`, which applies a plan to the pipeline's components stage by stage.
"""

from .components import Residency, device_free_bytes, dit_stage_size, probe_size, text_encoder_probe_size
from .planner import (
    DEFAULT_RESERVE,
    MEMORY_MODES,
    ComponentSize,
    MemoryMode,
    MemoryPlan,
    Workload,
    parse_memory_mode,
    plan_memory,
)
from .streaming import BlockStreamer, dit_stream_blocks, module_bytes, pick_blocks, resident_parts, stream_dit

__all__ = [
    "DEFAULT_RESERVE",
    "MEMORY_MODES",
    "BlockStreamer",
    "ComponentSize",
    "MemoryMode",
    "MemoryPlan",
    "Residency",
    "Workload",
    "device_free_bytes",
    "dit_stage_size",
    "dit_stream_blocks",
    "module_bytes",
    "parse_memory_mode",
    "pick_blocks",
    "plan_memory",
    "probe_size",
    "text_encoder_probe_size",
    "resident_parts",
    "stream_dit",
]
