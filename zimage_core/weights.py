"""Reading and writing safetensors weights without holding two copies of a model.

``WeightSource`` opens one file or a sharded folder lazily, and ``materialize`` moves tensors one at a
time into a module built on the meta device, converting each to the target dtype and device as it goes.

Each tensor is memory-mapped on its own (copy-on-write): where the module keeps the file's dtype on the
CPU, the parameter *is* the mapping, so loading copies nothing and the pages come straight from the OS
file cache (a model that is already cached loads in milliseconds, and never-touched rows such as most of
the text encoder's 150k-token embedding never become resident). Where a tensor is converted or moved to
a GPU, its mapping is dropped as soon as the converted copy exists. Peak host memory is therefore about
one copy of the model in its target dtype, never the file plus the model. Writes to a mapped parameter
(a merged LoRA, a training step) go to private pages and never reach the file.

What a mapping asks in return: while a model loaded this way is in use, its file must not be truncated or
rewritten in place (replacing it, as every download tool and ``zimage convert`` do, is fine: the mapping keeps
the old file), and on Windows the file cannot be deleted until the model is freed.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import CheckpointError
from .outputs import atomic_path

log = logging.getLogger(__name__)


#: Stored dtypes that a loader keeps as they are (ComfyUI's fp8 / int8 files): one byte per weight once loaded.
EIGHT_BIT = ("F8_E4M3", "F8_E5M2", "I8", "U8")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor a loader will hold, read from a file header.

    ``kept_bytes``: its size once loaded when the loader keeps the stored form (8-bit or GGUF-packed weights);
    None when it is converted to the compute dtype. ``quantizable``: whether ``--quant`` applies to it.
    """

    shape: tuple[int, ...]
    kept_bytes: int | None = None
    quantizable: bool = True


@dataclass
class FileProbe:
    """What a component's file holds, from its header alone (no weights read): the inferred config and the
    tensors its loader would hold, by name. Each component module has a ``probe_*`` function that returns one."""

    path: Path
    config: object
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    layout: str = ""
    #: Lazy readers of single tensors by the model's own parameter names (for checks before loading).
    getters: Mapping[str, Callable[[], torch.Tensor]] = field(default_factory=dict)


def tensor_infos(src, keys: Iterable[str] | None = None, quantizable: bool = True) -> dict[str, TensorInfo]:
    """:class:`TensorInfo` for the keys of a :class:`WeightSource` (8-bit stored tensors are kept as they are)."""
    out = {}
    for k in src if keys is None else keys:
        shape = tuple(src.shape(k))
        kept = None
        if src.dtype_name(k) in EIGHT_BIT:
            kept = 1
            for d in shape:
                kept *= int(d)
        out[k] = TensorInfo(shape, kept, quantizable)
    return out


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


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class _File:
    """One safetensors file: its header parsed once; each tensor mapped (:meth:`map`) or read (:meth:`read`)."""

    def __init__(self, path: Path, what: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n < 100 * 2**20:
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{what}: cannot read '{path}' as safetensors ({e}). Is the download complete?"
            ) from e
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries = header
        size = path.stat().st_size
        for k, e in header.items():
            if e.get("dtype") not in _DTYPES or e["data_offsets"][1] + self.base > size:
                raise CheckpointError(
                    f"{what}: tensor '{k}' in '{path}' is truncated or of an unsupported type ({e.get('dtype')}). "
                    "Is the download complete?"
                )

    def read(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        start, end = e["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.base + start)
                view = memoryview(buf.numpy())
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise CheckpointError(f"'{self.path}' ended early while reading '{key}'.")
                    got += n
        return buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])

    def map(self, key: str) -> torch.Tensor:
        """The tensor as a private (copy-on-write) memory map of its bytes: nothing is copied until written.

        Falls back to :meth:`read` where a mapping cannot serve: an empty or misaligned tensor (offsets that
        are not a multiple of the element size), or a file system without memory maps.
        """
        e = self.entries[key]
        start, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        offset, size = self.base + start, end - start
        if size == 0 or offset % dtype.itemsize:
            return self.read(key)
        page = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), offset + size - page, offset=page, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):
            return self.read(key)
        # the tensor holds the map alive; when the last view of it goes, the pages are unmapped
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=size, offset=offset - page)
        return data.view(dtype).reshape(e["shape"])


class WeightSource(Mapping):
    """A read-only, lazy ``{key: tensor}`` view over one or more safetensors files.

    Tensors are produced only when indexed: memory-mapped (``mapped=True``, the default: see the module
    docstring) or read into a fresh buffer of their own (``mapped=False``: for tensors that travel between
    processes, such as a training data cache's samples).
    """

    def __init__(self, files: Iterable[str | os.PathLike], what: str = "weights", mapped: bool = True):
        self.files = [Path(f) for f in files]
        self.what = what
        self.mapped = mapped
        self._handles = [_File(f, what) for f in self.files]
        self._where: dict[str, tuple[int, str]] = {}
        self.metadata: dict[str, str] = {}
        for i, h in enumerate(self._handles):
            self.metadata.update(h.metadata)
            for k in h.entries:
                self._where[k] = (i, k)

    @classmethod
    def open(cls, path: str | os.PathLike, what: str = "weights", mapped: bool = True) -> WeightSource:
        return cls(resolve_weight_files(path, what), what, mapped)

    def __getitem__(self, key: str) -> torch.Tensor:
        i, stored = self._where[key]
        h = self._handles[i]
        return h.map(stored) if self.mapped else h.read(stored)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        i, stored = self._where[key]
        return tuple(self._handles[i].entries[stored]["shape"])

    def dtype_name(self, key: str) -> str:
        i, stored = self._where[key]
        return self._handles[i].entries[stored]["dtype"]

    def renamed(self, fn: Callable[[str], str | None]) -> WeightSource:
        """A view whose keys are ``fn(key)``; keys mapped to None are hidden."""
        view = object.__new__(WeightSource)
        view.files, view.what, view._handles, view.metadata = self.files, self.what, self._handles, self.metadata
        view.mapped = self.mapped
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
    Only meta tensors are filled: submodules already built from real tensors (e.g. quantized linears made
    while loading, see :mod:`zimage_core.quant.load`) are left as they are.
    Raises :class:`CheckpointError` naming the missing and unexpected keys.
    """
    expected = {n: t for n, t in module.named_parameters() if t.is_meta}
    expected.update({n: t for n, t in module.named_buffers() if t.is_meta})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: the weights do not fit the model built from them. Missing: {_short(missing)}; "
            f"unexpected: {_short(unexpected)}. The file may be truncated or of another model family."
        )
    from tqdm.auto import tqdm

    for name, getter in tqdm(
        tensors.items(), total=len(tensors), desc=f"loading {what}", unit="tensor", disable=None, leave=False
    ):
        t = getter()
        target = expected[name]
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"{what}: '{name}' has shape {tuple(t.shape)}, expected {tuple(target.shape)}.")
        want = t.dtype if (keep_dtype(name) or not t.is_floating_point()) else dtype
        t = t.to(device=device, dtype=want)
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


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Write ``tensors`` atomically: a crash never leaves a half-written file at ``path``."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
