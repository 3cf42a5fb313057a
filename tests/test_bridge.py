"""The core MODEL bridge (nodes/bridge.py, nodes/core_model.py) where ComfyUI is absent: the converter's contract and
its message outside ComfyUI, what the bridged diffusion_model shows ComfyUI (names, streamed blocks left out), its
forward (the image is our sampler's), and the LoRA -> ComfyUI patch conversion. Inside a real ComfyUI the same
bridge is run by tests/comfyui/test_bridge.py."""

from __future__ import annotations

import functools

import pytest
import torch
from zimage_pack.nodes import bridge, core_model, loaders, sampler
from zimage_pack.zimage_core.errors import ZImageError
from zimage_pack.zimage_core.lora import parse_lora

from tests.factories import comfy as C
from tests.factories.dit import randomize_
from zimage_core.checkpoints import save_dit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.schedules import flow_sigmas

NAME = "z_image_turbo_bf16.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge") / "models"
    (root / "diffusion_models").mkdir(parents=True)
    cfg = DiTConfig.tiny(t_mid_dim=1024)
    save_dit(randomize_(ZImageDiT(cfg), 21).state_dict(), cfg, root / "diffusion_models" / NAME, "comfyui")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZIMAGE_MODELS_DIR", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def full(models):
    return loaders.ZImageModelLoader().load(NAME)[0]


@pytest.fixture(scope="module")
def swapped(models):
    return loaders.ZImageModelLoader().load(NAME, memory_mode="block-swap", swap_blocks=2)[0]


def conditioning(n=9, seed=0):
    ctx = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(seed))
    return [[ctx, {"pooled_output": None, "attention_mask": torch.ones(1, n, dtype=torch.long)}]]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding: oneDNN's CPU kernels may sum in another order from call to call (~1e-6 relative)."""
    return bool((a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())))


def our_sample(view, cond, seed=7, steps=4):
    args = dict(seed=seed, steps=steps, cfg=1.0, shift=3.0, sampler_name="euler", denoise=1.0)
    return sampler.ZImageTurboSampler().sample(view, cond, C.EmptySD3LatentImage().generate(64, 48)[0], **args)[0]


def bridged_sample(adapter, cond, seed=7, steps=4):
    """The engine's Euler loop driven through the bridged module's native call (sigma in, velocity out), from
    ComfyUI's noise; a host's Euler on ``denoised = x - sigma * out`` is the same up to rounding (test_native.py)."""
    from zimage_core.sampling import initial_noise, sample
    from zimage_core.vae import to_raw_space

    ctx = cond[0][0]

    def model_fn(x, sigma):
        return adapter(x, sigma, context=ctx, num_tokens=ctx.shape[1], transformer_options={}).float()

    sig = flow_sigmas(steps, 3.0)
    with torch.inference_mode():
        return to_raw_space(sample(model_fn, initial_noise((1, 16, 6, 8), seed), sig, "euler"))


# ---------------------------------------------------------------------------------------------- the node
def test_converter_node_contract():
    cls = core_model.ZImageToCoreModel
    assert cls.RETURN_TYPES == ("MODEL",) and list(cls.INPUT_TYPES()["required"]) == ["model"]


def test_outside_comfyui_the_converter_says_what_it_needs(full):
    assert full.slot.bridge is None  # no comfy.model_base here: the slot registered the plain way (or not at all)
    with pytest.raises(ZImageError, match=r"needs ComfyUI with native Z-Image support \(0\.3\.74 or newer"):
        core_model.ZImageToCoreModel().convert(full)
    with pytest.raises(ZImageError, match="not a Z-Image model"):
        core_model.ZImageToCoreModel().convert("MODEL")


# ---------------------------------------------------------------------------------------------- what ComfyUI sees
def test_bridged_module_has_comfyui_names_and_runs_our_forward(full):
    dit = full.slot.dit
    adapter = bridge.NativeDiT(dit)
    sd, want = adapter.state_dict(), dit.state_dict()
    assert sd.keys() == want.keys() and all(sd[k].data_ptr() == want[k].data_ptr() for k in sd)  # shared, not copied
    assert adapter.dtype == dit.dtype
    cond = conditioning()
    assert same(bridged_sample(adapter, cond), our_sample(full, cond)["samples"])


