"""Shared by the data-engine tests: small generated image sets with planted duplicates and rejects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train.curate.config import CurateConfig
from train.curate.synthetic import DUPLICATE_KINDS, natural, near_duplicate


def cfg(**kw) -> CurateConfig:
    """A quiet configuration without OCR (OCR has its own test)."""
    base = {"ocr": False, "progress": False, "shard_size": 8}
    base.update(kw)
    return CurateConfig.from_dict(base)


@pytest.fixture(scope="session")
def dup_set(tmp_path_factory):
    """6 originals, the first 5 with one planted near-duplicate of each kind -> (folder, {dup id: original id})."""
    root = tmp_path_factory.mktemp("dups")
    rng = np.random.default_rng(7)
    truth = {}
    for i in range(6):
        im = natural(rng, int(rng.integers(180, 260)), int(rng.integers(160, 240)))
        im.save(root / f"orig{i}.png")
        if i < 5:
            kind = DUPLICATE_KINDS[i]
            name = f"dup{i}_{kind}.jpg" if kind == "recompressed" else f"dup{i}_{kind}.png"
            v = near_duplicate(rng, im, kind)
            if kind == "recompressed":
                v.save(root / name, quality=60)
            else:
                v.save(root / name)
            truth[name] = f"orig{i}.png"
    return Path(root), truth


def make_tiny_clip(d: Path) -> Path:
    """A randomly initialised 2-layer CLIP with a byte-level tokenizer, saved like a real model folder."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in bytes_to_unicode().values():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={**text, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config=vision,
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))
