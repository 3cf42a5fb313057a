"""Reading a built cache: bucketed, token-budget batches that are deterministic, rank-sharded and resumable.

An epoch's batches are a pure function of ``(seed, epoch)``: per-source repeats, a shuffle inside each
bucket, packing to the token budget, the T2I/edit mix, then a shuffle of the batch order. Rank ``r`` of
``W`` takes batches ``r, r + W, ...`` of that list, cut to the same count on every rank. Caption choices
come from a generator seeded by ``(seed, epoch, batch index)``. The iterator's state is therefore just
``(epoch, position)`` and is the same on every rank (they step in lockstep), so saving rank 0's is enough.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter, OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zimage_core.weights import WeightSource

from .buckets import image_tokens, pack
from .cache import BUILD_HINT, MANIFEST, PLAN, read_json, shard_name, text_hash
from .captions import CaptionPolicy
from .config import DataConfig, DataError, describe_mismatch, digest
from .sources import sample_weights

log = logging.getLogger(__name__)

_SALT_EPOCH, _SALT_CAPTION = 0x5EED, 0xCA9
STATE_VERSION = 1


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 16, h, w] model-space float32, one bucket per batch
    cap_feats: list[torch.Tensor]  # B x [L_i, D]
    captions: list[str]  # chosen texts, "" when dropped
    kind: str  # "t2i" or "edit"
    ref_latents: list[list[torch.Tensor]] | None
    siglip: list[list[torch.Tensor]] | None
    keys: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, device, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device`` (dtypes unchanged)."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        def nested(x):
            return None if x is None else [[mv(t) for t in row] for row in x]

        return Batch(
            mv(self.latents),
            [mv(c) for c in self.cap_feats],
            list(self.captions),
            self.kind,
            nested(self.ref_latents),
            nested(self.siglip),
            list(self.keys),
        )


class CachedData:
    """An existing cache opened for training (raises :class:`DataError` saying how to build it when missing)."""

    def __init__(self, cfg: DataConfig):
        cfg.validate()
        self.cfg = cfg
        root = Path(cfg.cache_dir).expanduser()
        self.root = root
        man = read_json(root / MANIFEST, "cache manifest")
        if man is None:
            plan = read_json(root / PLAN, "cache build plan")
            if plan is not None:
                done = sum((root / shard_name(s)).is_file() for s in range(plan["n_shards"]))
                raise DataError(
                    f"the data cache at '{root}' is incomplete ({done} of {plan['n_shards']} shards; the build was "
                    "interrupted). Run the build again: it continues where it stopped."
                )
            raise DataError(f"no data cache at '{root}' (no {MANIFEST}): {BUILD_HINT}.")
        if man.get("fingerprint") != cfg.fingerprint():
            diff = describe_mismatch(man.get("identity", {}), cfg.cache_identity())
            raise DataError(
                f"the data cache at '{root}' was made for another data configuration ({diff}). Use a new cache_dir, "
                "or rebuild it: delete the folder and run again (build_cache(..., rebuild=True) in code)."
            )
        self.manifest = man
        self.samples: list[dict] = man["samples"]
        self.texts: dict[str, str] = man["texts"]
        self.store = WeightSource([root / s for s in man["shards"]], what="data cache", mapped=False)
        self.policy = CaptionPolicy(cfg.caption_levels, cfg.languages, cfg.caption_dropout)
        self.empty = text_hash("")
        self.weights = [float(s.get("weight", 1.0)) for s in cfg.sources]
        per_sample = sample_weights(cfg.sources)  # a manifest's 'weight' column (concept balance)
        self.sample_weights = [per_sample.get(s["key"], 1.0) for s in self.samples]
        self.tokens = [
            image_tokens(tuple(s["bucket"])) + sum(image_tokens(tuple(r)) for r in s["refs"]) for s in self.samples
        ]
        self._check_captions()
        self.kinds = sorted({s["kind"] for s in self.samples})
        if cfg.edit_ratio is not None and len(self.kinds) < 2:
            log.info("edit_ratio %.2f has no effect: the data holds only %s samples", cfg.edit_ratio, self.kinds[0])
        per_bucket = Counter(f"{s['bucket'][1]}x{s['bucket'][0]}" for s in self.samples)
        log.info(
            "data cache '%s': %d samples (%s) in %d buckets (%s)",
            root,
            len(self.samples),
            ", ".join(f"{n} {k}" for k, n in Counter(s["kind"] for s in self.samples).items()),
            len(per_bucket),
            ", ".join(f"{b}: {n}" for b, n in per_bucket.most_common(8)),
        )
        # the things an exact resume depends on besides the cache itself
        self.mix = digest(
            [
                cfg.token_budget,
                cfg.max_batch,
                self.weights,
                cfg.edit_ratio,
                cfg.caption_levels,
                cfg.languages,
                cfg.caption_dropout,
            ]
            + ([digest(self.sample_weights)] if per_sample else [])
        )
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def text_dim(self) -> int | None:
        return self.manifest.get("text_dim")

    def _check_captions(self) -> None:
        bad = [s for s in self.samples if not self.policy.options(s["captions"], s["primary"])]
        if bad:
            s = bad[0]
            have = {lv: sorted(langs) for lv, langs in s["captions"].items()}
            raise DataError(
                f"{len(bad)} of {len(self.samples)} cached samples have none of the configured caption levels "
                f"{sorted(self.policy.levels)} (languages {sorted(self.policy.languages)}), e.g. '{s['key']}' has "
                f'{have}. Add one of its levels to caption_levels ("caption" is the .txt caption).'
            )

    # ---- tensors ------------------------------------------------------------------------------------
    def text(self, h: str) -> torch.Tensor:
        """The cached embedding of the caption with hash ``h`` (shared with a small cache: do not modify in place)."""
        with self._lock:
            t = self._text_cache.get(h)
            if t is not None:
                self._text_cache.move_to_end(h)
                return t
        t = self.store[f"txt.{h}"]
        with self._lock:
            if h not in self._text_cache:
                self._text_cache[h] = t
                self._text_bytes += t.numel() * t.element_size()
            while self._text_bytes > 64 * 2**20 and len(self._text_cache) > 1:
                _, old = self._text_cache.popitem(last=False)
                self._text_bytes -= old.numel() * old.element_size()
        return t

    def load(self, idxs: list[int], kind: str, rng: np.random.Generator) -> Batch:
        """Batch of the samples ``idxs`` (one bucket), captions drawn from ``rng``."""
        ss = [self.samples[i] for i in idxs]
        latents = torch.stack([self.store[f"lat.{s['n']}"] for s in ss])
        feats, caps = [], []
        for s in ss:
            choice = self.policy.choose(s["captions"], s["primary"], rng)
            h = self.empty if choice is None else s["captions"][choice[0]][choice[1]]
            caps.append(self.texts[h])
            feats.append(self.text(h))
        refs = sig = None
        if kind == "edit":
            refs = [[self.store[f"ref.{s['n']}.{r}"] for r in range(len(s["refs"]))] for s in ss]
            if all(s["siglip"] for s in ss):
                sig = [[self.store[f"sig.{s['n']}.{r}"] for r in range(len(s["refs"]))] for s in ss]
        return Batch(latents, feats, caps, kind, refs, sig, [s["key"] for s in ss])

    # ---- the epoch plan ----------------------------------------------------------------------------
    def _kind_batches(self, kind: str, counts: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(self.samples):
            if s["kind"] == kind and counts[i]:
                groups[tuple(s["bucket"])] += [i] * int(counts[i])
        out = []
        for b in sorted(groups):
            members = np.asarray(groups[b])
            order = members[rng.permutation(len(members))].tolist()
            out += pack(order, self.tokens, self.cfg.token_budget, self.cfg.max_batch)
        return out

    def epoch_batches(self, seed: int, epoch: int) -> list[tuple[str, list[int]]]:
        """Every batch of an epoch over all ranks, in order: ``[(kind, sample indices)]``."""
        rng = np.random.default_rng([seed % 2**63, epoch, _SALT_EPOCH])
        w = np.asarray([self.weights[s["source"]] if s["source"] < len(self.weights) else 1.0 for s in self.samples])
        w = w * np.asarray(self.sample_weights)
        counts = np.floor(w).astype(int) + (rng.random(len(w)) < w - np.floor(w))
        per_kind = {k: self._kind_batches(k, counts, rng) for k in ("t2i", "edit")}
        r = self.cfg.edit_ratio
        t2i, edit = per_kind["t2i"], per_kind["edit"]
        if r is not None and t2i and edit:
            if len(edit) / (len(t2i) + len(edit)) < r:
                edit = self._extend(edit, max(1, round(len(t2i) * r / (1 - r))), "edit", counts, rng)
            else:
                t2i = self._extend(t2i, max(1, round(len(edit) * (1 - r) / r)), "t2i", counts, rng)
        batches = [("t2i", b) for b in t2i] + [("edit", b) for b in edit]
        return [batches[i] for i in rng.permutation(len(batches))]

    def _extend(self, batches, n: int, kind: str, counts, rng) -> list[list[int]]:
        out = list(batches)
        while len(out) < n:
            out += self._kind_batches(kind, np.maximum(counts, 1), rng)  # more passes, freshly shuffled
        return out[:n]

    def batches(self, seed: int, rank: int = 0, world_size: int = 1, prefetch: int = 1) -> BatchIterator:
        """An infinite, resumable iterator of this rank's batches (see :class:`BatchIterator`)."""
        return BatchIterator(self, seed, rank, world_size, prefetch)


