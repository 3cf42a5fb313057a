"""Caption policy: which caption level and language a sample shows this time, and caption dropout.

Levels are drawn by their configured weights among the levels a sample has; within a level, the language
is drawn by the language weights among the configured languages it has (a caption without a language,
``""``, is used when none of them is present). A sample with none of the configured levels falls back to
its primary caption (the ``.txt`` caption, or an edit pair's instruction). Dropout replaces the caption
by the empty prompt ``""`` (the unconditional branch of CFG). All draws come from the generator passed
in, so the same generator state gives the same choices.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Choice = tuple[str, str]  # (level, language)


class CaptionPolicy:
    def __init__(self, levels: Mapping[str, float], languages: Mapping[str, float], dropout: float = 0.0):
        self.levels = {k: float(v) for k, v in levels.items() if v > 0}
        self.languages = {k: float(v) for k, v in languages.items() if v > 0}
        self.dropout = float(dropout)

    def _languages(self, langs: Mapping[str, object], level: str, weight: float) -> list[tuple[Choice, float]]:
        present = [(lang, w) for lang, w in self.languages.items() if lang in langs]
        if present:
            total = sum(w for _, w in present)
            return [((level, lang), weight * w / total) for lang, w in present]
        if "" in langs:
            return [((level, ""), weight)]
        return []

    def options(self, captions: Mapping[str, Mapping[str, object]], primary: str | None) -> list[tuple[Choice, float]]:
        """``[((level, language), probability)]`` for one sample (before dropout); empty if it has no usable caption."""
        opts: list[tuple[Choice, float]] = []
        for level, w in self.levels.items():
            if level in captions:
                opts += self._languages(captions[level], level, w)
        if not opts and primary is not None and primary in captions:
            opts = self._languages(captions[primary], primary, 1.0)
            if not opts:  # the primary caption only exists in unconfigured languages: take its first one
                opts = [((primary, next(iter(captions[primary]))), 1.0)]
        total = sum(w for _, w in opts)
        return [(c, w / total) for c, w in opts]

    def choose(self, captions, primary, rng: np.random.Generator) -> Choice | None:
        """A (level, language) for this sample, or None when the caption is dropped. Draws exactly two numbers."""
        u_drop, u_pick = rng.random(2)
        opts = self.options(captions, primary)
        if not opts:
            raise ValueError("no usable caption")  # CachedData checks every sample before this can happen
        if u_drop < self.dropout:
            return None
        acc = 0.0
        for choice, p in opts:
            acc += p
            if u_pick < acc:
                return choice
        return opts[-1][0]
