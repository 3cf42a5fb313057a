"""``OUT/report.html``: one self-contained page (inline SVG plots, inline JPEG thumbnails).

Sections: counts and rejection reasons; histograms of the profile measurements with the configured
thresholds; the largest duplicate clusters (kept image first); a sample of rejected images with their
reasons; community sizes and the density report's sparse regions when present.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from .manifest import MANIFEST, REASON_SEP, open_manifest, write_text

PLOTS = [
    ("sharpness", True),
    ("noise", False),
    ("entropy", False),
    ("border_score", False),
    ("blockiness", False),
    ("jpeg_bytes_per_pixel", False),
    ("colour_cast", False),
    ("text_area", False),
    ("knn_sim", False),
    ("weight", False),
]


def _thumb(path: str, side: int = 112) -> str | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # a broken file is shown as a placeholder
        return None


def _card(path: str, caption: str) -> str:
    src = _thumb(path)
    img = f'<img src="{src}">' if src else '<div class="bad">no preview</div>'
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def svg_histogram(values, title: str, log: bool = False, bins: int = 30, width: int = 320, height: int = 150) -> str:
    v = np.asarray([x for x in values if x is not None and x == x and (x > 0 or not log)], dtype=np.float64)
    if len(v) == 0:
        return ""
    if log:
        v = np.log10(v)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    top = max(1, counts.max())
    bw = (width - 20) / bins
    bars = "".join(
        f'<rect x="{10 + i * bw:.1f}" y="{height - 25 - c / top * (height - 45):.1f}" width="{bw - 1:.1f}" '
        f'height="{c / top * (height - 45):.1f}" fill="#4a7ab8"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    fmt = (lambda x: f"1e{x:.1f}") if log else (lambda x: f"{x:.3g}")
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg"><text x="10" y="14" '
        f'font-size="12">{html.escape(title)}{" (log10)" if log else ""}, n={len(v)}</text>{bars}'
        f'<text x="10" y="{height - 8}" font-size="10">{fmt(lo)}</text>'
        f'<text x="{width - 10}" y="{height - 8}" font-size="10" text-anchor="end">{fmt(hi)}</text></svg>'
    )


def svg_bars(labels: list[str], counts: list[int], title: str, width: int = 660) -> str:
    if not counts:
        return ""
    h = 18 * len(counts) + 24
    top = max(counts)
    rows = "".join(
        f'<text x="0" y="{32 + i * 18}" font-size="11">{html.escape(lab[:40])}</text>'
        f'<rect x="260" y="{21 + i * 18}" width="{max(1.0, c / top * (width - 320)):.1f}" height="14" fill="#b8674a"/>'
        f'<text x="{265 + c / top * (width - 320):.1f}" y="{32 + i * 18}" font-size="11">{c}</text>'
        for i, (lab, c) in enumerate(zip(labels, counts))
    )
    return f'<svg width="{width}" height="{h}" xmlns="http://www.w3.org/2000/svg"><text x="0" y="12" font-size="12">{html.escape(title)}</text>{rows}</svg>'


def write_report(out, max_clusters: int = 12, max_rejects: int = 40) -> Path:
    out = Path(out).expanduser()
    pf = open_manifest(out)
    names = [c for c in pf.schema_arrow.names if c != "thumb"]
    t = pf.read(columns=names)
    cols = {c: t.column(c).to_pylist() for c in names}
    n = len(cols["id"])
    kept = sum(bool(k) for k in cols["keep"])
    codes = Counter(r.split(":")[0] for rs in cols["reasons"] for r in (rs.split(REASON_SEP) if rs else []))
    parts = [
        "<!doctype html><meta charset='utf-8'><title>zimage data engine report</title><style>"
        "body{font-family:sans-serif;margin:20px}figure{display:inline-block;margin:4px;width:120px;vertical-align:top}"
        "figure img{max-width:112px;max-height:112px}figcaption{font-size:10px;word-break:break-all}"
        ".row{border-bottom:1px solid #ccc;padding:4px}.bad{width:112px;height:60px;background:#eee;font-size:10px}"
        "</style>",
        f"<h1>Data engine report</h1><p>{n} images, {kept} kept, {n - kept} rejected.</p>",
        svg_bars([c for c, _ in codes.most_common()], [v for _, v in codes.most_common()], "rejections by reason"),
        "<h2>Measurements</h2>",
    ]
    for col, log in PLOTS:
        if col in cols:
            parts.append(svg_histogram(cols[col], col, log))
    dd = out / "dedup.json"
    if dd.is_file():
        info = json.loads(dd.read_text(encoding="utf-8"))
        path_of = dict(zip(cols["id"], cols["path"]))
        parts.append(
            f"<h2>Duplicate clusters</h2><p>{info['duplicates']} duplicates in {len(info['clusters'])} clusters; largest first.</p>"
        )
        for c in info["clusters"][:max_clusters]:
            cards = [_card(path_of.get(c["kept"], ""), "kept: " + c["kept"])]
            cards += [_card(path_of.get(d, ""), d) for d in c["duplicates"][:9]]
            parts.append(f'<div class="row">{"".join(cards)}</div>')
    rejects = [i for i in range(n) if not cols["keep"][i] and not (cols.get("duplicate_of") or [""] * n)[i]]
    parts.append(f"<h2>Rejected (not duplicates): {len(rejects)}</h2><div>")
    step = max(1, len(rejects) // max_rejects)
    parts += [_card(cols["path"][i], f"{cols['id'][i]}: {cols['reasons'][i]}") for i in rejects[::step][:max_rejects]]
    parts.append("</div>")
    if "community" in cols and any(c is not None and c >= 0 for c in cols["community"]):
        sizes = Counter(c for c in cols["community"] if c is not None and c >= 0)
        big = sizes.most_common(25)
        parts.append(
            "<h2>Communities</h2>"
            + svg_bars([f"community {c}" for c, _ in big], [v for _, v in big], f"{len(sizes)} communities, largest 25")
        )
    dens = out / "density.json"
    if dens.is_file():
        info = json.loads(dens.read_text(encoding="utf-8"))
        items = "".join(f"<li>{html.escape(s)}</li>" for s in info.get("sparse", [])[:30])
        parts.append(f"<h2>Sparse regions</h2><ul>{items}</ul>")
        if info.get("voids"):
            parts.append(
                "<h3>Concept voids</h3><ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in info["voids"]) + "</ul>"
            )
    if "weight" in cols:
        w = [x for x in cols["weight"] if x]
        if w:
            parts.append(
                f"<p>sampling weights: min {min(w):.3g}, median {float(np.median(w)):.3g}, max {max(w):.3g}; entropy of the mix {(-sum(x / sum(w) * math.log(x / sum(w)) for x in w)):.3g} nats</p>"
            )
    return write_text(out / "report.html", "\n".join(parts))


__all__ = ["MANIFEST", "write_report"]
