"""The data configuration, its validation and the fingerprint that ties a cache to it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from zimage_core.config import PIXEL_MULTIPLE
from zimage_core.errors import ZImageError

SOURCE_TYPES = ("folder", "edit_jsonl", "webdataset", "manifest")
# Caption levels that are always encoded into a cache (plus any level named in ``caption_levels``), so that
# changing the mixing weights never needs a rebuild. Other JSON keys (url, width, ...) are metadata.
KNOWN_LEVELS = (
    "caption",
    "tags",
    "short",
    "medium",
    "long",
    "detailed",
    "user",
    "user_prompt",
    "prompt",
    "alt",
    "alt_text",
    "text",
    "instruction",
    "target_caption",
)
CACHE_VERSION = 1


class DataError(ZImageError):
    """A dataset, a sidecar caption, an edit-pair file or a cache is missing, malformed or does not fit."""


@dataclass
class DataConfig:
    """What to train on and how to batch it (see :mod:`train.data` for the whole contract).

    ``sources``: ``{"type": "folder"|"edit_jsonl"|"webdataset"|"manifest", "path": str, "weight": 1.0}``;
    ``weight`` is how many times each sample of that source is seen per epoch (fractional parts are drawn per
    epoch); a ``manifest`` source's per-image ``weight`` column multiplies it.
    Fields that change the cached tensors (sources' types and paths, resolution, bucketing, text length,
    shard size, the encoded caption levels) form the cache fingerprint; the others (weights, mixing,
    dropout, batch sizes, edit ratio) can change between runs on the same cache.
    """

    sources: list[dict] = field(default_factory=list)
    resolution: int = 256
    aspect_buckets: bool = True
    token_budget: int = 4096
    max_batch: int = 64
    caption_levels: dict = field(default_factory=lambda: {"long": 1.0})
    languages: dict = field(default_factory=lambda: {"en": 1.0})
    caption_dropout: float = 0.1
    edit_ratio: float | None = None
    cache_dir: str = "cache"
    max_text_tokens: int = 512
    # additions beyond the contract
    max_aspect: float = 3.0  # widest bucket is max_aspect:1 (and 1:max_aspect)
    shard_size: int = 256  # samples per cache shard
    encode_batch: int = 8  # images per VAE call while caching
    skip_bad_images: bool = False  # True: leave unreadable images out of the cache (logged) instead of stopping

    @classmethod
    def from_dict(cls, d: dict, where: str = "data config") -> DataConfig:
        """Build from a plain dict (a YAML/JSON section); unknown keys are an error."""
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a mapping of data options, got {type(d).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(f"{where}: unknown option(s) {unknown}; valid options are {sorted(names)}.")
        cfg = cls(**d)
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, where: str = "data config") -> None:
        """Raise :class:`DataError` naming the first bad option."""
        if not self.sources:
            raise DataError(f'{where}: \'sources\' is empty; add e.g. {{"type": "folder", "path": "my_images"}}.')
        for i, s in enumerate(self.sources):
            if not isinstance(s, dict) or "path" not in s or "type" not in s:
                raise DataError(f"{where}: source {i} must be a mapping with 'type' and 'path', got {s!r}.")
            if s["type"] not in SOURCE_TYPES:
                raise DataError(f"{where}: source {i} has type {s['type']!r}; use one of {list(SOURCE_TYPES)}.")
            extra = sorted(set(s) - {"type", "path", "weight"})
            if extra:
                raise DataError(f"{where}: source {i} has unknown key(s) {extra}; allowed: type, path, weight.")
            w = s.get("weight", 1.0)
            if not isinstance(w, (int, float)) or w < 0:
                raise DataError(f"{where}: source {i} weight must be a number >= 0, got {w!r}.")
        r = self.resolution
        if not isinstance(r, int) or r < PIXEL_MULTIPLE or r % PIXEL_MULTIPLE:
            raise DataError(
                f"{where}: resolution {r!r} must be a positive multiple of {PIXEL_MULTIPLE} (e.g. 256, 512)."
            )
        for name in ("token_budget", "max_batch", "shard_size", "encode_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise DataError(f"{where}: {name} must be a positive integer, got {v!r}.")
        if not isinstance(self.max_text_tokens, int) or self.max_text_tokens < 0:
            raise DataError(f"{where}: max_text_tokens must be >= 1 (or 0 for no limit), got {self.max_text_tokens!r}.")
        if not self.max_aspect >= 1.0:
            raise DataError(f"{where}: max_aspect must be >= 1, got {self.max_aspect!r}.")
        for name in ("caption_levels", "languages"):
            d = getattr(self, name)
            if not isinstance(d, dict) or not d:
                raise DataError(f"{where}: {name} must be a non-empty mapping name -> weight, got {d!r}.")
            bad = {k: v for k, v in d.items() if not isinstance(v, (int, float)) or v < 0}
            if bad or sum(d.values()) <= 0:
                raise DataError(f"{where}: {name} weights must be >= 0 with a positive sum, got {d!r}.")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise DataError(f"{where}: caption_dropout must be in [0, 1], got {self.caption_dropout!r}.")
        if self.edit_ratio is not None and not 0.0 < self.edit_ratio < 1.0:
            raise DataError(f"{where}: edit_ratio must be in (0, 1) or null, got {self.edit_ratio!r}.")

    # ---- cache identity ------------------------------------------------------------------------
    def encoded_levels(self) -> list[str]:
        return sorted(set(KNOWN_LEVELS) | set(self.caption_levels))

    def cache_identity(self) -> dict:
        """The options that determine what a cache holds (compared field by field on reuse)."""
        return {
            "version": CACHE_VERSION,
            "sources": [{"type": s["type"], "path": str(Path(s["path"]).expanduser().resolve())} for s in self.sources],
            "resolution": self.resolution,
            "aspect_buckets": self.aspect_buckets,
            "max_aspect": float(self.max_aspect) if self.aspect_buckets else None,
            "max_text_tokens": self.max_text_tokens,
            "shard_size": self.shard_size,
            "levels": self.encoded_levels(),
        }

    def fingerprint(self) -> str:
        return digest(self.cache_identity())


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def describe_mismatch(old: dict, new: dict) -> str:
    """'resolution: 256 -> 512; levels: [...] -> [...]' for the fields that differ."""
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(parts) or "no field differs (a different cache version?)"
