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
