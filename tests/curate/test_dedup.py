"""Dedup: planted near-duplicates found, best member kept, Leiden communities, resume, and the contract command."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from train.curate import vectors as V
from train.curate.cli import main
from train.curate.config import CurateError
from train.curate.dedup import run_dedup
from train.curate.profile import Profiler, run_profile
from train.curate.synthetic import planted_embeddings

from .conftest import cfg


def rows(out):
    return {r["id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def test_contract_dedup_finds_planted_duplicates(tmp_path, dup_set):
    root, truth = dup_set
    (tmp_path / "c.toml").write_text("[curate]\nocr = false\n")  # OCR has its own test; it is slow here
    args = ["dedup", "--input", str(root), "--out", str(tmp_path), "--config", str(tmp_path / "c.toml")]
    assert main([*args, "--no-progress", "-q"]) == 0
    r = rows(tmp_path)
    assert {"path", "keep", "reasons", "duplicate_of", "cluster"} <= set(next(iter(r.values())))
    found = {i: x["duplicate_of"] for i, x in r.items() if x["duplicate_of"]}
    for dup, orig in truth.items():
        if dup.startswith("dup0_exact"):  # byte-identical copies tie; either may be kept (the first id is)
            dup, orig = sorted([dup, orig])[::-1]
        assert found.pop(dup) == (root / orig).resolve().as_posix()
        assert not r[dup]["keep"] and "duplicate" in r[dup]["reasons"]
        assert r[orig]["keep"] and r[orig]["duplicate_of"] == ""
        assert r[dup]["cluster"] == r[orig]["cluster"]  # the original is the larger / better member
    assert found == {}  # no false duplicate
    singles = [x["cluster"] for i, x in r.items() if i not in truth]
    assert len(set(singles)) == len(singles)  # every other image its own cluster


def test_rank_by_picks_the_member_kept(tmp_path, dup_set):
    root, truth = dup_set

    # a plug-in score that prefers the planted copies: the copy must then be kept instead of the original
    c = cfg(
        scores={"pref": {"kind": "plugin", "entry": "tests.curate.plugin_fixtures:prefer_dup"}},
        dedup={"rank_by": ["score_pref"]},
    )
    run_profile(root, tmp_path, c)
    run_dedup(tmp_path / "manifest.parquet", tmp_path, c)
    r = rows(tmp_path)
    for dup, orig in truth.items():
        if "resized" in dup or "cropped" in dup:  # (the copies of the same size tie on this score)
            assert r[dup]["keep"] and r[orig]["duplicate_of"].endswith(dup), (dup, r[orig]["reasons"])


def test_embedding_communities_and_near_duplicates(tmp_path):
    rng = np.random.default_rng(0)
    x, labels = planted_embeddings(rng, n_clusters=6, per_cluster=25, dim=48)
    opts = cfg().dedup
    comm, sims, idx = V.communities(x, opts)
    assert V.adjusted_rand_index(comm, labels) > 0.95
    assert (
        V.adjusted_rand_index(labels, labels) == 1.0
        and abs(V.adjusted_rand_index(labels, rng.permutation(labels))) < 0.1
    )
    # the same through an IVF and an HNSW index
    for kind in ("ivf", "hnsw"):
        c2, _, _ = V.communities(x, cfg(dedup={"index": kind}).dedup)
        assert V.adjusted_rand_index(c2, labels) > 0.9, kind
    # density names the small, loose region
    names = [f"concept{lab}" for lab in labels]
    extra = rng.normal(size=(3, 48)).astype(np.float32)
    xs = V.normalise(np.concatenate([x, extra]))
    comm, sims, _ = V.communities(xs, opts)
    rep = V.density(sims, comm, names + ["void"] * 3)
    assert any("void" in s for s in rep["sparse"]) and not any(s == "concept0" for s in rep["sparse"])
    hits_s, hits_i = V.retrieve(x, x[:1] + 0.01, 5, opts)
    assert hits_i[0][0] == 0 and set(labels[hits_i[0]]) == {labels[0]}


def test_embedding_near_duplicates_in_dedup(tmp_path, dup_set):
    root, truth = dup_set
    out = tmp_path / "o"
    run_profile(root, out, cfg())
    ids = sorted(p.name for p in root.iterdir())
    rng = np.random.default_rng(1)
    x = rng.normal(size=(len(ids), 32)).astype(np.float32)
    twin = ids.index("orig5.png")  # an unplanted image made a semantic twin of orig1 by its embedding only
    x[twin] = x[ids.index("orig1.png")] + 0.01 * rng.normal(size=32)
    np.save(tmp_path / "e.npy", x)
    (tmp_path / "ids.txt").write_text("\n".join(ids))
    (tmp_path / "c.toml").write_text("[curate]\nocr = false\nshard_size = 8\n")  # as profiled above: reused
    args = ["dedup", "--input", str(root), "--out", str(out), "--config", str(tmp_path / "c.toml")]
    assert (
        main(
            [*args, "--embeddings", str(tmp_path / "e.npy"), "--ids", str(tmp_path / "ids.txt"), "-q", "--no-progress"]
        )
        == 0
    )
    r = rows(out)
    assert "embedding cosine" in r["orig5.png"]["reasons"] or "embedding cosine" in r["orig1.png"]["reasons"]
    assert r["orig5.png"]["cluster"] == r["orig1.png"]["cluster"]
    assert all(x["community"] >= 0 for x in r.values())
    with pytest.raises(CurateError, match="ids"):
        V.load_embeddings(tmp_path / "e.npy", _write(tmp_path / "bad.txt", "a\nb"))


def _write(p, text):
    p.write_text(text)
    return p


def test_resume_skips_finished_shards(tmp_path, dup_set, monkeypatch):
    root, _ = dup_set
    c = cfg(shard_size=3)
    run_profile(root, tmp_path, c)
    shards = sorted((tmp_path / ".shards" / "profile").glob("part-*.parquet"))
    assert len(shards) == 4
    first = pq.read_table(tmp_path / "manifest.parquet")
    shards[2].unlink()
    calls = []
    orig = Profiler.__call__
    monkeypatch.setattr(Profiler, "__call__", lambda self, items: calls.append(len(items)) or orig(self, items))
    run_profile(root, tmp_path, c)
    assert calls == [3]  # only the missing shard was computed again
    assert pq.read_table(tmp_path / "manifest.parquet").equals(first)
    calls.clear()
    run_profile(root, tmp_path, c)
    assert calls == []
    run_profile(root, tmp_path, cfg(shard_size=3, filters={"min_sharpness": 99.0}))  # options changed: all again
    assert calls == [3, 3, 3, 2]


def test_run_and_report(tmp_path, dup_set):
    root, truth = dup_set
    (tmp_path / "c.toml").write_text("[curate]\nocr = false\n")
    rng = np.random.default_rng(0)
    ids = sorted(p.name for p in root.iterdir())
    np.save(tmp_path / "e.npy", rng.normal(size=(len(ids), 8)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(ids))
    out = tmp_path / "o"
    args = ["run", "--input", str(root), "--out", str(out), "--config", str(tmp_path / "c.toml")]
    assert main([*args, "--embeddings", str(tmp_path / "e.npy"), "--ids", str(tmp_path / "ids.txt"), "-q"]) == 0
    page = (out / "report.html").read_text()
    assert "<svg" in page and page.count("data:image/jpeg;base64,") >= 2 * len(truth)
    assert "Duplicate clusters" in page and "Sparse regions" in page and "sharpness" in page
    import json

    info = json.loads((out / "dedup.json").read_text())
    assert info["duplicates"] == len(truth) and info["images"] == len(ids)
    assert json.loads((out / "density.json").read_text())["communities"]
