"""Proof of the data engine (``train.curate``) on a generated image set with planted answers.

The set: ``--originals`` textured images (200-400 px); for a fifth of them one planted near-duplicate each,
of five kinds in turn (exact copy, resized, re-compressed JPEG, cropped by up to 10%, colour-jittered);
``--degraded`` fresh images each made low quality (blurred, heavily compressed, framed by a border, flat);
a few truncated files. Every image also gets a precomputed embedding from ``--clusters`` planted semantic
clusters (a duplicate: its original's vector plus a little noise).

Measured: dedup precision/recall (pixels only, and with embeddings), filter precision/recall, the adjusted Rand
index of the Leiden communities against the planted clusters, profile throughput (plain loop and local Ray,
with and without OCR), and peak RSS of the streaming steps and of dedup on synthetic 10k / 100k-row manifests.

    python bench/curate.py [--originals 500] [--degraded 80] [--rows 10000,100000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import cpu_name  # noqa: E402
from train.curate.config import CurateConfig  # noqa: E402
from train.curate.synthetic import DEGRADED_KINDS, DUPLICATE_KINDS, degraded, natural, near_duplicate  # noqa: E402


def make_set(root: Path, n_orig: int, n_deg: int, n_clusters: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth_dup, truth_bad, cluster = {}, {}, {}
    dim = 64
    centres = rng.normal(size=(n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vecs = {}

    def vec(c, noise):
        v = centres[c] + rng.normal(scale=noise / np.sqrt(dim), size=dim)
        return v / np.linalg.norm(v)

    for i in range(n_orig):
        im = natural(rng, int(rng.integers(200, 400)), int(rng.integers(200, 400)))
        name = f"img{i:05d}.png" if i % 3 else f"img{i:05d}.jpg"
        im.save(root / name, **({"quality": 92} if name.endswith(".jpg") else {}))
        c = int(rng.integers(n_clusters))
        cluster[name], vecs[name] = c, vec(c, 0.5)
        if i % 5 == 0:
            kind = DUPLICATE_KINDS[(i // 5) % len(DUPLICATE_KINDS)]
            dname = f"dup{i:05d}_{kind}." + ("jpg" if kind == "recompressed" else "png")
            v = near_duplicate(rng, im, kind)
            v.save(root / dname, **({"quality": int(rng.integers(35, 70))} if kind == "recompressed" else {}))
            truth_dup[dname] = name
            cluster[dname] = c
            vecs[dname] = vecs[name] + rng.normal(scale=0.02 / np.sqrt(dim), size=dim)
    for i in range(n_deg):
        kind = DEGRADED_KINDS[i % len(DEGRADED_KINDS)]
        name = f"bad{i:05d}_{kind}.png"
        degraded(rng, natural(rng, int(rng.integers(200, 400)), int(rng.integers(200, 400))), kind).save(root / name)
        truth_bad[name] = kind
        c = int(rng.integers(n_clusters))
        cluster[name], vecs[name] = c, vec(c, 0.5)
    for i in range(5):
        data = (root / f"img{i * 3:05d}.jpg").read_bytes()
        (root / f"corrupt{i}.jpg").write_bytes(data[: len(data) // (i + 2)])
    ids = sorted(vecs)
    np.save(root.parent / "emb.npy", np.stack([vecs[i] for i in ids]).astype(np.float32))
    (root.parent / "ids.txt").write_text("\n".join(ids))
    return truth_dup, truth_bad, cluster


def dedup_scores(rows: dict, truth: dict) -> dict:
    partner = {}
    for d, o in truth.items():
        partner[d], partner[o] = o, d
    flagged = {i for i, r in rows.items() if r["duplicate_of"]}
    ok = 0
    for i in flagged:  # a flagged row is right when it points at its planted partner
        p = partner.get(i)
        if p is not None and rows[i]["duplicate_of"] == rows[p]["path"]:
            ok += 1
    found = sum(
        1 for d, o in truth.items() if (d in flagged) != (o in flagged) and rows[d]["cluster"] == rows[o]["cluster"]
    )
    per_kind = {}
    for d, o in truth.items():
        k = d.split("_")[1].split(".")[0]
        hit = (d in flagged) != (o in flagged) and rows[d]["cluster"] == rows[o]["cluster"]
        per_kind.setdefault(k, [0, 0])
        per_kind[k][0] += hit
        per_kind[k][1] += 1
    return {
        "precision": ok / max(1, len(flagged)),
        "recall": found / len(truth),
        "flagged": len(flagged),
        "planted": len(truth),
        "recall_by_kind": {k: f"{a}/{b}" for k, (a, b) in sorted(per_kind.items())},
    }


def filter_scores(rows: dict, truth_bad: dict) -> dict:
    def quality_codes(r):
        return [
            x.split(":")[0] for x in r["reasons"].split("; ") if x and not x.startswith(("duplicate", "decode_error"))
        ]

    flagged = {i for i, r in rows.items() if r["decodes"] and quality_codes(r)}
    tp = len(flagged & set(truth_bad))
    by_kind = {}
    for name, kind in truth_bad.items():
        by_kind.setdefault(kind, [0, 0])
        by_kind[kind][0] += name in flagged
        by_kind[kind][1] += 1
    fps = sorted(flagged - set(truth_bad))
    return {
        "precision": tp / max(1, len(flagged)),
        "recall": tp / len(truth_bad),
        "flagged": len(flagged),
        "planted": len(truth_bad),
        "recall_by_kind": {k: f"{a}/{b}" for k, (a, b) in sorted(by_kind.items())},
        "false_positives": {i: rows[i]["reasons"] for i in fps[:10]},
        "corrupt_rows": sum(1 for r in rows.values() if not r["decodes"]),
    }


def timed_profile(root: Path, out: Path, engine: str, ocr: bool) -> float:
    """Images per second of a fresh profile run in a child process (Ray start-up included for 'ray')."""
    code = (
        "import sys, time, logging; sys.path.insert(0, %r)\n"
        "from train.curate.config import CurateConfig\nfrom train.curate.profile import run_profile\n"
        "cfg = CurateConfig.from_dict({'engine': %r, 'ocr': %r, 'progress': False, 'shard_size': 32})\n"
        "t = time.perf_counter()\n"
        "if cfg.engine == 'ray':\n    from train.curate.engine import ray_init; ray_init(cfg)\n"
        "s = time.perf_counter(); run_profile(%r, %r, cfg); e = time.perf_counter(); print(e - t, e - s)\n"
    ) % (str(Path(__file__).resolve().parents[1]), engine, ocr, str(root), str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    total, run = (float(x) for x in r.stdout.strip().splitlines()[-1].split())
    return total, run


MEM_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, REPO)
import numpy as np, pyarrow as pa
from pathlib import Path
from train.curate.config import CurateConfig
from train.curate.engine import merge
from train.curate.profile import schema, _thumb_png
from PIL import Image
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
step, n, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
cfg = CurateConfig.from_dict({"ocr": False, "progress": False})
sch = schema(CurateConfig.from_dict({"caption": {"entry": "captioner:unused"}}))  # with a caption column
base = rss()
t = time.perf_counter()
if step == "shards":  # synthetic profile shards of 1000 rows (random hashes, thumbnails, measurements)
    rng = np.random.default_rng(0); (work / "shards").mkdir(parents=True, exist_ok=True)
    def thumb():  # a distinct smooth random picture per row (no planted duplicates)
        return _thumb_png(Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((48, 36), Image.BICUBIC))
    for s in range(0, n, 1000):
        m = min(1000, n - s); rows = []
        for i in range(s, s + m):
            rows.append({"id": f"d{i//1000:03d}/i{i:07d}.jpg", "path": f"/data/d{i//1000:03d}/i{i:07d}.jpg", "keep": bool(rng.random() > 0.1),
                         "reasons": "", "duplicate_of": "", "cluster": -1, "decodes": True, "file_bytes": 50000, "sha1": f"{i:040x}",
                         "format": "JPEG", "mode": "RGB", "width": 512, "height": 384, "aspect": 4 / 3, "exif_orientation": 1,
                         "phash": f"{int(rng.integers(0, 2**63)):016x}", "dhash": f"{int(rng.integers(0, 2**63)):016x}",
                         "sharpness": float(rng.random() * 500), "mean_r": 100.0, "mean_g": 100.0, "mean_b": 100.0,
                         "thumb": thumb(), "caption": f"a photo number {i}"})
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows, schema=sch), work / "shards" / f"part-{s // 1000:05d}.parquet")
elif step == "merge":
    merge(sorted((work / "shards").glob("part-*.parquet")), work / "manifest.parquet")
elif step == "source":
    from train.data.sources import scan_manifest
    items = scan_manifest(0, work / "manifest.parquet", {"caption"}, 1.0)
elif step == "dedup":
    from train.curate.dedup import run_dedup
    run_dedup(work / "manifest.parquet", work, cfg)
elif step == "balance":
    from train.curate.manifest import rewrite, set_column
    def upd(off, rb):
        t = pa.Table.from_batches([rb]); return set_column(t, "weight", np.ones(rb.num_rows).tolist(), pa.float64())
    rewrite(work / "manifest.parquet", work / "manifest.parquet", upd)
print(json.dumps({"step": step, "rows": n, "baseline_rss_mb": base, "peak_rss_mb": rss(), "seconds": time.perf_counter() - t}))
"""


