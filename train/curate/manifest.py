"""Parquet manifests: listing the input, atomic writes, and streaming column updates with bounded memory.

A manifest is one row per input image. Columns every stage keeps: ``id`` (the path relative to the input
folder, unique), ``path`` (absolute), ``keep`` (bool: the current decision), ``reasons`` (``"; "``-joined
``code: detail`` entries, one per rejection, ``""`` when kept), ``duplicate_of`` (the ``path`` of the member
kept in its duplicate cluster, ``""`` otherwise) and ``cluster`` (duplicate-cluster id: members of one cluster
share it, every other image has its own). The profile stage adds its measurements (see :mod:`.profile`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from zimage_core.outputs import atomic_path

from .config import CurateError

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REASON_SEP = "; "


def pa():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise CurateError("the data engine needs pyarrow: pip install -e '.[curate]' (or pip install pyarrow).") from e
    return pyarrow


def list_images(root: str | Path) -> list[dict]:
    """Every file with an image extension under ``root`` (hidden parts skipped), sorted: ``{id, path, bytes}``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CurateError(f"the input folder '{root}' does not exist; give --input a folder of images.")
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_EXTS:
            out.append({"id": rel.as_posix(), "path": str(p.resolve()), "bytes": p.stat().st_size})
    if not out:
        raise CurateError(f"the input folder '{root}' holds no image ({', '.join(IMAGE_EXTS)}).")
    return out


def write_table(table, dest: str | Path) -> Path:
    """Write a pyarrow table to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        pa().parquet.write_table(table, tmp)
    return Path(dest)


def write_text(dest: str | Path, text: str) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_tables(tables, dest: str | Path, empty: str, cast: bool = False) -> Path:
    """Stream pyarrow ``tables`` into one Parquet file at ``dest`` (atomically; the first table's schema, the
    others cast to it with ``cast``); ``empty``: the error when there is no table at all."""
    pyarrow = pa()
    with atomic_path(dest) as tmp:
        writer = None
        try:
            for t in tables:
                if writer is None:
                    writer = pyarrow.parquet.ParquetWriter(tmp, t.schema)
                writer.write_table(t.cast(writer.schema) if cast else t)
            if writer is None:
                raise CurateError(empty)
        finally:
            if writer is not None:
                writer.close()
    return Path(dest)


def open_manifest(path: str | Path):
    """A ``pyarrow.parquet.ParquetFile`` for ``path`` (a manifest file or a folder holding one)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise CurateError(
            f"no manifest at '{p}'; run `python -m train.curate profile --input DIR --out {p.parent}` first."
        )
    try:
        return pa().parquet.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise CurateError(f"'{p}' is not a readable Parquet manifest ({e}); run the stage again.") from e


def read_columns(path, columns: list[str], optional: tuple[str, ...] = ()) -> dict:
    """Whole columns as Python lists (only the named ones: memory is the size of those columns)."""
    pf = open_manifest(path)
    names = set(pf.schema_arrow.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise CurateError(f"the manifest '{pf.metadata and path}' has no column(s) {missing}; have {sorted(names)}.")
    want = list(columns) + [c for c in optional if c in names and c not in columns]
    table = pf.read(columns=want)
    return {c: table.column(c).to_pylist() for c in want}


def iter_batches(path, columns: list[str] | None = None, batch_size: int = 4096) -> Iterator:
    yield from open_manifest(path).iter_batches(batch_size=batch_size, columns=columns)


def rewrite(src, dest, update: Callable[[int, object], object], batch_size: int = 4096) -> Path:
    """Stream ``src`` into ``dest`` batch by batch; ``update(row_offset, record_batch) -> table`` edits each.

    ``src`` and ``dest`` may be the same file (the result is written under a temporary name first).
    """
    pf = open_manifest(src)

    def tables():
        offset = 0
        for rb in pf.iter_batches(batch_size=batch_size):
            yield update(offset, rb)
            offset += rb.num_rows

    return write_tables(tables(), dest, f"the manifest '{src}' has no rows.")


def set_column(table, name: str, values, type_=None):
    """``table`` with column ``name`` replaced (or appended)."""
    pyarrow = pa()
    arr = pyarrow.array(values, type=type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


def join_reasons(*parts) -> str:
    out = []
    for p in parts:
        if not p:
            continue
        for r in p.split(REASON_SEP) if isinstance(p, str) else p:
            if r and r not in out:
                out.append(r)
    return REASON_SEP.join(out)
