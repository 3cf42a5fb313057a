"""Dataset sources: image folders with caption sidecars, JSONL edit pairs, webdataset tar shards and the data
engine's Parquet manifests (``train.curate``).

Every source is scanned into a list of :class:`Item` (image references and every caption it has, by level
and language) in a deterministic order. Captions are ``{level: {language: text}}``; a caption with no
language (a ``.txt`` file, a plain string in JSON) has language ``""`` and serves any language.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataError, digest

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
Captions = dict[str, dict[str, str]]


@dataclass
class ImageRef:
    """Where an image lives: a file, or a byte range of an uncompressed tar."""

    where: str  # for messages
    path: str
    offset: int | None = None
    size: int | None = None

    def _raise(self, e: Exception):
        raise DataError(
            f"cannot read the image '{self.where}' ({e}). The file is corrupt or not an image; replace or remove it."
        ) from e

    def _image(self):
        """The image opened lazily (PIL reads the header; pixels on ``load()``)."""
        from PIL import Image

        if self.offset is None:
            return Image.open(self.path)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"the tar ended after {len(data)} of {self.size} bytes")
        return Image.open(io.BytesIO(data))

    def displayed_size(self) -> tuple[int, int]:
        """(width, height) as shown, from the header only: EXIF orientations 5-8 swap the two."""
        from PIL import UnidentifiedImageError

        try:
            im = self._image()
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            self._raise(e)
        return w, h

    def open(self):
        """The image as RGB (EXIF orientation applied, transparency composited on white)."""
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            im = self._image()
            im.load()
            im = ImageOps.exif_transpose(im)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            self._raise(e)
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        return im.convert("RGB")


@dataclass
class Item:
    key: str  # unique over all sources: "<source index>:<name>"
    kind: str  # "t2i" or "edit"
    target: ImageRef
    captions: Captions
    refs: list[ImageRef] = field(default_factory=list)
    primary: str | None = None  # the level used when a sample has none of the configured levels
    source: int = 0
    weight: float = 1.0

    def texts(self) -> list[str]:
        return [t for langs in self.captions.values() for t in langs.values()]

    def describe(self) -> dict:
        """A JSON-able summary (for the listing signature and the manifest)."""
        return {
            "key": self.key,
            "kind": self.kind,
            "target": self.target.where,
            "refs": [r.where for r in self.refs],
            "captions": self.captions,
            "primary": self.primary,
        }


# ---- captions ------------------------------------------------------------------------------------
def _text(v, where: str, what: str) -> str | None:
    if isinstance(v, str):
        return v.strip() or None
    if isinstance(v, list) and all(isinstance(t, str) for t in v):  # e.g. a tag list
        return ", ".join(t.strip() for t in v if t.strip()) or None
    if v is None:
        return None
    raise DataError(f"{where}: {what} must be a string (or a list of strings), got {type(v).__name__}.")


def parse_caption_json(obj, where: str, levels) -> Captions:
    """``{"long": "...", "short": {"en": "...", "zh": "..."}, ...}`` -> captions of the wanted levels.

    A top-level ``"captions"`` mapping is used when present (webdataset JSON often carries other metadata).
    """
    if not isinstance(obj, dict):
        raise DataError(f'{where}: a caption JSON must be an object like {{"long": "..."}}, got {type(obj).__name__}.')
    if isinstance(obj.get("captions"), dict):
        obj = obj["captions"]
    out: Captions = {}
    for level, v in obj.items():
        if level not in levels:
            continue
        if isinstance(v, dict):
            langs = {}
            for lang, t in v.items():
                text = _text(t, where, f"caption '{level}' in language '{lang}'")
                if text:
                    langs[str(lang)] = text
            if langs:
                out[level] = langs
        else:
            text = _text(v, where, f"caption '{level}'")
            if text:
                out[level] = {"": text}
    return out


def merge_captions(a: Captions, b: Captions, where: str) -> Captions:
    out = {k: dict(v) for k, v in a.items()}
    for level, langs in b.items():
        for lang, text in langs.items():
            old = out.setdefault(level, {}).get(lang)
            if old is not None and old != text:
                raise DataError(
                    f"{where}: caption level '{level}' is given twice with different texts ({old[:40]!r} vs "
                    f"{text[:40]!r}); keep it in one sidecar only."
                )
            out[level][lang] = text
    return out


def _read_json(data: bytes | str, where: str):
    try:
        return json.loads(data)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e}).") from e


# ---- folder ----------------------------------------------------------------------------------------
def scan_folder(index: int, root: Path, levels, weight: float) -> list[Item]:
    if not root.is_dir():
        raise DataError(f"source {index}: the image folder '{root}' does not exist (type 'folder' needs a folder).")
    images: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        stem = rel.with_suffix("").as_posix()
        if stem in images:
            raise DataError(
                f"source {index}: '{images[stem]}' and '{p}' share the name '{stem}', so their caption sidecars "
                "would be shared too; rename one of them."
            )
        images[stem] = p
    if not images:
        raise DataError(f"source {index}: the folder '{root}' holds no image ({', '.join(IMAGE_EXTS)}).")
    items = []
    for stem, p in images.items():
        captions: Captions = {}
        txt, js = p.with_suffix(".txt"), p.with_suffix(".json")
        if txt.is_file():
            text = txt.read_text(encoding="utf-8").strip()
            if text:
                captions["caption"] = {"": text}
        if js.is_file():
            captions = merge_captions(
                captions, parse_caption_json(_read_json(js.read_bytes(), str(js)), str(js), levels), str(p)
            )
        if not captions:
            raise DataError(
                f"source {index}: the image '{p}' has no caption: add '{txt.name}' (one caption) or '{js.name}' "
                '(levels such as {"long": ..., "short": ...}), or move the image out of the folder.'
            )
        items.append(
            Item(
                key=f"{index}:{stem}",
                kind="t2i",
                target=ImageRef(str(p), str(p)),
                captions=captions,
                primary="caption" if "caption" in captions else None,
                source=index,
                weight=weight,
            )
        )
    return items


# ---- edit pairs (JSONL) -------------------------------------------------------------------------
def scan_edit_jsonl(index: int, path: Path, levels, weight: float) -> list[Item]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"source {index}: the folder '{path}' holds no .jsonl file of edit pairs.")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"source {index}: the edit-pair file '{path}' does not exist.")
    items = []
    for f in files:
        base = f.parent
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{f}:{n}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(
                    f"{where}: not valid JSON ({e}); each line must be one object like "
                    '{"source": "a.png", "target": "b.png", "instruction": "make it red"}.'
                ) from e
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
            items.append(_edit_item(index, rec, where, base, f"{f.stem}:{n}", levels, weight))
    if not items:
        raise DataError(f"source {index}: '{path}' holds no edit pair.")
    return items


def _edit_item(index: int, rec: dict, where: str, base: Path, default_key: str, levels, weight: float) -> Item:
    missing = [k for k in ("source", "target", "instruction") if k not in rec]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; an edit pair needs 'source', 'target' and 'instruction'."
        )
    srcs = rec["source"] if isinstance(rec["source"], list) else [rec["source"]]
    if not srcs or not all(isinstance(s, str) and s for s in srcs):
        raise DataError(f"{where}: 'source' must be an image path or a non-empty list of image paths.")
    if not isinstance(rec["target"], str) or not rec["target"]:
        raise DataError(f"{where}: 'target' must be an image path.")
    instruction = rec["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: 'instruction' must be a non-empty string.")

    def ref(p: str, what: str) -> ImageRef:
        full = Path(p).expanduser()
        full = full if full.is_absolute() else base / full
        if not full.is_file():
            raise DataError(
                f"{where}: {what} image '{p}' not found (looked for '{full}'; paths are relative to the "
                "JSONL file's folder)."
            )
        return ImageRef(str(full), str(full))

    captions: Captions = {"instruction": {"": instruction.strip()}}
    extra = rec.get("caption")
    if isinstance(extra, dict):
        captions = merge_captions(captions, parse_caption_json(extra, where, levels), where)
    elif extra is not None:
        text = _text(extra, where, "'caption'")
        if text:
            captions["target_caption"] = {"": text}
    key = rec.get("key", default_key)
    return Item(
        key=f"{index}:{key}",
        kind="edit",
        target=ref(rec["target"], "target"),
        refs=[ref(s, "source") for s in srcs],
        captions=captions,
        primary="instruction",
        source=index,
        weight=weight,
    )


# ---- webdataset tar shards ----------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """``shard-{000000..000009}.tar`` -> the ten names (zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") else 0
    out = []
    for i in range(int(a), int(b) + 1):
        out += expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :])
    return out