def test_block_swap_streamed_blocks_stay_out_of_what_comfyui_moves(swapped, full):
    slot = swapped.slot
    blocks = slot.streamer.blocks
    adapter = bridge.NativeDiT(slot.dit, blocks)
    streamed = {id(t) for b in blocks for t in list(b.parameters()) + list(b.buffers())}
    assert {id(p) for p in adapter.parameters()}.isdisjoint(streamed)
    assert {id(p) for p in adapter.parameters()} | streamed >= {id(p) for p in slot.dit.parameters()}
    assert not any(id(m) in {id(b) for b in blocks} for m in adapter.modules())
    # state_dict lists every key (ComfyUI's LoRA key map) and get_attr finds streamed weights by name
    assert adapter.state_dict().keys() == slot.dit.state_dict().keys()
    names = {id(m): n for n, m in slot.dit.named_modules()}
    key = names[id(blocks[0])] + ".attention.qkv.weight"
    assert functools.reduce(getattr, key.split("."), adapter) is slot.dit.get_parameter(key)
    # a full load by ComfyUI (.to on the model) never touches a streamed tensor
    seen = []
    adapter._apply(lambda t: seen.append(id(t)) or t)
    assert seen and streamed.isdisjoint(seen)
    # the image is the one our sampler makes, which is the fully resident model's
    cond = conditioning(seed=3)
    want = our_sample(full, cond)["samples"]
    assert same(our_sample(swapped, cond)["samples"], want)
    assert same(bridged_sample(adapter, cond), want)
    assert slot.streamer.stats.hits > 0  # the blocks really streamed
    slot.residency.finish("dit")  # what the bridged patcher's cleanup does after a core sampler's run
    assert slot.streamer.staged_count == 0 and slot.streamer.at_home()


def test_nextdit_block_patches_are_refused_in_one_message(full):
    adapter = bridge.NativeDiT(full.slot.dit)
    cond = conditioning()[0][0]
    x = torch.zeros(1, 16, 4, 4)
    for opts, what in (
        ({"patches": {"double_block": [object()]}}, "double_block"),
        ({"patches": {"noise_refiner": [object()]}}, "noise_refiner"),
        ({"rope_options": {"scale_x": 2.0}}, "rope_options"),
    ):
        with pytest.raises(ZImageError, match=f"{what}.*cannot run"):
            adapter(x, torch.ones(1), context=cond, transformer_options=opts)
    adapter(x, torch.ones(1), context=cond, transformer_options={"patches": {"attn1_patch": []}})  # unused: fine


# ---------------------------------------------------------------------------------------------- LoRA -> patches
def test_lora_conversion_gives_the_keys_comfyui_maps(full):
    dit = full.slot.dit
    g = torch.Generator().manual_seed(1)
    peft = C.peft_lora(dit, ["layers.0.attention.to_q", "noise_refiner.0.attention.to_v", "layers.1.feed_forward.w1"])
    qkv = dit.get_parameter("layers.0.attention.qkv.weight")
    ada = dit.get_parameter("layers.0.adaLN_modulation.0.bias")
    native = {  # our own (ComfyUI native) layout: a low-rank term and a full diff on one module, norm and bias deltas
        "diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.randn(2, qkv.shape[1], generator=g),
        "diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.randn(qkv.shape[0], 2, generator=g),
        "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(1.0),
        "diffusion_model.layers.0.attention.qkv.diff": torch.randn(qkv.shape, generator=g) * 0.01,
        "diffusion_model.layers.0.attention.q_norm.diff": torch.randn(dit.cfg.head_dim, generator=g) * 0.01,
        "diffusion_model.layers.0.adaLN_modulation.0.diff_b": torch.randn(ada.shape, generator=g) * 0.01,
    }
    # ComfyUI's model_lora_keys_unet: "diffusion_model.<module>" -> "diffusion_model.<module>.weight" for every
    # weight of the model's state dict, which for the bridged model is "diffusion_model." + NativeDiT's.
    model_sd = {bridge.PREFIX + k for k in bridge.NativeDiT(dit).state_dict()}
    key_map = {k[: -len(".weight")] for k in model_sd if k.endswith(".weight")}
    for state in (peft, native):
        lora = parse_lora(state, dit)
        sds = bridge.lora_patch_states(lora)
        targets = set()
        for sd in sds:
            bases = {k.rpartition(".lora_")[0] or k.rpartition(".")[0] for k in sd}
            assert bases <= key_map
            has_low = {k.rpartition(".lora_")[0] for k in sd if ".lora_" in k}
            has_diff = {k[: -len(".diff")] for k in sd if k.endswith(".diff")}
            assert not has_low & has_diff  # one patch per key and state dict in comfy.lora.load_lora
            targets |= bridge.patch_targets(sd)
        assert targets <= model_sd
        assert {t.removeprefix(bridge.PREFIX).rpartition(".")[0] for t in targets} == set(lora.keys())
    assert len(bridge.lora_patch_states(parse_lora(native, dit))) == 2
    assert "diffusion_model.layers.0.adaLN_modulation.0.bias" in bridge.patch_targets(
        bridge.lora_patch_states(parse_lora(native, dit))[0]
    )


def test_unet_config_carries_what_comfyui_reads(full):
    cfg = full.config
    u = bridge._unet_config(cfg)
    assert u["image_model"] == "lumina2" and u["disable_unet_model_creation"] is True
    # comfy.utils.z_image_to_diffusers (the LoRA key map) reads these three
    assert (u["dim"], u["n_layers"], u["n_refiner_layers"]) == (cfg.dim, cfg.n_layers, cfg.n_refiner_layers)


