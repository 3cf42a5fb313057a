"""One ComfyUI server for every real-server test (tests/comfyui/harness.py starts it)."""

from __future__ import annotations

import pytest

from tests.comfyui.harness import start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory)
