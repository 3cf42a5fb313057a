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


def make_teacher(path, seed: int = 3, **dims):
    """A tiny DiT that looks pretrained (nothing at zero, unlike a fresh adaLN-zero init), saved in ComfyUI's
    single-file layout: the teacher of the distillation tests and the start of fine-tuning tests."""
    from train.model import init_weights
    from zimage_core.checkpoints import save_dit
    from zimage_core.config import DiTConfig
    from zimage_core.dit import ZImageDiT

    gen = torch.Generator().manual_seed(seed)
    dit = init_weights(ZImageDiT(DiTConfig.tiny(**dims)), seed=seed)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return save_dit(dit.state_dict(), dit.cfg, path, "comfyui")
