"""Quantized linears (int8 / nf4 / fp8): formats against bitsandbytes, quantize-on-load, ComfyUI's quantized
files, LoRA side paths over quantized layers, and the quantized text encoder."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.factories.dit import randomize_
from tests.factories.lora import WRITERS, make_spec
from tests.factories.text_encoder import fp8_scaled_state
from zimage_core.checkpoints import convert_dit, load_dit, native_state_to_layout, save_dit
from zimage_core.config import DiTConfig, TextEncoderConfig
from zimage_core.dit import ZImageDiT
from zimage_core.errors import CheckpointError, ZImageError
from zimage_core.lora import LoraLinear, apply_loras, parse_lora
from zimage_core.quant import (
    DIT_POLICY,
    FP8Linear,
    Int8Linear,
    NF4Linear,
    QuantLinear,
    describe,
    kernels,
    quantize_model,
)
from zimage_core.weights import save_safetensors

CFG = DiTConfig.tiny(dim=128, n_heads=2, ffn_dim=384, cap_feat_dim=32, axes_dims=(16, 24, 24))
MODES = ("int8", "nf4", "fp8")
SENSITIVE = (
    "x_embedder",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "cap_embedder.1",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
    "layers.0.adaLN_modulation.0",
    "noise_refiner.0.adaLN_modulation.0",
)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def state():
    return {k: v.clone() for k, v in randomize_(ZImageDiT(CFG), 5).state_dict().items()}


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory, state):
    return save_dit(state, CFG, tmp_path_factory.mktemp("dit") / "z_image.safetensors", "comfyui")


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 16, 8, 8, generator=g),
        torch.tensor([0.3, 0.8]),
        [torch.randn(9, CFG.cap_feat_dim, generator=g), torch.randn(14, CFG.cap_feat_dim, generator=g)],
    )


def run(model, seed: int = 0):
    with torch.inference_mode():
        return model(*inputs(seed))


def dequantized(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantized linear replaced by a plain linear of its effective weight."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.data.float()
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, attr, lin)
    return out


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------
def test_int8_is_bitsandbytes_row_wise_absmax():
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(1))
    q, scale = kernels.quantize_int8(w)
    q_ref, absmax, _ = bnb.int8_vectorwise_quant(w.clone())
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(scale * 127, absmax, rtol=1e-6, atol=0)
    assert rel_err(kernels.dequantize_int8(q, scale, torch.float32), w) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_is_bitsandbytes_nf4_and_kernels_agree(dtype):
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(2)).to(dtype)
    packed, absmax = kernels.quantize_nf4(w)
    ref, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref.view(-1)) and torch.equal(absmax, state.absmax)
    plain = kernels.dequantize_nf4(packed, absmax, (64, 192), dtype, use_bnb=False)
    fast = kernels.dequantize_nf4(packed, absmax, (64, 192), dtype, use_bnb=True)
    assert torch.equal(plain, fast) and torch.equal(plain, bnb.dequantize_4bit(ref, state))
    assert rel_err(plain.float(), w.float()) < 0.12


@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_scales_and_range(per_row):
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(3))
    w[5] *= 50  # one loud row: per-row scales keep the others precise
    q, scale = kernels.quantize_fp8(w, per_row=per_row)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == ((48,) if per_row else (1,))
    assert float(q.float().abs().max()) == 448.0
    back = kernels.dequantize_fp8(q, scale, torch.float32)
    quiet = [i for i in range(48) if i != 5]
    assert rel_err(back[quiet], w[quiet]) < (0.04 if per_row else 0.5)


def test_int8_hadamard_groups_undo_comfy_convrot():
    h = kernels.regular_hadamard(16, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(h @ h, torch.eye(16, dtype=torch.float64))
    assert torch.equal(h, h.T)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    rotated = kernels.rotate_groups(w, 16)  # what ComfyUI stores: W @ H per group of 16 inputs
    q, scale = kernels.quantize_int8(rotated)
    lin = Int8Linear(q, scale, hadamard=16)
    assert rel_err(lin.dequantize(), w) < 0.01
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(lin(x), F.linear(x, lin.dequantize()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_modules_move_and_survive_dtype_casts(mode):
    w, b = torch.randn(64, 128), torch.randn(64)
    lin = {"int8": Int8Linear, "nf4": NF4Linear, "fp8": FP8Linear}[mode].quantize(w, b)
    storage = {n: (t.dtype, t.clone()) for n, t in lin.named_buffers()}
    x = torch.randn(4, 128)
    want = F.linear(x, lin.dequantize(), b)
    torch.testing.assert_close(lin(x), want)
    lin.to(torch.bfloat16)  # a model-wide cast: storage untouched, the bias follows, compute follows the input
    for n, t in lin.named_buffers():
        assert t.dtype == storage[n][0] and torch.equal(t, storage[n][1]), n
    assert lin.bias.dtype == torch.bfloat16
    assert lin(x.bfloat16()).dtype == torch.bfloat16
    assert rel_err(lin(x.bfloat16()).float(), want) < 0.02
    assert lin.storage_bytes() < w.numel() * (1.1 if mode != "nf4" else 0.6)
    if torch.cuda.is_available():
        lin.to("cuda", non_blocking=True)
        assert all(t.is_cuda for t in lin.buffers())
        torch.testing.assert_close(lin(x.cuda().bfloat16()).float().cpu(), want, rtol=0.05, atol=0.1)
        lin.cpu()
        assert all(torch.equal(t, storage[n][1]) for n, t in lin.named_buffers())


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with fp8 tensor cores",
)
@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_scaled_mm_matches_dequantized_matmul(per_row):
    w = torch.randn(256, 512, device="cuda") * 0.05
    lin = FP8Linear(*kernels.quantize_fp8(w, per_row=per_row), bias=torch.randn(256, device="cuda"))
    x = torch.randn(2, 77, 512, device="cuda", dtype=torch.bfloat16)
    fast = lin(x)
    lin.fp8_matmul = False
    slow = lin(x)
    assert fast.shape == slow.shape == (2, 77, 256)
    assert cos(fast.float(), slow.float()) > 0.999


# ---------------------------------------------------------------------------------------------
# Quantize-on-load
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_quantize_on_load_only_touches_block_matrices(dit_file, state, mode):
    model = load_dit(dit_file, dtype="fp32", quant=mode)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert quantized == {n for n in quantized | linears if DIT_POLICY.fullmatch(n)}
    assert len(quantized) == 5 * (CFG.n_layers + 2 * CFG.n_refiner_layers)
    for name in SENSITIVE:
        m = model.get_submodule(name)
        assert type(m) is nn.Linear and m.weight.dtype == torch.float32, name
        assert torch.equal(m.weight, state[name + ".weight"]), name
    sd = model.state_dict()
    for k in ("x_pad_token", "cap_pad_token", "layers.1.ffn_norm2.weight", "layers.0.attention.q_norm.weight"):
        assert torch.equal(sd[k], state[k]), k
    assert model.dtype == torch.float32
    assert mode in describe(model).replace("fp8_e4m3", "fp8")
    ref = load_dit(dit_file, dtype="fp32")
    assert cos(run(model), run(ref)) > {"int8": 0.999, "fp8": 0.995, "nf4": 0.97}[mode]
    torch.testing.assert_close(run(model), run(dequantized(model)), rtol=1e-4, atol=1e-4)


def test_bf16_compute_and_quantize_model_agree_with_loading(dit_file):
    loaded = load_dit(dit_file, dtype="bf16", quant="int8")
    assert loaded.dtype == torch.bfloat16 and loaded.layers[0].feed_forward.w1.weight.dtype == torch.int8
    late = quantize_model(load_dit(dit_file, dtype="bf16"), "int8")  # from the bf16 copy, not from the fp32 file
    assert describe(late) == describe(loaded)
    for (n, a), b in zip(loaded.named_modules(), late.modules()):
        if isinstance(a, QuantLinear):
            assert type(b) is type(a) and rel_err(b.dequantize(), a.dequantize()) < 0.01, n
    assert cos(run(loaded).float(), run(late).float()) > 0.999
    assert describe(load_dit(dit_file, dtype="fp32")).startswith("not quantized")


def test_unknown_mode_is_a_clear_error(dit_file):
    with pytest.raises(ZImageError, match="unknown quantization 'q3'.*int8, nf4, fp8"):
        load_dit(dit_file, quant="q3")


# ---------------------------------------------------------------------------------------------
# ComfyUI's quantized files
# ---------------------------------------------------------------------------------------------
def _native_layer(layer: str) -> str:
    from zimage_core.dit_layout import diffusers_to_native_key

    name = diffusers_to_native_key(layer.removeprefix("model.diffusion_model.") + ".weight")[: -len(".weight")]
    return name.replace(".to_q", ".qkv").replace(".to_k", ".qkv").replace(".to_v", ".qkv")


def comfy_fp8_state(state, style: str = "mixed") -> dict:
    """``state`` (native keys, or diffusers keys) with the block matrices in fp8, one scale per stored tensor."""
    out = {}
    for k, v in state.items():
        layer = k[: -len(".weight")]
        if not (k.endswith(".weight") and v.ndim == 2 and DIT_POLICY.fullmatch(_native_layer(layer))):
            out[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
            continue
        scale = v.abs().amax() / 448.0
        out[k] = (v / scale).to(torch.float8_e4m3fn)
        if style == "legacy":
            out[layer + ".scale_weight"] = scale.reshape(1)
        else:
            out[layer + ".weight_scale"] = scale
            out[layer + ".input_scale"] = torch.tensor(0.05)
            if style == "mixed":
                conf = {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
                out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    if style == "legacy":
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return out


@pytest.mark.parametrize("style", ["mixed", "legacy", "metadata", "diffusers"])
def test_comfy_fp8_files_stay_fp8_and_equal_their_dequantization(tmp_path, state, style):
    meta = None
    if style == "diffusers":  # split q/k/v, each with its own scale: fused with one scale per row
        split = {"model.diffusion_model." + k: v for k, v in native_state_to_layout(state, "diffusers").items()}
        fp8 = comfy_fp8_state(split, "mixed")
    else:
        fp8 = comfy_fp8_state(state, style)
    if style == "metadata":
        layers = {
            k[: -len(".weight")]: {"format": "float8_e4m3fn"} for k, v in fp8.items() if v.dtype == torch.float8_e4m3fn
        }
        meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_safetensors(fp8, tmp_path / "fp8.safetensors", metadata=meta)
    model = load_dit(tmp_path / "fp8.safetensors", dtype="fp32")
    qkv = model.layers[0].attention.qkv
    assert isinstance(qkv, FP8Linear) and qkv.weight.dtype == torch.uint8
    assert qkv.fp8_matmul == (style not in ("mixed", "diffusers"))  # full_precision_matrix_mult honoured
    assert qkv.scale.numel() == (3 * CFG.dim if style == "diffusers" else 1)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in SENSITIVE)
    assert rel_err(qkv.dequantize(), state["layers.0.attention.qkv.weight"]) < 0.05
    torch.testing.assert_close(run(model), run(dequantized(model)), rtol=1e-5, atol=1e-5)
    ref = load_dit(save_dit(state, CFG, tmp_path / "ref.safetensors", "comfyui"), dtype="fp32")
    assert cos(run(model), run(ref)) > 0.99


def test_comfy_int8_convrot_file(tmp_path, state):
    sd = {k: v.to(torch.bfloat16) for k, v in state.items()}
    conf = torch.tensor(
        list(b'{"format": "int8_tensorwise", "per_row": true, "convrot": true, "convrot_groupsize": 64}'),
        dtype=torch.uint8,
    )
    for k, v in state.items():
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and DIT_POLICY.fullmatch(layer):
            q, scale = kernels.quantize_int8(kernels.rotate_groups(v, 64))
            sd[k], sd[layer + ".weight_scale"], sd[layer + ".comfy_quant"] = q, scale[:, None], conf.clone()
    save_safetensors(sd, tmp_path / "int8_convrot.safetensors")
    model = load_dit(tmp_path / "int8_convrot.safetensors", dtype="fp32")
    w1 = model.layers[1].feed_forward.w1
    assert isinstance(w1, Int8Linear) and w1.hadamard == 64
    assert rel_err(w1.dequantize(), state["layers.1.feed_forward.w1.weight"]) < 0.01
    torch.testing.assert_close(run(model), run(dequantized(model)), rtol=1e-4, atol=1e-4)


def test_unsupported_recipe_names_layer_and_format(tmp_path, state):
    sd = dict(state)
    sd["layers.0.attention.out.weight"] = torch.zeros(CFG.dim, CFG.dim // 2, dtype=torch.uint8)
    sd["layers.0.attention.out.weight_scale"] = torch.zeros(CFG.dim, CFG.dim // 16, dtype=torch.float8_e4m3fn)
    sd["layers.0.attention.out.weight_scale_2"] = torch.tensor(1.0)
    sd["layers.0.attention.out.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_safetensors(sd, tmp_path / "nvfp4.safetensors")
    with pytest.raises(CheckpointError, match="layers.0.attention.out.*'nvfp4'"):
        load_dit(tmp_path / "nvfp4.safetensors")


def test_convert_and_info_on_a_quantized_file(tmp_path, state, capsys):
    from zimage_core.cli import main

    save_safetensors(comfy_fp8_state(state), tmp_path / "fp8.safetensors")
    with pytest.raises(CheckpointError, match="quantized.*full-precision"):
        convert_dit(tmp_path / "fp8.safetensors", tmp_path / "out.safetensors", "comfyui")
    assert main(["info", str(tmp_path / "fp8.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "comfyui" and "float8_e4m3fn x" in info["quantization"]


# ---------------------------------------------------------------------------------------------
# LoRA over quantized layers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nf4", "fp8"])
def test_lora_on_quantized_equals_lora_on_dequantized(dit_file, mode, caplog):
    model = load_dit(dit_file, dtype="fp32", quant=mode)
    plain = dequantized(model)
    lora = parse_lora(WRITERS["kohya"](make_spec(plain, seed=7, std=0.1))[0], plain)
    with apply_loras(plain, [(lora, 0.8)], mode="merge"):
        want = run(plain)
    before = run(model)
    storage = {n: t.clone() for n, t in model.named_buffers()}
    with caplog.at_level(logging.INFO, logger="zimage_core.lora"):
        handle = apply_loras(model, [(lora, 0.8)], mode="merge")  # quantized layers fall back to the side path
    assert "runtime side path" in caplog.text
    assert isinstance(model.layers[0].attention.qkv, LoraLinear)
    assert isinstance(model.layers[0].attention.qkv.base, QuantLinear)
    assert type(model.x_embedder) is nn.Linear  # a full-precision layer is still merged
    assert rel_err(run(model), want) < 1e-5
    second = apply_loras(model, [(lora, -0.8)], mode="merge")  # stacked on the first: cancels it
    torch.testing.assert_close(run(model), before, rtol=1e-4, atol=1e-4)
    second.remove()
    handle.remove()
    assert isinstance(model.layers[0].attention.qkv, QuantLinear)
    assert all(torch.equal(t, storage[n]) for n, t in model.named_buffers())
    torch.testing.assert_close(run(model), before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------
TE_CFG = TextEncoderConfig.tiny(
    hidden_size=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, intermediate_size=512
)


@pytest.fixture(scope="module")
def te_files(tmp_path_factory):
    from tests.factories.pipeline import load_tokenizer
    from tests.factories.text_encoder import make_qwen3, save_comfy_text_encoder

    folder = tmp_path_factory.mktemp("te")
    qwen = make_qwen3(TE_CFG, seed=3)
    with torch.no_grad():  # the factory's 0.15 std suits hidden 32; give the projections unit gain at hidden 256
        for name, p in qwen.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(p.shape[1] ** -0.5 / 0.15)
    path = save_comfy_text_encoder(qwen, folder / "qwen_3_4b.safetensors")
    return path, qwen, load_tokenizer()


PROMPTS = ["a red fox sitting in fresh snow, golden hour", "a lighthouse at dusk"]


@pytest.mark.parametrize("mode,bound", [("int8", 0.99), ("nf4", 0.95), ("fp8", 0.99)])
def test_text_encoder_quantized_embeddings(te_files, mode, bound):
    from zimage_core.quant.modes import TEXT_ENCODER_POLICY
    from zimage_core.text_encoder import TextEncoder

    path, _, tok = te_files
    ref = TextEncoder.load(path, tokenizer=tok).encode(PROMPTS)
    te = TextEncoder.load(path, tokenizer=tok, quant=mode)
    quantized = {n for n, m in te.model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized and all(TEXT_ENCODER_POLICY.fullmatch(n) for n in quantized)
    assert len(quantized) == 7 * (TE_CFG.n_layers - 1)
    assert te.model.embed_tokens.weight.dtype == torch.float32
    for a, b in zip(te.encode(PROMPTS), ref):
        assert a.shape == b.shape and cos(a, b) >= bound


def test_text_encoder_fp8_file_keeps_fp8_linears(tmp_path, te_files):
    from zimage_core.text_encoder import TextEncoder

    path, qwen, tok = te_files
    state = fp8_scaled_state(qwen)
    save_safetensors(state, tmp_path / "qwen_3_4b_fp8_mixed.safetensors")
    te = TextEncoder.load(tmp_path / "qwen_3_4b_fp8_mixed.safetensors", tokenizer=tok)
    q = te.model.layers[0].self_attn.q_proj
    assert isinstance(q, FP8Linear)
    w = state["model.layers.0.self_attn.q_proj.weight"].float() * state["model.layers.0.self_attn.q_proj.weight_scale"]
    assert torch.equal(q.dequantize(), w)
    ref = TextEncoder.load(path, tokenizer=tok).encode(PROMPTS)
    for a, b in zip(te.encode(PROMPTS), ref):
        assert cos(a, b) > 0.99
