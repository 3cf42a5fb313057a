"""Reading and writing safetensors weights without holding two copies of a model.

``WeightSource`` opens one file or a sharded folder lazily (memory-mapped by safetensors), and
``materialize`` moves tensors one at a time into a module built on the meta device, converting
each to the target dtype and device as it goes. Peak host memory is therefore about one copy of
the model in its target dtype, never the file plus the model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

log = logging.getLogger(__name__)


def resolve_weight_files(path: str | os.PathLike, what: str = "weights") -> list[Path]:
    """Return the safetensors files behind ``path``: a file, or every shard in a folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what}: '{p}' does not exist. Check the path, or download the file and put it there.")
    if p.is_file():
        if p.suffix not in (".safetensors", ".sft"):
            raise CheckpointError(
                f"{what}: '{p}' is not a .safetensors file. Z-Image weights are loaded from safetensors only "
                "(convert .ckpt/.bin files first)."
            )
        return [p]
    index = sorted(p.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text()).get("weight_map", {})
        files = sorted({p / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{what}: shards {missing} listed in '{index[0]}' are missing; download them too.")
        return files
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{what}: the folder '{p}' holds no .safetensors file.")
    return files


class WeightSource(Mapping):
    """A read-only, lazy ``{key: tensor}`` view over one or more safetensors files.

    ``rename`` maps stored keys to the keys callers see (e.g. to strip a prefix). Tensors are read
    from the memory map only when indexed.
    """

    def __init__(self, files: Iterable[str | os.PathLike], what: str = "weights"):
        self.files = [Path(f) for f in files]
        self.what = what
        self._handles = []
        self._where: dict[str, tuple[int, str]] = {}
        self.metadata: dict[str, str] = {}
        for i, f in enumerate(self.files):
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
                raise CheckpointError(f"{what}: cannot read '{f}' as safetensors ({e}). Is the download complete?") from e
            self._handles.append(h)
            self.metadata.update(h.metadata() or {})
            for k in h.keys():
                self._where[k] = (i, k)

    @classmethod
    def open(cls, path: str | os.PathLike, what: str = "weights") -> WeightSource:
        return cls(resolve_weight_files(path, what), what)

    def __getitem__(self, key: str) -> torch.Tensor:
        i, stored = self._where[key]
        return self._handles[i].get_tensor(stored)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        i, stored = self._where[key]
        return tuple(self._handles[i].get_slice(stored).get_shape())

    def dtype_name(self, key: str) -> str:
        i, stored = self._where[key]
        return self._handles[i].get_slice(stored).get_dtype()

    def renamed(self, fn: Callable[[str], str | None]) -> WeightSource:
        """A view whose keys are ``fn(key)``; keys mapped to None are hidden."""
        view = object.__new__(WeightSource)
        view.files, view.what, view._handles, view.metadata = self.files, self.what, self._handles, self.metadata
        view._where = {}
        for k, loc in self._where.items():
            new = fn(k)
            if new is not None:
                view._where[new] = loc
        return view

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


TensorGetter = Callable[[], torch.Tensor]


def materialize(
    module: torch.nn.Module,
    tensors: Mapping[str, TensorGetter],
    dtype: torch.dtype,
    device: torch.device | str,
    keep_dtype: Callable[[str], bool] = lambda name: False,
    what: str = "model",
) -> torch.nn.Module:
    """Fill a (meta-device) ``module`` from ``{name: getter}``, one tensor at a time.

    Floating-point tensors are cast to ``dtype`` unless ``keep_dtype(name)``; all go to ``device``.
    Raises :class:`CheckpointError` naming the missing and unexpected keys.
    """
    expected = dict(module.named_parameters())
    expected.update(dict(module.named_buffers()))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: the weights do not fit the model built from them. Missing: {_short(missing)}; "
            f"unexpected: {_short(unexpected)}. The file may be truncated or of another model family."
        )
    for name, getter in tensors.items():
        t = getter()
        target = expected[name]
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"{what}: '{name}' has shape {tuple(t.shape)}, expected {tuple(target.shape)}.")
        want = t.dtype if (keep_dtype(name) or not t.is_floating_point()) else dtype
        # Always a fresh, aligned copy: a tensor left on the file's memory map makes CPU kernels
        # (oneDNN convolutions in particular) measurably slower, and keeps the file mapped.
        t = t.to(device=device, dtype=want, copy=True)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if isinstance(target, torch.nn.Parameter):
            setattr(parent, attr, torch.nn.Parameter(t, requires_grad=False))
        else:
            parent._buffers[attr] = t
    return module


def _short(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``tensors`` atomically: a crash never leaves a half-written file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
