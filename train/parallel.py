"""Multi-process pieces the trainers share: FSDP2 sharding of a DiT, gradient averaging of replicated
parameters, and random streams that do not depend on the number of processes.

**FSDP2.** ``sharding = "fsdp2"`` in a run's config shards the trained DiT with ``torch.distributed.fsdp.fully_shard``
over all processes: every transformer block is its own unit, the root holds the embedders and the final layer. It
works with any process-group backend, so it runs on CPUs with gloo as well as on GPUs with NCCL; ``accelerate``
routes a CPU launch to DDP and ignores its FSDP plugin there (accelerate 1.16), which is why the trainers shard
the DiT themselves instead of leaving it to ``accelerate.prepare``. (An accelerate config with
``fsdp_version: 2`` still works on GPUs through ``accelerate.prepare``.) The DiT methods called outside
``forward`` (``denoise``, ``prepare_captions``, ``forward_omni``) are registered as FSDP forward methods, so the
engine's model functions (:class:`zimage_core.denoiser.Denoiser`) run on a sharded DiT; each block's adaLN
modulation linear is a unit of its own, since the DiT calls it before the block.

**Replicated trainables.** LoRA adapters on a frozen base that is shared by several networks (the distillation's
fake score sits on the teacher's weights) are not wrapped by DDP or FSDP (wrapping would copy or shard the shared
base); :func:`average_gradients` all-reduces their gradients after the backward pass instead.

**Rank-independent randomness.** :func:`keyed_generator` seeds a generator from ``(seed, *keys)``; keyed by the
*global* index of a micro-batch, one process with ``grad_accum = W`` draws exactly the noise that ``W`` processes
draw, so the number of processes does not change a run (the multi-process tests check this).
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def keyed_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``(seed, *keys)``."""
    text = ",".join(str(int(k)) for k in (seed, *keys)).encode()
    value = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(value)


def global_micro_index(step: int, micro: int, accum: int, rank: int, world: int) -> int:
    """The index of a micro-batch in the global order: ``W`` processes with ``grad_accum = n`` and one process
    with ``grad_accum = n W`` see the same data batches in the same order (the loader deals batch ``r + W j``
    to rank ``r``)."""
    return (step * accum + micro) * world + rank


def shard_dit(dit: nn.Module, device: torch.device, mixed_precision: str = "no") -> nn.Module:
    """``fully_shard`` every block of ``dit`` and then the DiT itself over all processes (in place)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sharding = 'fsdp2' needs a launched process group (accelerate launch / torchrun)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = {"mesh": mesh}
    if mixed_precision in ("bf16", "fp16"):
        low = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    blocks = [
        b for name in ("noise_refiner", "context_refiner", "siglip_refiner", "layers") for b in getattr(dit, name, [])
    ]
    for block in blocks:
        # The DiT computes a block's adaLN modulation before calling the block: the modulation linear is its own
        # unit, gathered by its own forward (and its output tensor carries the pre-backward hook).
        if getattr(block, "adaLN_modulation", None) is not None:
            fully_shard(block.adaLN_modulation, **kw)
        fully_shard(block, **kw)
    fully_shard(dit, **kw)
    for method in ("denoise", "prepare_captions", "forward_omni"):
        if hasattr(dit, method):
            register_fsdp_forward_method(dit, method)
    log.info("FSDP2: %d blocks and the root sharded over %d processes", len(blocks), dist.get_world_size())
    return dit


def average_gradients(params, world: int) -> None:
    """Mean of the gradients of replicated parameters over all processes (one flat all-reduce)."""
    if world <= 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if len(grads) != len([p for p in params if p.requires_grad]):
        # a parameter without a gradient on this rank: give it zeros, so every rank reduces the same buffer
        for p in params:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
