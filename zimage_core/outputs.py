"""Writing outputs so that nothing half-written is ever left: a temporary name in the same folder, then a rename.

:func:`atomic_path` is the building block (any writer); :func:`save_image` writes a PIL image with its generation
parameters: PNG text chunks (``parameters`` as A1111/ComfyUI readers expect, ``zimage`` as JSON), or for JPEG and
WebP the same text in the EXIF UserComment. :func:`read_parameters` reads them back from any of the three.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (atomically for a file; a folder is
    moved into place when ``path`` does not exist yet), on failure it is removed. Missing parents are created
    (and removed again on failure when they were made here)."""
    path = Path(path)
    made = []
    parent = path.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    _ordinary_mode(tmp)
    try:
        yield tmp
        if folder and path.exists():
            if not path.is_dir():
                raise FileExistsError(17, "a file is in the way of the output folder", str(path))
            for child in tmp.iterdir():  # an existing folder keeps its other files; ours replace theirs one by one
                _replace(child, path / child.name)
            tmp.rmdir()
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        for d in made:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _ordinary_mode(p: Path) -> None:
    """mkstemp/mkdtemp make 0600/0700 entries; the result is an ordinary file (0666) or folder (0777) under the
    process umask, as a plain ``open``/``mkdir`` would make it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _replace(src: Path, dest: Path) -> None:
    """``os.replace`` that also replaces an existing folder by a folder (the old one is moved aside, then removed)."""
    if src.is_dir() and dest.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
        try:
            os.replace(src, dest)
        except BaseException:
            os.replace(old / dest.name, dest)
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


def parameters_text(params: dict) -> str:
    """The A1111-style ``parameters`` text: prompt, negative prompt, then ``key: value`` pairs."""
    human = ", ".join(f"{k}: {v}" for k, v in params.items() if k not in ("prompt", "negative"))
    return f"{params.get('prompt')}\nNegative prompt: {params.get('negative') or ''}\n{human}"


def png_info(params: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("zimage", json.dumps(params, default=str))
    return info


def _exif(params: dict):
    from PIL import Image

    exif = Image.Exif()
    text = parameters_text(params) + "\nzimage: " + json.dumps(params, default=str)
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif


def save_image(img, path: str | os.PathLike, params: dict | None = None) -> Path:
    """Write ``img`` to ``path`` (PNG, JPEG or WebP by its suffix) with ``params``, atomically."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image suffix '{path.suffix}'; use one of {', '.join(_FORMATS)}")
    kw: dict = {"format": fmt}
    if params is not None:
        if fmt == "PNG":
            kw["pnginfo"] = png_info(params)
        else:
            kw["exif"] = _exif(params)
    if fmt == "JPEG":
        kw["quality"] = 95
        img = img.convert("RGB")
    elif fmt == "WEBP":
        kw["quality"] = 95
    with atomic_path(path) as tmp:
        img.save(tmp, **kw)
    return path


def read_parameters(path: str | os.PathLike) -> dict | None:
    """The ``zimage`` parameters written by :func:`save_image` (PNG text chunk or EXIF UserComment), or None."""
    from PIL import Image

    with Image.open(path) as img:
        text = img.info.get("zimage") if isinstance(img.info.get("zimage"), str) else None
        if text is None:
            raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
            if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
                body = raw[8:].decode("utf-16-be", errors="replace")
                _, sep, text = body.rpartition("\nzimage: ")
                text = text if sep else None
    return json.loads(text) if text else None
