"""Training checkpoints: one folder per step, written atomically, resumed exactly.

Layout of ``<output_dir>/checkpoints/step-00001000/``:

- ``trainable.safetensors``: the trained parameters in float32 (the whole DiT, or only the LoRA adapters);
- ``ema.safetensors``: their EMA (when on);
- ``optimizer.pt``: optimizer and LR-scheduler state;
- ``<unit>.safetensors`` / ``<unit>.ema.safetensors``: further trained networks of a run (e.g. a distillation's
  fake score), their optimizer state under ``optimizer.pt["units"]`` (see :mod:`train.runner`);
- ``rank<r>.pt``: per process: python/numpy/torch/CUDA RNG states, the noise generator, the data position;
- ``trainer.json``: step, epoch, world size, the run's configuration and the DiT architecture (written last).

A checkpoint is first written to ``.tmp-step-...`` and renamed into place when complete (files fsynced), so
a crash never leaves a half-written ``step-*`` folder and the previous checkpoints stay intact; leftovers
are removed when the next run starts. Only ``step-*`` folders holding ``trainer.json`` count.

Under FSDP2 the parameters and optimizer state are gathered to full tensors on every rank and rank 0
writes them; loading scatters them back into the shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from zimage_core.errors import CheckpointError
from zimage_core.weights import save_safetensors

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
META_FILE = "trainer.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Completed checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def clean_stale(root: str | os.PathLike) -> None:
    """Remove folders left by an interrupted save."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((TMP_PREFIX, OLD_PREFIX)) and p.is_dir():
                log.info("removing the unfinished checkpoint folder %s", p)
                shutil.rmtree(p, ignore_errors=True)


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` completed checkpoints (0 keeps everything)."""
    found = list_checkpoints(root)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    gone = []
    for _, p in found[:-keep_last]:
        # Rename first: a crash while deleting must not leave a step-* folder with missing files.
        trash = p.with_name(OLD_PREFIX + p.name)
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        gone.append(p)
    return gone


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_atomic_dir(
    final: Path, write: Callable[[Path], None], is_main: bool = True, barrier: Callable[[], None] = lambda: None
) -> Path:
    """Create ``final`` as a whole: every process runs ``write(tmp)``, then the main one renames it."""
    final = Path(final)
    tmp = final.with_name(TMP_PREFIX + final.name)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        write(tmp)
    finally:
        barrier()
    if is_main:
        _fsync_tree(tmp)
        old = None
        if final.exists():  # the same step saved again (e.g. right after a resume)
            old = final.with_name(OLD_PREFIX + final.name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# ---------------------------------------------------------------------------------------------
# Tensors that may be FSDP2 shards
# ---------------------------------------------------------------------------------------------
def is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def full_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full float32 CPU copies (gathers DTensor shards: every rank must call this)."""
    out = {}
    for n, t in tensors.items():
        t = t.detach()
        if is_dtensor(t):
            t = t.full_tensor()
        out[n] = t.float().cpu().clone()
    return out


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` shaped as ``target``: scattered into its shard layout for DTensors, else moved to its device."""
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            full.to(target.device_mesh.device_type, target.dtype), target.device_mesh, target.placements
        )
    return full.to(target.device, target.dtype)


def copy_into(params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(params) - set(state))
    if missing:
        raise CheckpointError(
            f"{what} lacks {len(missing)} tensors the model trains (e.g. {missing[:3]}); was it written by a run "
            "with another model or LoRA configuration?"
        )
    with torch.no_grad():
        for n, p in params.items():
            if tuple(state[n].shape) != tuple(p.shape):
                raise CheckpointError(f"{what}: '{n}' has shape {tuple(state[n].shape)}, the model {tuple(p.shape)}.")
            p.copy_(like(state[n], p))


# ---------------------------------------------------------------------------------------------
# Optimizer state (plain, or gathered from FSDP2 shards)
# ---------------------------------------------------------------------------------------------
def optimizer_state(optimizer, model=None, sharded: bool = False) -> dict:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(optimizer, state: dict, model=None, sharded: bool = False) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------
# Reading and writing the files of one checkpoint
# ---------------------------------------------------------------------------------------------
def write_checkpoint(
    folder: Path,
    *,
    rank: int,
    is_main: bool,
    trainable: dict,
    ema: dict | None,
    optim: dict | None,
    meta: dict,
    rank_state: dict,
    extra: dict[str, dict] | None = None,
) -> None:
    """Write the files of one checkpoint into ``folder`` (the temporary folder of :func:`write_atomic_dir`).

    ``extra`` maps more safetensors file names to their tensors (the other trained units of a run)."""
    torch.save(rank_state, folder / f"rank{rank}.pt")
    if not is_main:
        return
    save_safetensors(trainable, folder / "trainable.safetensors", metadata={"format": "pt"})
    if ema is not None:
        save_safetensors(ema, folder / "ema.safetensors", metadata={"format": "pt"})
    for name, tensors in (extra or {}).items():
        save_safetensors(tensors, folder / name, metadata={"format": "pt"})
    torch.save(optim, folder / "optimizer.pt")
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def read_meta(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    f = folder / META_FILE
    if not f.is_file():
        raise CheckpointError(
            f"'{folder}' is not a training checkpoint (no {META_FILE}); give a step-* folder from "
            "<output_dir>/checkpoints, or the run's output folder to take its latest checkpoint."
        )
    return json.loads(f.read_text())


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder, or the newest one under ``path`` or ``path/checkpoints``."""
    p = Path(path)
    if (p / META_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no completed checkpoint in '{p}' (looked for step-*/{META_FILE} there and in checkpoints/)."
    )


def read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    f = Path(folder) / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint '{folder}' has no {name}.")
    return load_file(str(f))


def read_rank_state(folder: Path, rank: int) -> dict | None:
    f = Path(folder) / f"rank{rank}.pt"
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=False)  # our own file: RNG states are python objects


def read_optimizer(folder: Path) -> dict:
    f = Path(folder) / "optimizer.pt"
    if not f.is_file():
        raise CheckpointError(f"checkpoint '{folder}' has no optimizer.pt.")
    return torch.load(f, map_location="cpu", weights_only=False)