def memory(n: int, work: Path, steps) -> list[dict]:
    out = []
    code = MEM_CHILD.replace("REPO", repr(str(Path(__file__).resolve().parents[1])))
    for step in steps:
        r = subprocess.run([sys.executable, "-c", code, step, str(n), str(work)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"memory step {step} failed:\n{r.stderr[-3000:]}")
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        o = out[-1]
        print(
            f"  {n} rows, {step}: peak RSS {o['peak_rss_mb']:.0f} MB (after imports {o['baseline_rss_mb']:.0f}), {o['seconds']:.1f} s",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--originals", type=int, default=500)
    ap.add_argument("--degraded", type=int, default=80)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--ocr-subset", type=int, default=120, help="images in the with-OCR throughput runs")
    ap.add_argument("--rows", default="10000,100000", help="synthetic manifest sizes for the memory runs")
    ap.add_argument("--dedup-rows", default="10000,100000", help="sizes at which dedup's memory is measured")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput runs")
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    args = ap.parse_args()
    from train.curate.dedup import run_dedup
    from train.curate.profile import run_profile
    from train.curate.vectors import adjusted_rand_index

    work = Path(args.workdir or tempfile.mkdtemp(prefix="curate-bench-"))
    root = work / "images"
    t0 = time.perf_counter()
    truth_dup, truth_bad, cluster = make_set(root, args.originals, args.degraded, args.clusters)
    n_files = len(list(root.iterdir()))
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; {n_files} images generated in {time.perf_counter() - t0:.0f} s"
    )
    import pyarrow.parquet as pq

    res = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "images": n_files}
    cfg = CurateConfig.from_dict({"ocr": False, "progress": False, "shard_size": 32})
    out = work / "out"
    man = run_profile(root, out, cfg)
    run_dedup(man, out, cfg)
    rows = {
        r["id"]: r
        for r in pq.read_table(
            out / "manifest.parquet", columns=["id", "path", "keep", "reasons", "decodes", "duplicate_of", "cluster"]
        ).to_pylist()
    }
    res["dedup_pixels"] = dedup_scores(rows, truth_dup)
    res["filter"] = filter_scores(rows, truth_bad)
    t = time.perf_counter()
    run_dedup(man, out, cfg, work / "emb.npy", work / "ids.txt")
    res["dedup_seconds_with_embeddings"] = time.perf_counter() - t
    rows = {
        r["id"]: r
        for r in pq.read_table(
            out / "manifest.parquet",
            columns=["id", "path", "keep", "reasons", "decodes", "duplicate_of", "cluster", "community"],
        ).to_pylist()
    }
    res["dedup_with_embeddings"] = dedup_scores(rows, truth_dup)
    ids = sorted(cluster)
    res["community_ari"] = adjusted_rand_index([rows[i]["community"] for i in ids], [cluster[i] for i in ids])
    res["communities"] = len({rows[i]["community"] for i in ids})
    print(
        json.dumps(
            {k: res[k] for k in ("dedup_pixels", "dedup_with_embeddings", "filter", "community_ari", "communities")},
            indent=1,
        ),
        flush=True,
    )

    # throughput: fresh runs in child processes
    sub = work / "ocr_subset"
    sub.mkdir(exist_ok=True)
    for p in sorted(root.iterdir())[: args.ocr_subset]:
        (sub / p.name).write_bytes(p.read_bytes())
    thr = {}
    runs = [
        ("plain loop, no OCR", root, n_files, "local", False),
        ("local Ray, no OCR", root, n_files, "ray", False),
        ("plain loop, with OCR", sub, args.ocr_subset, "local", True),
        ("local Ray, with OCR", sub, args.ocr_subset, "ray", True),
    ]
    for name, src, n, engine, ocr in [] if args.no_throughput else runs:
        s, run = timed_profile(src, work / f"thr-{engine}-{ocr}", engine, ocr)
        thr[name] = {"images": n, "seconds": s, "images_per_s": n / s, "images_per_s_after_start": n / run}
        print(
            f"  profile {name}: {n} images in {s:.1f} s = {n / s:.1f} img/s ({n / run:.1f} img/s after start-up)",
            flush=True,
        )
    res["throughput"] = thr

    mem = []
    dedup_at = {int(x) for x in args.dedup_rows.split(",") if x}
    for n in [int(x) for x in args.rows.split(",") if x]:
        w = work / f"mem{n}"
        w.mkdir(exist_ok=True)
        steps = ["shards", "merge", "source", "balance"] + (["dedup"] if n in dedup_at else [])
        mem += memory(n, w, steps)
    res["memory"] = mem
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
