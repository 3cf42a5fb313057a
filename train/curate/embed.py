"""The embed stage: image embeddings from a user-supplied CLIP / SigLIP2 folder, sharded and resumable.

Writes ``OUT/embeddings.npy`` (``[N, D]`` float32, L2-normalised, rows in manifest order) and ``OUT/ids.txt``
(the manifest ids, one per line). Images that do not decode get a zero row (and match nothing).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from zimage_core.outputs import atomic_path

from .config import CurateConfig, CurateError
from .engine import run_shards
from .manifest import list_images, pa, write_text

log = logging.getLogger(__name__)


class EmbedWorker:
    def __init__(self, model: str, batch: int):
        from .plugins import Embedder

        self.embedder = Embedder(model, "[curate.embed] model")
        self.batch = batch

    def __call__(self, items: list[dict]):
        from PIL import Image

        vecs: list = [None] * len(items)
        for c in range(0, len(items), self.batch):
            ims, where = [], []
            for j, it in enumerate(items[c : c + self.batch]):
                try:
                    with Image.open(it["path"]) as im:
                        im.load()
                        ims.append(im.convert("RGB"))
                    where.append(c + j)
                except Exception as e:  # an undecodable file gets a zero row
                    log.warning("embed: cannot read '%s' (%s); its embedding is zero", it["path"], e)
            if ims:
                for j, v in zip(where, self.embedder.images(ims)):
                    vecs[j] = v.tolist()
        dim = next((len(v) for v in vecs if v is not None), 0)
        vecs = [v if v is not None else [0.0] * dim for v in vecs]
        pyarrow = pa()
        return pyarrow.table(
            {"id": [it["id"] for it in items], "vec": pyarrow.array(vecs, type=pyarrow.list_(pyarrow.float32()))}
        )


def make_embedder(model: str, batch: int) -> EmbedWorker:
    return EmbedWorker(model, batch)


def run_embed(input_dir, out, cfg: CurateConfig, model=None) -> dict:
    model = model or cfg.embed.model
    if not model:
        raise CurateError(
            'embed needs a CLIP or SigLIP2 folder: pass --model DIR or set [curate.embed] model = "DIR" '
            "(or skip this stage and give dedup --embeddings FILE.npy --ids FILE.txt)."
        )
    from .plugins import _need_folder

    _need_folder(model, "[curate.embed] model", ["config.json", "preprocessor_config.json"], _expect())
    out = Path(out).expanduser()
    items = list_images(input_dir)
    files = run_shards(
        "embed",
        items,
        functools.partial(make_embedder, str(model), cfg.embed.batch),
        out,
        cfg,
        f"{Path(model).resolve()}:{cfg.embed.batch}",
    )
    ids, chunks = [], []
    for f in files:  # one shard in memory at a time while gathering (the result itself is N x D)
        t = pa().parquet.read_table(f)
        ids += t.column("id").to_pylist()
        chunks.append(np.asarray(t.column("vec").to_pylist(), dtype=np.float32))
    dim = max(c.shape[1] for c in chunks if c.ndim == 2)
    x = np.concatenate(
        [c if c.ndim == 2 and c.shape[1] == dim else np.zeros((len(c), dim), np.float32) for c in chunks]
    )
    with atomic_path(out / "embeddings.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, x)
    write_text(out / "ids.txt", "\n".join(ids) + "\n")
    log.info("embed: %d x %d embeddings -> %s", x.shape[0], x.shape[1], out / "embeddings.npy")
    return {"embeddings": str(out / "embeddings.npy"), "ids": str(out / "ids.txt")}


def _expect() -> str:
    from .plugins import Embedder

    return Embedder.EXPECT
