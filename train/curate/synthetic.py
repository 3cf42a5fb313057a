"""Generated test images: textured "natural-like" pictures, their near-duplicates and degraded versions.

Used by the tests and ``bench/curate.py`` to plant known duplicates and rejects (so precision and recall can be
measured); also handy to try the engine without a dataset.
"""

from __future__ import annotations

import io

import numpy as np


def natural(rng: np.random.Generator, w: int = 320, h: int = 240):
    """Smooth colour waves, a few solid shapes and mild grain: distinct per seed, sharp, not flat."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    for _ in range(6):
        f = rng.uniform(0.5, 6, 2)
        ph = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(20, 60, 3)
        img += np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + ph)[..., None] * amp
    img += rng.uniform(60, 200, 3)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0, s = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, 90))
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        box = [x0, y0, x0 + s, y0 + int(s * rng.uniform(0.5, 1.5))]
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=c)
    arr = np.asarray(im).astype(np.float64) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg(im, quality: int):
    from PIL import Image

    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def near_duplicate(rng: np.random.Generator, im, kind: str):
    """A planted near-duplicate: ``exact``, ``resized``, ``recompressed``, ``cropped`` (<=10%), ``jittered``."""
    from PIL import Image, ImageEnhance

    w, h = im.size
    if kind == "exact":
        return im.copy()
    if kind == "resized":
        s = rng.uniform(0.5, 0.8)
        return im.resize((max(16, int(w * s)), max(16, int(h * s))), Image.BICUBIC)
    if kind == "recompressed":
        return jpeg(im, int(rng.integers(35, 70)))
    if kind == "cropped":
        fx, fy = rng.uniform(0.0, 0.10, 2)
        cw, ch = int(round(w * (1 - fx))), int(round(h * (1 - fy)))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return im.crop((x0, y0, x0 + cw, y0 + ch))
    if kind == "jittered":
        j = ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))
        j = ImageEnhance.Brightness(j).enhance(rng.uniform(0.85, 1.15))
        return ImageEnhance.Contrast(j).enhance(rng.uniform(0.85, 1.15))
    raise ValueError(kind)


def degraded(rng: np.random.Generator, im, kind: str):
    """A planted low-quality image: ``blurred``, ``compressed`` (JPEG q<=8), ``bordered`` or ``flat``."""
    from PIL import Image, ImageFilter, ImageOps

    w, h = im.size
    if kind == "blurred":
        return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(2.5, 5.0))))
    if kind == "compressed":
        return jpeg(im, int(rng.integers(2, 9)))
    if kind == "bordered":
        b = int(min(w, h) * rng.uniform(0.06, 0.15))
        colour = tuple(int(v) for v in rng.choice([0, 255], 3)) if rng.random() < 0.7 else (0, 0, 0)
        return ImageOps.expand(im.resize((w - 2 * b, h - 2 * b)), border=b, fill=colour)
    if kind == "flat":
        return Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    raise ValueError(kind)


DUPLICATE_KINDS = ("exact", "resized", "recompressed", "cropped", "jittered")
DEGRADED_KINDS = ("blurred", "compressed", "bordered", "flat")


def planted_embeddings(
    rng: np.random.Generator, n_clusters: int, per_cluster: int, dim: int = 64, spread: float = 0.35
):
    """(vectors [n, dim], labels [n]): unit vectors around ``n_clusters`` random centres."""
    centres = rng.normal(size=(n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    x = centres[labels] + rng.normal(scale=spread / np.sqrt(dim), size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels
