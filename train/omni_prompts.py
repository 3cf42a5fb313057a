"""The Omni caption segments of the edit samples, encoded once per run while the text encoder is loaded.

An edit sample's prompt reaches the Omni DiT as its own segment, ``<|vision_end|>{prompt}<|im_end|>\\n
<|im_start|>assistant\\n<|vision_start|>``, between fixed pieces (:mod:`zimage_core.edit`), which is not the
text-to-image encoding the data cache holds. So every caption an edit sample can draw (all its levels and
languages, plus the empty prompt of caption dropout) is encoded that way into
``<output_dir>/omni_prompts.safetensors`` (keyed by a hash of the text; read lazily while training), together
with the three fixed pieces. The file is rebuilt when the captions or the encoder settings change.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from zimage_core.edit import OMNI_BETWEEN, OMNI_FIRST, OMNI_LAST, OMNI_PROMPT_TEMPLATE
from zimage_core.weights import WeightSource, save_safetensors

from .objective import OmniSegments

log = logging.getLogger(__name__)

FIXED = {"fixed.first": OMNI_FIRST, "fixed.between": OMNI_BETWEEN, "fixed.last": OMNI_LAST}


def key(text: str) -> str:
    return "p." + hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]


def edit_texts(data) -> list[str]:
    """Every caption text an edit sample of the cache ``data`` (a :class:`train.data.CachedData`) can draw."""
    texts = {""}
    for s in data.samples:
        if s.get("kind") == "edit":
            for langs in s["captions"].values():
                texts.update(data.texts[h] for h in langs.values())
    return sorted(texts)


def build_store(path: Path, te, texts: list[str], max_length: int | None, identity: dict, batch: int = 64) -> Path:
    """Encode ``texts`` (and the fixed pieces) into ``path`` unless it already holds them for ``identity``."""
    path = Path(path)
    ident = json.dumps(
        {
            **identity,
            "max_length": max_length,
            "n": len(texts),
            "digest": hashlib.sha1("\0".join(texts).encode("utf-8")).hexdigest(),
        },
        sort_keys=True,
    )
    if path.is_file():
        try:
            if WeightSource([path], "Omni prompts").metadata.get("identity") == ident:
                return path
        except Exception:  # noqa: BLE001 - an unreadable file is rebuilt
            pass
    tensors = {}
    fixed = te.encode(list(FIXED.values()), max_length=max_length, template=None)
    for name, emb in zip(FIXED, fixed):
        tensors[name] = emb.detach().cpu()
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        for text, emb in zip(chunk, te.encode(chunk, max_length=max_length, template=OMNI_PROMPT_TEMPLATE)):
            tensors[key(text)] = emb.detach().cpu()
    save_safetensors(tensors, path, metadata={"identity": ident})
    log.info("encoded %d edit captions as Omni prompt segments into %s", len(texts), path)
    return path


class PromptStore:
    """``text -> [L, D]`` Omni prompt segment, read from the file on demand."""

    def __init__(self, path: Path):
        self.source = WeightSource([Path(path)], "Omni prompts")

    def __call__(self, text: str) -> torch.Tensor | None:
        try:
            return self.source[key(text)]
        except KeyError:
            return None

    def segments(self) -> OmniSegments:
        return OmniSegments(
            self.source["fixed.first"], self.source["fixed.between"], self.source["fixed.last"], prompts=self
        )
