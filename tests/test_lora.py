"""LoRA loading (every layout), merge/runtime application, and parity with diffusers + PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from tests.factories.dit import diffusers_to_native_state, make_diffusers_dit
from tests.factories.lora import WRITERS, diffusers_linears, expected_weights, make_spec
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.errors import LoraError, ZImageError
from zimage_core.lora import LoraLinear, apply_loras, load_lora, parse_lora, parse_lora_arg, save_lora

CFG = DiTConfig.tiny(t_mid_dim=1024)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def pair():
    ref = make_diffusers_dit(CFG, seed=0)
    ours = ZImageDiT(CFG)
    ours.load_state_dict(diffusers_to_native_state(ref))
    return ref, ours.eval()


@pytest.fixture
def model(pair):
    return copy.deepcopy(pair[1])


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CFG.in_channels, 8, 12, generator=g)
    t = torch.tensor([0.3, 0.7])
    caps = [torch.randn(7, CFG.cap_feat_dim, generator=g), torch.randn(40, CFG.cap_feat_dim, generator=g)]
    return x, t, caps


def run(model, x, t, caps):
    with torch.no_grad():
        return model(x, t, caps)


def assert_weights(model, want: dict, atol: float = 1e-6):
    got = model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k].float(), v, atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------
# Parity with diffusers (PEFT injection) on the same random weights
# ---------------------------------------------------------------------------------------------
BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")


@pytest.mark.parametrize(
    "fmt,where",
    [
        ("diffusers-metadata", lambda d: True),  # every linear layer, embedders and final layer included
        ("kohya", lambda d: d.startswith(BLOCKS) or d.startswith(("t_embedder", "cap_embedder"))),
        ("ai-toolkit", lambda d: d.startswith(BLOCKS)),
    ],
)
def test_matches_diffusers_peft(pair, tmp_path, fmt, where):
    pytest.importorskip("peft")
    from diffusers import ZImagePipeline

    ref, base = pair
    ref = copy.deepcopy(ref)
    ours = copy.deepcopy(base)
    spec = make_spec(ours, rank=4, seed=3, where=where, std=0.2)
    sd, meta = WRITERS[fmt](spec)
    path = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt", **(meta or {})})

    state, metadata = ZImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    ZImagePipeline.load_lora_into_transformer(state, transformer=ref, metadata=metadata, adapter_name="a")
    assert any("lora" in type(m).__module__ for m in ref.modules())
    ref.set_adapters(["a"], weights=[0.8])

    lora = load_lora(path, ours)
    x, t, caps = inputs()
    with torch.no_grad():
        want = torch.stack(ref(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]).squeeze(2)
    plain = run(ours, x, t, caps)
    assert rel_err(plain, want) > 1e-3  # the LoRA really changes the output
    with apply_loras(ours, [(lora, 0.8)], mode="merge"):
        assert rel_err(run(ours, x, t, caps), want) <= 1e-5
    with apply_loras(ours, [(lora, 0.8)], mode="runtime"):
        assert rel_err(run(ours, x, t, caps), want) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Every layout gives the same merged weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_layout_merges_the_same(model, fmt):
    spec = make_spec(model, rank=3, seed=4)
    sd, meta = WRITERS[fmt](spec)
    want = expected_weights(model, [(spec, 0.7)])
    lora = parse_lora(sd, model, meta, name=fmt)
    assert lora.format != "unknown"
    apply_loras(model, [(lora, 0.7)])
    assert_weights(model, want)


def test_split_fused_and_saved_layouts_identical(model, tmp_path):
    """kohya split vs musubi fused (block-diagonal, alpha x 3) vs PEFT fused vs ComfyUI native vs our own save."""
    spec = make_spec(model, rank=2, seed=5)
    merged = {}
    for fmt in ("kohya", "musubi-comfy-fused", "peft-fused", "comfy-native"):
        m = copy.deepcopy(model)
        apply_loras(m, [parse_lora(WRITERS[fmt](spec)[0], m)])
        merged[fmt] = m.state_dict()
    lora = parse_lora(WRITERS["kohya"](spec)[0], model)
    path = save_lora(lora, tmp_path / "own.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["zimage_format"] == "lora"
    assert "diffusion_model.layers.0.attention.qkv.lora_down.weight" in keys
    assert not any("to_q" in k for k in keys)
    again = load_lora(path, model)
    assert again.format.startswith("zimage")
    m = copy.deepcopy(model)
    apply_loras(m, [again])
    merged["own"] = m.state_dict()
    for fmt, state in merged.items():
        for k, v in state.items():
            torch.testing.assert_close(v, merged["kohya"][k], atol=1e-6, rtol=0, msg=f"{fmt}: {k}")


def test_lokr_and_diffs(model):
    g = torch.Generator().manual_seed(6)
    dim, hid = CFG.dim, CFG.ffn_dim
    w1, w2 = torch.randn(4, 4, generator=g), torch.randn(dim // 4, dim // 4, generator=g) * 0.02
    w2a, w2b = torch.randn(hid // 2, 3, generator=g) * 0.1, torch.randn(3, dim // 2, generator=g) * 0.1
    w1b = torch.randn(2, 2, generator=g)
    norm, bias = torch.randn(CFG.head_dim, generator=g) * 0.1, torch.randn(dim, generator=g) * 0.1
    sd = {
        "diffusion_model.layers.0.attention.to_k.lokr_w1": w1,
        "diffusion_model.layers.0.attention.to_k.lokr_w2": w2,
        "diffusion_model.layers.1.feed_forward.w1.lokr_w1": w1b,
        "diffusion_model.layers.1.feed_forward.w1.lokr_w2_a": w2a,
        "diffusion_model.layers.1.feed_forward.w1.lokr_w2_b": w2b,
        "diffusion_model.layers.1.feed_forward.w1.alpha": torch.tensor(1.5),
        "diffusion_model.layers.0.attention.q_norm.diff": norm,
        "diffusion_model.x_embedder.diff_b": bias,
    }
    lora = parse_lora(sd, model)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want["layers.0.attention.qkv.weight"][dim : 2 * dim] += 0.5 * torch.kron(w1, w2)
    want["layers.1.feed_forward.w1.weight"] += 0.5 * 1.5 / 3 * torch.kron(w1b, w2a @ w2b)
    want["layers.0.attention.q_norm.weight"] += 0.5 * norm
    want["x_embedder.bias"] += 0.5 * bias
    x, t, caps = inputs(2)
    with apply_loras(model, [(lora, 0.5)]):
        assert_weights(model, want)
        merged = run(model, x, t, caps)
    with apply_loras(model, [(lora, 0.5)], mode="runtime"):
        assert isinstance(model.layers[1].feed_forward.w1, LoraLinear)
        assert rel_err(run(model, x, t, caps), merged) <= 1e-5
        torch.testing.assert_close(model.layers[0].attention.q_norm.weight, want["layers.0.attention.q_norm.weight"])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_unmatched_keys_are_listed(model):
    sd, _ = WRITERS["kohya"](make_spec(model, seed=7, where=lambda d: d.startswith("layers.0")))
    sd["lora_unet_layers_9_attention_to_q.lora_down.weight"] = torch.zeros(4, CFG.dim)
    sd["lora_unet_layers_9_attention_to_q.lora_up.weight"] = torch.zeros(CFG.dim, 4)
    with pytest.raises(LoraError, match=r"layers_9_attention_to_q\.lora_down\.weight.*") as e:
        parse_lora(sd, model)
    assert "kohya/musubi" in str(e.value) and "2 key(s)" in str(e.value)


def test_siglip_keys_need_an_omni_model(model):
    sd = {
        "diffusion_model.siglip_refiner.0.attention.qkv.lora_A.weight": torch.zeros(2, CFG.dim),
        "diffusion_model.siglip_refiner.0.attention.qkv.lora_B.weight": torch.zeros(3 * CFG.dim, 2),
    }
    with pytest.raises(LoraError, match="siglip_refiner.0.attention.qkv.lora_A.weight"):
        parse_lora(sd, model)
    lora = parse_lora(sd, ZImageDiT(DiTConfig.tiny(omni=True)))
    assert list(lora) == ["siglip_refiner.0.attention.qkv"]
    # without a model the names resolve against the released layout; applying checks the real one
    lora = parse_lora(sd)
    with pytest.raises(LoraError, match="lacks"):
        apply_loras(model, [lora])


def test_not_a_lora_is_refused(model, tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(LoraError, match="not a LoRA.*Z-Image diffusion model"):
        load_lora(path, model)
    with pytest.raises(LoraError, match="not a LoRA.*VAE"):
        parse_lora({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, model)
    with pytest.raises(LoraError, match="DoRA"):
        parse_lora({"diffusion_model.x_embedder.dora_scale": torch.zeros(1)}, model)
    with pytest.raises(ZImageError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors", model)


def test_shape_mismatch_names_key_and_shapes(model):
    sd = {
        "lora_unet_layers_0_feed_forward_w2.lora_down.weight": torch.zeros(4, 3840),
        "lora_unet_layers_0_feed_forward_w2.lora_up.weight": torch.zeros(3840, 4),
    }
    with pytest.raises(LoraError, match=r"lora_unet_layers_0_feed_forward_w2.*\(3840, 3840\).*\(64, 170\)"):
        parse_lora(sd, model)
    lora = parse_lora(sd)  # no model: checked when applied, nothing changed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match="another model size"):
        apply_loras(model, [lora])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Applying
# ---------------------------------------------------------------------------------------------
def test_strength_zero_is_identity(model):
    lora = parse_lora(WRITERS["kohya"](make_spec(model, seed=8))[0], model)
    x, t, caps = inputs()
    want = run(model, x, t, caps)
    for mode in ("merge", "runtime"):
        with apply_loras(model, [(lora, 0.0)], mode=mode):
            assert torch.equal(run(model, x, t, caps), want)


def test_merge_remove_is_bit_exact_and_reapply(model):
    low = copy.deepcopy(model).to(torch.bfloat16)
    original = {k: v.clone() for k, v in low.state_dict().items()}
    lora = parse_lora(WRITERS["ai-toolkit"](make_spec(low, seed=9))[0], low)
    h = apply_loras(low, [(lora, 0.9)])
    assert not torch.equal(low.layers[0].attention.qkv.weight, original["layers.0.attention.qkv.weight"])
    h.remove()
    h.remove()  # idempotent
    assert all(torch.equal(v, original[k]) for k, v in low.state_dict().items())
    with apply_loras(low, [(lora, 0.3)]):
        once = {k: v.clone() for k, v in low.state_dict().items()}
    h = apply_loras(low, [(lora, 0.9)])
    h.remove()
    with apply_loras(low, [(lora, 0.3)]):
        assert all(torch.equal(v, once[k]) for k, v in low.state_dict().items())


def test_merge_without_keeping_originals_gives_the_same_weights_and_refuses_removal(model):
    lora = parse_lora(WRITERS["ai-toolkit"](make_spec(model, seed=9))[0], model)
    kept, lean = copy.deepcopy(model), copy.deepcopy(model)
    with apply_loras(kept, [(lora, 0.7)]) as h:
        assert len(h._weights) > 0
        want = {k: v.clone() for k, v in kept.state_dict().items()}
    h = apply_loras(lean, [(lora, 0.7)], keep_original=False)
    assert h._weights == [] and h.lossy  # no copy of any merged weight is held
    assert all(torch.equal(v, want[k]) for k, v in lean.state_dict().items())
    with pytest.raises(LoraError, match="load the model again"):
        h.remove()


def test_stacked_loras_sum_and_runtime_equals_merge(model):
    spec_a, spec_b = make_spec(model, seed=10), make_spec(model, rank=2, seed=11, where=lambda d: "layers" in d)
    a = parse_lora(WRITERS["kohya"](spec_a)[0], model)
    b = parse_lora(WRITERS["diffusers"](spec_b)[0], model)
    want = expected_weights(model, [(spec_a, 0.5), (spec_b, -1.2)])
    x, t, caps = inputs(3)
    with apply_loras(model, [(a, 0.5), (b, -1.2)]):
        assert_weights(model, want)
        merged = run(model, x, t, caps)
    # two handles stacked give the same, and must be removed in reverse order
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ha = apply_loras(model, [(a, 0.5)])
    hb = apply_loras(model, [(b, -1.2)])
    assert_weights(model, want)
    with pytest.raises(LoraError, match="reverse order"):
        ha.remove()
    hb.remove()
    ha.remove()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    # runtime: side paths only, base weights untouched, original modules restored on remove
    qkv = model.layers[0].attention.qkv
    with apply_loras(model, [(a, 0.5), (b, -1.2)], mode="runtime"):
        assert isinstance(model.layers[0].attention.qkv, LoraLinear)
        assert torch.equal(model.layers[0].attention.qkv.weight, original["layers.0.attention.qkv.weight"])
        assert rel_err(run(model, x, t, caps), merged) <= 1e-5
        with apply_loras(model, [(a, 0.25)], mode="runtime"):  # stacking runtime on runtime
            stacked = run(model, x, t, caps)
    assert model.layers[0].attention.qkv is qkv
    with apply_loras(model, [(a, 0.75), (b, -1.2)]):
        assert rel_err(stacked, run(model, x, t, caps)) <= 1e-5


def test_runtime_with_bf16_base(model):
    """Runtime side paths follow the activations' dtype and device (as with a quantized base)."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    lora = parse_lora(WRITERS["kohya"](make_spec(model, seed=12, std=0.2))[0], low)
    x, t, caps = inputs(4)
    ref = copy.deepcopy(model)
    with apply_loras(ref, [(lora, 1.0)]):
        want = run(ref, x, t, caps)
    with apply_loras(low, [(lora, 1.0)], mode="runtime"):
        assert rel_err(run(low, x, t, caps).float(), want) < 0.05


