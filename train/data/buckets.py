"""Aspect-ratio buckets, resize-and-center-crop, and token-budget batch packing.

A bucket is ``(height, width)`` in pixels, both multiples of 16 (VAE x8 times the DiT's 2x2 patch), with
an area close to ``resolution**2``. An image of ``(h, w)`` pixels costs ``(h/16) * (w/16)`` image tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from zimage_core.config import PIXEL_MULTIPLE

from .config import DataError

Bucket = tuple[int, int]  # (height, width) in pixels


def image_tokens(bucket: Bucket) -> int:
    """DiT image tokens of a ``(h, w)`` pixel bucket: one per 2x2 patch of the /8 latent."""
    h, w = bucket
    return (h // PIXEL_MULTIPLE) * (w // PIXEL_MULTIPLE)


def bucket_step(resolution: int) -> int:
    """Spacing of bucket heights: 16 px at 256, 32 at 512, 64 at 1024 (about 20 buckets at any size)."""
    return PIXEL_MULTIPLE * max(1, round(resolution / 256))


def make_buckets(
    resolution: int, aspect_buckets: bool = True, max_aspect: float = 3.0, step: int | None = None
) -> list[Bucket]:
    """Buckets ``(h, w)``, multiples of 16, area near ``resolution**2``, aspect within ``1/max_aspect..max_aspect``.

    Sorted from the tallest to the widest; ``aspect_buckets=False`` gives the square bucket only.
    """
    m = PIXEL_MULTIPLE
    if resolution < m or resolution % m:
        raise DataError(f"resolution {resolution} must be a positive multiple of {m}.")
    if not aspect_buckets:
        return [(resolution, resolution)]
    step = step or bucket_step(resolution)
    if step % m:
        raise DataError(f"bucket step {step} must be a multiple of {m}.")
    area = resolution * resolution
    out: set[Bucket] = set()
    h = resolution
    while True:  # portrait buckets (h >= w) and their transposes, so both orientations get the same shapes
        w = max(m, round(area / h / m) * m)
        if h / w > max_aspect + 1e-9:
            break
        out.update({(h, w), (w, h)})
        h += step
    return sorted(out, key=lambda b: -b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log space) to ``width x height``; ties go to the first."""
    if width <= 0 or height <= 0:
        raise DataError(f"an image of {width}x{height} pixels has no aspect ratio.")
    target = math.log(height / width)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def resize_center_crop(image, bucket: Bucket):
    """Scale a PIL image to cover the bucket (keeping its aspect ratio), then crop the center."""
    from PIL import Image

    bh, bw = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def batch_size_for(bucket: Bucket, token_budget: int, max_batch: int) -> int:
    """``max(1, budget // tokens)`` capped by ``max_batch``."""
    return max(1, min(max_batch, token_budget // image_tokens(bucket)))


def pack(order: Sequence[int], tokens: Sequence[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Cut ``order`` into consecutive batches whose token sums stay within the budget (at least one sample each).

    With equal token counts this gives ``batch_size_for`` samples per batch, the last batch holding the rest.
    """
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        t = tokens[i]
        if cur and (used + t > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += t
    if cur:
        batches.append(cur)
    return batches
