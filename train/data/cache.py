"""The latent and text-embedding cache: built once into safetensors shards, resumable, reused across runs.

Layout of ``cache_dir``::

    build.json                     the plan of a build under way: fingerprint, listing, encoders, shard count
    shard-00000.safetensors ...    written atomically; a shard file that exists is complete and never recomputed
    manifest.json                  written last: samples (bucket, captions by level/language, shard), texts

Tensor keys: ``lat.<n>`` target latent ``[16, h, w]`` (model space, float32), ``ref.<n>.<r>`` clean reference
latents of edit pairs, ``sig.<n>.<r>`` SigLIP features of the references (when a ``vision`` encoder was
given), ``txt.<hash>`` one text embedding ``[L, D]`` per distinct caption (the empty prompt included),
stored in the dtype the text encoder produced. ``<n>`` is the sample's index in the build plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from zimage_core.vae import pil_to_tensor
from zimage_core.weights import save_safetensors

from .buckets import make_buckets, nearest_bucket, resize_center_crop
from .config import DataConfig, DataError, describe_mismatch, digest
from .sources import Item, scan_source, source_signature

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PLAN = "build.json"
BUILD_HINT = (
    "build it with train.data.build_cache(cfg, vae, text_encoder) (the training entry point does this on its "
    "first run), or point cache_dir at an existing cache"
)


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(
            f"the {what} '{path}' is unreadable ({e}); delete the cache folder and run again (it is rebuilt; build_cache(..., rebuild=True) in code)."
        ) from e


def shard_metadata(path: Path) -> dict:
    """The JSON index a shard carries in its safetensors metadata."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return json.loads(header["__metadata__"]["index"])
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"the cache shard '{path}' is unreadable ({e}); delete it and run the build again.") from e


