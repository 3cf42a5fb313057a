"""The vector engine: faiss k-NN (exact, IVF or HNSW), the proximity graph, Leiden communities, retrieval
and density (sparse regions).

Vectors are L2-normalised float32 rows, so inner product = cosine similarity. ``index = "auto"`` searches
exactly up to ``exact_limit`` vectors and with HNSW above; ``"ivf"`` trains an inverted file on a sample.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .config import CurateError, Dedup

log = logging.getLogger(__name__)


def faiss():
    try:
        import faiss as f
    except ImportError as e:
        raise CurateError("the vector engine needs faiss: pip install -e '.[curate]' (or faiss-cpu).") from e
    return f


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def load_embeddings(npy, ids_file=None) -> tuple[np.ndarray, list[str] | None]:
    """A ``[N, D]`` ``.npy`` and, when given, its ids (one per line: a manifest id, a path or a file name)."""
    p = Path(npy).expanduser()
    if not p.is_file():
        raise CurateError(f"embeddings file '{p}' does not exist (an [N, D] float array saved with numpy.save).")
    x = np.load(p, mmap_mode="r")
    if x.ndim != 2 or x.shape[0] == 0:
        raise CurateError(f"'{p}' holds an array of shape {x.shape}; expected [N, D] with N >= 1.")
    ids = None
    if ids_file is not None:
        q = Path(ids_file).expanduser()
        if not q.is_file():
            raise CurateError(f"ids file '{q}' does not exist (one id per line, in the order of the .npy rows).")
        ids = [ln.strip() for ln in q.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(ids) != x.shape[0]:
            raise CurateError(f"'{q}' has {len(ids)} ids but '{p}' has {x.shape[0]} rows; they must match.")
    return normalise(np.asarray(x)), ids


def align(ids: list[str], manifest_ids: list[str], manifest_paths: list[str]) -> np.ndarray:
    """Row of each manifest entry in the embedding file (-1: none), matching by id, then path, then file name."""
    by_id = {v: i for i, v in enumerate(ids)}
    names: dict[str, int] = {}
    for i, v in enumerate(ids):
        names[Path(v).name] = -2 if Path(v).name in names else i  # -2: ambiguous
    out = np.full(len(manifest_ids), -1, np.int64)
    for r, (mid, path) in enumerate(zip(manifest_ids, manifest_paths)):
        j = by_id.get(mid, by_id.get(path, names.get(Path(mid).name, -1)))
        out[r] = j if j >= 0 else -1
    missing = int((out < 0).sum())
    if missing == len(out):
        raise CurateError(
            "none of the embedding ids matches the manifest (ids are matched to the manifest's 'id', its 'path' "
            f"or the file name); e.g. id {ids[0]!r} vs manifest id {manifest_ids[0]!r}."
        )
    if missing:
        log.warning("%d of %d images have no embedding; they take part in pixel dedup only", missing, len(out))
    return out


def make_index(x: np.ndarray, opts: Dedup, metric: str = "ip"):
    """A faiss index over ``x`` (added), chosen by ``opts.index`` and the set's size."""
    f = faiss()
    n, d = x.shape
    kind = opts.index
    if kind == "auto":
        kind = "flat" if n <= opts.exact_limit else "hnsw"
    m = f.METRIC_INNER_PRODUCT if metric == "ip" else f.METRIC_L2
    if kind == "flat" or n < 64:
        index = f.IndexFlatIP(d) if metric == "ip" else f.IndexFlatL2(d)
    elif kind == "hnsw":
        index = f.IndexHNSWFlat(d, 32, m)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        quant = f.IndexFlatIP(d) if metric == "ip" else f.IndexFlatL2(d)
        index = f.IndexIVFFlat(quant, d, nlist, m)
        rng = np.random.default_rng(opts.seed)
        sample = x[np.sort(rng.choice(n, size=min(n, nlist * 256), replace=False))]
        index.train(sample)
        index.nprobe = min(nlist, 16)
    index.add(x)
    log.debug("faiss index %s over %d x %d", type(index).__name__, n, d)
    return index


