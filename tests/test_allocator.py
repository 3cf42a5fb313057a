"""The command line's allocator tuning: freed large blocks come back without fresh page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from zimage_core.allocator import recycle_large_blocks
    if sys.argv[1] == "on":
        assert recycle_large_blocks()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    counts = []
    for _ in range(3):  # a decode-like pattern: large activations of several sizes, made and freed
        before = faults()
        xs = [torch.ones(mb * 2**20 // 4) for mb in (40, 80, 120, 60)]
        del xs
        counts.append(faults() - before)
    print(counts[1] + counts[2])
""")


def faults_on_realloc(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_recycled_blocks_need_no_new_pages():
    default, recycled = faults_on_realloc("off"), faults_on_realloc("on")
    assert default > 10_000  # 600 MB of fresh pages each time: ~150k faults (fewer with huge pages, still many)
    assert recycled < 0.6 * default  # seen here: 51k vs 154k


def test_noop_elsewhere(monkeypatch):
    from zimage_core import allocator

    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.recycle_large_blocks() is False
