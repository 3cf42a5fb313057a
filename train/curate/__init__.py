"""The data engine: profile, deduplicate, balance and pair training images (``python -m train.curate``).

Stages (each writes into one output folder, resumable, ``engine = "local"`` or ``"ray"``):

- ``profile``: per image, decode check, size/aspect/format/EXIF, pHash/dHash, compression, border, JPEG
  re-encode size, entropy, blur, noise, colour cast, OCR (rapidocr), plug-in model scores and captions;
  the ``[curate.filters]`` thresholds decide ``keep`` and every rejection is a ``reasons`` entry.
- ``embed``: CLIP / SigLIP2 image embeddings from a user-supplied folder (or bring a ``.npy`` + ids).
- ``dedup``: pixel (pHash + crop-aware thumbnails) and embedding near-duplicates, Leiden clusters, the best
  member kept; semantic communities on the k-NN proximity graph.
- ``retrieve`` / ``density``: nearest images to a query; community sizes, sparse regions, concept voids.
- ``kg`` / ``balance``: PageRank-pruned knowledge graph, tag taxonomy, prompt-log boosts, BM25 rarity ->
  per-image ``weight`` (read by the trainer's ``manifest`` source).
- ``editpairs``: combinatorial + inverse pairs, video-frame pairs, rendered text-edit pairs (edit JSONL).
- ``report``: an HTML page with plots and image grids.

The manifest (``OUT/manifest.parquet``) is a training source: ``{type = "manifest", path = "OUT"}``.
"""

from .config import CurateConfig, CurateError

__all__ = ["CurateConfig", "CurateError"]
