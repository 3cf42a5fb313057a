"""Profile stage: every measurement moves the right way, corrupt files become rows, the contract columns exist."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter, ImageOps

from train.curate import metrics as M
from train.curate.cli import main
from train.curate.config import CurateConfig, CurateError
from train.curate.profile import COLUMNS, run_profile
from train.curate.synthetic import degraded, natural

from .conftest import cfg

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base():
    return natural(np.random.default_rng(3), 256, 192)


def _measure(im, **kw):
    from train.curate.profile import Profiler

    p = Profiler(cfg(**kw))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.png"
        im.save(path)
        row, _ = p.measure({"id": "x", "path": str(path)})
    return row


def _noisy(im):
    a = np.asarray(im).astype(float) + np.random.default_rng(0).normal(0, 25, np.asarray(im).shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _tinted(im):
    a = np.asarray(im).astype(float) * np.array([1.0, 0.75, 0.45])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# (name, transform, column, direction): the column must move that way from the clean image
CASES = [
    ("blur lowers sharpness", lambda im: im.filter(ImageFilter.GaussianBlur(3)), "sharpness", "down"),
    ("noise raises noise", _noisy, "noise", "up"),
    ("a frame raises border_score", lambda im: ImageOps.expand(im, border=20, fill=(0, 0, 0)), "border_score", "up"),
    (
        "a frame lowers border_variance",
        lambda im: ImageOps.expand(im, border=20, fill=(255, 255, 255)),
        "border_variance",
        "down",
    ),
    ("flat lowers entropy", lambda im: Image.new("RGB", im.size, (90, 120, 40)), "entropy", "down"),
    ("flat lowers std", lambda im: Image.new("RGB", im.size, (90, 120, 40)), "std", "down"),
    (
        "flat lowers JPEG bytes per pixel",
        lambda im: Image.new("RGB", im.size, (90, 120, 40)),
        "jpeg_bytes_per_pixel",
        "down",
    ),
    (
        "heavy JPEG raises blockiness",
        lambda im: degraded(np.random.default_rng(1), im, "compressed"),
        "blockiness",
        "up",
    ),
    ("a tint raises colour_cast", _tinted, "colour_cast", "up"),
]


@pytest.mark.parametrize("name,fn,col,direction", CASES, ids=[c[0] for c in CASES])
def test_metric_direction(base, name, fn, col, direction):
    clean, bad = _measure(base)[col], _measure(fn(base))[col]
    assert (bad < clean) if direction == "down" else (bad > clean), (name, clean, bad)


def test_metric_units():
    g = np.tile(np.arange(64, dtype=np.float32) * 4, (64, 1))
    assert M.entropy(g) == pytest.approx(6.0)  # 64 equally used grey levels
    assert M.sharpness(g) == pytest.approx(0.0)  # a linear ramp has no curvature
    assert M.ideal_bytes(100, 50, "RGB") == 15000 and M.ideal_bytes(100, 50, "RGBA") == 20000
    assert M.border_score(np.zeros((40, 40, 3), np.uint8)) == (0.0, 0.0)  # flat is not a frame
    lb = np.full((60, 80, 3), 128, np.uint8)
    lb[10:50] = np.random.default_rng(0).integers(0, 255, (40, 80, 3))
    lb[:10] = lb[50:] = 0
    assert M.border_score(lb)[0] == 0.5  # a letterbox frames two sides


def test_exif_orientation(tmp_path):
    im = natural(np.random.default_rng(2), 120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 80 x 120
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    run_profile(tmp_path, tmp_path / "out", cfg())
    t = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()[0]
    assert (t["exif_orientation"], t["width"], t["height"], t["format"]) == (6, 80, 120, "JPEG")


def test_corrupt_files_are_rows_and_filters_reject(tmp_path):
    rng = np.random.default_rng(5)
    good = natural(rng, 200, 160)
    good.save(tmp_path / "good.png")
    good.save(tmp_path / "trunc.jpg", quality=90)
    data = (tmp_path / "trunc.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.webp").write_bytes(b"this is not an image")
    for kind in ("blurred", "compressed", "bordered", "flat"):
        degraded(rng, natural(rng, 200, 160), kind).save(tmp_path / f"{kind}.png")
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "tiny.png")
    rows = {r["id"]: r for r in pq.read_table(run_profile(tmp_path, tmp_path / "out", cfg())).to_pylist()}
    assert len(rows) == 9
    for bad in ("trunc.jpg", "empty.png", "text.webp"):
        assert not rows[bad]["decodes"] and not rows[bad]["keep"]
        assert rows[bad]["reasons"].startswith("decode_error:"), rows[bad]["reasons"]
    assert rows["good.png"]["keep"] and rows["good.png"]["reasons"] == ""
    expect = {"blurred": "blur", "compressed": "compression", "bordered": "border", "flat": "flat", "tiny": "too_small"}
    for name, code in expect.items():
        r = rows[f"{name}.png"]
        assert not r["keep"] and code in [x.split(":")[0] for x in r["reasons"].split("; ")], (name, r["reasons"])


def test_contract_profile_command(tmp_path, dup_set):
    root, _ = dup_set
    # the module entry point itself, as other checks call it
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.curate",
            "profile",
            "--input",
            str(root),
            "--out",
            str(tmp_path),
            "--no-progress",
            "-q",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    t = pq.read_table(tmp_path / "manifest.parquet")
    assert set(COLUMNS) <= set(t.column_names)
    assert {"path", "keep", "reasons", "duplicate_of", "cluster"} <= set(t.column_names)
    assert t.num_rows == len(list(root.iterdir()))
    assert all(Path(p).is_file() for p in t.column("path").to_pylist())
    assert all(len(h) == 16 for h in t.column("phash").to_pylist())


def test_ocr_reads_rendered_text(tmp_path):
    from PIL import ImageDraw, ImageFont

    im = Image.new("RGB", (420, 160), (240, 240, 235))
    ImageDraw.Draw(im).text((20, 50), "OPEN 24", fill=(10, 10, 10), font=ImageFont.load_default(size=56))
    im.save(tmp_path / "sign.png")
    out = run_profile(tmp_path, tmp_path / "o", CurateConfig.from_dict({"progress": False}))
    row = pq.read_table(out).to_pylist()[0]
    assert "OPEN 24" in row["ocr_text"].replace("\n", " ")
    x0, y0, x1, y1 = json.loads(row["ocr_boxes"])[0]
    assert 0 <= x0 < 60 and 30 < y0 < 80 and x1 > 200 and 0.05 < row["text_area"] < 0.6


def test_config_errors(tmp_path):
    with pytest.raises(CurateError, match="unknown option.*blurr"):
        CurateConfig.from_dict({"filters": {"blurr": 3}})
    with pytest.raises(CurateError, match="engine"):
        CurateConfig.from_dict({"engine": "spark"})
    p = tmp_path / "c.toml"
    p.write_text("[curate]\nshard_size = 4\n[curate.filters]\nmin_sharpness = 50.0\nmax_noise = 9\n[other]\nx = 1\n")
    c = CurateConfig.load(p, {"engine": "ray"})
    assert (c.shard_size, c.filters.min_sharpness, c.filters.max_noise, c.engine) == (4, 50.0, 9, "ray")
    assert main(["profile", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "-q"]) == 2