def tar_files(index: int, path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.tar"))
    elif p.is_file():
        files = [p]
    else:
        names = expand_braces(str(p))
        files = []
        for n in names:
            q = Path(n)
            files += sorted(q.parent.glob(q.name)) if any(c in q.name for c in "*?[") else [q]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"source {index}: tar shard(s) {missing[:3]} not found (from '{path}').")
    if not files:
        raise DataError(
            f"source {index}: no .tar shard found at '{path}' (give a folder, a file or 'shard-{{000000..000009}}.tar')."
        )
    return files


def _split_member(name: str) -> tuple[str, str]:
    """webdataset grouping: 'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg')."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def scan_webdataset(index: int, path: str, levels, weight: float) -> list[Item]:
    items = []
    for tf_path in tar_files(index, path):
        try:
            tf = tarfile.open(tf_path, "r:")
        except (tarfile.TarError, OSError) as e:
            raise DataError(
                f"source {index}: cannot open '{tf_path}' as an uncompressed tar ({e}). Compressed shards (.tar.gz) "
                "cannot be read by offset; unpack them or re-pack without compression."
            ) from e
        groups: dict[str, dict] = {}
        with tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_member(m.name)
                g = groups.setdefault(key, {"captions": {}, "image": None})
                where = f"{tf_path}::{m.name}"
                if "." + ext in IMAGE_EXTS:
                    if g["image"] is not None:
                        raise DataError(f"source {index}: '{tf_path}' has two images for the key '{key}'.")
                    g["image"] = ImageRef(where, str(tf_path), m.offset_data, m.size)
                elif ext in ("txt", "json"):
                    data = tf.extractfile(m).read()
                    if ext == "txt":
                        text = data.decode("utf-8", errors="replace").strip()
                        caps = {"caption": {"": text}} if text else {}
                    else:
                        caps = parse_caption_json(_read_json(data, where), where, levels)
                    g["captions"] = merge_captions(g["captions"], caps, f"{tf_path}::{key}")
        no_image = [k for k, g in groups.items() if g["image"] is None]
        if no_image:
            log.warning("%s: %d key(s) without an image were skipped (e.g. '%s')", tf_path, len(no_image), no_image[0])
        for key, g in groups.items():
            if g["image"] is None:
                continue
            if not g["captions"]:
                raise DataError(
                    f"source {index}: '{g['image'].where}' has no caption: the shard needs '{key}.txt' or '{key}.json' "
                    "next to it."
                )
            items.append(
                Item(
                    key=f"{index}:{tf_path.stem}/{key}",
                    kind="t2i",
                    target=g["image"],
                    captions=g["captions"],
                    primary="caption" if "caption" in g["captions"] else None,
                    source=index,
                    weight=weight,
                )
            )
    return items


# ---- data-engine manifests (Parquet) -------------------------------------------------------------------
def _manifest_file(index: int, path: Path) -> Path:
    p = path / "manifest.parquet" if path.is_dir() else path
    if not p.is_file():
        raise DataError(
            f"source {index}: no manifest at '{p}' (type 'manifest' reads the manifest.parquet that "
            "`python -m train.curate dedup --input DIR --out DIR` writes)."
        )
    return p


def _manifest_rows(index: int, path: Path, columns: list[str]):
    """``(file, batch)`` of the manifest's wanted columns, streamed (bounded memory on large manifests)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"source {index}: reading a manifest needs pyarrow (pip install -e '.[curate]').") from e
    p = _manifest_file(index, path)
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"source {index}: '{p}' is not a readable Parquet manifest ({e}).") from e
    have = set(pf.schema_arrow.names)
    if "path" not in have:
        raise DataError(f"source {index}: the manifest '{p}' has no 'path' column.")
    for rb in pf.iter_batches(batch_size=4096, columns=[c for c in columns if c in have]):
        yield p, rb.to_pydict()