# ---- encoder identity ------------------------------------------------------------------------------
def encoder_signature(obj) -> dict | None:
    """Type, parameter shapes and a few probe values of an encoder (None when it has no weights to look at)."""
    if obj is None:
        return None
    module = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "model", None)
    if not isinstance(module, torch.nn.Module):
        return {"type": type(obj).__name__, "shapes": None, "probe": []}
    params = list(module.parameters())
    shapes = digest([[n, list(p.shape)] for n, p in module.named_parameters()])
    pick = np.linspace(0, len(params) - 1, num=min(16, len(params))).round().astype(int) if params else []
    probe = [float(params[i].detach().flatten()[params[i].numel() // 2].float()) for i in pick]
    return {"type": type(obj).__name__, "shapes": shapes, "probe": probe}


def _same_encoder(old: dict | None, new: dict | None) -> bool:
    """Equal parameter shapes, probe values equal to bf16 precision (a dtype change is the same encoder).

    Unknown on either side (not loaded because the cache is complete, or no weights to look at) counts as equal;
    the type name is recorded for messages only, so a wrapper around the same module is the same encoder.
    """
    if old is None or new is None or old.get("shapes") is None or new.get("shapes") is None:
        return True
    if old["shapes"] != new["shapes"] or len(old["probe"]) != len(new["probe"]):
        return False
    return bool(np.allclose(old["probe"], new["probe"], rtol=2e-2, atol=1e-3))


def _same_encoders(old: list, new: list) -> bool:
    return all(_same_encoder(a, b) for a, b in zip(old, new))


# ---- the plan -----------------------------------------------------------------------------------------
def _plan(items: list[Item], shard_size: int) -> tuple[list[list[int]], list[list[str]]]:
    """Shards of consecutive items, and per shard the captions first seen there (the empty prompt in shard 0)."""
    shards = [list(range(i, min(i + shard_size, len(items)))) for i in range(0, len(items), shard_size)]
    seen: set[str] = set()
    texts = []
    for s, idxs in enumerate(shards):
        new = [""] if s == 0 else []
        seen.update(new)
        for i in idxs:
            for t in items[i].texts():
                if t not in seen:
                    seen.add(t)
                    new.append(t)
        texts.append(new)
    return shards, texts


def _clear(root: Path) -> None:
    for p in [root / MANIFEST, root / PLAN, *root.glob("shard-*.safetensors"), *root.glob("*.tmp")]:
        p.unlink(missing_ok=True)


def _check(record: dict, what: str, root: Path, fp: str, identity: dict, listing: str | None, encoders: list) -> None:
    hint = "Use a new cache_dir, or rebuild this one: delete the folder and run again (build_cache(..., rebuild=True) in code)."
    if record.get("fingerprint") != fp:
        diff = describe_mismatch(record.get("identity", {}), identity)
        raise DataError(f"the {what} at '{root}' was made for another data configuration ({diff}). {hint}")
    if listing is not None and record.get("listing") != listing:
        raise DataError(
            f"the sources changed since the {what} at '{root}' was made (images or captions added, removed or "
            f"edited). {hint}"
        )
    old_enc = record.get("encoders") or [None, None, None]
    if old_enc[2] is None and encoders[2] is not None:
        raise DataError(
            f"the {what} at '{root}' was made without SigLIP features, but a vision encoder was given. {hint}"
        )
    if not _same_encoders(old_enc, encoders):
        raise DataError(
            f"the {what} at '{root}' was made with other encoders (VAE, text or vision weights differ). {hint}"
        )


# ---- building ---------------------------------------------------------------------------------------
def build_cache(
    cfg: DataConfig,
    vae,
    text_encoder,
    vision=None,
    progress: bool = True,
    rebuild: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Encode every sample once into ``cfg.cache_dir``; returns that folder.

    A complete cache whose fingerprint, source listing and encoders match is reused at once (the encoders
    may then be None). An interrupted build continues where it stopped: finished shards are kept. A cache
    made for another configuration is an error unless ``rebuild``. With ``world_size > 1`` each rank
    encodes the shards ``i % world_size == rank``; the manifest is written by whichever call finds every
    shard done (call again on one rank after a barrier).
    """
    cfg.validate()
    root = Path(cfg.cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    if rebuild:
        _clear(root)
    identity, fp = cfg.cache_identity(), cfg.fingerprint()
    levels = set(cfg.encoded_levels())
    encoders = [encoder_signature(vae), encoder_signature(text_encoder), encoder_signature(vision)]
    scanned: dict[int, list[Item]] = {}
    sigs = []
    for i, spec in enumerate(cfg.sources):
        if spec["type"] != "webdataset":
            scanned[i] = scan_source(i, spec, levels)
        sigs.append(source_signature(i, spec, levels, scanned.get(i)))
    listing = digest(sigs)

    manifest = read_json(root / MANIFEST, "cache manifest")
    if manifest is not None:
        _check(manifest, "cache", root, fp, identity, listing, encoders)
        log.info("reusing the data cache at '%s' (%d samples)", root, len(manifest["samples"]))
        return root
    plan_rec = read_json(root / PLAN, "cache build plan")
    if plan_rec is not None:
        _check(plan_rec, "interrupted cache build", root, fp, identity, listing, encoders)
    elif any(root.glob("shard-*.safetensors")):
        raise DataError(
            f"'{root}' holds cache shards but no build plan; delete it and run again to rebuild it, or "
            "use an empty cache_dir."
        )
    if vae is None or text_encoder is None:
        raise DataError(f"the data cache at '{root}' is not built yet; load the VAE and the text encoder to build it.")

    items = [it for i in range(len(cfg.sources)) for it in (scanned.get(i) or scan_source(i, cfg.sources[i], levels))]
    keys: dict[str, Item] = {}
    for it in items:
        if it.key in keys:
            raise DataError(f"two samples have the key '{it.key}' ({keys[it.key].target.where}, {it.target.where}).")
        keys[it.key] = it
    shards, texts = _plan(items, cfg.shard_size)
    if plan_rec is None:
        _write_json(
            root / PLAN,
            {
                "fingerprint": fp,
                "identity": identity,
                "listing": listing,
                "encoders": encoders,
                "n_shards": len(shards),
                "n_samples": len(items),
            },
        )
    if world_size == 1:  # leftovers of a killed write (with several ranks they may be another rank's, in flight)
        for tmp in root.glob("shard-*.tmp"):
            tmp.unlink(missing_ok=True)
    builder = _ShardBuilder(cfg, vae, text_encoder, vision)
    todo = [s for s in range(len(shards)) if s % world_size == rank and not (root / shard_name(s)).is_file()]
    done = sum((root / shard_name(s)).is_file() for s in range(len(shards)))
    if done:
        log.info("data cache '%s': %d of %d shards already done, continuing", root, done, len(shards))
    from tqdm.auto import tqdm

    for s in tqdm(todo, desc="caching latents and captions", unit="shard", disable=None if progress else True):
        tensors, index = builder.build(shards[s], items, texts[s])
        index["shard"] = s
        save_safetensors(tensors, root / shard_name(s), metadata={"index": json.dumps(index, ensure_ascii=False)})
    if all((root / shard_name(s)).is_file() for s in range(len(shards))):
        _finalize(
            root, len(shards), {"fingerprint": fp, "identity": identity, "listing": listing, "encoders": encoders}
        )
    return root


def _finalize(root: Path, n_shards: int, head: dict) -> None:
    samples, texts, skipped = [], {}, []
    dims = set()
    for s in range(n_shards):
        index = shard_metadata(root / shard_name(s))
        for e in index["samples"]:
            e["shard"] = s
        samples += index["samples"]
        texts.update(index["texts"])
        skipped += index["skipped"]
        dims.update(index["text_dims"])
    if len(dims) > 1:
        raise DataError(f"the cache at '{root}' holds text embeddings of several widths {sorted(dims)}; rebuild it.")
    if not samples:
        raise DataError(f"the data cache at '{root}' holds no usable sample (all {len(skipped)} were skipped).")
    _write_json(
        root / MANIFEST,
        {
            **head,
            "complete": True,
            "shards": [shard_name(s) for s in range(n_shards)],
            "samples": samples,
            "texts": texts,
            "skipped": skipped,
            "text_dim": dims.pop() if dims else None,
        },
    )
    (root / PLAN).unlink(missing_ok=True)
    log.info(
        "data cache '%s' complete: %d samples, %d distinct captions, %d skipped",
        root,
        len(samples),
        len(texts),
        len(skipped),
    )


class _ShardBuilder:
    def __init__(self, cfg: DataConfig, vae, text_encoder, vision):
        self.cfg, self.vae, self.te, self.vision = cfg, vae, text_encoder, vision
        self.buckets = make_buckets(cfg.resolution, cfg.aspect_buckets, cfg.max_aspect)

    def _bucket(self, ref) -> tuple[int, int]:
        return nearest_bucket(*ref.displayed_size(), self.buckets)

    def build(self, idxs: list[int], items: list[Item], new_texts: list[str]) -> tuple[dict, dict]:
        jobs = defaultdict(list)  # bucket -> [(tensor key, image ref, owner)]
        entries, bad = {}, {}
        for n in idxs:
            it = items[n]
            try:
                bucket = self._bucket(it.target)
                ref_buckets = [self._bucket(r) for r in it.refs]
            except DataError as e:
                self._bad(bad, n, it, e)
                continue
            jobs[bucket].append((f"lat.{n}", it.target, n))
            for r, (ref, b) in enumerate(zip(it.refs, ref_buckets)):
                jobs[b].append((f"ref.{n}.{r}", ref, n))
            entries[n] = {
                "n": n,
                "key": it.key,
                "kind": it.kind,
                "source": it.source,
                "bucket": list(bucket),
                "refs": [list(b) for b in ref_buckets],
                "siglip": self.vision is not None and bool(it.refs),
                "captions": {
                    lv: {lang: text_hash(t) for lang, t in langs.items()} for lv, langs in it.captions.items()
                },
                "primary": it.primary,
            }
        tensors: dict[str, torch.Tensor] = {}
        for bucket in sorted(jobs):
            group = jobs[bucket]
            for c in range(0, len(group), self.cfg.encode_batch):
                self._encode(group[c : c + self.cfg.encode_batch], bucket, items, tensors, bad)
        for n in bad:
            entries.pop(n, None)
            for k in [k for k in tensors if k.split(".")[1] == str(n) and not k.startswith("txt.")]:
                del tensors[k]
        dims = set()
        if new_texts:
            limit = self.cfg.max_text_tokens or None
            embs = self.te.encode(list(new_texts), max_length=limit)
            if len(embs) != len(new_texts):
                raise DataError(f"the text encoder returned {len(embs)} embeddings for {len(new_texts)} captions.")
            for t, e in zip(new_texts, embs):
                if e.ndim != 2:
                    raise DataError(
                        f"the text encoder returned an embedding of shape {tuple(e.shape)}; expected [L, D]."
                    )
                tensors[f"txt.{text_hash(t)}"] = e.detach().cpu().contiguous()
                dims.add(int(e.shape[1]))
        index = {
            "samples": [entries[n] for n in idxs if n in entries],
            "texts": {text_hash(t): t for t in new_texts},
            "skipped": list(bad.values()),
            "text_dims": sorted(dims),
        }
        return tensors, index

    def _bad(self, bad: dict, n: int, it: Item, err: DataError) -> None:
        if not self.cfg.skip_bad_images:
            raise err
        if n not in bad:
            log.warning("skipping sample '%s': %s", it.key, err)
            bad[n] = {"key": it.key, "reason": str(err)}

    def _encode(self, group, bucket, items, tensors, bad) -> None:
        pics, keep = [], []
        for key, ref, n in group:
            if n in bad:
                continue
            try:
                pics.append(resize_center_crop(ref.open(), bucket))
                keep.append((key, n))
            except DataError as e:
                self._bad(bad, n, items[n], e)
        if not pics:
            return
        with torch.no_grad():
            lat = self.vae.encode(pil_to_tensor(pics))
        expect = (len(pics), bucket[0] // 8, bucket[1] // 8)
        if lat.ndim != 4 or (lat.shape[0], lat.shape[2], lat.shape[3]) != expect:
            raise DataError(
                f"the VAE returned latents of shape {tuple(lat.shape)} for {len(pics)} images of "
                f"{bucket[1]}x{bucket[0]}; expected [B, C, {expect[1]}, {expect[2]}]."
            )
        lat = lat.detach().float().cpu()
        for j, (key, _) in enumerate(keep):
            tensors[key] = lat[j].clone()
        refs = [(j, key) for j, (key, _) in enumerate(keep) if key.startswith("ref.")]
        if self.vision is not None and refs:
            with torch.no_grad():
                feats = self.vision([pics[j] for j, _ in refs])
            if len(feats) != len(refs):
                raise DataError(f"the vision encoder returned {len(feats)} features for {len(refs)} images.")
            for (_, key), f in zip(refs, feats):
                tensors["sig." + key[4:]] = f.detach().cpu().contiguous()