# ---------------------------------------------------------------------------------------------- the rules clones follow
def test_weight_patches_that_would_corrupt_quantized_or_streamed_weights_are_refused(models, swapped):
    q = loaders.ZImageModelLoader().load(NAME, quant="int8")[0]
    rules = bridge.Bridge(q.slot, None, set())
    assert rules.quantized
    rules.check_patchable({"diffusion_model.layers.0.attention.q_norm.weight": ("diff", ())})  # full precision: fine
    with pytest.raises(
        ZImageError, match=r"quantized \(int8\).*layers\.0\.attention\.qkv\.weight.*Z-Image LoRA Loader"
    ):
        rules.check_patchable({("diffusion_model.layers.0.attention.qkv.weight", (0, 0, 64)): ("lora", ())})
    blocks = swapped.slot.streamer.blocks
    streamed = bridge._streamed_keys(swapped.slot.dit, blocks)
    assert streamed and all(k.startswith(bridge.PREFIX) for k in streamed)
    rules = bridge.Bridge(swapped.slot, None, streamed)
    assert not rules.quantized
    rules.check_patchable({k: ("diff", ()) for k in streamed})  # LoRA loaders may patch them (in place, later)
    with pytest.raises(ZImageError, match="scheduled weight hooks.*stream from host memory"):
        rules.check_unstreamed({sorted(streamed)[0]: ("diff", ())})


def test_a_clone_takes_comfyuis_other_patches_off_before_the_engine_changes_its_loras(full):
    from types import SimpleNamespace

    slot = full.slot
    events = []

    class FakeSlot:
        residency = SimpleNamespace(finish=lambda name: events.append("finish"))
        dit = slot.dit
        applied = ("X",)

        def has_loras(self, loras):
            return loras == self.applied

        def apply(self, loras):
            events.append(("engine", loras))
            self.applied = loras

    rules = bridge.Bridge(FakeSlot(), None, set())
    model = SimpleNamespace(current_weight_patches_uuid="other")

    def clone(engine_loras, uuid="mine"):
        return SimpleNamespace(
            engine_loras=engine_loras,
            patches_uuid=uuid,
            model=model,
            unpatch_model=lambda device, unpatch_weights: events.append(("comfy unpatch", device, unpatch_weights)),
        )

    rules.before_load(clone(None))  # the base: the Z-Image sampler sets the engine's LoRAs after loading
    assert events == ["finish"]
    events.clear()
    rules.before_load(clone(()))  # a bridged MODEL: ComfyUI's patches of another clone off, then the engine's
    assert events == ["finish", ("comfy unpatch", None, True), ("engine", ())]
    events.clear()
    model.current_weight_patches_uuid = "mine"
    rules.before_load(clone(("Y",)))  # a quantized view's LoRAs: the engine's, nothing of ComfyUI's to take off
    assert events == ["finish", ("engine", ("Y",))]
    events.clear()
    rules.before_load(clone(("Y",)))  # already in that state: nothing moves
    assert events == ["finish"]


class _Lumina2Before:
    """ComfyUI's Lumina2 before its Omni support: text conditioning only."""

    def extra_conds(self, **kwargs):
        return {"c_crossattn": kwargs.get("cross_attn")}

    def process_latent_in(self, x):
        return (x - 0.1159) * 0.3611  # Flux's latent format


class _Lumina2After(_Lumina2Before):
    def extra_conds(self, **kwargs):
        return {**super().extra_conds(**kwargs), "ref_latents": "native's own"}


def test_omni_conditioning_reaches_the_dit_on_a_comfyui_whose_lumina2_drops_it(monkeypatch):
    class CONDList(list):
        pass

    monkeypatch.setattr(bridge.host, "comfy_module", lambda name: type("m", (), {"CONDList": CONDList}))
    ref = torch.randn(1, 16, 4, 6)
    texts = [torch.randn(1, 3, 32), torch.randn(1, 2, 32)]
    vision = {"last_hidden_state": torch.randn(1, 2 * 3, 8), "image_sizes": [torch.Size((3, 32, 48))]}
    kw = dict(cross_attn=1, reference_latents=[ref], reference_latents_text_embeds=texts, clip_vision_outputs=[vision])
    out = bridge._model_class(_Lumina2Before)().extra_conds(**kw)
    assert isinstance(out["ref_latents"], CONDList) and torch.equal(out["ref_latents"][0], (ref - 0.1159) * 0.3611)
    assert out["ref_contexts"] == texts and out["c_crossattn"] == 1
    (grid,) = out["siglip_feats"]
    assert grid.shape == (1, 2, 3, 8) and torch.equal(grid.reshape(1, 6, 8), vision["last_hidden_state"])
    # a ComfyUI that forwards them keeps its own conversion
    assert bridge._model_class(_Lumina2After)().extra_conds(**kw)["ref_latents"] == "native's own"
    assert bridge._model_class(_Lumina2Before)().extra_conds(cross_attn=1) == {"c_crossattn": 1}
