"""``python -m train.curate STAGE ...``: the data engine's command line (see README, "Data engine")."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from zimage_core.commandline import Parser, add_debug_flag, run_command

from .config import CurateConfig, CurateError
from .manifest import MANIFEST

log = logging.getLogger("train.curate")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML file with a [curate] table (thresholds, models, engine)")
    p.add_argument("--engine", choices=["local", "ray"], help="override [curate] engine")
    p.add_argument("--shard-size", type=int, help="override [curate] shard_size")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m train.curate", description=__doc__)
    add_debug_flag(ap)
    sub = ap.add_subparsers(dest="stage", required=True, parser_class=Parser)

    p = sub.add_parser("profile", help="measure every image; reject by the [curate.filters] thresholds")
    p.add_argument("--input", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (manifest.parquet; resumable)")
    _common(p)

    p = sub.add_parser("embed", help="image embeddings from a CLIP / SigLIP2 folder -> OUT/embeddings.npy, ids.txt")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="CLIP / SigLIP2 folder (else [curate.embed] model)")
    _common(p)

    p = sub.add_parser("dedup", help="profile (if not done), then near-duplicate clusters and communities")
    p.add_argument("--input", required=True, help="folder of images")
    p.add_argument("--out", required=True)
    p.add_argument("--embeddings", help="[N, D] .npy (else OUT/embeddings.npy when present)")
    p.add_argument("--ids", help="ids of the .npy rows, one per line (manifest id, path or file name)")
    _common(p)

    p = sub.add_parser("retrieve", help="the images nearest a text or image query (trace a failure to its data)")
    p.add_argument("--out", required=True, help="a curated folder (manifest + embeddings)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--query-image", help="an image file")
    g.add_argument("--query-text", help="a text (needs the model's tokenizer)")
    g.add_argument("--query-npy", help="a [D] or [Q, D] .npy of query vectors")
    p.add_argument("--model", help="CLIP / SigLIP2 folder for image/text queries (else [curate.embed] model)")
    p.add_argument("--embeddings")
    p.add_argument("--ids")
    p.add_argument("--k", type=int, default=16)
    _common(p)

    p = sub.add_parser("density", help="community sizes and tightness; names sparse regions and concept voids")
    p.add_argument("--out", required=True)
    p.add_argument("--embeddings")
    p.add_argument("--ids")
    p.add_argument("--concepts", help="[C, D] .npy of concept (text) embeddings to look for voids")
    p.add_argument("--concept-names", help="names of the --concepts rows, one per line")
    p.add_argument("--void-threshold", type=float, default=0.3)
    _common(p)

    p = sub.add_parser("kg", help="knowledge graph: PageRank pruning, tag taxonomy, prompt-log boosts")
    p.add_argument("--entities", required=True, help="JSONL: {entity, links: [...], tags: [...]}")
    p.add_argument("--out", required=True)
    p.add_argument("--tag-embeddings", help="[T, D] .npy of tag embeddings (else hashed character n-grams)")
    p.add_argument("--tag-ids", help="the tags of the --tag-embeddings rows, one per line")
    p.add_argument("--prompts", help="a prompt log, one prompt per line")
    _common(p)

    p = sub.add_parser("balance", help="per-image sampling weights from concept rarity -> manifest 'weight'")
    p.add_argument("--out", required=True, help="a curated folder (manifest.parquet; kg.json unless --kg)")
    p.add_argument("--kg", help="kg.json from the kg stage")
    _common(p)

    p = sub.add_parser("editpairs", help="edit-pair JSONL: combinatorial, video frames or rendered text")
    p.add_argument("mode", choices=["combos", "video", "text"])
    p.add_argument("--out", required=True, help="output folder (pairs.jsonl, rendered images)")
    p.add_argument("--groups", help="combos: JSONL {source, edits: [{image, instruction, inverse?}]}")
    p.add_argument("--frames", help="video: folder of videos, one sub-folder of frames each")
    p.add_argument("--embeddings", help="video: frame embeddings .npy (with --ids)")
    p.add_argument("--ids")
    p.add_argument("--model", help="video: CLIP / SigLIP2 folder to embed the frames")
    p.add_argument("--n", type=int, default=100, help="text: pairs to render")
    p.add_argument("--backgrounds", help="text: folder of background images (else generated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="text: image side")
    _common(p)

    p = sub.add_parser("report", help="OUT/report.html: plots, rejects and duplicate clusters")
    p.add_argument("--out", required=True)
    _common(p)

    p = sub.add_parser("run", help="profile, (embed), dedup, (density, balance) and report in one go")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--embeddings")
    p.add_argument("--ids")
    p.add_argument("--kg", help="kg.json for balance")
    _common(p)
    return ap


def _embeddings(args, out: Path):
    if getattr(args, "embeddings", None):
        return args.embeddings, args.ids
    if (out / "embeddings.npy").is_file():
        return out / "embeddings.npy", out / "ids.txt" if (out / "ids.txt").is_file() else None
    return None, None


def run(args, cfg: CurateConfig) -> dict:
    out = Path(args.out).expanduser()
    given = getattr(args, "input", None)
    if given is not None and not Path(given).expanduser().is_dir():  # before OUT is made: a typo leaves nothing
        raise CurateError(f"the input folder '{given}' does not exist; give --input a folder of images.")
    out.mkdir(parents=True, exist_ok=True)
    st = args.stage
    if st == "profile":
        from .profile import run_profile

        return {"manifest": str(run_profile(args.input, out, cfg))}
    if st == "embed":
        from .embed import run_embed

        return run_embed(args.input, out, cfg, args.model)
    if st in ("dedup", "run"):
        from .dedup import run_dedup
        from .profile import run_profile

        man = run_profile(args.input, out, cfg)
        res = {}
        if st == "run" and cfg.embed.model and not getattr(args, "embeddings", None):
            from .embed import run_embed

            res.update(run_embed(args.input, out, cfg, None))
        emb, ids = _embeddings(args, out)
        res["manifest"] = str(run_dedup(man, out, cfg, emb, ids))
        if st == "run":
            if emb is not None:
                from .density import run_density

                res.update(run_density(out, cfg, emb, ids))
            if args.kg:
                from .kg import run_balance

                res.update(run_balance(out, cfg, args.kg))
            from .report import write_report

            res["report"] = str(write_report(out))
        return res
    if st == "retrieve":
        from .density import run_retrieve

        emb, ids = _embeddings(args, out)
        return run_retrieve(out, cfg, emb, ids, args)
    if st == "density":
        from .density import run_density

        emb, ids = _embeddings(args, out)
        return run_density(out, cfg, emb, ids, args.concepts, args.concept_names, args.void_threshold)
    if st == "kg":
        from .kg import run_kg

        return run_kg(args.entities, out, cfg, args.tag_embeddings, args.tag_ids, args.prompts)
    if st == "balance":
        from .kg import run_balance

        return run_balance(out, cfg, args.kg or out / "kg.json")
    if st == "editpairs":
        from . import editpairs as E

        if args.mode == "combos":
            if not args.groups:
                raise CurateError("editpairs combos needs --groups FILE.jsonl.")
            return E.run_combos(args.groups, out, cfg)
        if args.mode == "video":
            if not args.frames:
                raise CurateError("editpairs video needs --frames DIR (one sub-folder of frames per video).")
            return E.run_video(args.frames, out, cfg, args.embeddings, args.ids, args.model)
        return E.run_text(out, cfg, args.n, args.seed, args.size, args.backgrounds)
    if st == "report":
        from .report import write_report

        if not (out / MANIFEST).is_file():
            raise CurateError(f"no manifest in '{out}'; run profile or dedup first.")
        return {"report": str(write_report(out))}
    raise CurateError(f"unknown stage {st!r}")  # pragma: no cover (argparse restricts it)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def body() -> int:
        over = {"engine": args.engine, "shard_size": args.shard_size}
        if args.no_progress:
            over["progress"] = False
        cfg = CurateConfig.load(args.config, over)
        res = run(args, cfg)
        sys.stdout.write(json.dumps(res, default=str) + "\n")
        return 0

    return run_command(f"train.curate {args.stage}", body, debug=args.debug)
