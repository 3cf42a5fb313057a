"""Per-image measurements as pure functions of pixel arrays (numpy only, no model).

Grey images are float32 ``[H, W]`` in 0..255, colour images uint8 ``[H, W, 3]``. Directions, for reading the
manifest: ``sharpness`` falls with blur; ``noise`` rises with sensor/grain noise; ``entropy`` and ``std`` are
0 for a flat image; ``border_score`` is the fraction of the four sides framed by a uniform band;
``blockiness`` rises with JPEG over-compression; ``colour_cast`` rises with a tint.
"""

from __future__ import annotations

import io
import math

import numpy as np


def grey(rgb: np.ndarray) -> np.ndarray:
    a = rgb.astype(np.float32)
    return a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114


def sharpness(g: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian."""
    if min(g.shape) < 3:
        return 0.0
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def noise_sigma(g: np.ndarray) -> float:
    """Immerkaer (1996) fast noise estimate: the image's response to a Laplacian-difference mask."""
    h, w = g.shape
    if h < 3 or w < 3:
        return 0.0
    c = g[1:-1, 1:-1]
    edges = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    corners = g[:-2, :-2] + g[:-2, 2:] + g[2:, :-2] + g[2:, 2:]
    resp = np.abs(4.0 * c - 2.0 * edges + corners)
    return float(math.sqrt(math.pi / 2.0) * resp.sum() / (6.0 * (w - 2) * (h - 2)))


def entropy(g: np.ndarray) -> float:
    hist = np.bincount(np.clip(g, 0, 255).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))


def border_variance(rgb: np.ndarray, frac: float = 0.03) -> float:
    """Variance of the outer strips (``frac`` of the short side), averaged over channels."""
    h, w = rgb.shape[:2]
    k = max(1, round(frac * min(h, w)))
    a = rgb.astype(np.float32)
    strips = np.concatenate(
        [a[:k].reshape(-1, 3), a[-k:].reshape(-1, 3), a[:, :k].reshape(-1, 3), a[:, -k:].reshape(-1, 3)]
    )
    return float(strips.var(axis=0).mean())


def _side_framed(lines: np.ndarray, tol: float, cap: int) -> tuple[bool, int]:
    """``lines``: [n, L, 3] from the edge inwards. Framed when a uniform band ends in a clear, straight edge."""
    band = np.median(lines[0], axis=0)
    width = 0
    for r in range(min(cap, len(lines))):
        if (np.abs(lines[r] - band).max(axis=1) <= tol).mean() >= 0.98:
            width = r + 1
        else:
            break
    if width == 0 or width >= min(cap, len(lines)):
        return False, width
    after = lines[width : width + 3]
    differ = max(float((np.abs(row - band).max(axis=1) > tol).mean()) for row in after)
    return differ >= 0.5, width


def border_score(rgb: np.ndarray, tol: float = 10.0, cap_frac: float = 0.3) -> tuple[float, float]:
    """(fraction of framed sides, mean band width as a fraction of the side's depth)."""
    a = rgb.astype(np.float32)
    h, w = a.shape[:2]
    sides = [a, a[::-1], a.transpose(1, 0, 2), a.transpose(1, 0, 2)[::-1]]  # top, bottom, left, right
    caps = [int(h * cap_frac), int(h * cap_frac), int(w * cap_frac), int(w * cap_frac)]
    framed, widths = 0, []
    for lines, cap, depth in zip(sides, caps, (h, h, w, w)):
        f, wd = _side_framed(lines, tol, max(cap, 2))
        framed += f
        widths.append(wd / depth if f else 0.0)
    return framed / 4.0, float(np.mean(widths))


def blockiness(g: np.ndarray, block: int = 8) -> float:
    """Mean step across 8x8 block boundaries over the mean step elsewhere (1.0: no grid; > 1: JPEG blocks).

    Measured on the stored pixel grid (before any resize or EXIF rotation), on at most a 1024x1024 crop.
    """
    g = g[:1024, :1024]
    h, w = g.shape
    if h < 2 * block or w < 2 * block:
        return 1.0
    ratios = []
    for d in (np.abs(np.diff(g, axis=1)).mean(axis=0), np.abs(np.diff(g, axis=0)).mean(axis=1)):
        idx = np.arange(len(d))
        at = (idx % block) == block - 1
        other = d[~at].mean()
        ratios.append(float(d[at].mean() / other) if other > 1e-3 else 1.0)
    return float(np.mean(ratios))