class BatchIterator:
    """Infinite over epochs; ``state_dict()``/``load_state_dict()`` restore the exact position.

    ``prefetch`` batches are read ahead on a background thread; they are a pure function of their position,
    so reading ahead never changes what comes out or what the state says.
    """

    def __init__(self, data: CachedData, seed: int, rank: int = 0, world_size: int = 1, prefetch: int = 1):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}.")
        self.data, self.seed, self.rank, self.world_size = data, int(seed), rank, world_size
        self.epoch = 0
        self.position = 0  # batches of this epoch already returned on this rank
        self.prefetch = max(0, int(prefetch))
        self._plans: OrderedDict[int, list[tuple[str, list[int], int]]] = OrderedDict()
        self._pending: dict[tuple[int, int], Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # ---- plan ---------------------------------------------------------------------------------------
    def _plan(self, epoch: int) -> list[tuple[str, list[int], int]]:
        """This rank's batches of ``epoch``: ``(kind, indices, global batch index)``."""
        with self._lock:
            return self._plan_locked(epoch)

    def _plan_locked(self, epoch: int) -> list[tuple[str, list[int], int]]:
        if epoch not in self._plans:
            allb = self.data.epoch_batches(self.seed, epoch)
            per_rank = len(allb) // self.world_size
            if per_rank == 0:
                raise DataError(
                    f"epoch {epoch} has {len(allb)} batches, fewer than the {self.world_size} ranks; use more data, "
                    "a smaller token_budget or max_batch, or fewer ranks."
                )
            self._plans[epoch] = [(*allb[g], g) for g in range(self.rank, per_rank * self.world_size, self.world_size)]
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on this rank (the current epoch's; it varies only with fractional source weights)."""
        return len(self._plan(self.epoch))

    def _normalise(self, epoch: int, position: int) -> tuple[int, int]:
        while position >= len(self._plan(epoch)):
            position -= len(self._plan(epoch))
            epoch += 1
        return epoch, position

    def _make(self, epoch: int, position: int) -> Batch:
        kind, idxs, g = self._plan(epoch)[position]
        rng = np.random.default_rng([self.seed % 2**63, epoch, g, _SALT_CAPTION])
        return self.data.load(idxs, kind, rng)

    # ---- iteration ----------------------------------------------------------------------------------
    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        self.epoch, self.position = self._normalise(self.epoch, self.position)
        key = (self.epoch, self.position)
        fut = self._pending.pop(key, None)
        batch = fut.result() if fut is not None else self._make(*key)
        self.position += 1
        if self.prefetch:
            self._read_ahead()
        return batch

    def _read_ahead(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-data")
        e, p = self._normalise(self.epoch, self.position)
        wanted = []
        for _ in range(self.prefetch):
            wanted.append((e, p))
            e, p = self._normalise(e, p + 1)
        for k in [k for k in self._pending if k not in wanted]:
            self._pending.pop(k).cancel()
        for k in wanted:
            if k not in self._pending:
                self._pending[k] = self._pool.submit(self._make, *k)

    def close(self) -> None:
        """Stop the read-ahead thread (the iterator stays usable, reading synchronously until the next batch)."""
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the iterator is; identical on every rank, JSON-able."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "fingerprint": self.data.manifest["fingerprint"],
            "n_samples": len(self.data),
            "mix": self.data.mix,
        }

    def load_state_dict(self, d: dict) -> None:
        """Continue exactly where ``d`` was taken (from any rank of the run that saved it)."""
        if d.get("version") != STATE_VERSION:
            raise DataError(f"data loader state of version {d.get('version')!r}; this code reads {STATE_VERSION}.")
        if d["fingerprint"] != self.data.manifest["fingerprint"] or d["n_samples"] != len(self.data):
            raise DataError(
                "the saved data position belongs to another data cache (its fingerprint or sample count differs); "
                "resume with the same data configuration, or start the data from scratch."
            )
        self.close()
        self._plans.clear()
        if d["seed"] != self.seed:
            log.info("data loader: resuming with the saved seed %d (not %d)", d["seed"], self.seed)
        self.seed = int(d["seed"])
        epoch, position = int(d["epoch"]), int(d["position"])
        if d["world_size"] != self.world_size:
            position = math.ceil(position * d["world_size"] / self.world_size)
            log.warning(
                "data loader: resuming a %d-rank run on %d ranks; the position within the epoch is rescaled "
                "(not an exact resume).",
                d["world_size"],
                self.world_size,
            )
        if d["mix"] != self.data.mix:
            log.warning(
                "data loader: batching or caption options changed since the state was saved; the rest of "
                "epoch %d differs from the original run.",
                epoch,
            )
        self.epoch = epoch
        self.position = min(position, len(self._plan(epoch)))
