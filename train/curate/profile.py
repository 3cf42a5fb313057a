"""The profile stage: one manifest row per input file with its measurements and the filters' verdict.

A file that does not decode is a row with ``decodes = False`` and a ``decode_error`` reason, never a crash.
Pixel measurements (:mod:`.metrics`) are taken with the long side scaled to ``work_size``; blockiness on the
stored pixel grid. OCR uses rapidocr, whose detector and recogniser ship inside its pip package.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np

from . import metrics as M
from .config import CurateConfig, CurateError
from .engine import merge, run_shards
from .manifest import MANIFEST, REASON_SEP, list_images, pa

log = logging.getLogger(__name__)

# column -> arrow type name (plugin score columns score_<name> and caption are appended per config)
COLUMNS = {
    "id": "string",
    "path": "string",
    "keep": "bool_",
    "reasons": "string",
    "duplicate_of": "string",
    "cluster": "int64",
    "decodes": "bool_",
    "file_bytes": "int64",
    "sha1": "string",
    "format": "string",
    "mode": "string",
    "width": "int64",
    "height": "int64",
    "aspect": "float64",
    "exif_orientation": "int64",
    "phash": "string",
    "dhash": "string",
    "compression_ratio": "float64",
    "file_bytes_per_pixel": "float64",
    "jpeg_bytes_per_pixel": "float64",
    "blockiness": "float64",
    "border_variance": "float64",
    "border_score": "float64",
    "border_width": "float64",
    "entropy": "float64",
    "std": "float64",
    "sharpness": "float64",
    "noise": "float64",
    "colour_cast": "float64",
    "mean_r": "float64",
    "mean_g": "float64",
    "mean_b": "float64",
    "ocr_text": "string",
    "ocr_boxes": "string",
    "text_area": "float64",
    "thumb": "binary",
}


def schema(cfg: CurateConfig):
    pyarrow = pa()
    fields = [pyarrow.field(k, getattr(pyarrow, t)()) for k, t in COLUMNS.items()]
    fields += [pyarrow.field(f"score_{n}", pyarrow.float64()) for n in sorted(cfg.scores)]
    if cfg.caption:
        fields.append(pyarrow.field("caption", pyarrow.string()))
    return pyarrow.schema(fields)


# ---- rejection rules: (reason code, column, "min"|"max", filter option) -----------------------------------
RULES = [
    ("too_small", "min_side_px", "min", "min_side"),
    ("aspect", "aspect_ratio", "max", "max_aspect"),
    ("flat", "std", "min", "min_std"),
    ("low_entropy", "entropy", "min", "min_entropy"),
    ("blur", "sharpness", "min", "min_sharpness"),
    ("noise", "noise", "max", "max_noise"),
    ("border", "border_score", "max", "max_border_score"),
    ("compression", "blockiness", "max", "max_blockiness"),
    ("compression", "compression_ratio", "max", "max_compression_ratio"),
    ("low_information", "jpeg_bytes_per_pixel", "min", "min_jpeg_bytes_per_pixel"),
    ("colour_cast", "colour_cast", "max", "max_colour_cast"),
    ("text", "text_area", "max", "max_text_area"),
]


def verdict(row: dict, cfg: CurateConfig) -> list[str]:
    """Every rule the row breaks, as ``code: column=value (min|max threshold)``."""
    if not row["decodes"]:
        return []
    vals = dict(row)
    vals["min_side_px"] = min(row["width"], row["height"])
    vals["aspect_ratio"] = max(row["aspect"], 1.0 / row["aspect"]) if row["aspect"] else 0.0
    out = []
    for code, col, how, opt in RULES:
        t = getattr(cfg.filters, opt)
        v = vals.get(col)
        if t is None or v is None:
            continue
        if col == "compression_ratio" and row["format"] not in ("JPEG", "WEBP"):
            continue
        if (how == "min" and v < t) or (how == "max" and v > t):
            out.append(f"{code}: {col}={v:.4g} ({'<' if how == 'min' else '>'} {t:g})")
    for name, spec in sorted(cfg.scores.items()):
        v = row.get(f"score_{name}")
        if v is None:
            continue
        if spec.get("min") is not None and v < spec["min"]:
            out.append(f"score_{name}: {v:.4g} (< {spec['min']:g})")
        if spec.get("max") is not None and v > spec["max"]:
            out.append(f"score_{name}: {v:.4g} (> {spec['max']:g})")
    return out


# ---- the worker -----------------------------------------------------------------------------------------------
class Profiler:
    """Measures a shard of files; built once per worker (loads OCR, score models and the captioner)."""

    def __init__(self, cfg: CurateConfig):
        from .plugins import build_captioner, build_scorers

        self.cfg = cfg
        self.ocr = _load_ocr() if cfg.ocr else None
        self.scorers = build_scorers(cfg)
        self.captioner = build_captioner(cfg)
        self.schema = schema(cfg)

    def __call__(self, items: list[dict]):
        rows = []
        for c in range(0, len(items), 16):  # model scores run in small batches; pixels are dropped after
            chunk = [self.measure(it) for it in items[c : c + 16]]
            ok = [(r, im) for r, im in chunk if im is not None]
            if ok and self.scorers:
                for name, fn in self.scorers.items():
                    vals = list(fn([im for _, im in ok]))
                    if len(vals) != len(ok):
                        raise CurateError(f"score '{name}' returned {len(vals)} values for {len(ok)} images.")
                    for (r, _), v in zip(ok, vals):
                        r[f"score_{name}"] = float(v)
            if ok and self.captioner is not None:
                caps = list(self.captioner([im for _, im in ok], [r["ocr_text"] for r, _ in ok]))
                if len(caps) != len(ok):
                    raise CurateError(f"the captioner returned {len(caps)} captions for {len(ok)} images.")
                for (r, _), t in zip(ok, caps):
                    r["caption"] = str(t)
            for r, _ in chunk:
                reasons = ([r.pop("_error")] if "_error" in r else []) + verdict(r, self.cfg)
                r["keep"] = not reasons
                r["reasons"] = REASON_SEP.join(reasons)
                rows.append(r)
        return pa().Table.from_pylist(rows, schema=self.schema)

    def measure(self, item: dict):
        """(row, working image or None) for one file."""
        from PIL import Image, ImageOps

        row = {k: None for k in self.schema.names}
        row.update(id=item["id"], path=item["path"], duplicate_of="", cluster=-1, decodes=False)
        try:
            data = Path(item["path"]).read_bytes()
        except OSError as e:
            row["_error"] = f"decode_error: cannot read the file ({e})"
            return row, None
        row["file_bytes"] = len(data)
        row["sha1"] = hashlib.sha1(data).hexdigest()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
                im.load()
                row["format"], row["mode"] = im.format, im.mode
                row["exif_orientation"] = int(im.getexif().get(0x0112, 1) or 1)
                stored = im
                im = ImageOps.exif_transpose(im)
                rgb_full = _to_rgb(im)
        except Exception as e:  # PIL raises many types for broken files; each becomes a reason row
            msg = re.sub(r" <[^>]* at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}").replace("\n", " ")
            row["_error"] = f"decode_error: {msg}"[:300]
            return row, None
        row["decodes"] = True
        w, h = rgb_full.size
        row.update(width=w, height=h, aspect=w / h)
        row["compression_ratio"] = M.ideal_bytes(w, h, row["mode"]) / max(1, len(data))
        row["file_bytes_per_pixel"] = len(data) / float(w * h)
        row["blockiness"] = M.blockiness(M.grey(np.asarray(_to_rgb(stored))))
        work = _fit(rgb_full, self.cfg.work_size)
        a = np.asarray(work)
        g = M.grey(a)
        import imagehash

        row["phash"] = str(imagehash.phash(work))
        row["dhash"] = str(imagehash.dhash(work))
        row["jpeg_bytes_per_pixel"] = M.jpeg_bytes_per_pixel(work)
        row["border_variance"] = M.border_variance(a)
        row["border_score"], row["border_width"] = M.border_score(a)
        row["entropy"] = M.entropy(g) + 0.0
        row["std"] = float(g.std())
        row["sharpness"] = M.sharpness(g)
        row["noise"] = M.noise_sigma(g)
        row["colour_cast"] = M.colour_cast(a)
        row["mean_r"], row["mean_g"], row["mean_b"] = (float(x) for x in a.reshape(-1, 3).mean(axis=0))
        row["thumb"] = _thumb_png(work)
        if self.ocr is not None:
            row["ocr_text"], row["ocr_boxes"], row["text_area"] = self._ocr(rgb_full)
        return row, work

    def _ocr(self, rgb) -> tuple[str, str, float]:
        im = _fit(rgb, self.cfg.ocr_max_side)
        scale = rgb.size[0] / im.size[0]
        result, _ = self.ocr(np.asarray(im)[:, :, ::-1].copy())  # rapidocr takes BGR like OpenCV
        texts, boxes, area = [], [], 0.0
        for quad, text, _conf in result or []:
            q = np.asarray(quad, dtype=np.float64) * scale
            x0, y0 = q.min(axis=0)
            x1, y1 = q.max(axis=0)
            texts.append(text)
            boxes.append([round(float(x0), 1), round(float(y0), 1), round(float(x1), 1), round(float(y1), 1)])
            area += (x1 - x0) * (y1 - y0)
        return "\n".join(texts), json.dumps(boxes), min(1.0, area / float(rgb.size[0] * rgb.size[1]))


def _load_ocr():
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
        raise CurateError(
            "OCR needs rapidocr (its models ship in the package): pip install -e '.[curate]', or set "
            "ocr = false in [curate]."
        ) from e
    for name in ("RapidOCR", "rapidocr_onnxruntime"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return RapidOCR()


def _to_rgb(im):
    from PIL import Image

    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    if im.mode in ("I;16", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((a / max(a.max(), 1.0) * 255).astype(np.uint8))
    return im.convert("RGB")


def _fit(im, side: int):
    from PIL import Image

    w, h = im.size
    s = side / max(w, h)
    if s >= 1:
        return im
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BOX)


def _thumb_png(rgb) -> bytes:
    from PIL import Image

    g = rgb.convert("L")
    w, h = g.size
    s = M.THUMB / max(w, h)
    g = g.resize((max(6, round(w * s)), max(6, round(h * s))), Image.BOX)
    buf = io.BytesIO()
    g.save(buf, "PNG")
    return buf.getvalue()


def thumb_array(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"))


def make_profiler(cfg_dict: dict) -> Profiler:
    return Profiler(CurateConfig.from_dict(cfg_dict))


def profile_options(cfg: CurateConfig) -> str:
    return cfg.digest("filters", "scores", "caption", "work_size", "ocr", "ocr_max_side")


def run_profile(input_dir, out, cfg: CurateConfig) -> Path:
    """Profile every image under ``input_dir`` into ``out/manifest.parquet`` (resumable); returns its path."""
    out = Path(out).expanduser()
    items = list_images(input_dir)
    cfg_dict = cfg.to_dict()
    files = run_shards("profile", items, functools.partial(make_profiler, cfg_dict), out, cfg, profile_options(cfg))
    dest = merge(files, out / MANIFEST)
    log.info("profile: %d images -> %s", len(items), dest)
    return dest
