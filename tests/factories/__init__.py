"""Builders of tiny models and files for the tests, and the test fixtures' location."""

from pathlib import Path

#: The real Qwen2.5/Qwen3 BPE vocabulary, vendored under tests/fixtures (Apache-2.0; see its README).
TOKENIZER_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen25_tokenizer"
