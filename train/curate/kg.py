"""Knowledge graph and concept balance.

``kg``: entities and links from JSONL (``{"entity": "tabby cat", "links": ["cat"], "tags": ["tabby"]}``) ->
a directed graph; PageRank prunes isolated and unimportant nodes; the kept entities are clustered
hierarchically (k-means per level on their tag embeddings, each parent named by its most central member)
into a taxonomy; a prompt log adds a frequency boost per entity. Writes ``OUT/kg.json``.

``balance``: each manifest image's text (``tags``/``caption``/``ocr_text`` columns and caption sidecars) is
matched against the entities' tags; a BM25-style score (inverse document frequency with saturated term
frequency and length normalisation, times the prompt boost, plus a share of the taxonomy parents' score)
measures how rare its concepts are; normalised to mean 1 and clipped, it is the ``weight`` column the
trainer's ``manifest`` source samples by.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from .config import CurateConfig, CurateError
from .manifest import MANIFEST, read_columns, rewrite, set_column, write_text

log = logging.getLogger(__name__)
_WORD = re.compile(r"[\w']+", re.UNICODE)


def norm(text: str) -> str:
    return " ".join(_WORD.findall(str(text).lower()))


def read_entities(path) -> dict[str, dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CurateError(
            f'entity file \'{p}\' does not exist (JSONL: {{"entity": ..., "links": [...], "tags": [...]}}).'
        )
    out: dict[str, dict] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise CurateError(f"{p}:{n}: not valid JSON ({e}).") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("entity"), str) or not rec["entity"].strip():
            raise CurateError(f'{p}:{n}: each line needs "entity": a non-empty string.')
        for key in ("links", "tags"):
            v = rec.get(key, [])
            if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
                raise CurateError(f"{p}:{n}: '{key}' must be a list of strings.")
        e = out.setdefault(rec["entity"].strip(), {"links": [], "tags": []})
        e["links"] += [t.strip() for t in rec.get("links", []) if t.strip()]
        e["tags"] += [t.strip() for t in rec.get("tags", []) if t.strip()]
    if not out:
        raise CurateError(f"'{p}' holds no entity.")
    return out


def pagerank_prune(ents: dict[str, dict], cfg: CurateConfig) -> tuple[dict[str, float], dict[str, str]]:
    """(PageRank of every node, pruned node -> reason)."""
    import igraph

    names = sorted(set(ents) | {t for e in ents.values() for t in e["links"]})
    index = {n: i for i, n in enumerate(names)}
    edges = sorted({(index[a], index[b]) for a, e in ents.items() for b in e["links"] if a != b})
    g = igraph.Graph(n=len(names), edges=edges, directed=True)
    pr = dict(zip(names, g.pagerank(damping=0.85, directed=True)))
    deg = dict(zip(names, g.degree()))
    mean = 1.0 / len(names)
    pruned = {}
    for n in names:
        if cfg.kg.prune_isolated and deg[n] == 0:
            pruned[n] = "isolated (no link in or out)"
        elif pr[n] < cfg.kg.min_pagerank * mean:
            pruned[n] = f"PageRank {pr[n]:.3g} < {cfg.kg.min_pagerank:g} x mean {mean:.3g}"
    return pr, pruned


def hashed_embeddings(texts: list[str], dim: int = 256) -> np.ndarray:
    """Offline stand-in for a text encoder: hashed character 3-grams (similar spellings land close)."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, t in enumerate(texts):
        s = f"  {norm(t)}  "
        for j in range(len(s) - 2):
            h = int.from_bytes(hashlib.blake2b(s[j : j + 3].encode(), digest_size=4).digest(), "little")
            out[i, h % dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def taxonomy(names: list[str], vecs: np.ndarray, branching: list[int], seed: int = 0) -> tuple[dict, dict]:
    """Hierarchical k-means tree ``{name, children | entities}`` and entity -> [ancestors from the root down]."""
    from .vectors import faiss, normalise

    f = faiss()
    parents: dict[str, list[str]] = {n: [] for n in names}

    def medoid(idx):
        c = vecs[idx].mean(axis=0)
        return names[idx[int(np.argmax(vecs[idx] @ c))]]

    def split(idx: np.ndarray, level: int, path: list[str]) -> dict:
        node = {"name": medoid(idx) if path else "root", "size": int(len(idx))}
        k = branching[level] if level < len(branching) else 0
        if k < 2 or len(idx) <= k:
            node["entities"] = [names[i] for i in idx]
            return node
        km = f.Kmeans(
            vecs.shape[1], k, niter=25, seed=seed + level, min_points_per_centroid=1, max_points_per_centroid=100000
        )
        km.train(np.ascontiguousarray(vecs[idx]))
        _, assign = km.index.search(np.ascontiguousarray(vecs[idx]), 1)
        node["children"] = []
        for c in range(k):
            sub = idx[assign[:, 0] == c]
            if len(sub) == 0:
                continue
            child_path = path + [medoid(sub)]
            for i in sub:  # set before descending: a deeper level overwrites it with a longer path
                parents[names[i]] = child_path
            node["children"].append(split(sub, level + 1, child_path))
        return node

    vecs = normalise(vecs)
    tree = split(np.arange(len(names)), 0, [])

    def chain(n, ps):  # ancestors from the root down, without repeats and without the entity itself
        out = []
        for p in ps:
            if p != n and (not out or out[-1] != p):
                out.append(p)
        return out

    return tree, {n: chain(n, ps) for n, ps in parents.items()}


def prompt_frequencies(prompts_file, tag_map: dict[str, set[str]]) -> dict[str, int]:
    p = Path(prompts_file).expanduser()
    if not p.is_file():
        raise CurateError(f"prompt log '{p}' does not exist (one prompt per line).")
    freq: dict[str, int] = {}
    matcher = Matcher(tag_map)
    for line in p.read_text(encoding="utf-8").splitlines():
        for e in set(matcher(line)):
            freq[e] = freq.get(e, 0) + 1
    return freq


class Matcher:
    """Finds entities in text by their tags (whole words, up to 4-word tags, case-insensitive)."""

    def __init__(self, tag_map: dict[str, set[str]]):
        self.by_tag: dict[str, set[str]] = {}
        for ent, tags in tag_map.items():
            for t in tags:
                if norm(t):
                    self.by_tag.setdefault(norm(t), set()).add(ent)
        self.longest = max((len(t.split()) for t in self.by_tag), default=1)

    def __call__(self, text: str) -> list[str]:
        words = norm(text).split()
        hits = []
        for n in range(1, min(self.longest, 4) + 1):
            for i in range(len(words) - n + 1):
                hits += sorted(self.by_tag.get(" ".join(words[i : i + n]), ()))
        return hits


def run_kg(entities, out, cfg: CurateConfig, tag_embeddings=None, tag_ids=None, prompts=None) -> dict:
    out = Path(out).expanduser()
    ents = read_entities(entities)
    pr, pruned = pagerank_prune(ents, cfg)
    kept = [n for n in sorted(pr) if n not in pruned]
    if not kept:
        raise CurateError("PageRank pruning removed every entity; lower [curate.kg] min_pagerank.")
    tags = {n: sorted({n, *ents.get(n, {}).get("tags", [])}) for n in kept}
    if tag_embeddings:
        from .vectors import load_embeddings

        x, ids = load_embeddings(tag_embeddings, tag_ids)
        if ids is None:
            raise CurateError("--tag-embeddings needs --tag-ids (the tag of each row).")
        row = {norm(t): i for i, t in enumerate(ids)}
        missing = [t for n in kept for t in tags[n] if norm(t) not in row]
        if missing:
            raise CurateError(
                f"{len(missing)} tags have no row in '{tag_embeddings}' (e.g. {missing[:3]}); embed them all."
            )
        vecs = np.stack([x[[row[norm(t)] for t in tags[n]]].mean(axis=0) for n in kept])
    else:
        vecs = np.stack([hashed_embeddings(tags[n]).mean(axis=0) for n in kept])
    tree, parents = taxonomy(kept, vecs, list(cfg.kg.branching), cfg.dedup.seed)
    freq = prompt_frequencies(prompts, {n: set(tags[n]) for n in kept}) if prompts else {}
    fmax = max(freq.values(), default=0)
    result = {
        "entities": {
            n: {
                "pagerank": pr[n],
                "tags": tags[n],
                "parents": parents.get(n, []),
                "prompt_freq": freq.get(n, 0),
                "boost": 1.0 + cfg.kg.prompt_boost * (math.log1p(freq.get(n, 0)) / math.log1p(fmax) if fmax else 0.0),
            }
            for n in kept
        },
        "pruned": pruned,
        "taxonomy": tree,
    }
    write_text(out / "kg.json", json.dumps(result, indent=1, ensure_ascii=False))
    log.info(
        "kg: %d entities kept, %d pruned; taxonomy of %d top-level groups",
        len(kept),
        len(pruned),
        len(tree.get("children", [])),
    )
    return {"kg": str(out / "kg.json"), "kept": len(kept), "pruned": len(pruned)}


def _sidecar_text(path: str) -> str:
    p = Path(path)
    parts = []
    for q in (p.with_suffix(".txt"), p.with_suffix(".json")):
        if q.is_file():
            try:
                parts.append(q.read_text(encoding="utf-8"))
            except OSError:
                pass
    return " ".join(parts)


def concept_weights(texts: list[str], kg: dict, cfg: CurateConfig) -> tuple[np.ndarray, list[list[str]]]:
    """Per text: the BM25-rarity sampling weight (mean 1 over texts, clipped) and the entities found."""
    ents = kg["entities"]
    matcher = Matcher({n: set(e["tags"]) for n, e in ents.items()})
    found = [matcher(t) for t in texts]
    n = len(texts)
    df: dict[str, int] = {}
    for f in found:
        for e in set(f):
            df[e] = df.get(e, 0) + 1
            for p in ents[e]["parents"]:
                df["^" + p] = df.get("^" + p, 0) + 1
    lengths = np.array([len(f) for f in found], dtype=np.float64)
    avgdl = lengths[lengths > 0].mean() if (lengths > 0).any() else 1.0
    k1, b = cfg.kg.k1, cfg.kg.b

    def bm25(term: str, tf: int, dl: float) -> float:
        d = df[term]
        idf = math.log(1.0 + (n - d + 0.5) / (d + 0.5))
        return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))

    raw = np.full(n, np.nan)
    for i, f in enumerate(found):
        if not f:
            continue
        counts: dict[str, int] = {}
        for e in f:
            counts[e] = counts.get(e, 0) + 1
        scores = []
        for e, tf in counts.items():
            s = bm25(e, tf, lengths[i]) * ents[e]["boost"]
            ps = [bm25("^" + p, 1, lengths[i]) for p in ents[e]["parents"] if "^" + p in df]
            scores.append(s + cfg.kg.parent_share * (float(np.mean(ps)) if ps else 0.0))
        raw[i] = float(np.mean(scores))
    w = np.ones(n)
    have = ~np.isnan(raw)
    if have.any():
        w[have] = raw[have] / np.median(raw[have])
        w = w / w.mean()
    return np.clip(w, cfg.kg.weight_min, cfg.kg.weight_max), [sorted(set(f)) for f in found]


