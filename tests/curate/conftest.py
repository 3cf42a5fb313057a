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
