"""train.data cache: built with the real (tiny) VAE and text encoder, read back, resumed, reused, rejected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.factories import TOKENIZER_FIXTURE
from train.data import CachedData, DataConfig, DataError, build_cache, make_synthetic_dataset, resize_center_crop
from train.data.cache import MANIFEST, PLAN, shard_name
from train.data.sources import scan_source
from zimage_core.config import TextEncoderConfig, VAEConfig
from zimage_core.text_encoder import TextEncoder, build_qwen3, layers_used
from zimage_core.tokenizer import load_tokenizer
from zimage_core.vae import FluxVAE, pil_to_tensor
from zimage_core.weights import WeightSource, materialize


def make_vae(seed: int = 0) -> FluxVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxVAE(VAEConfig.tiny()).eval()


@pytest.fixture(scope="module")
def vae():
    return make_vae(0)


@pytest.fixture(scope="module")
def te():
    """The real TextEncoder on a tiny random Qwen3 (built on the meta device and filled in: no file round trip)."""
    cfg = TextEncoderConfig.tiny()
    model, buffers = build_qwen3(cfg, layers_used(cfg))
    g = torch.Generator().manual_seed(1)

    def rand(name, shape):
        x = torch.randn(shape, generator=g)
        return 1.0 + 0.2 * x if "norm" in name else x * (0.5 if "embed" in name else 0.15)

    getters = {n: (lambda n=n, p=p: rand(n, p.shape)) for n, p in model.named_parameters()}
    getters.update({n: (lambda b=b: b) for n, b in buffers.items()})
    materialize(model, getters, torch.float32, "cpu", keep_dtype=lambda n: n.startswith("rotary_emb."))
    return TextEncoder(model.eval().requires_grad_(False), load_tokenizer(TOKENIZER_FIXTURE), cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    make_synthetic_dataset(root / "shapes", n_per_class=2, size=64, seed=3)
    from PIL import Image

    Image.new("RGB", (120, 60), (90, 20, 200)).save(root / "shapes" / "wide.png")
    (root / "shapes" / "wide.json").write_text(
        json.dumps({"short": "a purple band", "long": {"en": "a wide purple band"}})
    )
    edits = root / "edits"
    edits.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (20, 40 * i, 90)).save(edits / f"in{i}.png")
        Image.new("RGB", (64, 96), (200, 40 * i, 10)).save(edits / f"out{i}.png")
    (edits / "pairs.jsonl").write_text(
        "\n".join(
            json.dumps({"source": [f"in{i}.png"] * (i + 1), "target": f"out{i}.png", "instruction": f"recolour {i}"})
            for i in range(2)
        )
    )
    return root


def config(ds: Path, cache: Path, **kw) -> DataConfig:
    base = dict(
        resolution=32,
        token_budget=64,
        caption_levels={"short": 1.0, "long": 1.0, "instruction": 1.0},
        languages={"en": 1.0, "zh": 1.0},
        caption_dropout=0.25,
        cache_dir=str(cache),
        shard_size=4,
    )
    base.update(kw)
    return DataConfig(
        sources=[
            {"type": "folder", "path": str(ds / "shapes")},
            {"type": "edit_jsonl", "path": str(ds / "edits" / "pairs.jsonl")},
        ],
        **base,
    )


class FakeSiglip:
    """vision(list of PIL) -> one [4, 3] tensor per image (channel means, scaled)."""

    def __init__(self):
        self.n = 0

    def __call__(self, images):
        self.n += len(images)
        return [pil_to_tensor([im])[0].mean(dim=(1, 2)).repeat(4, 1) * torch.arange(1, 5.0)[:, None] for im in images]


class Counting:
    """Wraps an encoder, counts what it encodes, and can fail after ``fail_after`` images."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after = inner, fail_after
        self.images, self.texts = 0, []
        self.model = inner if isinstance(inner, torch.nn.Module) else inner.model  # for the encoder signature

    def encode(self, x, **kw):
        if isinstance(x, torch.Tensor):
            self.images += x.shape[0]
            if self.fail_after is not None and self.images > self.fail_after:
                raise RuntimeError("simulated crash")
        else:
            self.texts += list(x)
        return self.inner.encode(x, **kw)


def crop(path, latent_hw):
    from PIL import Image

    im = Image.open(path).convert("RGB")
    return resize_center_crop(im, (latent_hw[0] * 8, latent_hw[1] * 8))


@pytest.fixture(scope="module")
def ref_cache(dataset, vae, te, tmp_path_factory):
    """One uninterrupted build (with SigLIP features), shared read-only; returns (config, vision calls)."""
    cfg = config(dataset, tmp_path_factory.mktemp("ref") / "cache")
    vision = FakeSiglip()
    build_cache(cfg, vae, te, vision=vision, progress=False)
    return cfg, vision.n


def same_cache(a: Path, b: Path) -> None:
    sa, sb = (WeightSource(sorted(d.glob("shard-*.safetensors"))) for d in (a, b))
    assert sorted(sa) == sorted(sb)
    for k in sa:  # text embeddings may differ in the last bits: the encoder batches captions differently
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-5, msg=k)
    ma, mb = (json.loads((d / MANIFEST).read_text()) for d in (a, b))
    assert ma["samples"] == mb["samples"] and ma["texts"] == mb["texts"]