def scan_manifest(index: int, path: Path, levels, weight: float) -> list[Item]:
    """Rows with ``keep`` true (all rows when there is no ``keep`` column); captions from a ``caption`` column
    (text, or JSON levels) and/or the image's sidecars, as for a folder."""
    items = []
    for p, cols in _manifest_rows(index, path, ["id", "path", "keep", "caption"]):
        for r, img in enumerate(cols["path"]):
            if "keep" in cols and not cols["keep"][r]:
                continue
            ip = Path(img) if Path(img).is_absolute() else p.parent / img
            name = (cols.get("id") or cols["path"])[r]
            captions: Captions = {}
            text = (cols.get("caption") or [None] * (r + 1))[r]
            if text and text.lstrip().startswith("{"):
                captions = parse_caption_json(_read_json(text, f"{p}: row {name}"), f"{p}: row {name}", levels)
            elif text and text.strip():
                captions["caption"] = {"": text.strip()}
            txt, js = ip.with_suffix(".txt"), ip.with_suffix(".json")
            if txt.is_file() and "caption" not in captions:
                t = txt.read_text(encoding="utf-8").strip()
                if t:
                    captions["caption"] = {"": t}
            if js.is_file():
                captions = merge_captions(
                    captions, parse_caption_json(_read_json(js.read_bytes(), str(js)), str(js), levels), str(ip)
                )
            if not captions:
                raise DataError(
                    f"source {index}: the kept image '{ip}' (manifest '{p}') has no caption: add a 'caption' column "
                    f"(the captioner's output), '{txt.name}' or '{js.name}' beside it, or set keep = false."
                )
            items.append(
                Item(
                    key=f"{index}:{name}",
                    kind="t2i",
                    target=ImageRef(str(ip), str(ip)),
                    captions=captions,
                    primary="caption" if "caption" in captions else None,
                    source=index,
                    weight=weight,
                )
            )
    if not items:
        raise DataError(f"source {index}: the manifest at '{path}' keeps no image (every row has keep = false).")
    return items


