"""A tiny labelled dataset of coloured shapes, for smoke tests and the "does it learn" benchmark."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

BACKGROUND = (236, 236, 236)
# (caption, slug, RGB, shape, Chinese caption)
CLASSES = (
    ("a red circle", "red_circle", (220, 30, 30), "circle", "一个红色的圆形"),
    ("a blue square", "blue_square", (30, 60, 220), "square", "一个蓝色的正方形"),
    ("a green triangle", "green_triangle", (30, 170, 50), "triangle", "一个绿色的三角形"),
    ("a yellow cross", "yellow_cross", (235, 200, 20), "cross", "一个黄色的十字"),
)


def _draw(shape: str, color, size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(im)
    cx, cy = (size / 2 + rng.uniform(-0.1, 0.1, 2) * size).tolist()
    r = float(rng.uniform(0.22, 0.32)) * size
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        s = r * 0.85
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=color)
    else:  # cross
        t = r * 0.32
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)
    return im


def make_synthetic_dataset(
    folder: str | os.PathLike, n_per_class: int = 16, size: int = 64, seed: int = 0
) -> list[str]:
    """Write ``4 * n_per_class`` PNGs of coloured shapes (position/size jitter, plain background) into ``folder``.

    Each image gets ``.txt`` = its class caption (level ``"caption"``) and ``.json`` with ``short`` (the same)
    and ``long`` in ``en`` and ``zh``. Returns the four class captions, in class order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for caption, slug, color, shape, zh in CLASSES:
        for i in range(n_per_class):
            stem = folder / f"{slug}_{i:04d}"
            _draw(shape, color, size, rng).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            stem.with_suffix(".json").write_text(
                json.dumps(
                    {
                        "short": caption,
                        "long": {"en": f"{caption} on a plain light grey background", "zh": f"{zh}，纯浅灰色背景"},
                    },
                    ensure_ascii=False,
                ),
                encoding="utf-8",
            )
    return [c[0] for c in CLASSES]