def run_balance(out, cfg: CurateConfig, kg_file) -> dict:
    out = Path(out).expanduser()
    kp = Path(kg_file).expanduser()
    if not kp.is_file():
        raise CurateError(f"no knowledge graph at '{kp}'; run `python -m train.curate kg --entities FILE --out {out}`.")
    kg = json.loads(kp.read_text(encoding="utf-8"))
    cols = read_columns(out, ["id", "path", "keep"], optional=("tags", "caption", "ocr_text"))
    texts = [
        " ".join(str(cols[c][i]) for c in ("tags", "caption", "ocr_text") if c in cols and cols[c][i])
        + " "
        + _sidecar_text(cols["path"][i])
        for i in range(len(cols["id"]))
    ]
    keep = np.asarray(cols["keep"], dtype=bool)
    w = np.zeros(len(texts))
    found: list[list[str]] = [[] for _ in texts]
    idx = np.nonzero(keep)[0]
    if len(idx):
        wk, fk = concept_weights([texts[i] for i in idx], kg, cfg)
        w[idx] = wk
        for j, i in enumerate(idx):
            found[i] = fk[j]

    def update(off, rb):
        import pyarrow as pa

        t = pa.Table.from_batches([rb])
        s = slice(off, off + rb.num_rows)
        t = set_column(t, "weight", w[s].tolist(), pa.float64())
        return set_column(t, "concepts", [", ".join(f) for f in found[s]], pa.string())

    rewrite(out / MANIFEST, out / MANIFEST, update)
    log.info("balance: weights %.3g..%.3g over %d kept images", w[keep].min() if keep.any() else 0, w.max(), keep.sum())
    return {
        "manifest": str(out / MANIFEST),
        "weight_min": float(w[keep].min()) if keep.any() else None,
        "weight_max": float(w.max()),
    }
