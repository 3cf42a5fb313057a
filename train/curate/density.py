"""Retrieval (nearest images to a text/image query) and the density report (sparse regions, concept voids)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from . import vectors as V
from .config import CurateConfig, CurateError
from .manifest import read_columns, write_text

log = logging.getLogger(__name__)


def _aligned(out: Path, embeddings, ids):
    if embeddings is None:
        raise CurateError(
            f"no embeddings for '{out}': run `python -m train.curate embed --model DIR` or pass --embeddings FILE.npy "
            "--ids FILE.txt."
        )
    cols = read_columns(out, ["id", "path"], optional=("caption", "ocr_text", "tags"))
    x, emb_ids = V.load_embeddings(embeddings, ids)
    n = len(cols["id"])
    if emb_ids is None:
        if len(x) != n:
            raise CurateError(f"'{embeddings}' has {len(x)} rows but the manifest {n}; give --ids.")
        rows = np.arange(n)
    else:
        rows = V.align(emb_ids, cols["id"], cols["path"])
    have = np.nonzero(rows >= 0)[0]
    return cols, have, x[rows[have]]


def _label(cols: dict, r: int) -> str:
    for c in ("tags", "caption", "ocr_text"):
        v = cols.get(c, [None] * (r + 1))[r]
        if v:
            return str(v).replace("\n", " ")[:80]
    return Path(cols["id"][r]).stem


def run_density(out, cfg: CurateConfig, embeddings, ids, concepts=None, concept_names=None, void_threshold=0.3) -> dict:
    out = Path(out).expanduser()
    cols, have, x = _aligned(out, embeddings, ids)
    labels, sims, _ = V.communities(x, cfg.dedup)
    rep = V.density(sims, labels, [_label(cols, int(r)) for r in have])
    rep.pop("local_density")
    rep["outliers"] = [cols["id"][int(have[i])] for i in rep.pop("outlier_rows")]
    if concepts is not None:
        if not concept_names:
            raise CurateError("--concepts needs --concept-names (one name per row).")
        c, names = V.load_embeddings(concepts, concept_names)
        if c.shape[1] != x.shape[1]:
            raise CurateError(f"concept vectors are {c.shape[1]}-d but image embeddings {x.shape[1]}-d.")
        rep["concepts"] = V.concept_voids(x, c, names, void_threshold)
        rep["voids"] = [d["concept"] for d in rep["concepts"] if d["images"] == 0]
    write_text(out / "density.json", json.dumps(rep, indent=1))
    log.info(
        "density: %d communities, %d sparse (%s)",
        len(rep["communities"]),
        len(rep["sparse"]),
        ", ".join(rep["sparse"][:5]),
    )
    return {"density": str(out / "density.json"), "sparse": rep["sparse"][:20], "voids": rep.get("voids", [])}


def run_retrieve(out, cfg: CurateConfig, embeddings, ids, args) -> dict:
    out = Path(out).expanduser()
    cols, have, x = _aligned(out, embeddings, ids)
    if args.query_npy:
        q = np.load(Path(args.query_npy).expanduser())
        q = q[None] if q.ndim == 1 else q
        what = args.query_npy
    else:
        from .plugins import Embedder

        emb = Embedder(args.model or cfg.embed.model, "retrieval model (--model)")
        if args.query_text:
            q, what = emb.texts([args.query_text]), args.query_text
        else:
            from PIL import Image

            p = Path(args.query_image).expanduser()
            if not p.is_file():
                raise CurateError(f"query image '{p}' does not exist.")
            q, what = emb.images([Image.open(p).convert("RGB")]), str(p)
    if q.shape[1] != x.shape[1]:
        raise CurateError(f"the query is {q.shape[1]}-d but the image embeddings are {x.shape[1]}-d.")
    sims, idx = V.retrieve(x, q, args.k, cfg.dedup)
    hits = [
        {"id": cols["id"][int(have[j])], "path": cols["path"][int(have[j])], "score": float(s)}
        for s, j in zip(sims[0], idx[0])
        if j >= 0
    ]
    write_text(out / "retrieval.json", json.dumps({"query": what, "hits": hits}, indent=1))
    return {"query": what, "hits": hits}
