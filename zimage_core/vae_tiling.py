"""Tiled VAE encode/decode: overlapping tiles blended with linear feathering.

Only the full-resolution part of the network is tiled (encoder conv_in + down levels, decoder up
levels + conv_out); the 1/8-resolution mid block with its global attention runs on the whole
latent, which is cheap. In the overlap between two tiles the outputs are cross-faded with
complementary linear ramps (weights sum to one), so no seam shows. Tiles still differ from the
untiled result through context: the receptive field and GroupNorm statistics see one tile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .errors import ZImageError

log = logging.getLogger(__name__)

# "auto" tiles images above this many pixels, with tiles of AUTO_TILE pixels.
AUTO_TILE_THRESHOLD_PIXELS = 1536 * 1536
AUTO_TILE = 1024
# Overlap between neighbouring tiles, as a fraction of the tile side.
OVERLAP_FRACTION = 0.25
# Share of an overlap, at each tile edge, given entirely to the neighbour (edge pixels see zero padding).
MARGIN_FRACTION = 0.25


def resolve_tile(tile: int | str | None, height: int, width: int, multiple: int = 8) -> int | None:
    """The tile side in pixels to use for an image of ``height`` x ``width`` pixels, or None (untiled)."""
    if tile is None:
        return None
    if isinstance(tile, str):
        if tile != "auto":
            raise ZImageError(f"VAE tile must be a size in pixels, 'auto' or None; got '{tile}'.")
        if height * width <= AUTO_TILE_THRESHOLD_PIXELS:
            return None
        tile = AUTO_TILE
    tile = int(tile)
    if tile < 4 * multiple or tile % multiple:
        raise ZImageError(f"VAE tile size {tile} must be a multiple of {multiple} and at least {4 * multiple} pixels.")
    if height <= tile and width <= tile:
        return None
    return tile


def default_overlap(tile: int, multiple: int = 8) -> int:
    """Overlap in pixels for a tile side: a quarter of it, rounded down to ``multiple`` (at least ``multiple``)."""
    return max(multiple, int(tile * OVERLAP_FRACTION) // multiple * multiple)


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans of length ``tile`` covering ``size``, stride ``tile - overlap``, last one flush."""
    if size <= tile:
        return [(0, size)]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _rise(dist: torch.Tensor, width: int) -> torch.Tensor:
    """Weight at ``dist`` (pixel centres) from a tile edge, across an overlap of ``width``: 0 -> 1."""
    margin = int(width * MARGIN_FRACTION)
    return ((dist - margin) / (width - 2 * margin)).clamp(0.0, 1.0)


def feather(spans: list[tuple[int, int]], index: int, scale: float) -> torch.Tensor:
    """Blend weights of span ``index`` in output units.

    Across each overlap with a neighbour, the two tiles get complementary weights (summing to one):
    the outer margin is left to the neighbour, the middle is a linear cross-fade.
    """
    s, e = (round(v * scale) for v in spans[index])
    n = e - s
    dist = torch.arange(n, dtype=torch.float32) + 0.5
    w = torch.ones(n)
    if index > 0:
        left = round(spans[index - 1][1] * scale) - s
        if left > 0:
            w = torch.minimum(w, _rise(dist, left))
    if index + 1 < len(spans):
        right = e - round(spans[index + 1][0] * scale)
        if right > 0:
            w = torch.minimum(w, _rise(n - dist, right))
    return w


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_px: int,
    factor: int,
    upscale: bool,
    overlap_px: int | None = None,
) -> torch.Tensor:
    """Apply ``fn`` (decoder when ``upscale``, else encoder) tile by tile; returns the blended float32 result.

    ``tile_px``/``overlap_px`` are in pixels; ``factor`` is the VAE scale (8).
    """
    overlap_px = default_overlap(tile_px, factor) if overlap_px is None else overlap_px
    if overlap_px % factor or not 0 < overlap_px < tile_px:
        raise ZImageError(f"VAE tile overlap {overlap_px} must be a multiple of {factor} and below the tile {tile_px}.")
    unit = factor if upscale else 1  # pixels per input element
    tile_in, overlap_in = tile_px // unit, overlap_px // unit
    scale = float(factor) if upscale else 1.0 / factor
    rows = tile_spans(x.shape[-2], tile_in, overlap_in)
    cols = tile_spans(x.shape[-1], tile_in, overlap_in)
    out_h, out_w = round(x.shape[-2] * scale), round(x.shape[-1] * scale)
    log.debug(
        "VAE tiling %dx%d input into %dx%d tiles of %d px", x.shape[-1], x.shape[-2], len(cols), len(rows), tile_px
    )
    acc: torch.Tensor | None = None
    wsum = torch.zeros(out_h, out_w, device=x.device)
    for r, (r0, r1) in enumerate(rows):
        wy = feather(rows, r, scale).to(x.device)
        for c, (c0, c1) in enumerate(cols):
            wx = feather(cols, c, scale).to(x.device)
            y = fn(x[..., r0:r1, c0:c1]).float()
            if acc is None:
                acc = torch.zeros(y.shape[0], y.shape[1], out_h, out_w, device=x.device)
            w = wy[:, None] * wx[None, :]
            ys, xs = round(r0 * scale), round(c0 * scale)
            acc[..., ys : ys + y.shape[-2], xs : xs + y.shape[-1]] += y * w
            wsum[ys : ys + y.shape[-2], xs : xs + y.shape[-1]] += w
    if acc is None or bool((wsum <= 0).any()):
        raise RuntimeError("VAE tiling left pixels without weight; tile/overlap sizes are inconsistent")
    return acc / wsum
