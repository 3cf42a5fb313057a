"""The ControlNet workflow in a real ComfyUI: core Canny -> Z-Image ControlNet Loader (models/model_patches) / Apply ->
Z-Image Sampler gives the CLI's ``--controlnet`` image for the same edge map, and *Unload models* frees the ControlNet
with the rest (it is registered with ComfyUI's memory management)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.comfyui.harness import COMFYUI, ROOT, H, W, messages, node_of, requires_comfyui, to_api

pytestmark = requires_comfyui


def _image(server, h: dict, node: str, name: str) -> Path:
    img = h["outputs"][node]["images"][0]
    path = server.tmp / name
    path.write_bytes(server.get(f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type=output"))
    return path


def test_controlnet_workflow_image_equals_the_cli(server):
    from tests.factories.comfy import CONTROLNET_NAME
    from zimage_core.cli import main as cli_main

    prompt = to_api(json.loads((ROOT / "workflows" / "zimage_controlnet.json").read_text()), server.object_info)
    prompt[node_of(prompt, "EmptySD3LatentImage")]["inputs"].update(width=W, height=H)
    canny = node_of(prompt, "Canny")
    prompt["900"] = {"class_type": "SaveImage", "inputs": {"images": [canny, 0], "filename_prefix": "edges"}}
    h = server.run(prompt)
    assert h["status"]["status_str"] == "success", [
        (e["node_type"], e["exception_message"], e["traceback"][-3:]) for e in messages(h, "execution_error")
    ]
    edges = _image(server, h, "900", "edges.png")
    assert 0 < np.asarray(Image.open(edges)).mean() < 255  # the preprocessor found edges
    got = _image(server, h, node_of(prompt, "SaveImage"), "comfy_controlnet.png")
    s = prompt[node_of(prompt, "ZImageTurboSampler")]["inputs"]
    a = prompt[node_of(prompt, "ZImageControlNetApply")]["inputs"]
    m = server.models
    out = server.tmp / "cli_controlnet.png"
    rc = cli_main(
        [
            "generate",
            *("--transformer", str(m / "diffusion_models" / "z_image_turbo_bf16.safetensors")),
            *("--text-encoder", str(m / "text_encoders" / "qwen_3_4b.safetensors")),
            *("--vae", str(m / "vae" / "ae.safetensors")),
            *("--tokenizer", str(Path(COMFYUI) / "comfy" / "text_encoders" / "qwen25_tokenizer")),
            *("--prompt", prompt[node_of(prompt, "ZImageTextEncode")]["inputs"]["text"]),
            *("--width", str(W), "--height", str(H), "--steps", str(s["steps"]), "--seed", str(s["seed"])),
            *("--device", "cpu", "--out", str(out)),
            *("--controlnet", str(m / "model_patches" / CONTROLNET_NAME), "--control-image", str(edges)),
            *("--control-strength", str(a["strength"]), "--control-start", str(a["start_percent"])),
            *("--control-end", str(a["end_percent"])),
        ]
    )
    assert rc == 0
    comfy = np.asarray(Image.open(got).convert("RGB"), dtype=np.int16)
    cli = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert cli.std() > 2
    assert np.abs(comfy - cli).max() <= 1  # core SaveImage truncates where the CLI rounds
    # Unload models frees everything, the ControlNet included; the next run loads it again
    assert server.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
    s["seed"] = int(s["seed"]) + 1
    assert server.run(prompt)["status"]["status_str"] == "success"
    assert "could not register" not in server.log.read_text()


def test_bridged_controlnet_model_samples_our_samplers_image(server):
    """Z-Image ControlNet Apply -> Z-Image Model -> MODEL -> core SamplerCustomAdvanced (euler, the flow sigmas;
    BasicGuider and CFGGuider 3) draws Z-Image Sampler's latents for the same view, a start/end window included."""
    import torch

    from tests.comfyui.test_core_model import STEPS, TEXT, Graph, close, custom, loader, manual_sigmas, our_sampler
    from tests.comfyui.test_core_model import text_encode as encode
    from tests.factories.comfy import CONTROLNET_NAME
    from zimage_core.schedules import flow_sigmas

    g = Graph()
    model = loader(g)
    vae = g("VAELoader", vae_name="ae.safetensors")
    cn = g("ZImageControlNetLoader", controlnet_name=CONTROLNET_NAME, quant="none")
    img = g("LoadImage", image="example.png")
    apply = dict(controlnet=[cn, 0], vae=[vae, 0], image=[img, 0], strength=0.8)
    windowed = g("ZImageControlNetApply", model=[model, 0], **apply, start_percent=0.25, end_percent=0.75)
    pos, neg = encode(g, TEXT), encode(g, "blurry, low quality")
    latent = g("EmptySD3LatentImage", width=W, height=H, batch_size=1)
    core = g("ZImageToCoreModel", model=[windowed, 0])
    flow = manual_sigmas(g, flow_sigmas(STEPS, 3.0))
    g.save("plain", our_sampler(g, model, pos, latent))
    g.save("ours", our_sampler(g, windowed, pos, latent))
    g.save("custom", custom(g, g("BasicGuider", model=[core, 0], conditioning=[pos, 0]), flow, latent))
    g.save("ours_cfg", our_sampler(g, windowed, pos, latent, cfg=3.0, negative=neg))
    guider = g("CFGGuider", model=[core, 0], positive=[pos, 0], negative=[neg, 0], cfg=3.0)
    g.save("custom_cfg", custom(g, guider, flow, latent))
    out = g.latents(server, g.run(server))
    assert (out["ours"] - out["plain"]).abs().max() > 1e-2  # the ControlNet did something
    report = {
        "ControlNet, SamplerCustomAdvanced vs Z-Image Sampler": close(out["custom"], out["ours"]),
        "ControlNet, CFGGuider 3 vs Z-Image Sampler cfg 3": close(out["custom_cfg"], out["ours_cfg"]),
    }
    print(report)
    assert torch.isfinite(out["custom_cfg"]).all()