def sample_weights(sources: list[dict]) -> dict[str, float]:
    """Per-sample weights (key -> weight) from the ``weight`` column of ``manifest`` sources (kept rows only)."""
    out: dict[str, float] = {}
    for index, spec in enumerate(sources):
        if spec.get("type") != "manifest":
            continue
        for _, cols in _manifest_rows(index, Path(spec["path"]).expanduser(), ["id", "path", "keep", "weight"]):
            if "weight" not in cols:
                break
            for r, w in enumerate(cols["weight"]):
                if "keep" in cols and not cols["keep"][r]:
                    continue
                if w is None or not w >= 0:
                    raise DataError(f"source {index}: the manifest's weight {w!r} (row {r}) must be a number >= 0.")
                out[f"{index}:{(cols.get('id') or cols['path'])[r]}"] = float(w)
    return out


# ---- all sources -----------------------------------------------------------------------------------
def scan_source(index: int, spec: dict, levels) -> list[Item]:
    weight = float(spec.get("weight", 1.0))
    # resolved like the cache identity (DataConfig.cache_identity), so the listing of "data" and "/abs/data" agree
    path = Path(spec["path"]).expanduser().resolve()
    if spec["type"] == "folder":
        return scan_folder(index, path, levels, weight)
    if spec["type"] == "edit_jsonl":
        return scan_edit_jsonl(index, path, levels, weight)
    if spec["type"] == "manifest":
        return scan_manifest(index, path, levels, weight)
    return scan_webdataset(index, spec["path"], levels, weight)


def source_signature(index: int, spec: dict, levels, items: list[Item] | None = None) -> str:
    """A cheap digest that changes when the source's content does.

    Folders and JSONL files: the scanned listing (captions included) plus image sizes. Tar shards: names,
    sizes and modification times (no member is read).
    """
    if spec["type"] == "webdataset":
        parts = []
        for f in tar_files(index, spec["path"]):
            st = f.stat()
            parts.append([f.name, st.st_size, st.st_mtime_ns])
        return digest(parts)
    if items is None:
        items = scan_source(index, spec, levels)
    return digest([[it.describe(), [os.path.getsize(r.path) for r in [it.target, *it.refs]]] for it in items])
