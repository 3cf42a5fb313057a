"""Edit pairs written as the edit JSONL that ``train.data`` reads (``{"source", "target", "instruction"}``, paths
relative to the JSONL file).

- ``combos``: one source and N expert edits are N+1 images; every ordered pair is a training pair, 2*C(N+1, 2)
  = N(N+1) of them: source->edit (the expert's instruction), edit->source (the inverse: the real image as
  target) and edit_i->edit_j (undo i, then apply j; or a difference captioner plug-in's instruction).
- ``video``: frames of one video (a sub-folder), split into shots where consecutive frames stop being
  similar; pairs inside a shot whose embedding cosine lies in ``[sim_low, sim_high]`` (related, not identical).
- ``text``: rendered text edits (replace, recolour, add, remove) whose instruction is exact ground truth.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .config import CurateConfig, CurateError
from .manifest import IMAGE_EXTS, write_text

log = logging.getLogger(__name__)


def _rel(p: Path, base: Path) -> str:
    return Path(os.path.relpath(p.resolve(), base.resolve())).as_posix()


def _instructor(cfg: CurateConfig):
    if not cfg.editpairs.instructor:
        return None
    from .plugins import load_entry

    return load_entry(cfg.editpairs.instructor, "[curate.editpairs] instructor")


def inverse_instruction(edit: dict) -> str:
    return edit.get("inverse") or f'Undo the edit "{edit["instruction"].rstrip(".")}".'


def combo_pairs(source: str, edits: list[dict]) -> list[tuple[str, str, str, int, int]]:
    """All ordered pairs (src, tgt, instruction, i, j) among the source (0) and the edits (1..N)."""
    images = [source] + [e["image"] for e in edits]
    out = []
    for i in range(len(images)):
        for j in range(len(images)):
            if i == j:
                continue
            if i == 0:
                instr = edits[j - 1]["instruction"]
            elif j == 0:
                instr = inverse_instruction(edits[i - 1])
            else:
                undo = inverse_instruction(edits[i - 1]).rstrip(".")
                instr = f"{undo}, then {edits[j - 1]['instruction'][0].lower()}{edits[j - 1]['instruction'][1:]}"
            out.append((images[i], images[j], instr, i, j))
    return out


def run_combos(groups_file, out, cfg: CurateConfig) -> dict:
    gp = Path(groups_file).expanduser()
    if not gp.is_file():
        raise CurateError(
            f'groups file \'{gp}\' does not exist (JSONL: {{"source": "a.png", "edits": [{{"image": '
            '"a_red.png", "instruction": "make it red"}]}}).'
        )
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    instructor = _instructor(cfg)
    lines, n_groups = [], 0
    for n, line in enumerate(gp.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{gp}:{n}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise CurateError(f"{where}: not valid JSON ({e}).") from e
        edits = rec.get("edits") if isinstance(rec, dict) else None
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("source"), str)
            or not isinstance(edits, list)
            or not edits
        ):
            raise CurateError(f'{where}: needs "source" (an image) and "edits" (a non-empty list).')
        for e in edits:
            if (
                not isinstance(e, dict)
                or not isinstance(e.get("image"), str)
                or not str(e.get("instruction", "")).strip()
            ):
                raise CurateError(f'{where}: each edit needs "image" and a non-empty "instruction".')
        paths = {}
        for p in [rec["source"]] + [e["image"] for e in edits]:
            full = (gp.parent / p) if not Path(p).is_absolute() else Path(p)
            if not full.is_file():
                raise CurateError(
                    f"{where}: image '{p}' not found (looked for '{full}'; paths are relative to the JSONL)."
                )
            paths[p] = full
        for src, tgt, instr, i, j in combo_pairs(rec["source"], edits):
            if instructor is not None and i and j:
                from PIL import Image

                instr = str(instructor(Image.open(paths[src]).convert("RGB"), Image.open(paths[tgt]).convert("RGB")))
            rec_out = {
                "source": _rel(paths[src], out),
                "target": _rel(paths[tgt], out),
                "instruction": instr,
                "key": f"g{n_groups}:{i}->{j}",
                "kind": "expert" if i == 0 else ("inverse" if j == 0 else "mixed"),
            }
            if rec.get("caption") and j == 0:
                rec_out["caption"] = rec["caption"]
            lines.append(json.dumps(rec_out, ensure_ascii=False))
        n_groups += 1
    dest = write_text(out / "pairs.jsonl", "\n".join(lines) + "\n")
    log.info("editpairs combos: %d groups -> %d pairs", n_groups, len(lines))
    return {"pairs": str(dest), "count": len(lines), "groups": n_groups}


# ---- video frames ---------------------------------------------------------------------------------------
def frame_pairs(x: np.ndarray, cfg: CurateConfig) -> list[tuple[int, int, float]]:
    """Pairs (i < j, cosine) of consecutive-ordered frames ``x`` (normalised rows) within shots and the band."""
    ep = cfg.editpairs
    if len(x) < 2:
        return []
    consecutive = (x[:-1] * x[1:]).sum(axis=1)
    shot = np.concatenate([[0], np.cumsum(consecutive < ep.shot_threshold)])
    sims = x @ x.T
    out = []
    for i in range(len(x)):
        for j in range(i + 1, min(len(x), i + ep.max_gap + 1)):
            if shot[j] != shot[i]:
                break
            if ep.sim_low <= sims[i, j] <= ep.sim_high:
                out.append((i, j, float(sims[i, j])))
    return out


def run_video(frames_dir, out, cfg: CurateConfig, embeddings=None, ids=None, model=None) -> dict:
    root = Path(frames_dir).expanduser()
    if not root.is_dir():
        raise CurateError(f"frames folder '{root}' does not exist (one sub-folder of frames per video).")
    videos = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        fr = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if len(fr) >= 2:
            videos[d.name] = fr
    if not videos:
        raise CurateError(f"'{root}' has no sub-folder with two or more frames.")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    from .vectors import align, load_embeddings

    all_frames = [f for fr in videos.values() for f in fr]
    if embeddings is not None:
        x, emb_ids = load_embeddings(embeddings, ids)
        ids_rel = [_rel(f, root) for f in all_frames]
        rows = align(emb_ids or [str(i) for i in range(len(x))], ids_rel, [str(f.resolve()) for f in all_frames])
        if (rows < 0).any():
            raise CurateError(f"{int((rows < 0).sum())} frames have no embedding in '{embeddings}'.")
        xs = x[rows]
    else:
        from PIL import Image

        from .plugins import Embedder

        emb = Embedder(model or cfg.embed.model, "frame embedding model (--model)")
        xs = np.concatenate(
            [
                emb.images([Image.open(f).convert("RGB") for f in all_frames[c : c + 16]])
                for c in range(0, len(all_frames), 16)
            ]
        )
    instructor = _instructor(cfg)
    lines, start = [], 0
    for name, fr in videos.items():
        for i, j, s in frame_pairs(xs[start : start + len(fr)], cfg):
            if instructor is not None:
                from PIL import Image

                instr = str(instructor(Image.open(fr[i]).convert("RGB"), Image.open(fr[j]).convert("RGB")))
            else:
                instr = "Show the same scene a moment later."
            lines.append(
                json.dumps(
                    {
                        "source": _rel(fr[i], out),
                        "target": _rel(fr[j], out),
                        "instruction": instr,
                        "key": f"{name}:{i}->{j}",
                        "similarity": round(s, 4),
                    }
                )
            )
        start += len(fr)
    dest = write_text(out / "pairs.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    log.info("editpairs video: %d videos -> %d pairs", len(videos), len(lines))
    return {"pairs": str(dest), "count": len(lines)}


# ---- rendered text edits -----------------------------------------------------------------------------------
WORDS = [
    "OPEN",
    "SALE",
    "CAFE",
    "HELLO",
    "BOOKS",
    "NORTH",
    "EXIT",
    "PIZZA",
    "HOTEL",
    "MUSIC",
    "GARDEN",
    "RIVER",
    "STOP",
    "TEA",
    "SUMMER",
    "LIGHT",
]
COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (20, 150, 40),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
    "yellow": (245, 210, 20),
}
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "centre": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}


def find_fonts(cfg: CurateConfig) -> list[str | None]:
    """Configured fonts, else TrueType fonts on the system, else ``[None]`` (Pillow's built-in font)."""
    if cfg.editpairs.fonts:
        missing = [f for f in cfg.editpairs.fonts if not Path(f).expanduser().is_file()]
        if missing:
            raise CurateError(f"[curate.editpairs] fonts: {missing} not found; list .ttf/.otf files that exist.")
        return [str(Path(f).expanduser()) for f in cfg.editpairs.fonts]
    found = []
    for d in ("/usr/share/fonts", "/Library/Fonts", "C:/Windows/Fonts"):
        if Path(d).is_dir():
            found += sorted(str(p) for p in Path(d).rglob("*.ttf"))[:16]
    return found or [None]


def _font(path: str | None, size: int):
    from PIL import ImageFont

    if path is None:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
            return ImageFont.load_default()
    return ImageFont.truetype(path, size)


def _background(rng, size: int, backgrounds: list[Path]):
    from PIL import Image

    if backgrounds:
        im = Image.open(backgrounds[int(rng.integers(len(backgrounds)))]).convert("RGB")
        return im.resize((size, size))
    a, b = rng.integers(90, 200, 3), rng.integers(90, 200, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    grad = (a * (1 - t) + b * t).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(grad, (size, size, 3)).copy())


def render_pair(rng, size: int, font_path, backgrounds) -> tuple:
    """(source image, target image, instruction, metadata) of one random text edit."""
    from PIL import ImageDraw

    op = ["replace", "recolour", "add", "remove"][int(rng.integers(4))]
    words = list(rng.choice(WORDS, size=2, replace=False))
    cols = list(COLOURS)
    c1, c2 = (str(c) for c in rng.choice(cols, size=2, replace=False))
    pos = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    fsize = int(size * rng.uniform(0.08, 0.13))
    font = _font(font_path, fsize)
    bg = _background(rng, size, backgrounds)

    def draw(im, word, colour):
        im = im.copy()
        d = ImageDraw.Draw(im)
        x0, y0, x1, y1 = d.textbbox((0, 0), word, font=font)
        gx, gy = POSITIONS[pos]
        cw = size / 3
        x = gx * cw + (cw - (x1 - x0)) / 2 - x0
        y = gy * cw + (cw - (y1 - y0)) / 2 - y0
        d.text((x, y), word, fill=COLOURS[colour], font=font)
        return im

    if op == "replace":
        src, tgt = draw(bg, words[0], c1), draw(bg, words[1], c1)
        instr = f'Replace the text "{words[0]}" with "{words[1]}".'
    elif op == "recolour":
        src, tgt = draw(bg, words[0], c1), draw(bg, words[0], c2)
        instr = f'Change the colour of the text "{words[0]}" to {c2}.'
    elif op == "add":
        src, tgt = bg, draw(bg, words[0], c1)
        instr = f'Add the text "{words[0]}" in {c1} at the {pos}.'
    else:
        src, tgt = draw(bg, words[0], c1), bg
        instr = f'Remove the text "{words[0]}".'
    meta = {"op": op, "position": pos, "font": Path(font_path).name if font_path else "pillow-default"}
    meta["text_source"] = "" if op == "add" else words[0]
    meta["text_target"] = {"replace": words[1], "recolour": words[0], "add": words[0], "remove": ""}[op]
    return src, tgt, instr, meta


def run_text(out, cfg: CurateConfig, n: int, seed: int = 0, size: int = 512, backgrounds=None) -> dict:
    if n < 1 or size < 64:
        raise CurateError("editpairs text needs --n >= 1 and --size >= 64.")
    out = Path(out).expanduser()
    img_dir = out / "text"
    img_dir.mkdir(parents=True, exist_ok=True)
    bgs = []
    if backgrounds:
        bgs = sorted(p for p in Path(backgrounds).expanduser().rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not bgs:
            raise CurateError(f"--backgrounds '{backgrounds}' holds no image.")
    fonts = find_fonts(cfg)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        font = fonts[int(rng.integers(len(fonts)))]
        src, tgt, instr, meta = render_pair(rng, size, font, bgs)
        sp, tp = img_dir / f"{i:06d}_src.png", img_dir / f"{i:06d}_tgt.png"
        src.save(sp)
        tgt.save(tp)
        lines.append(
            json.dumps(
                {"source": _rel(sp, out), "target": _rel(tp, out), "instruction": instr, "key": f"text:{i}", **meta}
            )
        )
    dest = write_text(out / "pairs.jsonl", "\n".join(lines) + "\n")
    log.info("editpairs text: %d rendered pairs -> %s", n, dest)
    return {"pairs": str(dest), "count": n}
