"""The core MODEL bridge in a real ComfyUI: core samplers, schedulers and LoRA loaders on ``Z-Image Model -> MODEL``
draw what the Z-Image sampler draws; ComfyUI's memory manager counts the bridged DiT at its real size and "Unload
models" unloads it.

Latents are compared, not PNGs: each graph saves them with core SaveLatent and the test reads the files. Within the
server, "up to rounding" is a relative 1e-4 (oneDNN may sum in another order between calls); against the engine run
here (torch 2.13 vs the server's 2.14.1) the same bound holds on these 4-step tiny-model runs.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.comfyui.harness import COMFYUI, H, W, messages, requires_comfyui

pytestmark = requires_comfyui

TURBO = "z_image_turbo_bf16.safetensors"
OMNI = "z_image_omni_base_bf16.safetensors"
TEXT = "a lighthouse on a cliff at dusk"
SEED, STEPS = 7, 4


class Graph:
    """An API prompt built node by node; ``save`` adds a SaveLatent whose file :meth:`latents` reads back."""

    def __init__(self):
        self.prompt: dict = {}
        self.saved: dict[str, str] = {}
        self.tag = uuid.uuid4().hex[:8]  # fresh SaveLatent inputs: never served from ComfyUI's cache

    def __call__(self, class_type: str, **inputs) -> str:
        nid = str(len(self.prompt) + 1)
        self.prompt[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    def save(self, name: str, node: str, slot: int = 0) -> None:
        self.saved[name] = self("SaveLatent", samples=[node, slot], filename_prefix=f"bridge/{self.tag}_{name}")

    def run(self, server) -> dict:
        h = server.run(self.prompt)
        assert h["status"]["status_str"] == "success", [
            (e["node_type"], e["exception_message"], e["traceback"][-3:]) for e in messages(h, "execution_error")
        ]
        return h

    def latents(self, server, h) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        out = {}
        for name, nid in self.saved.items():
            (entry,) = h["outputs"][nid]["latents"]
            path = Path(server.tmp) / "output" / entry["subfolder"] / entry["filename"]
            out[name] = load_file(str(path))["latent_tensor"]
        return out


def loader(g: Graph, name: str = TURBO, **kw) -> str:
    args = dict(
        model_name=name,
        weight_dtype="fp32",
        attention="sdpa",
        memory_mode="full",
        quant="none",
        swap_blocks=16,
        compile=False,
    )
    return g("ZImageModelLoader", **{**args, **kw})


def text_encode(g: Graph, text: str) -> str:
    te = g("ZImageTextEncoderLoader", text_encoder_name="qwen_3_4b.safetensors", weight_dtype="fp32", quant="none")
    return g("ZImageTextEncode", text_encoder=[te, 0], text=text, max_length=512)


def ref(x) -> list:
    """A node id (its output 0) or an explicit ``[node, output]``."""
    return x if isinstance(x, list) else [x, 0]


def our_sampler(g: Graph, model: str, pos, latent, cfg=1.0, negative=None) -> str:
    extra = {"negative": ref(negative)} if negative else {}
    return g(
        "ZImageTurboSampler",
        model=[model, 0],
        positive=ref(pos),
        latent_image=ref(latent),
        seed=SEED,
        steps=STEPS,
        cfg=cfg,
        shift=3.0,
        sampler_name="euler",
        denoise=1.0,
        **extra,
    )


def manual_sigmas(g: Graph, sigmas: torch.Tensor) -> str:
    return g("ManualSigmas", sigmas=", ".join(repr(float(s)) for s in sigmas))


def custom(g: Graph, guider: str, sigmas: str, latent) -> str:
    noise = g("RandomNoise", noise_seed=SEED)
    euler = g("KSamplerSelect", sampler_name="euler")
    return g(
        "SamplerCustomAdvanced",
        noise=[noise, 0],
        guider=[guider, 0],
        sampler=[euler, 0],
        sigmas=[sigmas, 0],
        latent_image=ref(latent),
    )


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> float:
    """``max |a - b|`` after checking it is within ``rel`` of the scale (returned for the report)."""
    assert a.shape == b.shape
    d = float((a.float() - b.float()).abs().max())
    assert d <= rel * max(1.0, float(b.abs().max())), d
    return d


@pytest.fixture(scope="module")
def engine(server):
    """The engine here (not in the server): the same DiT file and text encoder with ComfyUI's tokenizer."""
    from zimage_core.checkpoints import load_dit
    from zimage_core.text_encoder import TextEncoder

    m = server.models
    dit = load_dit(m / "diffusion_models" / TURBO, dtype="fp32").eval()
    te = TextEncoder.load(
        m / "text_encoders" / "qwen_3_4b.safetensors",
        comfy_tokenizer_dir=Path(COMFYUI) / "comfy" / "text_encoders" / "qwen25_tokenizer",
    )
    return dit, te


