"""The dedup stage: near-duplicate clusters from pixels (pHash + crop-aware thumbnails) and embeddings.

Candidates come from two k-NN searches over the profile manifest: pHash Hamming distance (faiss binary
index) and crop-region descriptors of the grey thumbnail (:func:`.metrics.region_descriptors`), and, with
embeddings, cosine >= ``embed_threshold``. A pixel candidate is confirmed by a brightness/contrast-invariant
template match of the two thumbnails (resized, re-encoded, colour-jittered and <=10%-cropped copies pass;
unrelated images do not), with a mean-colour guard. Confirmed pairs form the near-duplicate graph; its
Leiden communities are the duplicate clusters, and each keeps its best member (``rank_by`` columns, then
resolution, file size, sharpness). Embeddings also give the semantic ``community`` of every image.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from . import metrics as M
from . import vectors as V
from .config import CurateConfig, CurateError
from .manifest import MANIFEST, join_reasons, read_columns, rewrite, set_column, write_text
from .profile import thumb_array

log = logging.getLogger(__name__)

NEEDED = ["id", "path", "keep", "reasons", "decodes", "sha1", "phash", "thumb", "mean_r", "mean_g", "mean_b"]
QUALITY = ["width", "height", "file_bytes", "sharpness"]


def _phash_bits(hexes: list[str | None]) -> np.ndarray:
    out = np.zeros((len(hexes), 8), np.uint8)
    for i, h in enumerate(hexes):
        if h:
            out[i] = np.frombuffer(bytes.fromhex(h.rjust(16, "0")[-16:]), np.uint8)
    return out


def _popcount(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def pixel_pairs(cols: dict, opts, valid: np.ndarray) -> dict[tuple[int, int], str]:
    """Confirmed pixel near-duplicate pairs ``(i < j) -> evidence``."""
    f = V.faiss()
    rows = np.nonzero(valid)[0]
    n = len(rows)
    if n < 2:
        return {}
    k = min(opts.candidates, n - 1)
    cands: dict[tuple[int, int], int | tuple] = {}  # pHash distance, or (image, region, image) of the match
    # pHash Hamming neighbours
    bits = _phash_bits([cols["phash"][r] for r in rows])
    bindex = f.IndexBinaryFlat(64) if n <= 20 * opts.exact_limit else f.IndexBinaryHNSW(64, 16)  # popcounts are cheap
    bindex.add(bits)
    dist, idx = bindex.search(bits, k + 1)
    for a in range(n):
        for d, b in zip(dist[a], idx[a]):
            if b >= 0 and b != a and d <= opts.phash_max:
                cands[(min(a, b), max(a, b))] = int(d)

    # crop-region descriptor neighbours: every region of every image against every image's whole view (so a
    # copy cropped from an image, or an image cropped into a copy, meets it), in chunks: bounded memory
    def thumb(a):
        return thumb_array(cols["thumb"][int(rows[a])]).astype(np.float32)

    regions = np.zeros((n, len(M.REGIONS), M.GRID * M.GRID), np.float16)  # ~0.8 kB per image
    for a in range(n):
        regions[a] = M.region_descriptors(thumb(a))
    index = V.make_index(np.ascontiguousarray(regions[:, 0], dtype=np.float32), opts)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = 64
    chunk = 4096
    for c0 in range(0, n, chunk):
        regs = regions[c0 : c0 + chunk].astype(np.float32)
        nr = regs.shape[1]
        sims, idx = index.search(np.ascontiguousarray(regs.reshape(-1, regs.shape[2])), k + 1)
        sims, idx = sims.reshape(len(regs), nr * (k + 1)), idx.reshape(len(regs), nr * (k + 1))
        for q in range(len(regs)):
            a = c0 + q
            order = np.argsort(-sims[q], kind="stable")
            owners: dict[int, int] = {}
            for o in order:
                b, sv = int(idx[q, o]), sims[q, o]
                if sv < opts.candidate_min or len(owners) >= k:
                    break
                if b >= 0 and b != a and b not in owners:
                    owners[b] = int(o) // (k + 1)  # which region of a matched b's whole view
            for b, r in owners.items():
                cands.setdefault((min(a, b), max(a, b)), (a, r, b))
    rgb = np.stack([np.array([cols["mean_r"][r], cols["mean_g"][r], cols["mean_b"][r]]) for r in rows])
    out = {}
    for (a, b), hd in sorted(cands.items()):
        ra, rb = int(rows[a]), int(rows[b])
        if isinstance(hd, tuple):  # a cheap finer look at the matched region first (most candidates end here)
            qa, r, qb = hd
            fine = float(
                M.region_descriptor(thumb(qa), M.REGIONS[r], 12) @ M.region_descriptor(thumb(qb), M.REGIONS[0], 12)
            )
            if fine < 0.6 and cols["sha1"][ra] != cols["sha1"][rb]:
                continue
            hd = _popcount(bits[a], bits[b])
        if cols["sha1"][ra] == cols["sha1"][rb]:
            out[(ra, rb)] = "identical bytes"
            continue
        cdist = float(np.linalg.norm(rgb[a] - rgb[b]))
        if cdist > opts.colour_max:
            continue
        ta, tb = thumb(a), thumb(b)
        flat_a, flat_b = ta.std() < 2.0, tb.std() < 2.0
        if flat_a or flat_b:
            if flat_a and flat_b and cdist <= 8.0:
                out[(ra, rb)] = f"flat, colour distance {cdist:.1f}"
            continue
        m = M.crop_match(ta, tb)
        if m >= opts.match_min:
            out[(ra, rb)] = f"pHash distance {hd}, thumbnail match {m:.3f}"
    return out


def _rank_key(cols: dict, r: int, rank_by: list[str]):
    def num(c):
        v = cols[c][r]
        return -float(v) if v is not None and v == v else float("inf")

    w, h = cols["width"][r] or 0, cols["height"][r] or 0
    return (
        not cols["decodes"][r],
        not cols["keep"][r],
        *[num(c) for c in rank_by],
        -(w * h),
        -(cols["file_bytes"][r] or 0),
        num("sharpness"),
        cols["id"][r],
    )


def run_dedup(manifest, out, cfg: CurateConfig, embeddings=None, ids=None) -> Path:
    """Add ``keep``/``reasons``/``duplicate_of``/``cluster``/``community``/``knn_sim`` to a profile manifest.

    ``manifest``: the profile manifest; the result is written to ``out/manifest.parquet`` (may be the same file).
    """
    opts = cfg.dedup
    cols = read_columns(manifest, NEEDED + QUALITY, optional=tuple(opts.rank_by))
    missing = [c for c in opts.rank_by if c not in cols]
    if missing:
        raise CurateError(f"[curate.dedup] rank_by names column(s) {missing} that the manifest lacks.")
    n = len(cols["id"])
    valid = np.array([bool(d) and t is not None for d, t in zip(cols["decodes"], cols["thumb"])])
    pairs = pixel_pairs(cols, opts, valid)
    log.info("dedup: %d confirmed pixel near-duplicate pairs among %d images", len(pairs), n)
    community = np.full(n, -1, np.int64)
    knn_sim = np.full(n, np.nan)
    if embeddings is not None:
        x, emb_ids = V.load_embeddings(embeddings, ids)
        if emb_ids is None:
            if len(x) != n:
                raise CurateError(
                    f"'{embeddings}' has {len(x)} rows but the manifest {n}; give --ids (one id per row)."
                )
            row_of = np.arange(n)
        else:
            row_of = V.align(emb_ids, cols["id"], cols["path"])
        have = np.nonzero(row_of >= 0)[0]
        xs = x[row_of[have]]
        labels, sims, idx = V.communities(xs, opts)
        community[have] = labels
        knn_sim[have] = np.nanmean(np.where(np.isfinite(sims), sims, np.nan), axis=1)
        emb_edges = 0
        for (a, b), s in V.edges_from_knn(sims, idx, opts.embed_threshold).items():
            ra, rb = int(have[a]), int(have[b])
            key = (min(ra, rb), max(ra, rb))
            if key not in pairs:
                pairs[key] = f"embedding cosine {s:.3f}"
                emb_edges += 1
        log.info("dedup: %d more near-duplicate pairs from embeddings; %d communities", emb_edges, labels.max() + 1)
    clusters = V.leiden(V.graph(n, {k: 1.0 for k in pairs}), 1.0, opts.seed) if pairs else np.arange(n)
    keep = np.asarray(cols["keep"], dtype=bool).copy()
    duplicate_of = [""] * n
    extra = [""] * n
    groups: dict[int, list[int]] = {}
    for r, c in enumerate(clusters):
        groups.setdefault(int(c), []).append(r)
    evidence = {}
    for (a, b), e in pairs.items():
        evidence[(a, b)] = evidence[(b, a)] = e
    summary = []
    for members in groups.values():
        if len(members) < 2:
            continue
        best = min(members, key=lambda r: _rank_key(cols, r, opts.rank_by))
        summary.append({"kept": cols["id"][best], "duplicates": [cols["id"][r] for r in members if r != best]})
        for r in members:
            if r == best:
                continue
            keep[r] = False
            duplicate_of[r] = cols["path"][best]
            why = evidence.get((r, best), "same near-duplicate cluster")
            extra[r] = f"duplicate: of {cols['id'][best]} ({why})"
    reasons = [join_reasons(cols["reasons"][r], extra[r]) for r in range(n)]

    def update(off, rb):
        import pyarrow as pa

        t = pa.Table.from_batches([rb])
        s = slice(off, off + rb.num_rows)
        t = set_column(t, "keep", keep[s].tolist(), pa.bool_())
        t = set_column(t, "reasons", reasons[s], pa.string())
        t = set_column(t, "duplicate_of", duplicate_of[s], pa.string())
        t = set_column(t, "cluster", clusters[s].tolist(), pa.int64())
        t = set_column(t, "community", community[s].tolist(), pa.int64())
        return set_column(t, "knn_sim", [None if v != v else float(v) for v in knn_sim[s]], pa.float64())

    out = Path(out).expanduser()
    dest = rewrite(manifest, out / MANIFEST, update)
    write_text(
        out / "dedup.json",
        json.dumps(
            {
                "images": n,
                "kept": int(keep.sum()),
                "duplicates": int(sum(bool(d) for d in duplicate_of)),
                "clusters": sorted(summary, key=lambda s: -len(s["duplicates"])),
                "communities": int(community.max() + 1) if embeddings is not None else None,
            },
            indent=1,
        ),
    )
    log.info(
        "dedup: %d duplicates in %d clusters; %d of %d kept", sum(map(bool, duplicate_of)), len(summary), keep.sum(), n
    )
    return dest
