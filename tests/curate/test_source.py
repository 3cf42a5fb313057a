"""The trainer reads a curated manifest: rows with keep = false skipped, the 'weight' column drives sampling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from train.data import CachedData, DataConfig, DataError, build_cache
from train.data.sources import scan_source


class FakeVAE:
    def encode(self, x):
        p = F.avg_pool2d(x.float(), 8)
        return torch.cat([p] * 5 + [p[:, :1]], dim=1)


class FakeTE:
    def encode(self, texts, max_length=None):
        return [torch.full((len(t) + 1, 8), float(len(t))) for t in texts]


@pytest.fixture()
def curated(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    ids, caps = [], []
    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, 10, 10)).save(imgs / f"im{i}.png")
        ids.append(f"im{i}.png")
        caps.append(f"picture {i}" if i != 2 else None)
    (imgs / "im2.txt").write_text("from the sidecar")  # no caption column value: the sidecar serves
    out = tmp_path / "cur"
    out.mkdir()
    t = pa.table(
        {
            "id": ids,
            "path": [str(imgs / i) for i in ids],
            "keep": [True, True, True, False, True, True],
            "reasons": ["", "", "", "blur: sharpness=1 (< 10)", "", ""],
            "caption": caps,
            "weight": [1.0, 1.0, 1.0, 0.0, 3.0, 0.0],
        }
    )
    pq.write_table(t, out / "manifest.parquet")
    return out


def test_manifest_source_skips_rejected_rows(curated):
    cfg = DataConfig(sources=[{"type": "manifest", "path": str(curated)}], resolution=64)  # validation accepts it
    items = scan_source(0, cfg.sources[0], {"caption"})
    assert [it.key for it in items] == ["0:im0.png", "0:im1.png", "0:im2.png", "0:im4.png", "0:im5.png"]
    assert (
        items[2].captions == {"caption": {"": "from the sidecar"}} and items[0].captions["caption"][""] == "picture 0"
    )
    with pytest.raises(DataError, match="no manifest"):
        scan_source(0, {"type": "manifest", "path": str(curated / "nope")}, {"caption"})
    with pytest.raises(DataError, match="unknown key"):
        DataConfig(sources=[{"type": "manifest", "path": "x", "weights": 1}]).validate()


def test_weight_column_drives_sampling(curated, tmp_path):
    cfg = DataConfig(
        sources=[{"type": "manifest", "path": str(curated / "manifest.parquet"), "weight": 2.0}],
        resolution=64,
        token_budget=16,
        max_batch=1,
        caption_levels={"caption": 1.0},
        caption_dropout=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    build_cache(cfg, FakeVAE(), FakeTE(), progress=False)
    data = CachedData(cfg)
    it = data.batches(0, prefetch=0)
    seen = Counter(k for _ in range(it.steps_per_epoch) for k in next(it).keys)
    # source weight 2 x per-image weight: 2, 2, 2, 6 and 0 (the rejected row is not even cached)
    assert seen == {"0:im0.png": 2, "0:im1.png": 2, "0:im2.png": 2, "0:im4.png": 6}
    # re-weighting (a new balance run) needs no rebuild: weights are read when the cache is opened
    t = pq.read_table(curated / "manifest.parquet")
    t = t.set_column(t.column_names.index("weight"), "weight", pa.array([0.5, 1.0, 1.0, 0.0, 1.0, 1.0]))
    pq.write_table(t, curated / "manifest.parquet")
    it = CachedData(cfg).batches(0, prefetch=0)
    seen = Counter(k for _ in range(it.steps_per_epoch) for k in next(it).keys)
    assert seen == {"0:im0.png": 1, "0:im1.png": 2, "0:im2.png": 2, "0:im4.png": 2, "0:im5.png": 2}
    assert np.isclose(sum(seen.values()), 9)