# ---------------------------------------------------------------------------------------------
# CLI argument
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arg,want",
    [
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("style.safetensors:0.8", ("style.safetensors", 0.8)),
        ("dir/style.safetensors:-1.5", ("dir/style.safetensors", -1.5)),
        ("style.safetensors:1e-1", ("style.safetensors", 0.1)),
        (r"C:\loras\style.safetensors", (r"C:\loras\style.safetensors", 1.0)),
        (r"C:\loras\style.safetensors:0.5", (r"C:\loras\style.safetensors", 0.5)),
        ("C:/loras/style.safetensors:2", ("C:/loras/style.safetensors", 2.0)),
        ("odd:name.safetensors", ("odd:name.safetensors", 1.0)),
    ],
)
def test_parse_lora_arg(arg, want):
    assert parse_lora_arg(arg) == want


@pytest.mark.parametrize("arg", ["style.safetensors:", "style.safetensors:1.2.3", "style.safetensors:inf"])
def test_parse_lora_arg_rejects_bad_strength(arg):
    with pytest.raises(LoraError):
        parse_lora_arg(arg)


def test_spec_covers_every_linear(model):
    names = diffusers_linears(model)
    assert "all_x_embedder.2-1" in names and "layers.1.attention.to_v" in names
    assert len(make_spec(model)) == len(names)
