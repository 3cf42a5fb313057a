"""Knowledge graph: PageRank pruning, taxonomy, prompt boosts and BM25 rarity weights on a tiny graph."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.curate.cli import main
from train.curate.config import CurateError
from train.curate.kg import Matcher, concept_weights, hashed_embeddings, run_balance, run_kg

from .conftest import cfg

ENTITIES = [
    {"entity": "animal", "links": ["living thing"], "tags": []},
    {"entity": "living thing", "links": ["animal"], "tags": []},
    {"entity": "cat", "links": ["animal"], "tags": ["kitten", "tabby"]},
    {"entity": "dog", "links": ["animal"], "tags": ["puppy"]},
    {"entity": "axolotl", "links": ["animal"], "tags": ["mexican salamander"]},
    {"entity": "car", "links": ["vehicle"], "tags": ["sedan"]},
    {"entity": "vehicle", "links": ["car"], "tags": []},
    {"entity": "bus", "links": ["vehicle"], "tags": []},
    {"entity": "pet", "links": ["cat", "dog"], "tags": []},
    {"entity": "zoo", "links": ["axolotl", "animal"], "tags": []},
    {"entity": "garage", "links": ["car", "bus"], "tags": []},
    {"entity": "lonely word", "links": [], "tags": ["hermit"]},
    {"entity": "leaf page", "links": ["stub"], "tags": []},
]


@pytest.fixture()
def kg_dir(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(e) for e in ENTITIES))
    (tmp_path / "prompts.txt").write_text("a puppy on grass\nmy dog\ntwo dogs\na dog and a cat\n")
    return tmp_path


def test_pagerank_pruning_and_taxonomy(kg_dir):
    c = cfg(kg={"branching": [2, 2]})  # default min_pagerank 0.25 x mean: nodes nothing links to go
    res = run_kg(kg_dir / "e.jsonl", kg_dir, c, prompts=kg_dir / "prompts.txt")
    kg = json.loads((kg_dir / "kg.json").read_text())
    assert kg["pruned"]["lonely word"].startswith("isolated")
    assert "PageRank" in kg["pruned"]["leaf page"]  # nothing links to it: the lowest rank
    assert {"pet", "zoo", "garage"} <= set(kg["pruned"])
    assert {"animal", "cat", "dog", "axolotl", "car", "vehicle"} <= set(kg["entities"])
    assert res["kept"] + res["pruned"] == 14  # 'stub' is a node too
    e = kg["entities"]
    assert e["dog"]["prompt_freq"] == 3 and e["cat"]["prompt_freq"] == 1 and e["axolotl"]["prompt_freq"] == 0
    assert e["dog"]["boost"] == pytest.approx(2.0) and 1.0 < e["cat"]["boost"] < e["dog"]["boost"]
    # the taxonomy: every kept entity sits in exactly one leaf, with its parents on the way down
    leaves = {}

    def walk(node, path):
        for name in node.get("entities", []):
            leaves[name] = [p for i, p in enumerate(path) if p != name and (i == 0 or path[i - 1] != p)]
        for ch in node.get("children", []):
            walk(ch, path + [ch["name"]])

    walk(kg["taxonomy"], [])
    assert sorted(leaves) == sorted(e)
    assert {n: v["parents"] for n, v in e.items()} == leaves
    assert len(kg["taxonomy"]["children"]) == 2 and any(v["parents"] for v in e.values())


def test_hashed_embeddings_and_matcher():
    v = hashed_embeddings(["tabby cat", "tabby cats", "school bus"])
    assert v[0] @ v[1] > 0.7 > v[0] @ v[2]
    m = Matcher({"axolotl": {"axolotl", "mexican salamander"}, "cat": {"cat"}})
    assert m("A Mexican salamander, and a CAT!") == ["cat", "axolotl"]


def test_rarity_weights(kg_dir):
    c = cfg(kg={"branching": [2]})
    run_kg(kg_dir / "e.jsonl", kg_dir, c, prompts=kg_dir / "prompts.txt")
    kg = json.loads((kg_dir / "kg.json").read_text())
    texts = (
        ["a tabby cat"] * 10 + ["a cat on a sofa"] * 5 + ["an axolotl in a tank"] + ["a puppy"] * 5 + ["abstract art"]
    )
    w, found = concept_weights(texts, kg, c)
    assert found[0] == ["cat"] and found[15] == ["axolotl"] and found[-1] == []
    assert w[15] > w[16] > w[0]  # rare > boosted-by-prompts medium > common
    assert w[-1] == pytest.approx(w[-1]) and abs(np.mean(w) - 1.0) < 0.2
    assert w.min() >= c.kg.weight_min and w.max() <= c.kg.weight_max


def test_balance_writes_weights(kg_dir):
    ids = [f"img{i}.png" for i in range(6)]
    caps = ["a cat"] * 4 + ["an axolotl", "a dog"]
    t = pa.table({"id": ids, "path": [str(kg_dir / i) for i in ids], "keep": [True] * 5 + [False], "caption": caps})
    pq.write_table(t, kg_dir / "manifest.parquet")
    assert main(["kg", "--entities", str(kg_dir / "e.jsonl"), "--out", str(kg_dir), "-q"]) == 0
    assert main(["balance", "--out", str(kg_dir), "-q"]) == 0
    r = pq.read_table(kg_dir / "manifest.parquet").to_pylist()
    assert r[4]["weight"] > r[0]["weight"] > 0 and r[5]["weight"] == 0.0  # rejected rows are never drawn
    assert r[4]["concepts"] == "axolotl"
    with pytest.raises(CurateError, match="no knowledge graph"):
        run_balance(kg_dir, cfg(), kg_dir / "missing.json")
