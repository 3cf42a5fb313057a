"""Training data: sources, aspect buckets, caption policy, the latent/text cache and the batch iterator.

Sources (``DataConfig.sources``, each ``{"type", "path", "weight"}``; ``weight`` = times each sample is seen
per epoch, fractional parts drawn per epoch):

- ``folder``: images (png/jpg/jpeg/webp/bmp, searched recursively) with sidecars ``img.txt`` (level
  ``"caption"``) and/or ``img.json`` holding levels, each a string or per-language mapping::

      {"tags": "...", "short": "...", "medium": "...", "long": {"en": "...", "zh": "..."}}

- ``edit_jsonl``: a ``.jsonl`` file (or a folder of them), one pair per line::

      {"source": "in.png" | ["ref1.png", "ref2.png"], "target": "out.png", "instruction": "make it red",
       "caption": "optional target caption" | {"long": ...}}

  paths relative to the JSONL file; the instruction is level ``"instruction"``, a string caption is level
  ``"target_caption"``.
- ``webdataset``: uncompressed tar shards (a folder, a file, a glob or ``shard-{000000..000009}.tar``),
  members grouped by key (``xxx.jpg``/``xxx.png`` + ``xxx.txt``/``xxx.json``), read with :mod:`tarfile`.
- ``manifest``: the data engine's ``manifest.parquet`` (or its folder), from ``python -m train.curate``:
  rows with ``keep`` false are skipped; captions from its ``caption`` column and/or sidecars; its ``weight``
  column (``curate balance``) multiplies the source weight per sample. Needs pyarrow.

Contract (what the training loop codes against)::

    @dataclass
    class DataConfig:
        sources: list[dict]          # {"type": "folder"|"edit_jsonl"|"webdataset"|"manifest", "path", "weight"}
        resolution: int = 256        # bucket area side (multiple of 16)
        aspect_buckets: bool = True  # False: square R x R only
        token_budget: int = 4096     # image tokens per batch, (h/16)*(w/16) per sample (+ its references)
        max_batch: int = 64
        caption_levels: dict = {"long": 1.0}   # level -> weight; "caption" is the .txt level
        languages: dict = {"en": 1.0}
        caption_dropout: float = 0.1           # the empty prompt "" (CFG's unconditional branch)
        edit_ratio: float | None = None        # fraction of edit batches when both kinds exist (stage2: 0.2)
        cache_dir: str = "cache"
        max_text_tokens: int = 512             # 0: no limit
        max_aspect: float = 3.0; shard_size: int = 256; encode_batch: int = 8; skip_bad_images: bool = False

    build_cache(cfg, vae, text_encoder, vision=None, progress=True, rebuild=False, rank=0, world_size=1) -> Path
        # vae.encode(pixels [B,3,H,W] in [-1,1]) -> model-space latents; text_encoder.encode(list[str],
        # max_length=...) -> list of [L_i, D]; vision(list[PIL]) -> list of [N, D] (optional). Encodes every
        # caption level/language present and the empty prompt once. Resumable; a complete matching cache is
        # reused at once (the encoders may then be None); a mismatching one is an error unless rebuild.
    class CachedData:                 # opens an existing cache; DataError (with how to build it) if missing
        def __init__(self, cfg: DataConfig): ...
        def batches(self, seed: int, rank: int = 0, world_size: int = 1, prefetch: int = 1) -> BatchIterator
        text_dim: int                 # D of the cached text embeddings
    class BatchIterator:              # infinite over epochs; iterator of Batch
        def __iter__(self); def __next__(self) -> Batch
        def state_dict(self) -> dict; def load_state_dict(self, d: dict) -> None   # exact resume
        epoch: int; position: int; steps_per_epoch: int; def close(self)
    @dataclass
    class Batch:
        latents: torch.Tensor            # [B, 16, h, w] model-space float32, one bucket per batch
        cap_feats: list[torch.Tensor]    # B x [L_i, D] (text encoder's dtype; the empty prompt on dropout)
        captions: list[str]              # the chosen caption texts ("" when dropped)
        kind: str                        # "t2i" or "edit"
        ref_latents: list[list[torch.Tensor]] | None   # edit: per sample, list of [16, h', w'] clean latents
        siglip: list[list[torch.Tensor]] | None        # edit with a vision encoder: per sample, [N, D] per ref
        keys: list[str]
        def to(self, device) -> Batch

Determinism: an epoch's batches depend only on (seed, epoch); rank r of W takes every W-th batch, the same
count on every rank, so ranks see disjoint batches. The iterator state is (epoch, position) and the same on
every rank. ``make_synthetic_dataset`` (in :mod:`train.data.synthetic`) writes a tiny labelled shape set.
"""

from .buckets import batch_size_for, image_tokens, make_buckets, nearest_bucket, resize_center_crop
from .cache import build_cache
from .captions import CaptionPolicy
from .config import DataConfig, DataError
from .loader import Batch, BatchIterator, CachedData
from .synthetic import make_synthetic_dataset

__all__ = [
    "Batch",
    "BatchIterator",
    "CachedData",
    "CaptionPolicy",
    "DataConfig",
    "DataError",
    "batch_size_for",
    "build_cache",
    "image_tokens",
    "make_buckets",
    "make_synthetic_dataset",
    "nearest_bucket",
    "resize_center_crop",
]
