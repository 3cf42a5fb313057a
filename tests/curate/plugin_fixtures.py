"""Plug-ins loaded by ``module:function`` in the data-engine tests."""

from __future__ import annotations

import numpy as np


def prefer_dup(**opts):
    """A 'score' that prefers lower-resolution images (so a planted copy beats its original)."""

    def score(images):
        return [-float(im.size[0] * im.size[1]) + float(np.asarray(im).std()) * 0 for im in images]

    return score


def mean_brightness(path=None, scale=1.0):
    def score(images):
        return [float(np.asarray(im.convert("L")).mean()) * scale for im in images]

    return score


def ocr_captioner(prefix="a picture"):
    def caption(images, ocr_texts):
        return [
            f"{prefix} {im.size[0]}x{im.size[1]}" + (f' with the text "{t}"' if t else "")
            for im, t in zip(images, ocr_texts)
        ]

    return caption
