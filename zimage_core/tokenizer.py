"""Finding and loading the Qwen tokenizer that goes with a Z-Image text encoder.

The weights never carry the tokenizer, so it is looked up, in this order:

1. the folder the user named explicitly (``--tokenizer DIR``);
2. the diffusers ``tokenizer/`` folder: in the model root, or next to a ``text_encoder/`` folder;
3. a tokenizer beside a single weight file: ``<file dir>/tokenizer``, or the file's own folder;
4. ComfyUI's bundled ``qwen25_tokenizer`` (the caller passes its folder; this package never
   imports ComfyUI). Qwen3 uses the Qwen2.5 vocabulary and merges, so it tokenizes identically.

Loading is always local (``local_files_only=True``): nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ZImageError

log = logging.getLogger(__name__)

TOKENIZER_HELP = (
    "Put the diffusers 'tokenizer/' folder from Tongyi-MAI/Z-Image-Turbo (vocab.json, merges.txt, "
    "tokenizer_config.json, or tokenizer.json) next to the text encoder (as '<its folder>/tokenizer'), "
    "or pass --tokenizer DIR."
)


def is_tokenizer_dir(path: str | os.PathLike | None) -> bool:
    """True if ``path`` is a folder holding a BPE tokenizer (``tokenizer.json`` or vocab + merges)."""
    if path is None:
        return False
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    return (p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())


def tokenizer_candidates(model_path: str | os.PathLike | None) -> list[Path]:
    """Folders that may hold the tokenizer of the text encoder at ``model_path``, most specific first."""
    if model_path is None:
        return []
    p = Path(model_path).expanduser()
    if p.is_dir():
        # diffusers root, then a text_encoder/ folder's sibling, then the folder itself (an HF LLM repo).
        out = [p / "tokenizer", p.parent / "tokenizer", p]
    else:
        out = [p.parent / "tokenizer", p.parent]
    seen: list[Path] = []
    for c in out:
        if c not in seen:
            seen.append(c)
    return seen


def find_tokenizer(
    explicit: str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None,
    comfy_tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Return the tokenizer folder to use (see the module docstring for the order).

    An explicit folder that holds no tokenizer is an error rather than silently skipped.
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if is_tokenizer_dir(p):
            return p
        raise ZImageError(
            f"tokenizer: '{p}' is not a tokenizer folder (it needs tokenizer.json, or vocab.json and merges.txt). "
            + TOKENIZER_HELP
        )
    looked = tokenizer_candidates(model_path)
    for c in looked:
        if is_tokenizer_dir(c):
            return c
    if comfy_tokenizer_dir is not None:
        looked.append(Path(comfy_tokenizer_dir))
        if is_tokenizer_dir(comfy_tokenizer_dir):
            return Path(comfy_tokenizer_dir)
    where = ", ".join(f"'{c}'" for c in looked) or "nowhere (no text encoder path was given)"
    raise ZImageError(f"tokenizer: no Qwen tokenizer found for the text encoder; looked in {where}. " + TOKENIZER_HELP)


def load_tokenizer(folder: str | os.PathLike):
    """Load a tokenizer folder with ``transformers.AutoTokenizer``, offline."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ZImageError(f"tokenizer: cannot load '{folder}' ({type(e).__name__}: {e}). " + TOKENIZER_HELP) from e
    log.debug("loaded tokenizer %s from %s", type(tok).__name__, folder)
    return tok
