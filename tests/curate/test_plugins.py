"""User-supplied models: embeddings (tiny CLIP), classifier/CLIP-MLP/plug-in scores, captioner, clear errors."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from train.curate.cli import main
from train.curate.config import CurateConfig, CurateError
from train.curate.embed import run_embed
from train.curate.plugins import Embedder, build_captioner, build_scorers
from train.curate.profile import Profiler, run_profile

from .conftest import cfg


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    c = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        id2label={0: "safe", 1: "nsfw"},
        label2id={"safe": 0, "nsfw": 1},
    )
    ViTForImageClassification(c).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_embed_stage_and_retrieval(tmp_path, dup_set, tiny_clip):
    root, _ = dup_set
    res = run_embed(root, tmp_path, cfg(), tiny_clip)
    x = np.load(res["embeddings"])
    ids = (tmp_path / "ids.txt").read_text().split()
    assert x.shape == (len(ids), 16) and np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert ids == sorted(p.name for p in root.iterdir())
    direct = Embedder(tiny_clip).images([__import__("PIL.Image").Image.open(root / ids[2]).convert("RGB")])
    assert np.allclose(direct[0], x[2], atol=1e-5)
    run_profile(root, tmp_path, cfg())
    assert (
        main(
            [
                "retrieve",
                "--out",
                str(tmp_path),
                "--query-image",
                str(root / ids[3]),
                "--model",
                str(tiny_clip),
                "--k",
                "3",
                "-q",
            ]
        )
        == 0
    )
    hits = __import__("json").loads((tmp_path / "retrieval.json").read_text())["hits"]
    assert hits[0]["id"] == ids[3] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and len(hits) == 3
    assert main(["retrieve", "--out", str(tmp_path), "--query-text", "a red car", "--model", str(tiny_clip), "-q"]) == 0
    assert len(__import__("json").loads((tmp_path / "retrieval.json").read_text())["hits"]) == min(16, len(ids))


def test_scores_and_captioner(tmp_path, dup_set, tiny_vit, tiny_clip):
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    root, _ = dup_set
    torch.manual_seed(1)
    head = {
        "layers.0.weight": torch.randn(8, 16),
        "layers.0.bias": torch.randn(8),
        "layers.2.weight": torch.randn(1, 8),
    }
    save_file(head, str(tmp_path / "head.safetensors"))
    c = cfg(
        scores={
            "nsfw": {"kind": "image_classifier", "path": str(tiny_vit), "label": "nsfw", "max": 2.0},
            "aesthetic": {"kind": "clip_mlp", "path": str(tiny_clip), "head": str(tmp_path / "head.safetensors")},
            "bright": {
                "kind": "plugin",
                "entry": "tests.curate.plugin_fixtures:mean_brightness",
                "scale": 2.0,
                "min": 1e9,
            },
        },
        caption={"entry": "tests.curate.plugin_fixtures:ocr_captioner", "prefix": "photo"},
    )
    rows = pq.read_table(run_profile(root, tmp_path / "o", c)).to_pylist()
    from PIL import Image

    im = Image.open(rows[0]["path"]).convert("RGB")
    model = AutoModelForImageClassification.from_pretrained(tiny_vit)
    with torch.no_grad():
        p = model(**AutoImageProcessor.from_pretrained(tiny_vit)(images=[im], return_tensors="pt")).logits.softmax(-1)[
            0, 1
        ]
    assert rows[0]["score_nsfw"] == pytest.approx(float(p), abs=1e-5)
    e = torch.from_numpy(Embedder(tiny_clip).images([im]))
    want = (e @ head["layers.0.weight"].T + head["layers.0.bias"]) @ head["layers.2.weight"].T
    assert rows[0]["score_aesthetic"] == pytest.approx(float(want[0, 0]), abs=1e-4)
    assert rows[0]["score_bright"] == pytest.approx(2 * np.asarray(im.convert("L")).mean(), rel=1e-3)
    assert all("score_bright" in r["reasons"] and not r["keep"] for r in rows if r["decodes"])  # min 1e9: all rejected
    assert rows[0]["caption"] == f"photo {im.size[0]}x{im.size[1]}"


MISSING = [
    (
        "image_classifier",
        {"scores": {"nsfw": {"kind": "image_classifier", "path": "{tmp}/nsfw"}}},
        r"\[curate.scores.nsfw\].*{tmp}/nsfw.*does not exist.*config.json",
    ),
    (
        "clip_mlp head",
        {"scores": {"aes": {"kind": "clip_mlp", "path": "{clip}", "head": "{tmp}/aes.pth"}}},
        r"head.*{tmp}/aes.pth.*does not exist",
    ),
    (
        "plugin path",
        {
            "scores": {
                "wm": {
                    "kind": "plugin",
                    "entry": "tests.curate.plugin_fixtures:mean_brightness",
                    "path": "{tmp}/wm.onnx",
                }
            }
        },
        r"\[curate.scores.wm\].*{tmp}/wm.onnx.*does not exist",
    ),
    (
        "captioner",
        {"caption": {"entry": "tests.curate.plugin_fixtures:ocr_captioner", "path": "{tmp}/vlm"}},
        r"\[curate.caption\].*{tmp}/vlm.*does not exist",
    ),
    ("bad entry", {"caption": {"entry": "no_such_module:f"}}, r"cannot import 'no_such_module'"),
]


@pytest.mark.parametrize("name,opts,pattern", MISSING, ids=[m[0] for m in MISSING])
def test_missing_user_model_is_one_clear_error(tmp_path, tiny_clip, name, opts, pattern):
    import json

    fill = json.loads(json.dumps(opts).replace("{tmp}", str(tmp_path)).replace("{clip}", str(tiny_clip)))
    c = CurateConfig.from_dict({"ocr": False, **fill})
    with pytest.raises(CurateError, match=pattern.replace("{tmp}", str(tmp_path))):
        build_scorers(c) if "scores" in fill else build_captioner(c)


def test_missing_embedding_model(tmp_path, dup_set):
    root, _ = dup_set
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CurateError, match=r"lacks preprocessor_config.json"):
        run_embed(root, tmp_path / "o", cfg(), tmp_path / "half")
    with pytest.raises(CurateError, match="--model DIR"):
        run_embed(root, tmp_path / "o", cfg(), None)
    assert (
        main(["embed", "--input", str(root), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "none"), "-q"])
        == 2
    )


def test_profiler_builds_once_per_worker(tmp_path):
    p = Profiler(cfg())
    assert p.scorers == {} and p.captioner is None and p.ocr is None
