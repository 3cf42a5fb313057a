"""The ``[curate]`` configuration: engine, thresholds and user-supplied models, validated up front.

A TOML file holds a ``[curate]`` table (other tables are ignored, so it can live in a training config)::

    [curate]
    engine = "local"            # "local" (plain loop) or "ray" (Ray Data; RAY_ADDRESS selects a cluster)
    shard_size = 256
    [curate.filters]            # a threshold set to a number rejects; leave it out to disable that check
    min_sharpness = 10.0
    [curate.dedup]
    embed_threshold = 0.95
    [curate.scores.aesthetic]   # a pluggable model score (see train.curate.plugins)
    kind = "image_classifier"; path = "models/aesthetic"; label = "good"; min = 0.5

Every option has a default; unknown keys are an error that names the valid ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from zimage_core.errors import ZImageError


class CurateError(ZImageError):
    """A curation input, option, model file or manifest is missing, malformed or does not fit."""


@dataclass
class Filters:
    """Rejection thresholds on profile columns (None: the check is off). See README, "Data engine"."""

    min_side: int | None = 32  # shorter side in pixels
    max_aspect: float | None = 6.0  # long side / short side
    min_std: float | None = 2.0  # grey-level standard deviation: below = a flat, empty image
    min_entropy: float | None = None  # grey-histogram entropy in bits (0..8)
    min_sharpness: float | None = 10.0  # variance of the Laplacian at the working size: below = blurred
    max_noise: float | None = None  # Immerkaer noise sigma (grey levels)
    max_border_score: float | None = 0.75  # fraction of sides framed by a uniform band (0, .25, ..., 1)
    max_blockiness: float | None = 2.2  # JPEG 8x8-grid edge strength / elsewhere: above = over-compressed
    max_compression_ratio: float | None = None  # ideal raw bytes / file bytes (lossy formats)
    min_jpeg_bytes_per_pixel: float | None = (
        None  # bytes per pixel of a q=75 JPEG re-encode: below = little information
    )
    max_colour_cast: float | None = None  # chroma mean / chroma spread (Lab): above = tinted
    max_text_area: float | None = None  # fraction of the image covered by OCR boxes


@dataclass
class Dedup:
    phash_max: int = 10  # pHash Hamming distance that makes a pair a duplicate candidate
    match_min: float = 0.85  # grey-thumbnail template match (normalised correlation) that confirms it
    candidate_min: float = 0.75  # crop-region descriptor similarity that makes a pair a candidate
    candidates: int = 8  # neighbours examined per image (pixel path)
    colour_max: float = 80.0  # mean-RGB distance (0..441) above which two images are never duplicates
    embed_threshold: float = 0.95  # embedding cosine that makes two images near-duplicates
    k: int = 10  # neighbours per image in the proximity graph
    index: str = "auto"  # "auto", "flat" (exact), "ivf" or "hnsw"
    exact_limit: int = 50_000  # "auto": exact search up to this many vectors, HNSW above
    resolution: float = 1.0  # Leiden resolution for the semantic communities
    rank_by: list = field(default_factory=list)  # columns (higher = better) that pick the member kept
    seed: int = 0


@dataclass
class Embed:
    model: str | None = None  # a SigLIP2 / CLIP folder (config.json, weights, preprocessor_config.json)
    batch: int = 16


@dataclass
class KG:
    prune_isolated: bool = True
    min_pagerank: float = 0.25  # keep nodes with PageRank >= this times the mean PageRank
    branching: list = field(default_factory=lambda: [8, 4])  # hierarchical k-means fan-out per level
    prompt_boost: float = 1.0  # weight multiplier 1 + prompt_boost * log1p(f) / log1p(f_max)
    parent_share: float = 0.5  # how much a taxonomy parent's rarity adds to its children's
    k1: float = 1.2
    b: float = 0.75
    weight_min: float = 0.2
    weight_max: float = 5.0


@dataclass
class EditPairs:
    sim_low: float = 0.6  # video frames: pairs at least this similar (same scene)...
    sim_high: float = 0.97  # ... and at most this (not the same frame)
    shot_threshold: float = 0.5  # consecutive frames less similar than this start a new shot
    max_gap: int = 30  # frames apart at most
    instructor: str | None = None  # "module:function" (source PIL, target PIL) -> instruction
    fonts: list = field(default_factory=list)  # .ttf/.otf files for rendered text edits (else system/Pillow)


@dataclass
class CurateConfig:
    engine: str = "local"
    shard_size: int = 256
    workers: int = 0  # parallel workers for the ray engine (0: all cores)
    work_size: int = 512  # pixel metrics are measured with the long side scaled down to this
    ocr: bool = True
    ocr_max_side: int = 960
    progress: bool = True
    filters: Filters = field(default_factory=Filters)
    dedup: Dedup = field(default_factory=Dedup)
    embed: Embed = field(default_factory=Embed)
    kg: KG = field(default_factory=KG)
    editpairs: EditPairs = field(default_factory=EditPairs)
    scores: dict = field(default_factory=dict)  # name -> {kind, path | entry, label, min, max, ...}
    caption: dict = field(default_factory=dict)  # {entry = "module:function", path = ..., ...}

    # ---- building --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, where: str = "[curate]") -> CurateConfig:
        cfg = _build(cls, d, where)
        cfg.validate(where)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict | None = None) -> CurateConfig:
        """The ``[curate]`` table of a TOML file (defaults when ``path`` is None), with ``overrides`` on top."""
        tree: dict = {}
        if path is not None:
            import tomllib

            p = Path(path).expanduser()
            if not p.is_file():
                raise CurateError(f"curation config '{p}' does not exist (a TOML file with a [curate] table).")
            try:
                doc = tomllib.loads(p.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as e:
                raise CurateError(f"'{p}' is not valid TOML: {e}") from e
            tree = doc.get("curate", {})
            if not isinstance(tree, dict):
                raise CurateError(f"'{p}': [curate] must be a table.")
        for k, v in (overrides or {}).items():
            if v is not None:
                tree[k] = v
        return cls.from_dict(tree, f"{path or 'defaults'} [curate]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self, *parts: str) -> str:
        """A short hash of the named sub-sections (what a stage's shards depend on)."""
        d = self.to_dict()
        keep = {p: d[p] for p in parts}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def validate(self, where: str = "[curate]") -> None:
        if self.engine not in ("local", "ray"):
            raise CurateError(f"{where}: engine must be 'local' or 'ray', got {self.engine!r}.")
        for name in ("shard_size", "work_size", "ocr_max_side"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise CurateError(f"{where}: {name} must be a positive integer, got {v!r}.")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise CurateError(f"{where}: workers must be >= 0 (0: all cores), got {self.workers!r}.")
        for f in dataclasses.fields(Filters):
            v = getattr(self.filters, f.name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise CurateError(f"{where}.filters: {f.name} must be a number or left out, got {v!r}.")
        dd = self.dedup
        if dd.index not in ("auto", "flat", "ivf", "hnsw"):
            raise CurateError(f"{where}.dedup: index must be auto, flat, ivf or hnsw, got {dd.index!r}.")
        if not 0.0 < dd.embed_threshold <= 1.0 or not -1.0 <= dd.match_min <= 1.0:
            raise CurateError(f"{where}.dedup: embed_threshold must be in (0, 1] and match_min in [-1, 1].")
        if dd.k < 1 or dd.candidates < 1 or not 0 <= dd.phash_max <= 64:
            raise CurateError(f"{where}.dedup: k and candidates must be >= 1 and phash_max in 0..64.")
        if not all(isinstance(c, str) for c in dd.rank_by):
            raise CurateError(f"{where}.dedup: rank_by must be a list of column names, got {dd.rank_by!r}.")
        if not all(isinstance(b, int) and b >= 2 for b in self.kg.branching) or not self.kg.branching:
            raise CurateError(f"{where}.kg: branching must be a list of integers >= 2, got {self.kg.branching!r}.")
        if not 0 < self.kg.weight_min <= 1 <= self.kg.weight_max:
            raise CurateError(f"{where}.kg: need 0 < weight_min <= 1 <= weight_max.")
        ep = self.editpairs
        if not -1.0 <= ep.sim_low < ep.sim_high <= 1.0:
            raise CurateError(
                f"{where}.editpairs: need -1 <= sim_low < sim_high <= 1, got {ep.sim_low}, {ep.sim_high}."
            )
        for name, spec in self.scores.items():
            if not isinstance(spec, dict) or "kind" not in spec:
                raise CurateError(
                    f"{where}.scores.{name}: needs a 'kind' (image_classifier, clip_mlp or plugin), got {spec!r}."
                )
            if spec["kind"] not in ("image_classifier", "clip_mlp", "plugin"):
                raise CurateError(
                    f"{where}.scores.{name}: kind {spec['kind']!r} is unknown; use image_classifier, clip_mlp "
                    "or plugin."
                )
        if self.caption and "entry" not in self.caption and "path" not in self.caption:
            raise CurateError(
                f"{where}.caption: give 'entry' (\"module:function\") and/or 'path' (the captioner's weights)."
            )


def _build(cls, d, where):
    if not isinstance(d, dict):
        raise CurateError(f"{where}: expected a table of options, got {type(d).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise CurateError(f"{where}: unknown option(s) {unknown}; valid options are {sorted(fields)}.")
    kw = {}
    for k, v in d.items():
        sub = _SUBSECTIONS.get(k) if cls is CurateConfig else None
        kw[k] = _build(sub, v, f"{where}.{k}") if sub is not None else v
    return cls(**kw)


_SUBSECTIONS = {"filters": Filters, "dedup": Dedup, "embed": Embed, "kg": KG, "editpairs": EditPairs}
