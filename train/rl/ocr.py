"""The text-rendering reward: OCR the image, compare with the text the prompt quotes.

The OCR model is the one ``rapidocr_onnxruntime`` ships inside its pip package (PP-OCRv4 detection and
recognition, Chinese and English), so it runs offline with nothing to supply. The target is every quoted span of
the prompt (``"..."``, ``“...”``, ``「...」``, ``『...』``, ``‘...’``, ``《...》``) joined; both sides are
normalised (Unicode NFKC, lower case, whitespace and punctuation removed) and the score is
``1 - min(d, n) / n`` with ``d`` the edit distance between the recognised and the target text and ``n`` the
target's length, as Flow-GRPO's OCR reward: 1 for the exact text, 0 for nothing like it. A prompt that quotes
nothing scores 0 for every image (so it carries no preference).
"""

from __future__ import annotations

import logging
import re
import unicodedata

import numpy as np
import torch

from .rewards import Reward, RewardError

log = logging.getLogger(__name__)

_QUOTES = re.compile(r'"([^"]+)"|“([^”]+)”|「([^」]+)」|『([^』]+)』|‘([^’]+)’|《([^》]+)》')


def quoted_text(prompt: str) -> str:
    """The prompt's quoted spans joined by spaces ('' when it quotes nothing)."""
    return " ".join(next(g for g in m.groups() if g is not None) for m in _QUOTES.finditer(prompt))


def normalize_text(text: str) -> str:
    """NFKC, lower case, letters and digits only (CJK characters are letters)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_score(recognised: str, target: str) -> float:
    """``1 - min(d, n) / n`` on the normalised texts (0 when the target is empty)."""
    rec, tgt = normalize_text(recognised), normalize_text(target)
    if not tgt:
        return 0.0
    return 1.0 - min(edit_distance(rec, tgt), len(tgt)) / len(tgt)


class OCRReward(Reward):
    """``ocr``: the rapidocr text-rendering score (not differentiable). ``threads``: onnxruntime threads per
    model (default 1); ``min_confidence``: recognised lines below it are ignored (default 0.5)."""

    name = "ocr"
    options = ("threads", "min_confidence")

    def __init__(self, threads: int = 1, min_confidence: float = 0.5):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except Exception as e:  # noqa: BLE001 - a broken onnxruntime raises more than ImportError
            raise RewardError(
                f"reward 'ocr' needs the rapidocr_onnxruntime package, which ships its OCR models ({type(e).__name__}: "
                f"{e}); install it with pip install 'zimage[rl]' or pip install rapidocr_onnxruntime."
            ) from e
        # Small images are not upscaled to a 736-pixel short side (rapidocr's default), which costs ~20x.
        self.engine = RapidOCR(
            det_limit_side_len=960,
            det_limit_type="max",
            intra_op_num_threads=int(threads),
            inter_op_num_threads=1,
            text_score=float(min_confidence),
        )

    def recognise(self, image: np.ndarray) -> str:
        """Text lines of one ``[H, W, 3]`` uint8 RGB image, top to bottom, joined by spaces."""
        bgr = np.ascontiguousarray(image[..., ::-1])  # rapidocr reads arrays as OpenCV does (BGR)
        result, _ = self.engine(bgr, use_cls=False)
        if not result:
            return ""
        lines = sorted(result, key=lambda r: (min(p[1] for p in r[0]), min(p[0] for p in r[0])))
        return " ".join(str(r[1]) for r in lines)

    def score(self, images, prompts, keys):
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for img, prompt in zip(arr, prompts):
            target = quoted_text(prompt)
            out.append(text_score(self.recognise(img), target) if target else 0.0)
        return torch.tensor(out, dtype=torch.float32)


__all__ = ["OCRReward", "RewardError", "edit_distance", "normalize_text", "quoted_text", "text_score"]
