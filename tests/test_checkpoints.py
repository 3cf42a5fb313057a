"""DiT checkpoint layouts: detection from tensors, size inference, lossless conversion, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.factories.dit import diffusers_to_native_state, make_diffusers_dit, save_comfy_dit, save_diffusers_dit
from zimage_core.checkpoints import convert_dit, load_dit
from zimage_core.config import DiTConfig
from zimage_core.dit_layout import DiTCheckpoint
from zimage_core.errors import CheckpointError

CFG = DiTConfig.tiny(t_mid_dim=1024, n_layers=3)


@pytest.fixture(scope="module")
def ref():
    return make_diffusers_dit(CFG, seed=11)


@pytest.fixture(scope="module")
def native(ref):
    return diffusers_to_native_state(ref)


def assert_state_equal(model, native):
    sd = model.state_dict()
    assert set(sd) == set(native)
    for k, v in native.items():
        assert torch.equal(sd[k], v.to(sd[k].dtype)), k


def test_diffusers_folder_fp32(tmp_path, ref, native):
    save_diffusers_dit(ref, tmp_path / "transformer")
    ckpt = DiTCheckpoint(tmp_path)  # the model root with transformer/ inside
    assert ckpt.layout == "diffusers"
    assert ckpt.config == CFG
    assert_state_equal(load_dit(tmp_path, dtype="fp32"), native)


def test_diffusers_folder_bf16_loads_as_requested_dtype(tmp_path, ref, native):
    import copy

    save_diffusers_dit(copy.deepcopy(ref), tmp_path / "transformer", dtype=torch.bfloat16)
    model = load_dit(tmp_path / "transformer", dtype="fp32")
    assert model.dtype == torch.float32
    for k, v in native.items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16).float()), k


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfyui_single_file(tmp_path, ref, native, prefix):
    f = save_comfy_dit(ref, tmp_path / "z_image_turbo_bf16.safetensors", prefix=prefix, cfg=CFG)
    ckpt = DiTCheckpoint(f)
    assert ckpt.layout == "comfyui" and ckpt.config == CFG
    assert_state_equal(load_dit(f), native)


def test_comfy_file_with_lumina_leftover_key(tmp_path, native):
    f = tmp_path / "x.safetensors"
    save_file({**native, "norm_final.weight": torch.ones(CFG.dim)}, str(f))
    assert_state_equal(load_dit(f), native)


def test_config_from_diffusers_json_wins(tmp_path, ref):
    save_diffusers_dit(ref, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["axes_lens"] = [1024, 512, 512]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert DiTCheckpoint(tmp_path).config.axes_lens == (1024, 512, 512)


@pytest.mark.parametrize("layout", ["comfyui", "diffusers", "zimage"])
def test_convert_round_trip_is_lossless(tmp_path, ref, native, layout):
    src = save_comfy_dit(ref, tmp_path / "src.safetensors", cfg=CFG)
    dst = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    convert_dit(src, dst, layout)
    ckpt = DiTCheckpoint(dst)
    assert ckpt.layout == layout and ckpt.config == CFG
    back = tmp_path / "back.safetensors"
    convert_dit(dst, back, "comfyui")
    got = load_file(str(back))
    assert set(got) == set(native)
    assert all(torch.equal(got[k], native[k]) for k in native)
    if layout == "diffusers":
        # what diffusers itself reads
        from diffusers import ZImageTransformer2DModel

        again = ZImageTransformer2DModel.from_pretrained(dst)
        for k, v in ref.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k


def test_convert_to_bf16(tmp_path, ref):
    src = save_comfy_dit(ref, tmp_path / "src.safetensors", cfg=CFG)
    convert_dit(src, tmp_path / "b.safetensors", "comfyui", dtype="bf16")
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(tmp_path / "b.safetensors")).values())


def test_wrong_kind_of_file_is_named(tmp_path):
    f = tmp_path / "ae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(2, 2, 3, 3)}, str(f))
    with pytest.raises(CheckpointError, match="holds a VAE"):
        load_dit(f)
    g = tmp_path / "qwen.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, str(g))
    with pytest.raises(CheckpointError, match="text-encoder"):
        load_dit(g)


def test_missing_and_truncated_files(tmp_path, native):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit(tmp_path / "nope.safetensors")
    part = {k: v for k, v in native.items() if not k.startswith("layers.1.")}
    f = tmp_path / "cut.safetensors"
    save_file(part, str(f))
    with pytest.raises(CheckpointError, match="Missing: layers.1"):
        load_dit(f)
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_dit(bad)
