"""Edit pairs: 2*C(N+1, 2) combinatorial pairs with inverses, video-frame pairs in a band, rendered text edits."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.curate import editpairs as E
from train.curate.config import CurateError
from train.curate.synthetic import natural
from train.data.sources import scan_edit_jsonl

from .conftest import cfg

LEVELS = {"instruction", "caption", "target_caption"}


@pytest.mark.parametrize("n_edits", [1, 2, 3, 5])
def test_combinatorial_pairs(tmp_path, n_edits):
    rng = np.random.default_rng(n_edits)
    natural(rng, 64, 64).save(tmp_path / "src.png")
    edits = []
    for i in range(n_edits):
        natural(rng, 64, 64).save(tmp_path / f"e{i}.png")
        edits.append(
            {"image": f"e{i}.png", "instruction": f"Make edit {i}."} | ({"inverse": "Restore it."} if i == 0 else {})
        )
    (tmp_path / "groups.jsonl").write_text(json.dumps({"source": "src.png", "edits": edits}) + "\n")
    res = E.run_combos(tmp_path / "groups.jsonl", tmp_path / "out", cfg())
    assert res["count"] == 2 * comb(n_edits + 1, 2) == n_edits * (n_edits + 1)
    recs = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    pairs = {(r["source"].split("/")[-1], r["target"].split("/")[-1]): r for r in recs}
    assert len(pairs) == res["count"]  # all distinct ordered pairs
    assert (
        pairs[("src.png", "e0.png")]["instruction"] == "Make edit 0."
        and pairs[("src.png", "e0.png")]["kind"] == "expert"
    )
    assert (
        pairs[("e0.png", "src.png")]["instruction"] == "Restore it."
        and pairs[("e0.png", "src.png")]["kind"] == "inverse"
    )
    if n_edits > 1:
        assert pairs[("e1.png", "src.png")]["instruction"] == 'Undo the edit "Make edit 1".'
        assert pairs[("e0.png", "e1.png")]["instruction"] == "Restore it, then make edit 1."
    items = scan_edit_jsonl(0, tmp_path / "out" / "pairs.jsonl", LEVELS, 1.0)  # the trainer reads them
    assert len(items) == res["count"] and all(Path(it.target.path).is_file() for it in items)


def test_combos_errors(tmp_path):
    (tmp_path / "g.jsonl").write_text(
        json.dumps({"source": "a.png", "edits": [{"image": "b.png", "instruction": "x"}]})
    )
    with pytest.raises(CurateError, match="not found"):
        E.run_combos(tmp_path / "g.jsonl", tmp_path / "o", cfg())


def test_video_frame_pairs(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    other = rng.normal(size=16)
    # one video: frames drift slowly, an identical repeat, then a cut to another scene
    vecs = (
        [base + 0.15 * k * rng.normal(size=16) for k in range(4)]
        + [base + 0.45 * rng.normal(size=16)] * 2
        + [other, other + 0.3 * rng.normal(size=16)]
    )
    x = np.stack([v / np.linalg.norm(v) for v in vecs]).astype(np.float32)
    c = cfg(editpairs={"sim_low": 0.5, "sim_high": 0.999, "shot_threshold": 0.3})
    pairs = E.frame_pairs(x, c)
    sims = x @ x.T
    assert (4, 5) not in [(i, j) for i, j, _ in pairs]  # identical frames are above the band
    assert all(c.editpairs.sim_low <= sims[i, j] <= c.editpairs.sim_high for i, j, _ in pairs)
    assert all((i < 6) == (j < 6) for i, j, _ in pairs)  # never across the cut
    assert (6, 7) in [(i, j) for i, j, _ in pairs] and (0, 1) in [(i, j) for i, j, _ in pairs]
    # through the stage, with frames on disk and embeddings by id
    vid = tmp_path / "frames" / "clip1"
    vid.mkdir(parents=True)
    ids = []
    for k in range(len(x)):
        Image.new("RGB", (16, 16), (k * 20, 0, 0)).save(vid / f"{k:03d}.png")
        ids.append(f"clip1/{k:03d}.png")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "ids.txt").write_text("\n".join(ids))
    res = E.run_video(tmp_path / "frames", tmp_path / "out", c, tmp_path / "x.npy", tmp_path / "ids.txt")
    assert res["count"] == len(pairs)
    assert len(scan_edit_jsonl(0, tmp_path / "out" / "pairs.jsonl", LEVELS, 1.0)) == len(pairs)


def test_text_edit_pairs_are_exact(tmp_path):
    res = E.run_text(tmp_path, cfg(), n=12, seed=3, size=256)
    recs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert res["count"] == 12 and {r["op"] for r in recs} == {"replace", "recolour", "add", "remove"}
    for r in recs:
        src, tgt = (
            np.asarray(Image.open(tmp_path / r[k]).convert("RGB"), dtype=np.int16) for k in ("source", "target")
        )
        assert np.abs(src - tgt).max() > 50  # the edit is visible
        t = {
            "replace": f'Replace the text "{r["text_source"]}" with "{r["text_target"]}".',
            "remove": f'Remove the text "{r["text_source"]}".',
        }
        if r["op"] in t:
            assert r["instruction"] == t[r["op"]]
    assert len(scan_edit_jsonl(0, tmp_path / "pairs.jsonl", LEVELS, 1.0)) == 12
    # the ground truth is what an OCR reads in the rendered target
    from rapidocr_onnxruntime import RapidOCR

    r = next(r for r in recs if r["op"] == "replace")
    text = " ".join(
        t
        for _, t, _ in RapidOCR()(np.asarray(Image.open(tmp_path / r["target"]).convert("RGB"))[:, :, ::-1].copy())[0]
        or []
    )
    assert r["text_target"] in text.upper().replace(" ", "")


def test_fonts_fall_back(tmp_path):
    assert E.find_fonts(cfg())  # system fonts or Pillow's own
    with pytest.raises(CurateError, match="fonts"):
        E.find_fonts(cfg(editpairs={"fonts": [str(tmp_path / "none.ttf")]}))
    src, tgt, instr, meta = E.render_pair(np.random.default_rng(0), 128, None, [])  # Pillow's built-in font
    assert src.size == tgt.size == (128, 128) and meta["font"] == "pillow-default"
