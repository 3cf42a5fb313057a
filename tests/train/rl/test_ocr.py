"""The OCR text-rendering reward on words rendered with PIL: the right word scores high, a misspelt one lower, a
blurred one low; Chinese as well where the system has a font with CJK glyphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from train.rl.ocr import OCRReward, edit_distance, normalize_text, quoted_text, text_score
from train.rl.rewards import build_rewards

CJK_FONTS = [
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
]


def latin_font(size: int):
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font


def render(text: str, font, blur: float = 0.0, size=(256, 96)) -> torch.Tensor:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((12, 24), text, fill="black", font=font)
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def ocr():
    return OCRReward()


def test_text_helpers():
    assert quoted_text('a sign that says "OPEN" and “Café 24”') == "OPEN Café 24"
    assert quoted_text("海报上写着「你好世界」和『欢迎』") == "你好世界 欢迎"
    assert quoted_text("no quotes here") == ""
    assert normalize_text("Café 24!  ") == "café24" and normalize_text("你好，世界") == "你好世界"
    assert normalize_text("ＡＢＣ") == "abc"  # full-width letters (NFKC)
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0
    assert text_score("HELLO", "hello") == 1.0
    assert text_score("HELO", "hello") == pytest.approx(0.8)
    assert text_score("", "hello") == 0.0 and text_score("something else entirely", "hi") == 0.0


def test_ocr_scores_rendered_english_words(ocr):
    font = latin_font(40)
    imgs = torch.stack([render("ZEBRA", font), render("ZEBAR", font), render("ZEBRA", font, blur=8.0)])
    prompt = 'a street sign that says "ZEBRA"'
    right, misspelt, blurred = ocr(imgs, [prompt] * 3).tolist()
    assert right == 1.0
    assert 0.2 < misspelt < 0.9 and misspelt < right
    assert blurred < 0.3
    # no quoted text: no preference at all
    assert ocr(imgs[:1], ["a street sign"]).tolist() == [0.0]
    # through the configuration, with other rewards
    rs = build_rewards([{"name": "ocr", "weight": 1.0}, {"name": "brightness", "weight": 0.1}])
    assert rs.scores(imgs[:1], [prompt])["ocr"].tolist() == [1.0]


def test_ocr_scores_rendered_chinese_words(ocr):
    path = next((p for p in CJK_FONTS if Path(p).is_file()), None)
    if path is None:  # pragma: no cover - depends on the system's fonts
        pytest.skip("no font with CJK glyphs on this system (apt-get install fonts-wqy-microhei)")
    font = ImageFont.truetype(path, 40)
    imgs = torch.stack([render("你好世界", font), render("你好世果", font), render("你好世界", font, blur=8.0)])
    right, misspelt, blurred = ocr(imgs, ["一个写着“你好世界”的招牌"] * 3).tolist()
    assert right == 1.0 and misspelt == pytest.approx(0.75) and blurred < 0.3
