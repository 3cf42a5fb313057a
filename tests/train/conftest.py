"""Shared by the training tests that run the trainer and the CLI on tiny models."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core machine they cost up to 30x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