def engine_latent(engine, sigmas: torch.Tensor) -> torch.Tensor:
    """Our sampler (the engine's model function and Euler loop) given ``sigmas``, in raw Flux-VAE space."""
    from zimage_core.denoiser import Denoiser
    from zimage_core.sampling import initial_noise, sample
    from zimage_core.vae import to_raw_space

    dit, te = engine
    cap = te.encode([TEXT])[0].float()
    h, w = H // 8, W // 8
    with torch.inference_mode():
        x = sample(Denoiser(dit, [cap], None, (h, w)), initial_noise((1, 16, h, w), SEED), sigmas, "euler")
    return to_raw_space(x)


def probe(server, g: Graph | None = None, **inputs) -> list[dict]:
    """What ComfyUI has loaded, from the test-only probe node (in ``g``; ``after``: a LATENT to wait for, ``model``:
    entries of that MODEL's slot get ``this``)."""
    g = g or Graph()
    nid = g("ZImageTestLoadedModels", **inputs)
    h = g.run(server)
    return json.loads(h["outputs"][nid]["text"][0])


# ---------------------------------------------------------------------------------------------
def test_core_samplers_and_schedulers_draw_our_samplers_image(server, engine):
    from zimage_core.schedules import comfy_simple_sigmas, flow_sigmas

    g = Graph()
    model = loader(g)
    pos, neg = text_encode(g, TEXT), text_encode(g, "blurry, low quality")
    latent = g("EmptySD3LatentImage", width=W, height=H, batch_size=1)
    core = g("ZImageToCoreModel", model=[model, 0])
    flow = manual_sigmas(g, flow_sigmas(STEPS, 3.0))
    g.save("ours", our_sampler(g, model, pos, latent))
    g.save("custom", custom(g, g("BasicGuider", model=[core, 0], conditioning=[pos, 0]), flow, latent))
    ks = g(
        "KSampler",
        model=[core, 0],
        seed=SEED,
        steps=STEPS,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        positive=[pos, 0],
        negative=[neg, 0],
        latent_image=[latent, 0],
        denoise=1.0,
    )
    g.save("ksampler", ks)
    aura = g("ModelSamplingAuraFlow", model=[core, 0], shift=7.0)
    sched = g("BasicScheduler", model=[aura, 0], scheduler="simple", steps=STEPS, denoise=1.0)
    g.save("aura7", custom(g, g("BasicGuider", model=[aura, 0], conditioning=[pos, 0]), sched, latent))
    # guidance (Base-style): our sampler's CFG and core CFGGuider, both with our negative conditioning
    g.save("ours_cfg", our_sampler(g, model, pos, latent, cfg=3.0, negative=neg))
    cfg_guider = g("CFGGuider", model=[core, 0], positive=[pos, 0], negative=[neg, 0], cfg=3.0)
    g.save("custom_cfg", custom(g, cfg_guider, flow, latent))
    out = g.latents(server, g.run(server))

    assert out["ours"].shape == (1, 16, H // 8, W // 8) and out["ours"].std() > 0.1
    report = {
        "SamplerCustomAdvanced(flow sigmas) vs Z-Image Sampler": close(out["custom"], out["ours"]),
        "CFGGuider 3 vs Z-Image Sampler cfg 3": close(out["custom_cfg"], out["ours_cfg"]),
        "KSampler euler/simple vs engine(simple sigmas)": close(
            out["ksampler"], engine_latent(engine, comfy_simple_sigmas(STEPS, 3.0))
        ),
        "AuraFlow 7 + BasicScheduler vs engine(simple, shift 7)": close(
            out["aura7"], engine_latent(engine, comfy_simple_sigmas(STEPS, 7.0))
        ),
    }
    print(report)
    assert (out["aura7"] - out["ksampler"]).abs().max() > 1e-2  # the shift really changed the schedule
    assert (out["ours_cfg"] - out["ours"]).abs().max() > 1e-2


def test_core_lora_loader_changes_the_image_as_ours_does(server):
    from zimage_core.schedules import flow_sigmas

    g = Graph()
    pos = text_encode(g, TEXT)
    latent = g("EmptySD3LatentImage", width=W, height=H, batch_size=1)
    flow = manual_sigmas(g, flow_sigmas(STEPS, 3.0))
    lora = dict(lora_name="style_lora.safetensors", strength=2.0)

    def sample_core(model_node, tag):
        g.save(tag, custom(g, g("BasicGuider", model=[model_node, 0], conditioning=[pos, 0]), flow, latent))

    full = loader(g)
    g.save("base", our_sampler(g, full, pos, latent))
    ours_lora = g("ZImageLoraLoader", model=[full, 0], **lora)
    g.save("ours", our_sampler(g, ours_lora, pos, latent))
    sample_core(g("ZImageToCoreModel", model=[ours_lora, 0]), "converted")
    core = g("ZImageToCoreModel", model=[full, 0])
    sample_core(g("LoraLoaderModelOnly", model=[core, 0], lora_name=lora["lora_name"], strength_model=2.0), "core")
    # block swap: the streamed blocks get ComfyUI's patches in host memory
    swap = g("ZImageToCoreModel", model=[loader(g, memory_mode="block-swap", swap_blocks=2), 0])
    sample_core(g("LoraLoaderModelOnly", model=[swap, 0], lora_name=lora["lora_name"], strength_model=2.0), "swap")
    # quantized: our LoRA loader before the converter (runtime side paths of the engine)
    q_lora = g("ZImageLoraLoader", model=[loader(g, quant="int8"), 0], **lora)
    g.save("q_ours", our_sampler(g, q_lora, pos, latent))
    sample_core(g("ZImageToCoreModel", model=[q_lora, 0]), "q_converted")
    out = g.latents(server, g.run(server))

    assert (out["ours"] - out["base"]).abs().max() > 0.05  # the LoRA does something
    report = {
        "our LoRA loader -> converter": close(out["converted"], out["ours"]),
        "LoraLoaderModelOnly": close(out["core"], out["ours"]),
        "LoraLoaderModelOnly, block-swap": close(out["swap"], out["ours"]),
        "int8, our LoRA loader -> converter": close(out["q_converted"], out["q_ours"]),
    }
    print(report)
    # after all that, the plain model is still the plain model (no view's LoRA left in the shared weights)
    g2 = Graph()
    model = loader(g2)
    pos2 = text_encode(g2, TEXT)
    lat2 = g2("EmptySD3LatentImage", width=W, height=H, batch_size=1)
    g2.save("base", our_sampler(g2, model, pos2, lat2))
    g2.save(
        "core",
        custom(
            g2,
            g2("BasicGuider", model=[g2("ZImageToCoreModel", model=[model, 0]), 0], conditioning=[pos2, 0]),
            manual_sigmas(g2, flow_sigmas(STEPS, 3.0)),
            lat2,
        ),
    )
    again = g2.latents(server, g2.run(server))
    assert torch.equal(again["base"], out["base"])
    close(again["core"], out["base"])


def test_core_lora_on_a_quantized_bridged_model_is_one_clear_error(server):
    g = Graph()
    core = g("ZImageToCoreModel", model=[loader(g, quant="int8"), 0])
    lora = g("LoraLoaderModelOnly", model=[core, 0], lora_name="style_lora.safetensors", strength_model=1.0)
    pos = text_encode(g, TEXT)
    latent = g("EmptySD3LatentImage", width=W, height=H, batch_size=1)
    from zimage_core.schedules import flow_sigmas

    g.save(
        "x",
        custom(g, g("BasicGuider", model=[lora, 0], conditioning=[pos, 0]), manual_sigmas(g, flow_sigmas(2)), latent),
    )
    h = server.run(g.prompt)
    (err,) = messages(h, "execution_error")
    assert err["node_type"] == "LoraLoaderModelOnly"
    assert "quantized (int8)" in err["exception_message"] and "Z-Image LoRA Loader" in err["exception_message"]


def test_edit_conditioning_samples_the_same_through_the_bridge(server):
    from zimage_core.schedules import flow_sigmas

    g = Graph()
    te = g("ZImageTextEncoderLoader", text_encoder_name="qwen_3_4b.safetensors", weight_dtype="fp32", quant="none")
    vae = g("VAELoader", vae_name="ae.safetensors")
    vision = g("ZImageVisionLoader", vision_name="siglip2-so400m-patch16-naflex", weight_dtype="fp32")
    image = g("LoadImage", image="example.png")
    cond = g(
        "ZImageEditConditioning",
        text_encoder=[te, 0],
        vae=[vae, 0],
        image1=[image, 0],
        text="make it night",
        negative_text="",
        max_length=512,
        vision=[vision, 0],
    )
    omni = loader(g, OMNI)
    g.save("ours", our_sampler(g, omni, [cond, 0], [cond, 2], cfg=3.0, negative=[cond, 1]))
    guider = g(
        "CFGGuider", model=[g("ZImageToCoreModel", model=[omni, 0]), 0], positive=[cond, 0], negative=[cond, 1], cfg=3.0
    )
    g.save("bridged", custom(g, guider, manual_sigmas(g, flow_sigmas(STEPS, 3.0)), [cond, 2]))
    out = g.latents(server, g.run(server))
    print({"edit, CFGGuider vs Z-Image Sampler": close(out["bridged"], out["ours"])})


def test_memory_manager_counts_the_real_size_and_unload_frees_it(server):
    from zimage_core.checkpoints import load_dit
    from zimage_core.memory import dit_stream_blocks

    dit = load_dit(server.models / "diffusion_models" / TURBO, dtype="fp32")
    total = sum(t.nbytes for t in dit.state_dict().values())
    streamed = sum(t.nbytes for b in dit_stream_blocks(dit, 2) for t in b.state_dict().values())
    found = {}
    for mode, kw in (("full", {}), ("block-swap:2", {"memory_mode": "block-swap", "swap_blocks": 2})):
        g = Graph()
        model = loader(g, **kw)
        pos = text_encode(g, TEXT)
        latent = g("EmptySD3LatentImage", width=W, height=H, batch_size=1)
        ours = our_sampler(g, model, pos, latent)  # our sampler first, then core KSampler on the same slot
        core = g("ZImageToCoreModel", model=[model, 0])
        ks = g(
            "KSampler",
            model=[core, 0],
            seed=SEED,
            steps=2,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            positive=[pos, 0],
            negative=[pos, 0],
            latent_image=[ours, 0],
            denoise=1.0,
        )
        entries = [e for e in probe(server, g, after=[ks, 0], model=[core, 0]) if e["this"]]
        assert len(entries) == 1  # one registration per loaded DiT: our sampler and core KSampler share it
        (e,) = entries
        assert e["class"] == "Lumina2" and e["mode"] == mode
        want = (total if mode == "full" else total - streamed) + e["sampling_bytes"]
        assert e["memory"] == want and e["loaded"] == want
        found[mode] = e["memory"]
    assert found["block-swap:2"] < found["full"]
    # "Unload models" (the UI's button posts this): ComfyUI unloads the bridged models
    assert server.post("/free", {"unload_models": True})[0] == 200
    for _ in range(20):
        left = [e for e in probe(server) if e["slot"] is not None]
        if not left:
            break
        time.sleep(0.5)
    assert left == []
    print({"registered bytes": found, "DiT bytes": total, "streamed bytes": streamed})


def test_diffusion_model_wrappers_run_around_the_bridged_forward(server):
    """EasyCache registers a DIFFUSION_MODEL wrapper (as NextDiT runs it): with a high threshold it skips steps by
    returning cached outputs instead of calling our forward, which only works if the forward goes through it."""
    g = Graph()
    core = g("ZImageToCoreModel", model=[loader(g), 0])
    cached = g("EasyCache", model=[core, 0], reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=True)
    pos = text_encode(g, TEXT)
    latent = g("EmptySD3LatentImage", width=W, height=H, batch_size=1)
    ks = g(
        "KSampler",
        model=[cached, 0],
        seed=SEED + 1,
        steps=8,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        positive=[pos, 0],
        negative=[pos, 0],
        latent_image=[latent, 0],
        denoise=1.0,
    )
    g.save("x", ks)
    out = g.latents(server, g.run(server))["x"]
    assert torch.isfinite(out).all()
    skipped = [line for line in server.log.read_text().splitlines() if "EasyCache - skipped" in line]
    assert skipped and not skipped[-1].split("skipped ")[1].startswith("0/"), skipped[-1:]
