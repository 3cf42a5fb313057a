"""The node classes, tested where ComfyUI is absent (ComfyUI's modules are faked where a test needs them)."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from zimage_pack import nodes
from zimage_pack.nodes import conditioning, handles, host, loaders, paths, sampler
from zimage_pack.zimage_core.errors import ZImageError

from tests.factories import TOKENIZER_FIXTURE
from tests.factories import comfy as C
from tests.factories.pipeline import build_tiny_model
from zimage_core.pipeline import GenerateOptions, ZImagePipeline
from zimage_core.sampling import initial_noise, latent_shape
from zimage_core.vae import to_raw_space

ROOT = Path(__file__).resolve().parents[1]

# Node ids and widget order are public API: saved workflows store widget values by position.
PUBLIC_API = {
    "ZImageModelLoader": ["model_name", "weight_dtype", "attention", "memory_mode", "quant", "swap_blocks", "compile"],
    "ZImageTextEncoderLoader": ["text_encoder_name", "weight_dtype", "quant"],
    "ZImageTextEncode": ["text_encoder", "text", "max_length"],
    "ZImageTurboSampler": [
        "model",
        "positive",
        "latent_image",
        "seed",
        "steps",
        "cfg",
        "shift",
        "sampler_name",
        "denoise",
        "negative",
        "seed_variance",
    ],
    "ZImageLoraLoader": ["model", "lora_name", "strength"],
    "ZImageVisionLoader": ["vision_name", "weight_dtype"],
    "ZImageEditConditioning": [
        "text_encoder",
        "vae",
        "image1",
        "text",
        "negative_text",
        "max_length",
        "vision",
        "image2",
        "image3",
    ],
    "ZImagePromptEnhancer": [
        "prompt",
        "seed",
        "max_new_tokens",
        "temperature",
        "top_p",
        "text_encoder",
        "llm",
        "system_prompt",
    ],
    "ZImageToCoreModel": ["model"],
    "ZImageControlNetLoader": ["controlnet_name", "quant"],
    "ZImageControlNetApply": [
        "model",
        "controlnet",
        "vae",
        "image",
        "strength",
        "start_percent",
        "end_percent",
        "inpaint_image",
        "mask",
    ],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodes")
    model = build_tiny_model(tmp, seed=31)
    C.install_models(model, tmp / "models", dit_names=("z_image_turbo_bf16.safetensors",))
    model.models = tmp / "models"
    return model


@pytest.fixture()
def env(tiny, monkeypatch):
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", str(tiny.models))
    return tiny


@pytest.fixture(scope="module")
def loaded(tiny):
    mp = pytest.MonkeyPatch()
    mp.setenv("ZIMAGE_MODELS_DIR", str(tiny.models))
    try:
        model = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors")[0]
        te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0]
    finally:
        mp.undo()
    return model, te


def encode(te, text, max_length=512):
    return conditioning.ZImageTextEncode().encode(te, text, max_length)[0]


def empty_latent(w=64, h=48, b=1):
    return C.EmptySD3LatentImage().generate(w, h, b)[0]


def run(model, cond, latent=None, seed=7, steps=3, **kw):
    args = dict(seed=seed, steps=steps, cfg=1.0, shift=3.0, sampler_name="euler", denoise=1.0)
    args.update(kw)
    return sampler.ZImageTurboSampler().sample(model, cond, latent or empty_latent(), **args)[0]


# ---------------------------------------------------------------------------------------------- contract
def test_node_ids_and_widget_order_are_stable():
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(PUBLIC_API) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, names in PUBLIC_API.items():
        it = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        assert list(it["required"]) + list(it.get("optional", {})) == names, node_id


@pytest.mark.parametrize("node_id", sorted(PUBLIC_API))
def test_node_contract(node_id):
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("ZImage") and cls.CATEGORY.startswith("Z-Image/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert isinstance(cls.RETURN_TYPES, tuple) and callable(getattr(cls, cls.FUNCTION))
    assert not hasattr(cls, "IS_CHANGED") and not hasattr(cls, "VALIDATE_INPUTS")
    it = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in it.get(section, {}).items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES)


def test_root_package_imports_without_comfyui():
    for name in ("folder_paths", "comfy", "comfy.utils", "server", "latent_preview"):
        assert name not in sys.modules
    spec = importlib.util.spec_from_file_location(
        "zimage_pack_under_test", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        assert set(mod.NODE_CLASS_MAPPINGS) == set(PUBLIC_API)
        # Loaded as a package (as ComfyUI does), the nodes use the engine that ships beside them.
        assert "zimage_pack_under_test.zimage_core.errors" in sys.modules
    finally:
        for k in [k for k in sys.modules if k.startswith("zimage_pack_under_test")]:
            del sys.modules[k]
    assert "folder_paths" not in sys.modules and "comfy" not in sys.modules


# ---------------------------------------------------------------------------------------------- loaders
def test_model_lists_show_files_and_diffusers_folders(env, tmp_path):
    import shutil

    shutil.copytree(env.root, env.models / "diffusion_models" / "Z-Image-Tiny", dirs_exist_ok=True)
    try:
        names = paths.list_models("diffusion_models")
        assert "Z-Image-Tiny" in names and "z_image_turbo_bf16.safetensors" in names
        assert not any(n.startswith("Z-Image-Tiny/") for n in names)  # shards are hidden inside their folder
        assert paths.list_models("text_encoders") == ["qwen_3_4b.safetensors"]
        folder = loaders.ZImageModelLoader().load("Z-Image-Tiny")[0]
        single = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors")[0]
        a, b = folder.slot.dit.state_dict(), single.slot.dit.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        shutil.copytree(env.root, env.models / "text_encoders" / "Z-Image-Tiny", dirs_exist_ok=True)
        assert paths.list_models("text_encoders") == ["Z-Image-Tiny", "qwen_3_4b.safetensors"]
        te_folder = loaders.ZImageTextEncoderLoader().load("Z-Image-Tiny")[0]  # tokenizer/ found in the root
        te_file = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0]
        assert torch.equal(te_folder.encoder.encode(["a cat"])[0], te_file.encoder.encode(["a cat"])[0])
    finally:
        shutil.rmtree(env.models / "diffusion_models" / "Z-Image-Tiny")
        shutil.rmtree(env.models / "text_encoders" / "Z-Image-Tiny", ignore_errors=True)


def test_loader_errors_say_where_to_put_files(env):
    with pytest.raises(ZImageError, match=r"models/diffusion_models.*refresh"):
        loaders.ZImageModelLoader().load("missing.safetensors")
    with pytest.raises(ZImageError, match="not found"):
        loaders.ZImageModelLoader().load("../vae/ae.safetensors")  # no escaping the model folder
    import shutil

    shutil.copy(env.models / "vae" / "ae.safetensors", env.models / "diffusion_models" / "wrong.safetensors")
    try:
        with pytest.raises(ZImageError, match="holds a VAE"):
            loaders.ZImageModelLoader().load("wrong.safetensors")
    finally:
        (env.models / "diffusion_models" / "wrong.safetensors").unlink()
    with pytest.raises(ZImageError, match="memory_mode 'lowvram' is not available"):
        loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", memory_mode="lowvram")
    with pytest.raises(ZImageError, match="not found"):
        loaders.ZImageTextEncoderLoader().load("nope.safetensors")


def test_dtypes_and_fp16(env, loaded):
    model = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", weight_dtype="auto")[0]
    assert model.dtype == torch.float32 and model.slot.dit.dtype == torch.float32  # auto on a CPU
    assert loaders.pick_dtype("auto", torch.device("cpu")) == torch.float32
    fp16 = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", weight_dtype="fp16")[0]
    assert fp16.slot.dit.dtype == torch.float16  # fp16 is offered for every checkpoint (overflow is kept in range)
    cond = encode(loaded[1], "a lighthouse")
    half = run(fp16, cond, seed=3, steps=2)["samples"]
    full = run(model, cond, seed=3, steps=2)["samples"]
    assert torch.isfinite(half).all()
    assert torch.nn.functional.cosine_similarity(half.flatten(), full.flatten(), dim=0) > 0.99


def test_text_encoder_finds_comfyui_tokenizer(env, tmp_path, monkeypatch):
    import shutil

    lone = tmp_path / "text_encoders"
    lone.mkdir()
    shutil.copy(env.models / "text_encoders" / "qwen_3_4b.safetensors", lone / "qwen_3_4b.safetensors")
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", str(tmp_path))
    with pytest.raises(ZImageError, match="no Qwen tokenizer found"):
        loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")
    # Inside ComfyUI: its bundled comfy/text_encoders/qwen25_tokenizer is the last resort.
    comfy_root = tmp_path / "ComfyUI" / "comfy"
    shutil.copytree(TOKENIZER_FIXTURE, comfy_root / "text_encoders" / "qwen25_tokenizer")
    utils = types.ModuleType("comfy.utils")
    utils.__file__ = str(comfy_root / "utils.py")
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    handle = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0]
    assert host.comfy_tokenizer_dir() == (comfy_root / "text_encoders" / "qwen25_tokenizer").resolve()
    assert handle.hidden_size == 32


def test_folder_paths_used_inside_comfyui(env, monkeypatch):
    fp = types.ModuleType("folder_paths")
    fp.get_folder_paths = lambda kind: [str(env.models / kind)]
    fp.get_filename_list = lambda kind: sorted(p.name for p in (env.models / kind).glob("*.safetensors"))
    fp.get_full_path = lambda kind, name: str(env.models / kind / name) if (env.models / kind / name).exists() else None
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", "/nonexistent")
    assert loaders.ZImageModelLoader.INPUT_TYPES()["required"]["model_name"][0] == ["z_image_turbo_bf16.safetensors"]
    assert paths.resolve("vae", "ae.safetensors") == env.models / "vae" / "ae.safetensors"


# ---------------------------------------------------------------------------------------------- text encode
def test_text_encode_gives_native_conditioning(loaded, env):
    _, te = loaded
    cond = conditioning.ZImageTextEncode().encode(te, "a cat on a sofa")[0]
    assert isinstance(cond, list) and len(cond) == 1
    tensor, opts = cond[0]
    assert tensor.dtype == torch.float32 and tensor.ndim == 3 and tensor.shape[0] == 1 and tensor.shape[2] == 32
    assert opts["pooled_output"] is None
    assert opts["attention_mask"].dtype == torch.long and torch.equal(
        opts["attention_mask"], torch.ones(1, tensor.shape[1], dtype=torch.long)
    )
    ref = te.encoder.encode(["a cat on a sofa"])[0]
    assert torch.equal(tensor[0], ref.float())


def test_text_encode_reports_truncation(loaded, caplog, monkeypatch):
    _, te = loaded
    shown = []
    monkeypatch.setattr(host, "send_text", lambda node_id, text: shown.append((node_id, text)))
    with caplog.at_level(logging.WARNING):
        cond = conditioning.ZImageTextEncode().encode(te, " ".join(f"w{i}" for i in range(60)), 20, unique_id="4")[0]
    assert cond[0][0].shape[1] == 20
    assert any("Prompt cut" in r.getMessage() for r in caplog.records)
    assert shown and shown[-1][0] == "4" and "dropped" in shown[-1][1]
    unlimited = conditioning.ZImageTextEncode().encode(te, " ".join(f"w{i}" for i in range(60)), 0)[0]
    assert unlimited[0][0].shape[1] > 20
    with pytest.raises(ZImageError, match="not a Z-Image text encoder"):
        conditioning.ZImageTextEncode().encode("clip", "x")


# ---------------------------------------------------------------------------------------------- sampler
def test_noise_is_native_comfyui_noise():
    lat = torch.zeros(2, 16, 6, 8)
    assert torch.equal(sampler.prepare_noise(lat, 123), torch.randn(lat.size(), generator=torch.manual_seed(123)))
    assert torch.equal(sampler.prepare_noise(lat, 5), initial_noise(latent_shape(2, 48, 64), 5))
    full = sampler.prepare_noise(torch.zeros(4, 16, 6, 8), 9)
    assert torch.equal(sampler.prepare_noise(lat, 9, batch_index=[3, 1]), full[[3, 1]])


def test_sampler_matches_engine_pipeline(loaded):
    model, te = loaded
    cond = encode(te, "a lighthouse")
    out = run(model, cond, seed=11, steps=4)
    assert set(out) == {"samples"} and out["samples"].shape == (1, 16, 6, 8) and out["samples"].dtype == torch.float32
    pipe = ZImagePipeline(model.slot.dit, te.encoder, None, "cpu")
    opts = GenerateOptions(prompt="a lighthouse", width=64, height=48, steps=4, seed=11)
    ref = pipe.sample(pipe.encode_prompts(["a lighthouse"]), None, initial_noise(latent_shape(1, 48, 64), 11), opts)
    assert torch.equal(out["samples"], to_raw_space(ref))  # raw Flux-VAE space out
    assert torch.equal(run(model, cond, seed=11, steps=4)["samples"], out["samples"])
    assert not torch.equal(run(model, cond, seed=12, steps=4)["samples"], out["samples"])
    varied = run(model, cond, seed=11, steps=4, seed_variance=0.3)["samples"]
    assert not torch.equal(varied, out["samples"])


@pytest.mark.parametrize("name", ["res_multistep", "heun", "dpmpp_2m"])
def test_other_samplers(loaded, name):
    model, te = loaded
    out = run(model, encode(te, "x"), steps=3, sampler_name=name)
    assert torch.isfinite(out["samples"]).all()


def test_batch_cfg_and_padded_native_conditioning(loaded):
    model, te = loaded
    pos, neg = encode(te, "a red apple"), encode(te, "blurry")
    out = run(model, pos, empty_latent(b=2), steps=2, cfg=4.0, negative=neg)
    assert out["samples"].shape[0] == 2 and not torch.equal(out["samples"][0], out["samples"][1])
    # Native conditioning may carry padding marked in attention_mask: padded tokens are dropped.
    t, opts = pos[0]
    padded = [
        [
            torch.cat([t, torch.randn(1, 5, t.shape[2])], 1),
            {
                "pooled_output": None,
                "attention_mask": torch.cat([opts["attention_mask"], torch.zeros(1, 5, dtype=torch.long)], 1),
            },
        ]
    ]
    assert torch.equal(run(model, padded)["samples"], run(model, pos)["samples"])


def test_core_conditioning_node_results_are_accepted(loaded):
    model, te = loaded
    pos = encode(te, "a red apple")
    t, opts = pos[0]
    zero_out = [[torch.zeros_like(t), {**opts, "pooled_output": None}]]  # core ConditioningZeroOut
    concat = [[torch.cat([t, encode(te, "on a table")[0][0]], 1), opts.copy()]]  # core ConditioningConcat
    out = run(model, concat, steps=2, cfg=3.0, negative=zero_out)
    assert torch.isfinite(out["samples"]).all()
    assert not torch.equal(out["samples"], run(model, pos, steps=2, cfg=3.0, negative=zero_out)["samples"])


def test_img2img_and_inpainting(loaded):
    model, te = loaded
    cond = encode(te, "a bowl")
    src = {"samples": torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(0))}
    assert torch.equal(run(model, cond, src, denoise=0.0)["samples"], src["samples"])
    part = run(model, cond, src, denoise=0.5)["samples"]
    assert not torch.allclose(part, run(model, cond, src)["samples"])
    mask = torch.zeros(1, 48, 64)
    mask[:, :, 32:] = 1.0  # repaint the right half
    inp = run(model, cond, C.SetLatentNoiseMask().set_mask(src, mask)[0])
    assert "noise_mask" in inp
    assert torch.allclose(inp["samples"][..., :3], src["samples"][..., :3], atol=1e-5)
    assert not torch.allclose(inp["samples"][..., 5:], src["samples"][..., 5:], atol=1e-2)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(latent_image={"samples": torch.zeros(1, 4, 6, 8)}), "EmptySD3LatentImage"),
        (dict(latent_image={"samples": torch.zeros(1, 16, 5, 8)}), "multiples of 16"),
        (dict(latent_image="x"), "not a LATENT"),
        (dict(cfg=3.0), "nothing is connected to negative"),
        (dict(sampler_name="ddim"), "unknown"),
        (dict(positive=[[torch.zeros(1, 7, 768), {}]]), "expects .1, tokens, 32.*another text encoder"),
        (dict(positive=[[torch.zeros(1, 7, 32), {}], [torch.zeros(1, 7, 32), {}]]), "has 2 entries"),
        (dict(model="MODEL"), "not a Z-Image model"),
    ],
)
def test_sampler_errors_are_readable(loaded, bad, match):
    model, te = loaded
    args = dict(
        model=model,
        positive=encode(te, "x"),
        latent_image=empty_latent(),
        seed=1,
        steps=2,
        cfg=1.0,
        shift=3.0,
        sampler_name="euler",
        denoise=1.0,
    )
    args.update(bad)
    with pytest.raises(ZImageError, match=match):
        sampler.ZImageTurboSampler().sample(**args)


# ---------------------------------------------------------------------------------------------- ComfyUI hooks
@pytest.fixture()
def fake_comfy(monkeypatch):
    """Minimal stand-ins for comfy.model_management / comfy.utils / latent_preview / comfy.latent_formats."""
    state = types.SimpleNamespace(interrupt_at=None, updates=[], previews=[], loads=[], registered=[])

    class Interrupted(Exception):
        pass

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = Interrupted

    def throw():
        if state.interrupt_at is not None and len(state.updates) >= state.interrupt_at:
            raise Interrupted()

    mm.throw_exception_if_processing_interrupted = throw
    mm.load_models_gpu = lambda models, force_full_load=False, **k: state.loads.append((models, force_full_load))
    mm.get_torch_device = lambda: torch.device("cpu")
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state.updates.append((value, total))
            throw()

    utils.ProgressBar = ProgressBar
    lp = types.ModuleType("latent_preview")

    def prepare_callback(model, steps):
        bar = ProgressBar(steps)

        def cb(step, x0, x, total):
            state.previews.append((model.model.latent_format, tuple(x0.shape)))
            bar.update_absolute(step + 1, total)

        return cb

    lp.prepare_callback = prepare_callback
    lf = types.ModuleType("comfy.latent_formats")
    lf.Flux = type("Flux", (), {})
    mpatch = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model = model
            state.registered.append(self)

    mpatch.ModelPatcher = ModelPatcher
    for name, mod in (
        ("comfy.model_management", mm),
        ("comfy.utils", utils),
        ("latent_preview", lp),
        ("comfy.latent_formats", lf),
        ("comfy.model_patcher", mpatch),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    state.Interrupted = Interrupted
    return state


def test_progress_previews_and_cancel(loaded, fake_comfy, monkeypatch):
    model, te = loaded
    cond = encode(te, "a fox")
    run(model, cond, steps=4)
    assert [u[0] for u in fake_comfy.updates] == [1, 2, 3, 4]
    assert len(fake_comfy.previews) == 4 and fake_comfy.previews[0][1] == (1, 16, 6, 8)
    calls = []
    real = model.slot.dit.denoise
    monkeypatch.setattr(model.slot.dit, "denoise", lambda *a: calls.append(1) or real(*a))
    fake_comfy.updates.clear()
    fake_comfy.interrupt_at = 1  # Cancel pressed during step 1
    with pytest.raises(fake_comfy.Interrupted):
        run(model, cond, steps=8)
    assert len(calls) == 1  # stopped within one step


def test_models_register_with_comfyui_memory_management(env, fake_comfy):
    model = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors")[0]
    te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0]
    assert model.slot.patcher is not None and te.patcher is not None
    assert model.slot.patcher.model.inner is model.slot.dit and isinstance(model.slot.patcher.model, host.ManagedModule)
    cond = conditioning.ZImageTextEncode().encode(te, "x")[0]
    run(model, cond, steps=1)
    assert [m[0][0] for m in fake_comfy.loads] == [te.patcher, model.slot.patcher]
    again = conditioning.ZImageTextEncode().encode(te, "x")[0]
    assert torch.equal(again[0][0], cond[0][0]) and len(fake_comfy.loads) == 2  # cached: the encoder stays put
    assert all(force for _, force in fake_comfy.loads)


# ---------------------------------------------------------------------------------------------- LoRA
def write_diff_lora(path: Path, deltas: dict[str, torch.Tensor]) -> None:
    """A ComfyUI weight-diff LoRA: ``W += strength * diff`` for each parameter name in ``deltas``."""
    from zimage_core.weights import save_safetensors

    save_safetensors({"diffusion_model." + k.removesuffix(".weight") + ".diff": v for k, v in deltas.items()}, path)


def test_lora_stack_shares_and_restores_weights(loaded, env):
    model, te = loaded
    key = "layers.0.attention.qkv.weight"
    shape = model.slot.dit.get_parameter(key).shape
    w1 = "layers.1.feed_forward.w1.weight"
    files = {
        "a.safetensors": {key: torch.full(shape, 0.01)},
        "b.safetensors": {w1: torch.full(model.slot.dit.get_parameter(w1).shape, 0.02)},
        "bad.safetensors": {"not.a.key.weight": torch.zeros(1)},
    }
    for name, deltas in files.items():
        write_diff_lora(env.models / "loras" / name, deltas)
    base_w = model.slot.dit.get_parameter(key).detach().clone()
    cond = encode(te, "x")
    base = run(model, cond)["samples"]
    one = loaders.ZImageLoraLoader().load(model, "a.safetensors", 1.0)[0]
    two = loaders.ZImageLoraLoader().load(one, "b.safetensors", 0.5)[0]
    assert one.slot is model.slot and two.slot is model.slot and model.loras == () and len(two.loras) == 2
    assert loaders.ZImageLoraLoader().load(model, "a.safetensors", 0.0)[0] is model
    with_two = run(two, cond)["samples"]
    assert torch.allclose(model.slot.dit.get_parameter(key), base_w + 0.01)
    assert not torch.equal(with_two, base)
    assert torch.equal(run(model, cond)["samples"], base)  # the base view gets its weights back
    assert torch.equal(model.slot.dit.get_parameter(key), base_w)
    assert torch.equal(run(two, cond)["samples"], with_two)
    with pytest.raises(ZImageError, match="not.a.key"):
        loaders.ZImageLoraLoader().load(model, "bad.safetensors", 1.0)
    model.slot.unpatch()


def test_real_lora_files(loaded, env):
    from zimage_core.weights import save_safetensors

    model, te = loaded
    dit = model.slot.dit
    save_safetensors(
        C.peft_lora(dit, ["layers.0.attention.to_q", "layers.1.feed_forward.w1"]),
        env.models / "loras" / "real.safetensors",
    )
    bad = C.peft_lora(dit, ["layers.0.feed_forward.w1"])
    bad["transformer.nonexistent_block.lora_A.weight"] = torch.zeros(2, 4)
    bad["transformer.nonexistent_block.lora_B.weight"] = torch.zeros(4, 2)
    save_safetensors(bad, env.models / "loras" / "bad.safetensors")
    cond = encode(te, "x")
    base = run(model, cond)["samples"]
    styled = run(loaders.ZImageLoraLoader().load(model, "real.safetensors", 1.0)[0], cond)["samples"]
    assert not torch.equal(styled, base)
    assert torch.equal(run(model, cond)["samples"], base)
    with pytest.raises(ZImageError, match="nonexistent"):
        loaders.ZImageLoraLoader().load(model, "bad.safetensors", 1.0)


def test_handles_repr(loaded):
    model, te = loaded
    assert "z_image_turbo_bf16" in repr(model) and "qwen_3_4b" in repr(te)
    assert isinstance(model, handles.ZImageModel)


# ---------------------------------------------------------------------------------------------- memory modes
@pytest.mark.parametrize(
    "mode,kw,streamed",
    [
        ("block-swap", {"swap_blocks": 2}, 2),
        ("sequential", {}, 4),
        ("auto", {}, 0),
        ("text-encoder-offload", {}, 0),
    ],
)
def test_loader_memory_modes_sample_the_same_latents(loaded, env, mode, kw, streamed):
    model, te = loaded
    cond = encode(te, "a lighthouse")
    want = run(model, cond, seed=3, steps=2)["samples"]
    other = loaders.ZImageModelLoader().load(
        "z_image_turbo_bf16.safetensors", memory_mode=mode, attention="auto", **kw
    )[0]
    assert other.memory_mode.kind == mode and other.attention == "sdpa"  # auto on a CPU
    streamer = other.slot.streamer
    assert (streamer is None) == (streamed == 0)
    assert torch.equal(run(other, cond, seed=3, steps=2)["samples"], want)
    if streamer is not None:
        assert len(streamer.blocks) == streamed and streamer.stats.hits > 0
        assert streamer.staged_count == 0 and streamer.at_home()  # the run left nothing staged


def test_block_swap_registers_only_the_resident_part_with_comfyui(env, fake_comfy, monkeypatch):
    mm = sys.modules["comfy.model_management"]
    asked = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, **k: asked.append(k), raising=False)
    model = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", memory_mode="block-swap", swap_blocks=3)[
        0
    ]
    slot = model.slot
    holder = slot.patcher.model
    streamed = {id(p) for b in slot.streamer.blocks for p in b.parameters()}
    shown = {id(p) for p in holder.parameters()}
    assert shown and shown.isdisjoint(streamed)  # ComfyUI counts and moves only the resident weights
    assert shown | streamed == {id(p) for p in slot.dit.parameters()}
    assert holder.inner is slot.dit and holder.get_dtype() == torch.float32
    te = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0]
    run(model, conditioning.ZImageTextEncode().encode(te, "x")[0], steps=1)
    need = [k.get("memory_required", 0) for k in asked]
    assert need[-1] >= slot.streamer.staging_bytes() > 0  # room for the two staged blocks is asked for
    slot.streamer.enter(0)  # a block staged, as mid-run; then ComfyUI's "Unload models" moves the holder
    assert slot.streamer.staged_count > 0
    holder.to("cpu")
    assert slot.streamer.staged_count == 0 and slot.streamer.at_home()
    full = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors")[0]
    assert full.slot.streamer is None and full.slot.patcher.model.inner is full.slot.dit


def test_loader_quant_and_swap_options_are_checked(env, monkeypatch):
    with pytest.raises(ZImageError, match="quant 'int4' is not one of"):
        loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", quant="int4")
    with pytest.raises(ZImageError, match="swap_blocks"):
        loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", memory_mode="block-swap", swap_blocks=0)
    got = loaders.ZImageModelLoader().load("z_image_turbo_bf16.safetensors", quant="none")[0]
    assert got.slot.dit.dtype == torch.float32


def test_gguf_models_are_listed_and_load_like_the_safetensors_file(loaded, env):
    """A city96-style GGUF DiT in models/diffusion_models shows in the drop-down and samples like its source."""
    pytest.importorskip("gguf")
    from zimage_pack.zimage_core.quant import QuantLinear  # the class the nodes (the pack's engine) build

    from zimage_core.checkpoints import load_dit
    from zimage_core.quant.gguf_write import save_gguf

    model, te = loaded
    src = env.models / "diffusion_models" / "z_image_turbo_bf16.safetensors"
    save_gguf(load_dit(src, dtype="fp32").state_dict(), env.models / "diffusion_models" / "z_image-F32.gguf", "F32")
    save_gguf(load_dit(src, dtype="fp32").state_dict(), env.models / "diffusion_models" / "z_image-Q8_0.gguf", "Q8_0")
    try:
        assert {"z_image-F32.gguf", "z_image-Q8_0.gguf"} <= set(
            loaders.ZImageModelLoader.INPUT_TYPES()["required"]["model_name"][0]
        )
        cond = encode(te, "a lighthouse")
        want = run(model, cond, seed=3, steps=2)["samples"]
        exact = loaders.ZImageModelLoader().load("z_image-F32.gguf", memory_mode="auto")[0]
        assert torch.equal(run(exact, cond, seed=3, steps=2)["samples"], want)  # F32 GGUF: the same weights
        q8 = loaders.ZImageModelLoader().load("z_image-Q8_0.gguf", memory_mode="block-swap", swap_blocks=1)[0]
        assert any(isinstance(m, QuantLinear) for m in q8.slot.dit.modules())
        got = run(q8, cond, seed=3, steps=2)["samples"]
        assert torch.isfinite(got).all() and not torch.equal(got, want)
    finally:
        for name in ("z_image-F32.gguf", "z_image-Q8_0.gguf"):
            (env.models / "diffusion_models" / name).unlink()
