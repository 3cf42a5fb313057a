"""WeightSource: memory-mapped tensors are the file's values, private to the process, and fall back safely."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_core.errors import CheckpointError
from zimage_core.weights import WeightSource, materialize


@pytest.fixture()
def file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(64, 48, generator=g),
        "b.weight": torch.randn(33, generator=g).to(torch.bfloat16),
        "c.count": torch.arange(7, dtype=torch.int64),
        "d.empty": torch.zeros(0, 5),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("mapped", [True, False])
def test_values_dtypes_and_shapes(file, mapped):
    path, want = file
    src = WeightSource.open(path, mapped=mapped)
    assert set(src) == set(want)
    for k, t in want.items():
        got = src[k]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t)


def test_writes_to_a_mapped_tensor_stay_private(file):
    path, want = file
    before = path.read_bytes()
    src = WeightSource.open(path)
    t = src["a.weight"]
    t.mul_(2)  # e.g. a LoRA merged in place
    assert torch.equal(t, want["a.weight"] * 2)
    assert path.read_bytes() == before
    assert torch.equal(src["a.weight"], want["a.weight"])  # a fresh view still reads the file
    assert torch.equal(load_file(str(path))["a.weight"], want["a.weight"])


def test_misaligned_tensor_is_read_instead(tmp_path):
    """A header whose length leaves the data unaligned for float32 (legal safetensors) still loads exactly."""
    x = torch.randn(10, 3)
    header = json.dumps({"x": {"dtype": "F32", "shape": [10, 3], "data_offsets": [0, x.numel() * 4]}}).encode()
    header += b" " * ((4 - (8 + len(header)) % 4) % 4 + 1)  # 8 + len(header) == 1 (mod 4)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + x.numpy().tobytes())
    got = WeightSource.open(path)["x"]
    assert torch.equal(got, x)
    got.add_(1)  # its own memory
    assert torch.equal(WeightSource.open(path)["x"], x)


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds ``t``'s memory (Linux), or None for anonymous memory."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        parts = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5].strip() if len(parts) == 6 and parts[5].startswith("/") else None
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_materialize_keeps_same_dtype_zero_copy_and_converts_others(file):
    """Same dtype on the CPU: the parameter is the file's mapping itself; another dtype: a converted copy."""
    path, want = file
    src = WeightSource.open(path)
    with torch.device("meta"):
        mod = torch.nn.Linear(48, 64, bias=False)
    materialize(mod, {"weight": lambda: src["a.weight"]}, torch.float32, "cpu")
    assert torch.equal(mod.weight, want["a.weight"]) and not mod.weight.requires_grad
    assert mapped_file(mod.weight) == str(path.resolve())
    assert mapped_file(WeightSource.open(path, mapped=False)["a.weight"]) is None
    with torch.device("meta"):
        half = torch.nn.Linear(48, 64, bias=False)
    materialize(half, {"weight": lambda: src["a.weight"]}, torch.bfloat16, "cpu")
    assert half.weight.dtype == torch.bfloat16 and mapped_file(half.weight) is None
    assert torch.equal(half.weight, want["a.weight"].to(torch.bfloat16))


def test_truncated_file_is_refused_before_mapping(file):
    path, _ = file
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match="truncated"):
        WeightSource.open(path)
