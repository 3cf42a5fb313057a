"""train.data: sources, buckets, batching, determinism, sharding, resume and caption policy (fake encoders)."""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from train.data import (
    CachedData,
    CaptionPolicy,
    DataConfig,
    DataError,
    batch_size_for,
    build_cache,
    image_tokens,
    make_buckets,
    make_synthetic_dataset,
    nearest_bucket,
    resize_center_crop,
)
from train.data.buckets import pack
from train.data.sources import expand_braces, scan_source
from zimage_core.vae import pil_to_tensor

LEVELS = {"caption", "tags", "short", "medium", "long", "instruction", "target_caption"}


class FakeVAE:
    """Model-space 'latents': 8x8 average pooling, 16 channels."""

    def __init__(self):
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        p = F.avg_pool2d(x.float(), 8)
        return torch.cat([p * (k + 1) for k in range(5)] + [p[:, :1]], dim=1)


class FakeTE:
    """An embedding [len(text) + 1, 8] that depends on the text."""

    def encode(self, texts, max_length=None):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)) * 131 + len(t))
            out.append(torch.randn(len(t) + 1, 8, generator=g))
        return out


def save_png(path: Path, size=(64, 64), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def cfg_for(tmp_path: Path, sources, **kw) -> DataConfig:
    base = dict(
        resolution=64,
        token_budget=64,
        caption_levels={"caption": 1.0},
        caption_dropout=0.0,
        cache_dir=str(tmp_path / "cache"),
        shard_size=8,
    )
    base.update(kw)
    return DataConfig(sources=sources, **base)


def built(cfg: DataConfig) -> CachedData:
    build_cache(cfg, FakeVAE(), FakeTE(), progress=False)
    return CachedData(cfg)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    caps = make_synthetic_dataset(folder, n_per_class=6, size=64, seed=1)
    return folder, caps


# ---- sources --------------------------------------------------------------------------------------
def test_folder_sidecars(tmp_path):
    d = tmp_path / "imgs"
    save_png(d / "a.png")
    (d / "a.txt").write_text("  a red square \n")
    save_png(d / "sub" / "b.jpg")
    (d / "sub" / "b.json").write_text(
        json.dumps(
            {
                "tags": ["red", "square"],
                "short": "red",
                "long": {"en": "a big red square", "zh": "红色方块"},
                "url": "http://x",
                "width": 64,
            }
        )
    )
    save_png(d / "c.png")
    (d / "c.txt").write_text("cat")
    (d / "c.json").write_text(json.dumps({"caption": "cat", "medium": "a cat"}))
    items = {it.key: it for it in scan_source(0, {"type": "folder", "path": str(d)}, LEVELS)}
    assert set(items) == {"0:a", "0:sub/b", "0:c"}
    assert items["0:a"].captions == {"caption": {"": "a red square"}} and items["0:a"].primary == "caption"
    assert items["0:sub/b"].captions == {
        "tags": {"": "red, square"},
        "short": {"": "red"},
        "long": {"en": "a big red square", "zh": "红色方块"},
    }
    assert items["0:sub/b"].primary is None
    assert items["0:c"].captions == {"caption": {"": "cat"}, "medium": {"": "a cat"}}

    (d / "c.json").write_text(json.dumps({"caption": "dog"}))
    with pytest.raises(DataError, match="given twice"):
        scan_source(0, {"type": "folder", "path": str(d)}, LEVELS)
    (d / "c.json").write_text("{not json")
    with pytest.raises(DataError, match=r"c\.json.*not valid JSON"):
        scan_source(0, {"type": "folder", "path": str(d)}, LEVELS)
    (d / "c.json").unlink()
    save_png(d / "nocap.png")
    with pytest.raises(DataError, match=r"nocap\.png' has no caption"):
        scan_source(0, {"type": "folder", "path": str(d)}, LEVELS)


def test_edit_jsonl(tmp_path):
    d = tmp_path / "edits"
    for n in ("in1.png", "in2.png", "out.png"):
        save_png(d / "img" / n)
    f = d / "pairs.jsonl"
    lines = [
        {"source": "img/in1.png", "target": "img/out.png", "instruction": "make it blue"},
        {
            "source": ["img/in1.png", "img/in2.png"],
            "target": "img/out.png",
            "instruction": "merge",
            "caption": "a blue thing",
            "key": "merge",
        },
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = scan_source(2, {"type": "edit_jsonl", "path": str(f)}, LEVELS)
    assert [it.key for it in items] == ["2:pairs:1", "2:merge"]
    assert items[0].kind == "edit" and len(items[0].refs) == 1 and items[0].primary == "instruction"
    assert Path(items[1].refs[1].path) == d / "img" / "in2.png"
    assert items[1].captions == {"instruction": {"": "merge"}, "target_caption": {"": "a blue thing"}}

    f.write_text(json.dumps(lines[0]) + "\n\n{bad json\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: not valid JSON"):
        scan_source(0, {"type": "edit_jsonl", "path": str(f)}, LEVELS)
    f.write_text(json.dumps({"source": "img/in1.png", "target": "img/out.png"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: missing field.*instruction"):
        scan_source(0, {"type": "edit_jsonl", "path": str(f)}, LEVELS)
    f.write_text(json.dumps({**lines[0], "source": "img/nope.png"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: source image 'img/nope\.png' not found"):
        scan_source(0, {"type": "edit_jsonl", "path": str(f)}, LEVELS)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _png_bytes(color, size=(64, 64), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def test_webdataset_shards(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    colors = {}
    for s in range(2):
        with tarfile.open(d / f"shard-{s:06d}.tar", "w") as tf:
            for k in range(3):
                key = f"s{s}k{k}"
                colors[key] = (40 * k, 100, 60 * s)
                if k == 1:
                    _add(tf, f"{key}.jpg", _png_bytes(colors[key], (80, 48), "JPEG"))
                    _add(tf, f"{key}.json", json.dumps({"captions": {"short": f"short {key}"}, "width": 80}).encode())
                else:
                    _add(tf, f"{key}.png", _png_bytes(colors[key]))
                    _add(tf, f"{key}.txt", f"caption {key}".encode())
    assert expand_braces(str(d / "shard-{000000..000001}.tar")) == [
        str(d / "shard-000000.tar"),
        str(d / "shard-000001.tar"),
    ]
    spec = {"type": "webdataset", "path": str(d / "shard-{000000..000001}.tar")}
    items = scan_source(0, spec, LEVELS)
    assert [it.key for it in items] == [f"0:shard-{s:06d}/s{s}k{k}" for s in range(2) for k in range(3)]
    assert items[1].captions == {"short": {"": "short s0k1"}}
    assert items[4].captions == {"short": {"": "short s1k1"}} and items[3].captions == {"caption": {"": "caption s1k0"}}
    assert np.asarray(items[3].target.open())[0, 0].tolist() == list(colors["s1k0"])

    cfg = cfg_for(tmp_path, [spec], caption_levels={"caption": 1.0, "short": 1.0})
    data = built(cfg)
    assert len(data) == 6
    it = data.batches(0, prefetch=0)
    seen = {}
    for _ in range(it.steps_per_epoch):
        b = next(it)
        for j, k in enumerate(b.keys):
            seen[k] = (b.latents[j], b.captions[j])
    for item in items:
        lat, cap = seen[item.key]
        pic = resize_center_crop(item.target.open(), (lat.shape[1] * 8, lat.shape[2] * 8))
        torch.testing.assert_close(lat, FakeVAE().encode(pil_to_tensor([pic]))[0])
        assert cap.endswith(item.key.split("/")[1])

    with tarfile.open(d / "shard-000002.tar", "w") as tf:
        _add(tf, "lonely.png", _png_bytes((1, 2, 3)))
    with pytest.raises(DataError, match=r"lonely\.png' has no caption"):
        scan_source(0, {"type": "webdataset", "path": str(d)}, LEVELS)
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tf:
        _add(tf, "a.png", _png_bytes((1, 2, 3)))
    with pytest.raises(DataError, match="uncompressed tar"):
        scan_source(0, {"type": "webdataset", "path": str(tmp_path / "gz.tar")}, LEVELS)


def test_unreadable_image(tmp_path, caplog):
    d = tmp_path / "imgs"
    for i in range(3):
        save_png(d / f"ok{i}.png")
        (d / f"ok{i}.txt").write_text(f"fine {i}")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (d / "broken.txt").write_text("broken")
    cfg = cfg_for(tmp_path, [{"type": "folder", "path": str(d)}])
    with pytest.raises(DataError, match=r"cannot read the image '.*broken\.png'"):
        build_cache(cfg, FakeVAE(), FakeTE(), progress=False)
    cfg.skip_bad_images = True
    with caplog.at_level(logging.WARNING):
        build_cache(cfg, FakeVAE(), FakeTE(), progress=False)
    assert "skipping sample '0:broken'" in caplog.text
    data = CachedData(cfg)
    assert sorted(s["key"] for s in data.samples) == ["0:ok0", "0:ok1", "0:ok2"]
    assert data.manifest["skipped"][0]["key"] == "0:broken"


def test_config_validation():
    with pytest.raises(DataError, match="unknown option"):
        DataConfig.from_dict({"sources": [{"type": "folder", "path": "x"}], "resolutoin": 256})
    with pytest.raises(DataError, match="multiple of 16"):
        DataConfig.from_dict({"sources": [{"type": "folder", "path": "x"}], "resolution": 250})
    with pytest.raises(DataError, match="type 'zip'"):
        DataConfig.from_dict({"sources": [{"type": "zip", "path": "x"}]})
    with pytest.raises(DataError, match="edit_ratio"):
        DataConfig.from_dict({"sources": [{"type": "folder", "path": "x"}], "edit_ratio": 1.5})


# ---- buckets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("res", [256, 512, 1024])
def test_bucket_geometry(res):
    buckets = make_buckets(res, max_aspect=3.0)
    assert (res, res) in buckets and 10 <= len(buckets) <= 40
    assert len(set(buckets)) == len(buckets)
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert abs(h * w - res * res) <= 8 * max(h, w)  # the short side is the nearest multiple of 16 to res^2 / long
        assert max(h / w, w / h) <= 3.0
    aspects = [h / w for h, w in buckets]
    assert max(aspects) >= 2.5 and min(aspects) <= 1 / 2.5
    assert make_buckets(res, aspect_buckets=False) == [(res, res)]
    # nearest aspect ratio, in log space
    b = nearest_bucket(1000, 500, buckets)
    best = min(abs(math.log(h / w) - math.log(0.5)) for h, w in buckets)
    assert abs(math.log(b[0] / b[1]) - math.log(0.5)) == best
    with pytest.raises(DataError):
        make_buckets(res + 8)


def test_resize_center_crop():
    im = Image.new("RGB", (300, 100), (0, 0, 255))
    im.paste((255, 0, 0), (140, 0, 160, 100))  # a red stripe in the middle
    out = resize_center_crop(im, (48, 96))
    assert out.size == (96, 48)
    arr = np.asarray(out)
    assert arr[24, 48, 0] > 200 and arr[24, 2, 2] > 200  # center red, edges blue (cropped left/right)
    small = resize_center_crop(Image.new("RGB", (10, 20)), (64, 32))
    assert small.size == (32, 64)


def test_token_budget_batches(tmp_path):
    d = tmp_path / "mixed"
    sizes = [(64, 64)] * 11 + [(128, 48)] * 5  # (w, h): square and wide
    for i, sz in enumerate(sizes):
        save_png(d / f"{i:02d}.png", sz, (i * 10, 50, 50))
        (d / f"{i:02d}.txt").write_text(f"image {i}")
    cfg = cfg_for(tmp_path, [{"type": "folder", "path": str(d)}], token_budget=40, max_batch=3)
    data = built(cfg)
    assert batch_size_for((64, 64), 40, 3) == 2 and batch_size_for((48, 96), 40, 10) == 2
    assert batch_size_for((64, 64), 10, 64) == 1 and batch_size_for((64, 64), 10**6, 5) == 5
    it = data.batches(0, prefetch=0)
    seen = Counter()
    per_bucket = Counter()
    for _ in range(it.steps_per_epoch):
        b = next(it)
        hw = (b.latents.shape[2] * 8, b.latents.shape[3] * 8)
        cap = batch_size_for(hw, 40, 3)
        assert 1 <= len(b) <= cap and len(b) * image_tokens(hw) <= 40
        per_bucket[hw] += len(b)
        seen.update(b.keys)
    assert sum(seen.values()) == 16 and max(seen.values()) == 1  # one pass over the data
    assert per_bucket == {(64, 64): 11, (48, 96): 5}
    assert it.steps_per_epoch == math.ceil(11 / 2) + math.ceil(5 / 2)
    assert pack([0, 1, 2, 3], [10, 10, 30, 5], 25, 8) == [[0, 1], [2], [3]]


# ---- determinism, sharding, resume -------------------------------------------------------------------
@pytest.fixture(scope="module")
def shape_data(shapes, tmp_path_factory):
    folder, _ = shapes
    cache = tmp_path_factory.mktemp("shape_cache")
    cfg = DataConfig(
        sources=[{"type": "folder", "path": str(folder)}],
        resolution=64,
        token_budget=48,
        caption_levels={"long": 1.0, "short": 1.0},
        languages={"en": 1.0, "zh": 1.0},
        caption_dropout=0.2,
        cache_dir=str(cache),
        shard_size=5,
    )
    return built(cfg)


def run(it, n):
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return (
        a.keys == b.keys
        and a.captions == b.captions
        and torch.equal(a.latents, b.latents)
        and all(torch.equal(x, y) for x, y in zip(a.cap_feats, b.cap_feats))
    )


def test_determinism(shape_data):
    a = run(shape_data.batches(7, prefetch=0), 20)
    b = run(shape_data.batches(7, prefetch=2), 20)
    assert all(same(x, y) for x, y in zip(a, b))
    c = run(shape_data.batches(8, prefetch=0), 20)
    assert [x.keys for x in a] != [x.keys for x in c]
    it = shape_data.batches(7, prefetch=0)
    n = it.steps_per_epoch
    e0 = [k for x in run(it, n) for k in x.keys]
    e1 = [k for x in run(it, n) for k in x.keys]
    assert sorted(e0) == sorted(e1) == sorted(s["key"] for s in shape_data.samples) and e0 != e1
    assert it.epoch == 1


def test_rank_sharding(shape_data):
    world = 3
    its = [shape_data.batches(5, rank=r, world_size=world, prefetch=0) for r in range(world)]
    steps = {it.steps_per_epoch for it in its}
    assert len(steps) == 1
    n = steps.pop()
    total = len(shape_data.epoch_batches(5, 0))
    assert n == total // world
    keys = [[k for b in run(it, n) for k in b.keys] for it in its]
    for r in range(world):
        for q in range(r + 1, world):
            assert not set(keys[r]) & set(keys[q])
    covered = sum(len(k) for k in keys)
    assert covered <= len(shape_data) and covered >= len(shape_data) - (total % world) * 3
    # the same position state on every rank
    assert its[0].state_dict() == its[1].state_dict()
    with pytest.raises(DataError, match="fewer than the 1000 ranks"):
        next(shape_data.batches(0, rank=0, world_size=1000))


@pytest.mark.parametrize("k", [3, 13])  # mid-epoch, and in the second epoch
def test_exact_resume(shape_data, k):
    ref = shape_data.batches(11, prefetch=0)
    expected = run(ref, k + 8)[k:]
    it = shape_data.batches(11, prefetch=2)
    run(it, k)
    state = json.loads(json.dumps(it.state_dict()))  # survives a JSON round trip
    it.close()
    fresh = shape_data.batches(0, prefetch=2)  # another seed: the state carries the run's own
    fresh.load_state_dict(state)
    got = run(fresh, 8)
    assert all(same(x, y) for x, y in zip(expected, got))
    assert fresh.epoch == ref.epoch


def test_caption_frequencies(shape_data):
    counts = Counter()
    it = shape_data.batches(3, prefetch=0)
    for b in run(it, 600):
        for c in b.captions:
            if c == "":
                counts["drop"] += 1
            elif "背景" in c:
                counts["long_zh"] += 1
            elif "background" in c:
                counts["long_en"] += 1
            else:
                counts["short"] += 1
    n = sum(counts.values())
    assert abs(counts["drop"] / n - 0.2) < 0.03
    assert abs(counts["short"] / n - 0.4) < 0.04  # 0.8 * 1/2
    assert abs(counts["long_en"] / n - 0.2) < 0.03 and abs(counts["long_zh"] / n - 0.2) < 0.03
    # dropped samples carry the empty prompt's embedding, the others their caption's
    b = next(x for x in run(it, 50) if "" in x.captions)
    j = b.captions.index("")
    torch.testing.assert_close(b.cap_feats[j], FakeTE().encode([""])[0])
    i = next(i for i, c in enumerate(b.captions) if c)
    torch.testing.assert_close(b.cap_feats[i], FakeTE().encode([b.captions[i]])[0])


def test_caption_policy_unit():
    rng = np.random.default_rng(0)
    pol = CaptionPolicy({"long": 3.0, "short": 1.0, "tags": 1.0}, {"en": 1.0, "zh": 3.0}, dropout=0.0)
    caps = {"long": {"en": "L", "zh": "长"}, "short": {"": "S"}, "medium": {"": "M"}}
    got = Counter(pol.choose(caps, None, rng) for _ in range(8000))
    assert set(got) == {("long", "en"), ("long", "zh"), ("short", "")}  # no tags here; medium not configured
    assert abs(got[("long", "zh")] / 8000 - 0.75 * 0.75) < 0.02
    assert abs(got[("short", "")] / 8000 - 0.25) < 0.02
    # none of the configured levels: fall back to the primary caption, or nothing
    assert pol.options({"caption": {"": "C"}}, "caption") == [(("caption", ""), 1.0)]
    assert pol.options({"medium": {"": "M"}}, None) == []
    # the same generator state gives the same choices
    a = [
        CaptionPolicy({"long": 1, "short": 1}, {"en": 1}, 0.3).choose(caps, None, np.random.default_rng(5))
        for _ in range(3)
    ]
    assert len(set(a)) == 1


def test_missing_caption_level_error(shapes, tmp_path):
    folder, _ = shapes
    cfg = DataConfig(
        sources=[{"type": "folder", "path": str(folder)}],
        resolution=64,
        caption_levels={"tags": 1.0},
        cache_dir=str(tmp_path / "c"),
    )
    build_cache(cfg, FakeVAE(), FakeTE(), progress=False)
    assert len(CachedData(cfg)) == 24  # .txt sidecars: the "caption" level is the fallback
    (folder / "red_circle_0000.txt").rename(tmp_path / "moved.txt")
    try:
        cfg2 = DataConfig(**{**cfg.to_dict(), "cache_dir": str(tmp_path / "c2")})
        build_cache(cfg2, FakeVAE(), FakeTE(), progress=False)
        with pytest.raises(DataError, match=r"1 of 24 cached samples have none of .*'0:red_circle_0000'"):
            CachedData(cfg2)
    finally:
        (tmp_path / "moved.txt").rename(folder / "red_circle_0000.txt")


# ---- source weights and the edit mix --------------------------------------------------------------
def test_weights_and_edit_ratio(shapes, tmp_path):
    folder, _ = shapes
    e = tmp_path / "edits"
    for i in range(4):
        save_png(e / f"src{i}.png", (64, 64), (10, 10, 10 * i))
        save_png(e / f"dst{i}.png", (96, 64), (10, 10 * i, 10))
    (e / "pairs.jsonl").write_text(
        "\n".join(
            json.dumps({"source": [f"src{i}.png"] * (1 + i % 2), "target": f"dst{i}.png", "instruction": f"edit {i}"})
            for i in range(4)
        )
    )
    srcs = [
        {"type": "folder", "path": str(folder), "weight": 2.0},
        {"type": "edit_jsonl", "path": str(e / "pairs.jsonl")},
    ]
    cfg = cfg_for(tmp_path, srcs, token_budget=16, max_batch=1, edit_ratio=0.25, caption_levels={"caption": 1.0})
    data = built(cfg)
    it = data.batches(0, prefetch=0)
    n = it.steps_per_epoch
    batches = run(it, n)
    kinds = Counter(b.kind for b in batches)
    assert kinds["t2i"] == 48  # 24 images, weight 2, one per batch
    assert kinds["edit"] == 16  # 48 * 0.25 / 0.75: the 4 pairs repeated
    assert Counter(k for b in batches if b.kind == "t2i" for k in b.keys) == {
        s["key"]: 2 for s in data.samples if s["kind"] == "t2i"
    }
    for b in (b for b in batches if b.kind == "edit"):
        i = int(b.keys[0].split(":")[-1]) - 1
        assert b.latents.shape[1:] == (16, 6, 10)  # 96x64 -> the 80x48 bucket
        assert len(b.ref_latents[0]) == 1 + i % 2 and b.ref_latents[0][0].shape == (16, 8, 8)
        assert b.captions == [f"edit {i}"] and b.siglip is None
    assert all(b.ref_latents is None for b in batches if b.kind == "t2i")
    # weight 0 removes a source without a rebuild (weights are not part of the cache fingerprint)
    cfg.sources[0]["weight"] = 0.0
    it = CachedData(cfg).batches(0, prefetch=0)
    assert {b.kind for b in run(it, it.steps_per_epoch)} == {"edit"}
