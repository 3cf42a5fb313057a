"""GGUF: the torch dequantization kernels against the gguf package's numpy decoders, our K-quant encoders,
and DiT files in city96's (ComfyUI key) and diffusers' key layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.factories.dit import randomize_
from zimage_core.checkpoints import load_dit, native_state_to_layout, probe_dit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.errors import CheckpointError
from zimage_core.memory import probe_size
from zimage_core.quant import GGUFLinear, describe, storage_bytes
from zimage_core.quant import gguf as qg
from zimage_core.quant.gguf_write import quantize, save_gguf

gguf = pytest.importorskip("gguf")

# (type, byte offsets of its fp16 scale fields)
TYPES = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def random_blocks(name: str, n: int, seed: int) -> np.ndarray:
    """Random bytes for ``n`` blocks of type ``name``, with finite fp16 scales."""
    t = gguf.GGMLQuantizationType[name]
    _, size = gguf.GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in TYPES[name]:
        raw[:, off : off + 2] = rng.uniform(-0.1, 0.1, size=(n, 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("name", sorted(TYPES))
def test_kernels_equal_gguf_numpy_on_random_blocks(name):
    t = gguf.GGMLQuantizationType[name]
    block, _ = gguf.GGML_QUANT_SIZES[t]
    raw = random_blocks(name, 24, seed=len(name))
    want = gguf.quants.dequantize(raw, t).reshape(-1)
    got = qg.dequantize(torch.from_numpy(raw), int(t), (24 * block,))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_encoders_round_trip_and_decode_identically(name):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(3)) * 0.05
    raw = quantize(w, name)
    t = gguf.GGMLQuantizationType[name]
    want = gguf.quants.dequantize(raw, t)
    got = qg.dequantize(torch.from_numpy(raw), int(t), tuple(w.shape))
    np.testing.assert_array_equal(got.numpy(), want)
    bound = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_1": 0.05, "Q5_K": 0.05, "Q4_0": 0.12, "Q4_K": 0.1}[name]
    assert float((got - w).norm() / w.norm()) < bound


def test_bf16_f16_f32_tensors_read_back_exactly():
    x = torch.randn(8, 32)
    for qtype, dtype in ((0, torch.float32), (1, torch.float16), (30, torch.bfloat16)):
        raw = x.to(dtype).contiguous().view(torch.uint8)
        assert torch.equal(qg.dequantize(raw, qtype, (8, 32), dtype), x.to(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", sorted(TYPES))
def test_kernels_on_cuda_equal_cpu(name):
    t = int(gguf.GGMLQuantizationType[name])
    raw = torch.from_numpy(random_blocks(name, 64, seed=1))
    n = 64 * qg.TYPES[t][1]
    # addcmul may run as a fused multiply-add on the GPU: equal up to float32 rounding
    torch.testing.assert_close(
        qg.dequantize(raw.cuda(), t, (n,)).cpu(), qg.dequantize(raw, t, (n,)), rtol=1e-6, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# DiT files
# ---------------------------------------------------------------------------------------------
CFG = DiTConfig.tiny(dim=256, n_heads=4, ffn_dim=512, cap_feat_dim=32, axes_dims=(16, 24, 24))


@pytest.fixture(scope="module")
def state():
    return {k: v.clone() for k, v in randomize_(ZImageDiT(CFG), 11).state_dict().items()}


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.4]), [torch.randn(9, CFG.cap_feat_dim, generator=g)]


def dequantized_reference(model: ZImageDiT) -> ZImageDiT:
    """A plain fp32 model with the quantized model's effective weights."""
    ref = ZImageDiT(model.cfg)
    sd = {}
    for name, module in model.named_modules():
        if isinstance(module, GGUFLinear):
            sd[name + ".weight"] = module.dequantize(torch.float32)
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] + ".weight" in sd and not k.endswith(".bias"):
            continue
        sd[k] = v
    ref.load_state_dict(sd)
    return ref.eval()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_city96_layout_loads_with_blocks_kept(tmp_path, state, qtype):
    path = save_gguf(state, tmp_path / f"z_image_turbo-{qtype}.gguf", qtype)
    model = load_dit(path, dtype="fp32")
    assert model.cfg == CFG
    quantized = {n for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert "layers.0.attention.qkv" in quantized and "layers.1.feed_forward.w2" in quantized
    assert model.layers[0].attention.qkv.weight.dtype == torch.uint8
    assert f"gguf_{qtype}" in describe(model)
    for n in ("layers.0.attention_norm1.weight", "x_pad_token", "cap_embedder.0.weight"):  # 1-D: stored F32
        assert torch.equal(model.state_dict()[n], state[n])
    with torch.inference_mode():
        got = model(*inputs())
        want = dequantized_reference(model)(*inputs())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    probe = probe_dit(path)  # the planner's header-only estimate is exact
    assert probe.config == CFG and probe_size(probe, torch.float32).total == sum(storage_bytes(model))


def test_diffusers_keys_with_prefix_fuse_qkv_blocks(tmp_path, state):
    comfy = load_dit(save_gguf(state, tmp_path / "a.gguf", "Q8_0"), dtype="fp32")
    split = {"model.diffusion_model." + k: v for k, v in native_state_to_layout(state, "diffusers").items()}
    model = load_dit(save_gguf(split, tmp_path / "b.gguf", "Q8_0"), dtype="fp32")
    assert isinstance(model.layers[0].attention.qkv, GGUFLinear)
    assert torch.equal(model.layers[0].attention.qkv.weight, comfy.layers[0].attention.qkv.weight)
    with torch.inference_mode():
        torch.testing.assert_close(model(*inputs()), comfy(*inputs()), rtol=0, atol=0)


def test_quant_flag_on_gguf_is_ignored_and_info_names_types(tmp_path, state, capsys):
    from zimage_core.cli import main

    path = save_gguf(state, tmp_path / "m.gguf", "Q4_0")
    model = load_dit(path, dtype="fp32", quant="nf4")
    assert isinstance(model.layers[0].feed_forward.w1, GGUFLinear)
    assert main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and "Q4_0" in info["quantization"] and info["config"]["dim"] == CFG.dim


def test_not_a_dit_gguf_is_named(tmp_path):
    path = save_gguf(
        {"token_embd.weight": torch.zeros(64, 32), "blk.0.attn_q.weight": torch.zeros(32, 32)},
        tmp_path / "llm.gguf",
        "Q8_0",
        arch="qwen3",
    )
    with pytest.raises(CheckpointError, match="Z-Image diffusion model"):
        load_dit(path)


def test_truncated_gguf_is_reported(tmp_path, state):
    path = save_gguf(state, tmp_path / "t.gguf", "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|cannot read"):
        load_dit(path)