def jpeg_bytes_per_pixel(im, quality: int = 75) -> float:
    """Bytes per pixel of a transient JPEG re-encode at a fixed quality (a complexity / information proxy)."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return len(buf.getvalue()) / float(im.size[0] * im.size[1])


_BITS = {"1": 1, "L": 8, "P": 8, "RGB": 24, "RGBA": 32, "CMYK": 32, "YCbCr": 24, "LA": 16, "I;16": 16, "I": 32, "F": 32}


def ideal_bytes(width: int, height: int, mode: str) -> float:
    """Uncompressed size for the resolution and bit depth: W * H * channels * bitdepth / 8."""
    return width * height * _BITS.get(mode, 24) / 8.0


def _lab(rgb: np.ndarray) -> np.ndarray:
    c = rgb.astype(np.float32) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], np.float32)
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883], np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def colour_cast(rgb: np.ndarray) -> float:
    """Colour-cast factor K = D / M: the mean chroma offset (a*, b*) over the chroma spread (Xu et al.)."""
    lab = _lab(rgb[:: max(1, rgb.shape[0] // 128), :: max(1, rgb.shape[1] // 128)]).reshape(-1, 3)
    d = math.hypot(float(lab[:, 1].mean()), float(lab[:, 2].mean()))
    m = math.hypot(float(lab[:, 1].std()), float(lab[:, 2].std()))
    return d / max(m, 1.0)


# ---- duplicate-finding descriptors (computed from the small grey thumbnail) ----------------------------
THUMB = 48  # long side of the stored grey thumbnail
GRID = 6
# (size fraction, x anchor, y anchor): the whole image, then 90% and 95% crops at the corners and the centre.
REGIONS = [(1.0, 0.5, 0.5)] + [
    (f, ax, ay) for f in (0.9, 0.95) for ax, ay in ((0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5))
]


def region_descriptor(thumb: np.ndarray, region: tuple[float, float, float], grid: int = GRID) -> np.ndarray:
    """The zero-mean unit vector of one crop ``(size fraction, x anchor, y anchor)`` at ``grid`` x ``grid``."""
    import cv2

    t = thumb.astype(np.float32)
    h, w = t.shape
    f, ax, ay = region
    cw, ch = w * f, h * f
    x0, y0 = (w - cw) * ax, (h - ch) * ay
    sub = t[round(y0) : max(round(y0 + ch), round(y0) + 1), round(x0) : max(round(x0 + cw), round(x0) + 1)]
    v = cv2.resize(sub, (grid, grid), interpolation=cv2.INTER_AREA).ravel()
    v -= v.mean()
    n = np.linalg.norm(v)
    return v / n if n > 1e-3 else np.zeros_like(v)


def region_descriptors(thumb: np.ndarray) -> np.ndarray:
    """[len(REGIONS), GRID*GRID] zero-mean unit vectors of the thumbnail's crops (row 0: the whole image).

    A crop of up to 10% of an image is close to one of the original's region descriptors, so a k-NN of each
    region against every image's whole-image row finds crops as well as resized and re-encoded copies.
    """
    return np.stack([region_descriptor(thumb, r) for r in REGIONS])


def crop_match(a: np.ndarray, b: np.ndarray, lo: float = 0.86) -> float:
    """Best normalised correlation of ``b`` placed inside ``a`` at 86..100% of ``a``'s size (either way round).

    Invariant to brightness/contrast changes; a resized, re-encoded, colour-jittered or <=10%-cropped copy
    scores ~0.95+, unrelated images ~0.6 or less.
    """
    import cv2

    def one(x, y):
        hx, wx = x.shape
        hy, wy = y.shape
        best = -1.0
        for f in np.linspace(lo, 1.0, 8):
            if wy / wx >= hy / hx:
                nw, nh = f * wx, f * wx * hy / wy
            else:
                nh, nw = f * hx, f * hx * wy / hy
            nw, nh = int(round(nw)), int(round(nh))
            if nw > wx or nh > hx or nw < 6 or nh < 6:
                continue
            t = cv2.resize(y, (nw, nh), interpolation=cv2.INTER_AREA)
            if t.std() < 1e-3:
                continue
            r = cv2.matchTemplate(x, t, cv2.TM_CCOEFF_NORMED)
            best = max(best, float(np.nan_to_num(r, nan=-1.0).max()))
        return best

    a, b = a.astype(np.float32), b.astype(np.float32)
    return max(one(a, b), one(b, a))