def test_round_trip_equals_direct_encoding(ref_cache, vae, te):
    cfg, vision_calls = ref_cache
    data = CachedData(cfg)
    assert data.text_dim == te.config.hidden_size and len(data) == 11
    items = {it.key: it for i, s in enumerate(cfg.sources) for it in scan_source(i, s, set(cfg.encoded_levels()))}
    all_texts = {t for it in items.values() for t in it.texts()} | {""}
    assert set(data.texts.values()) == all_texts  # every level and language, the empty prompt once
    assert vision_calls == 3  # one feature set per reference image

    it = data.batches(0, prefetch=0)
    seen = set()
    for _ in range(it.steps_per_epoch):
        b = next(it)
        assert b.latents.dtype == torch.float32 and b.latents.shape[1] == 16
        for j, key in enumerate(b.keys):
            seen.add(key)
            item = items[key]
            want = vae.encode(pil_to_tensor([crop(item.target.path, b.latents.shape[2:])]))[0]
            torch.testing.assert_close(b.latents[j], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b.cap_feats[j], te.encode([b.captions[j]])[0], rtol=1e-5, atol=1e-5)
            if b.captions[j]:
                assert b.captions[j] in item.texts()
            if item.kind == "edit":
                assert b.kind == "edit" and len(b.ref_latents[j]) == len(item.refs)
                for r, ref in enumerate(item.refs):
                    lat = b.ref_latents[j][r]
                    pic = crop(ref.path, lat.shape[1:])
                    torch.testing.assert_close(lat, vae.encode(pil_to_tensor([pic]))[0], rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(b.siglip[j][r], FakeSiglip()([pic])[0])
            else:
                assert b.kind == "t2i" and b.ref_latents is None
    assert seen == set(items)
    wide = next(s for s in data.samples if s["key"].endswith(":wide"))
    assert wide["bucket"] == [16, 48]  # 120x60 at 32x32: the widest bucket (1:3)


def test_interrupted_build_resumes(ref_cache, tmp_path, vae, te):
    cfg = DataConfig(**{**ref_cache[0].to_dict(), "cache_dir": str(tmp_path / "cache")})  # 11 samples, 3 shards
    crashing = Counting(vae, fail_after=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(cfg, crashing, te, vision=FakeSiglip(), progress=False)
    root = tmp_path / "cache"
    assert (root / shard_name(0)).is_file() and not (root / shard_name(1)).is_file()
    assert (root / PLAN).is_file() and not (root / MANIFEST).is_file()
    with pytest.raises(DataError, match=r"incomplete \(1 of 3 shards.*continues where it stopped"):
        CachedData(cfg)
    done_texts = set(json.loads(WeightSource([root / shard_name(0)]).metadata["index"])["texts"].values())

    vae2, te2 = Counting(vae), Counting(te)
    build_cache(cfg, vae2, te2, vision=FakeSiglip(), progress=False)
    assert vae2.images == 14 - 4  # the targets and references of shards 1 and 2 only
    assert te2.texts and not set(te2.texts) & done_texts  # no caption of shard 0 encoded again
    same_cache(root, Path(ref_cache[0].cache_dir))
    assert not (root / PLAN).exists()


def test_reuse_and_mismatch(dataset, ref_cache, tmp_path, vae, te):
    shutil.copytree(ref_cache[0].cache_dir, tmp_path / "cache")
    cfg = DataConfig(**{**ref_cache[0].to_dict(), "cache_dir": str(tmp_path / "cache")})
    again_vae, again_te = Counting(vae), Counting(te)
    build_cache(cfg, again_vae, again_te, progress=False)
    assert again_vae.images == 0 and again_te.texts == []
    build_cache(cfg, None, None, progress=False)  # complete: the encoders need not be loaded
    # batching and caption options are not part of the fingerprint
    CachedData(DataConfig(**{**cfg.to_dict(), "token_budget": 16, "caption_dropout": 0.5}))

    other = DataConfig(**{**cfg.to_dict(), "resolution": 48})
    with pytest.raises(DataError, match=r"resolution: 32 -> 48.*new cache_dir, or rebuild"):
        build_cache(other, vae, te, progress=False)
    with pytest.raises(DataError, match=r"resolution: 32 -> 48.*rebuild"):
        CachedData(other)
    with pytest.raises(DataError, match="other encoders"):
        build_cache(cfg, make_vae(seed=5), te, progress=False)
    # bf16 weights of the same VAE are the same encoder
    build_cache(cfg, make_vae(0).to(torch.bfloat16), None, progress=False)

    (dataset / "shapes" / "wide.json").write_text(json.dumps({"short": "a violet band"}))
    try:
        with pytest.raises(DataError, match="sources changed"):
            build_cache(cfg, vae, te, progress=False)
    finally:
        (dataset / "shapes" / "wide.json").write_text(
            json.dumps({"short": "a purple band", "long": {"en": "a wide purple band"}})
        )

    build_cache(other, vae, te, progress=False, rebuild=True)
    data = CachedData(other)
    assert {tuple(s["bucket"]) for s in data.samples} >= {(48, 48)}
    assert not any(s["siglip"] for s in data.samples)  # rebuilt without a vision encoder
    with pytest.raises(DataError, match="without SigLIP"):
        build_cache(other, vae, te, vision=FakeSiglip(), progress=False)


def test_missing_cache(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "nothing")
    with pytest.raises(DataError, match=r"no data cache at .*build_cache\(cfg, vae, text_encoder\)"):
        CachedData(cfg)


def test_sharded_build_across_ranks(ref_cache, tmp_path, vae, te):
    cfg = DataConfig(**{**ref_cache[0].to_dict(), "cache_dir": str(tmp_path / "cache")})
    r0, r1 = Counting(vae), Counting(vae)
    build_cache(cfg, r0, te, vision=FakeSiglip(), progress=False, rank=0, world_size=2)  # shards 0 and 2
    assert not (tmp_path / "cache" / MANIFEST).exists()
    build_cache(cfg, r1, te, vision=FakeSiglip(), progress=False, rank=1, world_size=2)  # shard 1: then all are done
    assert (r0.images, r1.images) == (10, 4)
    same_cache(tmp_path / "cache", Path(ref_cache[0].cache_dir))