def knn(x: np.ndarray, k: int, opts: Dedup, index=None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows: (similarities [N, k], indices [N, k]; -1 where fewer exist)."""
    n = x.shape[0]
    index = index or make_index(x, opts)
    kk = min(n, k + 1)
    sims, idx = index.search(x, kk)
    out_s = np.full((n, k), -np.inf, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    for r in range(n):
        row = [(s, j) for s, j in zip(sims[r], idx[r]) if j >= 0 and j != r][:k]
        for c, (s, j) in enumerate(row):
            out_s[r, c], out_i[r, c] = s, j
    return out_s, out_i


def edges_from_knn(sims: np.ndarray, idx: np.ndarray, min_sim: float) -> dict[tuple[int, int], float]:
    """Undirected edges ``(i < j) -> similarity`` of the k-NN lists at or above ``min_sim``."""
    edges: dict[tuple[int, int], float] = {}
    rows, cols = np.nonzero((idx >= 0) & (sims >= min_sim))
    for r, c in zip(rows.tolist(), cols.tolist()):
        j = int(idx[r, c])
        key = (r, j) if r < j else (j, r)
        s = float(sims[r, c])
        if s > edges.get(key, -np.inf):
            edges[key] = s
    return edges


def graph(n: int, edges: dict[tuple[int, int], float]):
    """The proximity graph (igraph, undirected, ``weight`` = similarity)."""
    try:
        import igraph
    except ImportError as e:
        raise CurateError("communities need igraph and leidenalg: pip install -e '.[curate]'.") from e
    g = igraph.Graph(n=n, edges=list(edges), directed=False)
    g.es["weight"] = [max(1e-6, w) for w in edges.values()]
    return g


def leiden(g, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Leiden communities (modularity with a resolution), one label per vertex, labelled by first appearance."""
    try:
        import leidenalg
    except ImportError as e:
        raise CurateError("communities need leidenalg: pip install -e '.[curate]'.") from e
    if g.ecount() == 0:
        return np.arange(g.vcount(), dtype=np.int64)
    part = leidenalg.find_partition(
        g,
        leidenalg.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=resolution,
        seed=seed,
        n_iterations=-1,
    )
    return relabel(np.asarray(part.membership, dtype=np.int64))


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... in order of first appearance (so equal partitions give equal arrays)."""
    seen: dict[int, int] = {}
    return np.asarray([seen.setdefault(int(v), len(seen)) for v in labels], dtype=np.int64)


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index of two labelings (1: identical partitions, ~0: chance)."""
    a, b = np.asarray(a), np.asarray(b)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), np.int64)
    np.add.at(table, (ai, bi), 1)

    def c2(x):
        return (x * (x - 1) / 2.0).sum()

    sum_ij, sum_a, sum_b = c2(table), c2(table.sum(1)), c2(table.sum(0))
    expected = sum_a * sum_b / max(c2(np.array([len(a)])), 1.0)
    top = (sum_a + sum_b) / 2.0
    return 1.0 if top == expected else float((sum_ij - expected) / (top - expected))


def communities(x: np.ndarray, opts: Dedup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(community per row, k-NN similarities, k-NN indices) of the semantic proximity graph."""
    sims, idx = knn(x, opts.k, opts)
    g = graph(len(x), edges_from_knn(sims, idx, 0.0))
    return leiden(g, opts.resolution, opts.seed), sims, idx


def retrieve(x: np.ndarray, queries: np.ndarray, k: int, opts: Dedup) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``x`` nearest each query: (similarities [Q, k], indices [Q, k])."""
    index = make_index(x, opts)
    return index.search(normalise(queries), min(k, len(x)))


def _robust_low(v: np.ndarray, z: float) -> float:
    """The value ``z`` robust standard deviations (median absolute deviation) below the median."""
    med = float(np.nanmedian(v))
    mad = float(np.nanmedian(np.abs(v - med))) * 1.4826
    return med - z * max(mad, 1e-6)


def density(sims: np.ndarray, labels: np.ndarray, names: list[str], small: float = 0.25, z: float = 3.0) -> dict:
    """Sparse regions of the embedding space, named.

    Per community: size and mean k-NN similarity of its members; sparse when it has fewer than ``small`` x the
    median community size, or is ``z`` robust deviations looser than the median community. Per image: its
    mean k-NN similarity (local density); outliers lie ``z`` robust deviations below the median. ``names[i]``
    labels row ``i`` (tags, a caption or the file name); a community is named by its most frequent labels.
    """
    valid = np.where(np.isfinite(sims), sims, np.nan)
    local = np.nanmean(valid, axis=1)
    comms = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        words: dict[str, int] = {}
        for i in members:
            for w in names[i].split(", ")[:3]:
                words[w] = words.get(w, 0) + 1
        top = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        comms.append(
            {
                "community": int(c),
                "size": int(len(members)),
                "mean_sim": float(np.nanmean(local[members])),
                "name": " / ".join(w for w, _ in top),
                "examples": [names[i] for i in members[:5]],
            }
        )
    sizes = np.array([c["size"] for c in comms], dtype=np.float64)
    loose = _robust_low(np.array([c["mean_sim"] for c in comms]), z)
    for c in comms:
        c["sparse"] = bool(c["size"] < small * np.median(sizes) or c["mean_sim"] < loose)
    comms.sort(key=lambda c: (not c["sparse"], c["size"], c["mean_sim"]))
    cut = _robust_low(local, z)
    outliers = [int(i) for i in np.argsort(local) if local[i] < cut]
    sparse = [c["name"] for c in comms if c["sparse"]]
    for i in outliers:
        if names[i] not in sparse:
            sparse.append(names[i])
    return {
        "n": int(len(labels)),
        "communities": comms,
        "sparse": sparse,
        "outlier_rows": outliers,
        "local_density": local.tolist(),
        "outlier_threshold": cut,
    }


def concept_voids(x: np.ndarray, concepts: np.ndarray, names: list[str], threshold: float) -> list[dict]:
    """Per concept vector: how many images lie within ``threshold`` cosine and the best match (voids first)."""
    sims = normalise(concepts) @ x.T
    out = []
    for i, n in enumerate(names):
        out.append({"concept": n, "images": int((sims[i] >= threshold).sum()), "best": float(sims[i].max())})
    out.sort(key=lambda d: (d["images"], d["best"]))
    return out
